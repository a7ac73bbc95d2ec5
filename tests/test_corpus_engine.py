"""The corpus job with the real engine (the embedded default model, SmolLM2-135M, on the CPU)."""

import json

import numpy as np
import pytest

from llm2vec_fast.corpus import embed_corpus, read_embeddings, search
from llm2vec_fast.corpus.manifest import load_manifest

TEXTS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply on Monday.",
    "Photosynthesis turns light into chemical energy.",
    "He played the violin at the concert.",
    "Rain is expected tomorrow afternoon.",
    "The recipe needs two eggs and a cup of flour.",
    "Quantum computers use qubits.",
]
INSTRUCTION = "Represent the sentence for retrieval: "


@pytest.fixture(scope="module")
def default_model():
    from llm2vec_fast.default_model import default_model_path
    from llm2vec_fast.encoder import LLM2Vec

    path = default_model_path()
    return path, LLM2Vec.from_pretrained(path, pooling_mode="mean", max_length=64, device="cpu", dtype="float32")


def test_job_embeddings_equal_the_encoders_and_search_finds_the_text(default_model, tmp_path):
    path, model = default_model
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n"
                                               for i, t in enumerate(TEXTS)))
    summary = embed_corpus(tmp_path / "in.jsonl", tmp_path / "out", model=str(path), id_field="id",
                           instruction=INSTRUCTION, pooling="mean", max_length=64, normalize=True, device="cpu",
                           dtype="float32", batch_tokens=64, shard_rows=3, progress=False)
    assert (summary.embedded, summary.errors, summary.shards_total) == (len(TEXTS), 0, 3)
    ids, matrix = read_embeddings(tmp_path / "out")
    assert ids == [f"s{i}" for i in range(len(TEXTS))]
    expected = model.encode([[INSTRUCTION, t] for t in TEXTS], normalize_embeddings=True, show_progress_bar=False,
                            convert_to_numpy=True)
    assert matrix.shape == expected.shape == (len(TEXTS), model.embedding_dim)
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=2e-5)
    engine = load_manifest(tmp_path / "out")["engine"]
    assert engine["files"] and all(len(f["sha256"]) == 64 for f in engine["files"])
    assert (engine["pooling"], engine["max_length"], engine["normalize"]) == ("mean", 64, True)
    hits = search(tmp_path / "out", TEXTS[3], k=2, device="cpu")
    assert hits[0][0] == "s3" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
