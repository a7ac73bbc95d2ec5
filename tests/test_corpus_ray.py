"""The Ray Data entry point: EmbedBatches by itself, then on a local Ray instance with two CPU
actors, against the single-process job (fake engine and the tiny reference Llama)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from llm2vec_fast.corpus import embed_corpus, read_embeddings, read_errors
from llm2vec_fast.corpus.ray_embed import EMPTY_TEXT, NO_TOKENS, EmbedBatches

TINY_LLAMA = Path(__file__).parent / "data" / "llm2vec_reference" / "llama"
TEXTS = [f"document {i}: " + "word " * (i % 7) for i in range(40)]


def _corpus(path: Path) -> Path:
    records = [{"id": f"d{i}", "text": text} for i, text in enumerate(TEXTS)]
    records[5]["text"] = "   "  # an error row, in both paths
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


class _FailingOnX(EmbedBatches):
    """An engine that fails on any batch holding a text with an "x"."""

    def __init__(self):
        super().__init__("fake:dim=4")
        embed = self.engine.embed

        def failing(items, progress=None):
            if any(ord("x") in item.input_ids for item in items):
                raise RuntimeError("cannot embed x")
            return embed(items, progress)

        self.engine.embed = failing


def test_bad_rows_become_error_values_and_the_rest_are_embedded():
    embed = _FailingOnX()
    out = embed(pa.table({"id": ["a", "b", "c", "d"], "text": ["fine", None, " ", "has x"]}))
    assert out.column_names == ["id", "text", "embedding", "error"]
    assert out.column("error").to_pylist() == [
        None,
        "missing text",
        EMPTY_TEXT,
        "RuntimeError: cannot embed x",
    ]
    vectors = out.column("embedding").to_pylist()
    assert vectors[1] is vectors[2] is vectors[3] is None
    expected = embed.engine.embed(embed.engine.tokenize(["fine"]))[0]
    np.testing.assert_array_equal(np.array(vectors[0], np.float32), expected)
    assert str(out.schema.field("embedding").type) == "fixed_size_list<element: float>[4]"


def test_a_text_with_no_tokens_to_pool_is_an_error_value():
    embed = EmbedBatches("fake:dim=4")
    embed.engine.tokenize = lambda texts: [
        type(item)(item.input_ids, [False] * len(item.input_ids))
        for item in type(embed.engine).tokenize(embed.engine, texts)
    ]
    out = embed({"text": np.array(["abc"])})
    assert out.column("error").to_pylist() == [NO_TOKENS]


@pytest.fixture(scope="module")
def local_ray():
    import ray  # the [ray] extra, in the test requirements

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _ray_embeddings(ray, corpus: Path, **options) -> tuple[dict, dict]:
    """Row id -> embedding and row id -> error, from two actors over batches of 8 rows."""
    dataset = ray.data.read_json(str(corpus)).map_batches(
        EmbedBatches,
        fn_constructor_kwargs=options,
        batch_format="pyarrow",
        batch_size=8,
        concurrency=2,
        num_cpus=0.5,  # two actors on one CPU: the other reads
    )
    rows = dataset.take_all()
    assert len(rows) == len(TEXTS)
    embedded = {r["id"]: np.asarray(r["embedding"], np.float32) for r in rows if not r["error"]}
    return embedded, {r["id"]: r["error"] for r in rows if r["error"]}


@pytest.mark.parametrize(
    "model, options",
    [("fake:dim=8", {}), (str(TINY_LLAMA), {"device": "cpu", "dtype": "float32"})],
    ids=["fake", "tiny-llama"],
)
def test_two_ray_actors_give_the_single_process_jobs_embeddings(
    local_ray, tmp_path, model, options
):
    corpus = _corpus(tmp_path / "in.jsonl")
    embed_corpus(corpus, tmp_path / "job", model=model, id_field="id", progress=False, **options)
    ids, matrix = read_embeddings(tmp_path / "job")
    embedded, errors = _ray_embeddings(local_ray, corpus, model=model, **options)
    assert sorted(embedded) == sorted(ids)
    np.testing.assert_allclose(np.stack([embedded[i] for i in ids]), matrix, rtol=1e-5, atol=1e-6)
    assert errors == {e["id"]: e["reason"] for e in read_errors(tmp_path / "job")}
