"""The corpus job with the real engine (the embedded default model, SmolLM2-135M, on the CPU)."""

import json

import numpy as np
import pytest

from llm2vec_fast.corpus import embed_corpus, read_embeddings, search
from llm2vec_fast.corpus.engine import LLM2VecEngine, load_engine
from llm2vec_fast.corpus.manifest import load_manifest
from llm2vec_fast.corpus.nearest import engine_for_job

TEXTS = [
    "The cat sat on the mat.",
    "Stock markets fell sharply on Monday.",
    "Photosynthesis turns light into chemical energy.",
    "Rain is expected tomorrow.",
    "Quantum computers use qubits.",
]
INSTRUCTION = "Represent the sentence for retrieval: "


def test_job_embeddings_equal_the_encoders_and_search_reloads_the_model(tmp_path, default_model_folder):
    engine = load_engine(str(default_model_folder), pooling="mean", max_length=64, device="cpu", dtype="float32",
                         normalize=True)
    assert isinstance(engine, LLM2VecEngine)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n"
                                               for i, t in enumerate(TEXTS)))
    summary = embed_corpus(tmp_path / "in.jsonl", tmp_path / "out", engine=engine, id_field="id",
                           instruction=INSTRUCTION, batch_tokens=48, shard_rows=2, progress=False)
    assert (summary.embedded, summary.errors, summary.shards_total) == (len(TEXTS), 0, 3)
    ids, matrix = read_embeddings(tmp_path / "out")
    assert ids == [f"s{i}" for i in range(len(TEXTS))]
    expected = engine.model.encode([[INSTRUCTION, t] for t in TEXTS], normalize_embeddings=True,
                                   show_progress_bar=False, convert_to_numpy=True)
    assert matrix.shape == expected.shape == (len(TEXTS), engine.model.embedding_dim)
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=2e-5)
    described = load_manifest(tmp_path / "out")["engine"]
    assert described["files"] and all(len(f["sha256"]) == 64 for f in described["files"])
    assert (described["pooling"], described["max_length"], described["normalize"]) == ("mean", 64, True)

    reloaded = engine_for_job(tmp_path / "out", device="cpu")
    assert reloaded.describe() == described
    hits = search(tmp_path / "out", TEXTS[2], k=2, engine=reloaded)
    assert hits[0][0] == "s2" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
