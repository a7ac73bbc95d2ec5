"""The corpus job with the real engine (the embedded default model, SmolLM2-135M, on the CPU)."""

import json
from pathlib import Path

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


def test_job_embeddings_equal_the_encoders_and_search_reloads_the_model(
    tmp_path, default_model_folder
):
    engine = load_engine(
        str(default_model_folder),
        pooling_mode="mean",
        max_length=64,
        device="cpu",
        dtype="float32",
        normalize=True,
    )
    assert isinstance(engine, LLM2VecEngine)
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    summary = embed_corpus(
        tmp_path / "in.jsonl",
        tmp_path / "out",
        engine=engine,
        id_field="id",
        instruction=INSTRUCTION,
        max_batch_tokens=48,
        shard_rows=2,
        progress=False,
    )
    assert (summary.embedded, summary.errors, summary.shards_total) == (len(TEXTS), 0, 3)
    ids, matrix = read_embeddings(tmp_path / "out")
    assert ids == [f"s{i}" for i in range(len(TEXTS))]
    expected = engine.model.encode(
        [[INSTRUCTION, t] for t in TEXTS],
        normalize_embeddings=True,
        show_progress_bar=False,
        convert_to_numpy=True,
    )
    assert matrix.shape == expected.shape == (len(TEXTS), engine.model.embedding_dim)
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=2e-5)
    described = load_manifest(tmp_path / "out")["engine"]
    assert described["files"] and all(len(f["sha256"]) == 64 for f in described["files"])
    assert (described["pooling"], described["max_length"], described["normalize"]) == (
        "mean",
        64,
        True,
    )

    reloaded = engine_for_job(tmp_path / "out", device="cpu")
    assert reloaded.describe() == described
    hits = search(tmp_path / "out", TEXTS[2], k=2, engine=reloaded)
    assert hits[0][0] == "s2" and hits[0][1] == pytest.approx(1.0, abs=1e-4)


def test_max_length_alone_decides_truncation_past_llm2vecs_400_token_word_cut(default_model_folder):
    """The Python API keeps llm2vec's doc_max_length=400 word rule; the job's --max-length does
    not."""
    text = " ".join(f"word{i}" for i in range(300))  # ~ 900 tokens
    engine = load_engine(str(default_model_folder), max_length=2048, device="cpu", dtype="float32")
    whole = engine.tokenize([text])[0]
    assert 400 < len(whole.input_ids) < 2048 and not whole.truncated
    cut = load_engine(
        str(default_model_folder), max_length=600, device="cpu", dtype="float32"
    ).tokenize([text])[0]
    assert len(cut.input_ids) == 600 and cut.truncated
    assert cut.input_ids == whole.input_ids[:600]  # its first tokens, no words dropped


def _tiny_corpus_job(tmp_path, name: str, **options) -> tuple[list[str], np.ndarray]:
    """A 300-line corpus (1-120 tokens a line) embedded with a tiny random Llama folder."""
    from model_helpers import VOCAB, save_tiny_folder, tiny_hf_model

    model = tmp_path / "model"
    if not model.exists():
        save_tiny_folder(
            tiny_hf_model("llama", seed=7), model
        )  # (qwen2 would reload its word-level
        # test tokenizer as Qwen2Tokenizer, which drops every word)
        rng = np.random.default_rng(3)
        lines = [
            " ".join(f"w{w}" for w in rng.integers(3, VOCAB, rng.integers(1, 121)))
            for _ in range(300)
        ]
        (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    embed_corpus(
        tmp_path / "in.txt",
        tmp_path / name,
        model=str(model),
        max_length=128,
        max_batch_tokens=1024,
        shard_rows=100,
        normalize=True,
        progress=False,
        **options,
    )
    return read_embeddings(tmp_path / name)


@pytest.mark.gpu
def test_gpu_job_equals_the_cpu_job_eager_and_with_cuda_graphs(tmp_path):
    """The job on a GPU (pinned host batches, asynchronous copies, Triton kernels; CUDA graphs on
    request) writes the CPU reference's embeddings."""
    ids, cpu = _tiny_corpus_job(tmp_path, "cpu", device="cpu", dtype="float32")
    # bf16 weights and activations: the CPU reference in bf16 gives a worst cosine of 0.9990 here
    for dtype, min_cosine in (("float32", 0.99999), ("bfloat16", 0.995)):
        for graphs in (False, True):
            gpu_ids, gpu = _tiny_corpus_job(
                tmp_path, f"cuda-{dtype}-{graphs}", device="cuda", dtype=dtype, cuda_graphs=graphs
            )
            assert gpu_ids == ids and gpu.shape == cpu.shape
            cosine = np.sum(gpu * cpu, axis=1)  # both normalized
            assert cosine.min() > min_cosine, (dtype, graphs, float(cosine.min()))


def test_a_job_recorded_with_llm2vecs_400_token_word_cut_resumes_and_searches_with_it(tmp_path):
    """Jobs written before --max-length alone decided recorded doc_max_length 400: rerunning the
    command continues with that rule (not a settings mismatch) and search embeds queries by it."""
    from llm2vec_fast.corpus.manifest import atomic_write_json

    _tiny_corpus_job(tmp_path, "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest["engine"]["doc_max_length"] == 128  # the job's max_length
    manifest["engine"]["doc_max_length"] = 400  # as an older version wrote it
    atomic_write_json(tmp_path / "out" / "manifest.json", manifest)
    ids, _ = _tiny_corpus_job(tmp_path, "out")  # the same command again: accepted, nothing to do
    assert len(ids) == 300
    assert load_manifest(tmp_path / "out")["engine"]["doc_max_length"] == 400
    assert engine_for_job(tmp_path / "out", device="cpu").describe()["doc_max_length"] == 400


def test_search_finds_the_model_of_a_job_embedded_with_a_relative_model_path(tmp_path, monkeypatch):
    """Model files are recorded resolved, and compared by content: a manifest that recorded them
    relative (as older versions did) still matches the same files."""
    from llm2vec_fast.corpus.manifest import atomic_write_json

    _tiny_corpus_job(tmp_path, "absolute")  # writes the tiny model folder and the corpus
    monkeypatch.chdir(tmp_path)
    embed_corpus(
        "in.txt",
        "relative",
        model="model",
        max_length=128,
        shard_rows=100,
        normalize=True,
        progress=False,
    )
    manifest = load_manifest(tmp_path / "relative")
    assert all(Path(f["path"]).is_absolute() for f in manifest["engine"]["files"])
    line = (tmp_path / "in.txt").read_text().splitlines()[6]
    hit = search(tmp_path / "relative", line, k=1)[0]
    assert hit[0] == "in.txt:7" and hit[1] == pytest.approx(1.0, abs=1e-4)
    for f in manifest["engine"]["files"]:
        f["path"] = str(Path(f["path"]).relative_to(tmp_path))  # as an older version recorded them
    atomic_write_json(tmp_path / "relative" / "manifest.json", manifest)
    monkeypatch.chdir(Path(__file__).parent)  # another working directory
    assert search(tmp_path / "relative", line, k=1)[0] == hit


def test_unset_pooling_and_max_length_come_from_llm2vec_config_and_max_length_alone_cuts(tmp_path):
    """As from_pretrained: the folder's llm2vec_config.json fills what the job does not give."""
    _tiny_corpus_job(tmp_path, "plain")  # writes the tiny model folder and the corpus
    (tmp_path / "model" / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "last_token", "max_length": 48, "doc_max_length": 20})
    )
    saved = embed_corpus(
        tmp_path / "in.txt", tmp_path / "saved", model=str(tmp_path / "model"), progress=False
    )
    engine = load_manifest(tmp_path / "saved")["engine"]
    assert (engine["pooling"], engine["max_length"], engine["doc_max_length"]) == (
        "last_token",
        48,
        48,
    )
    assert saved.truncated == sum(
        len(line.split()) > 48 for line in (tmp_path / "in.txt").read_text().splitlines()
    )
    given = load_engine(
        str(tmp_path / "model"), pooling_mode="mean", max_length=64, device="cpu"
    ).describe()
    assert (given["pooling"], given["max_length"], given["doc_max_length"]) == ("mean", 64, 64)


def test_a_rerun_without_pooling_or_max_length_continues_with_what_the_job_recorded(
    tmp_path, capsys
):
    _tiny_corpus_job(tmp_path, "plain")  # writes the tiny model folder and the corpus
    options = dict(model=str(tmp_path / "model"), shard_rows=100, limit=150)
    embed_corpus(
        tmp_path / "in.txt", tmp_path / "out", pooling_mode="last_token", max_length=64, **options
    )
    summary = embed_corpus(
        tmp_path / "in.txt", tmp_path / "out", **{**options, "limit": 150}
    )  # the same job
    assert summary.complete and summary.shards_written == 0
    assert (
        str(summary).splitlines()[0]
        == f"model {tmp_path / 'model'}: last_token pooling, max length 64, float32,"
        " bidirectional attention"
    )
    assert (
        "last_token pooling, max length 64" in capsys.readouterr().err
    )  # said before the work, too
