"""The job's pipeline: reading and tokenization in worker processes give the in-process output,
errors from the workers surface, chunks travel as flat token arrays that the engines embed as they
embed lists, and the summary names the stage that bounds the job."""

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from llm2vec_fast.corpus import embed_corpus, read_embeddings, read_errors
from llm2vec_fast.corpus.engine import HashEngine, load_engine
from llm2vec_fast.corpus.inputs import InputError
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.manifest import load_manifest
from llm2vec_fast.corpus.rows import Row
from llm2vec_fast.corpus.tokens import NO_TOKENS, Tokens, tokenize_rows
from llm2vec_fast.corpus.workers import TOKENIZE_CHUNK, worker_tokenizer

TINY_LLAMA = Path(__file__).parent / "data" / "llm2vec_reference" / "llama"


class SlowTokenizer(HashEngine):
    def tokenize(self, texts):
        time.sleep(0.02 * len(texts) / 16)
        return super().tokenize(texts)


class FailingTokenizer(HashEngine):
    def tokenize(self, texts):
        if any("poison" in text for text in texts):
            raise ValueError("this tokenizer refuses poison")
        return super().tokenize(texts)


def _corpus(path: Path, rows: int) -> Path:
    lines = []
    for i in range(rows):
        if i % 97 == 3:
            lines.append('{"id": "broken", ')
        elif i % 89 == 7:
            lines.append(json.dumps({"id": f"d{i}", "text": " "}))
        elif i % 83 == 11:
            lines.append(json.dumps({"id": "d0", "text": "a repeated id"}))
        else:
            lines.append(json.dumps({"id": f"d{i}", "text": f"text {i} " + "ab " * (i % 13)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _embed(corpus, out, engine=None, **options):
    return embed_corpus(
        corpus,
        out,
        engine=engine or HashEngine(dim=8, max_length=64),
        id_field="id",
        progress=False,
        **options,
    )


def test_worker_processes_write_exactly_the_in_process_shards(tmp_path):
    corpus = _corpus(tmp_path / "in.jsonl", 1500)  # shards of several tokenizer chunks
    shard_rows = 2 * TOKENIZE_CHUNK + 88
    in_process = _embed(corpus, tmp_path / "threads", workers=0, shard_rows=shard_rows)
    workers = _embed(corpus, tmp_path / "workers", workers=2, shard_rows=shard_rows)
    assert (workers.embedded, workers.errors) == (in_process.embedded, in_process.errors)
    assert in_process.errors > 20
    ids, matrix = read_embeddings(tmp_path / "workers")
    expected_ids, expected = read_embeddings(tmp_path / "threads")
    assert ids == expected_ids
    np.testing.assert_array_equal(matrix, expected)
    assert read_errors(tmp_path / "workers") == read_errors(tmp_path / "threads")
    assert [s["sha256"] for s in load_manifest(tmp_path / "workers")["shards"]] == [
        s["sha256"] for s in load_manifest(tmp_path / "threads")["shards"]
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_errors_of_the_reader_and_of_a_tokenizer_are_raised(tmp_path, workers):
    (tmp_path / "in.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(InputError, match="text"):
        _embed(tmp_path / "in.csv", tmp_path / "csv", workers=workers)
    (tmp_path / "in.txt").write_text("fine\npoison\n")
    with pytest.raises(ValueError, match="refuses poison"):
        embed_corpus(
            tmp_path / "in.txt",
            tmp_path / "txt",
            engine=FailingTokenizer(dim=8),
            workers=workers,
            progress=False,
        )


@pytest.mark.parametrize("workers", [0, 1])
def test_the_summary_names_compute_for_a_slow_engine(tmp_path, workers):
    corpus = _corpus(tmp_path / "in.jsonl", 200)
    summary = _embed(
        corpus, tmp_path / "out", HashEngine(dim=8, delay=0.15), workers=workers, shard_rows=40
    )
    assert summary.bound == "compute", summary.busy
    assert "bound by: compute" in str(summary)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_summary_names_tokenize_for_a_slow_tokenizer(tmp_path, workers):
    corpus = _corpus(tmp_path / "in.jsonl", 600)
    summary = _embed(corpus, tmp_path / "out", SlowTokenizer(dim=8), workers=workers)
    assert summary.bound == "tokenize", summary.busy
    assert summary.busy["tokenize"] > 0.5


def test_workers_option_is_checked_and_reaches_the_job(tmp_path):
    from llm2vec_fast.cli import build_parser

    with pytest.raises(ValueError, match="workers must be >= 0"):
        JobSettings(workers=-1)
    args = build_parser().parse_args(["embed", "--input", "a", "--output", "b", "--workers", "0"])
    assert args.workers == 0
    assert build_parser().parse_args(["embed", "--input", "a", "--output", "b"]).workers is None
    assert JobSettings().workers is None


@pytest.fixture(scope="module")
def tiny_engine():
    return load_engine(str(TINY_LLAMA), device="cpu", dtype="float32")


def test_a_worker_tokenizes_as_the_real_engine_does(tiny_engine):
    engine = tiny_engine
    tokenizer = pickle.loads(pickle.dumps(worker_tokenizer(engine)))
    texts = ["a short text", ("an instruction:", "with a text"), "long " * 600]
    assert [vars(item) for item in tokenizer.tokenize(texts)] == [
        vars(item) for item in engine.tokenize(texts)
    ]


def _rows(texts):
    """Rows of in.txt, None standing for a row the reader found bad."""
    return [
        Row(i, "in.txt", i + 1, f"r{i}", text, "bad row" if text is None else None)
        for i, text in enumerate(texts)
    ]


def test_tokenized_rows_keep_row_order_and_turn_texts_with_nothing_to_pool_into_errors():
    engine = HashEngine(dim=8, max_length=16)
    texts = ["abc", None, ("i" * 16, "all instruction"), "", "x" * 20, ("ab", "cd"), None]
    chunk = tokenize_rows(engine, _rows(texts), "truncate", "16 tokens")
    assert chunk.ids == ["r0", "r4", "r5"]
    assert [(e["id"], e["line"], e["reason"]) for e in chunk.errors] == [
        ("r1", 2, "bad row"),
        ("r2", 3, NO_TOKENS),
        ("r3", 4, NO_TOKENS),
        ("r6", 7, "bad row"),
    ]
    expected = engine.tokenize(["abc", "x" * 20, ("ab", "cd")])
    assert chunk.tokens.ids.dtype == np.int32 and chunk.tokens.offsets.tolist() == [0, 3, 19, 23]
    assert [
        (item.input_ids.tolist(), item.pool_mask.tolist(), item.truncated)
        for item in chunk.tokens.items()
    ] == [(item.input_ids, item.pool_mask, item.truncated) for item in expected]
    assert chunk.tokens.truncated.tolist() == [False, True, False]


def test_on_long_error_names_the_first_truncated_row_of_a_chunk():
    rows = _rows(["short", None, "y" * 9, "z" * 9])
    with pytest.raises(InputError, match=r"^in\.txt:3: text is longer than max_length=8 tokens"):
        tokenize_rows(HashEngine(dim=4, max_length=8), rows, "error", "max_length=8 tokens")


def test_tokens_select_and_count_pooled_tokens_of_empty_and_full_texts():
    items = HashEngine(dim=4).tokenize(["", ("ab", "c"), "de", ("xyz", "")])
    tokens = Tokens.from_items(items)
    assert tokens.pooled_counts().tolist() == [0, 1, 2, 0]
    kept = tokens.select(np.array([False, True, True, False]))
    assert (kept.ids.tolist(), kept.offsets.tolist()) == ([97, 98, 99, 100, 101], [0, 3, 5])
    assert kept.pool_mask.tolist() == [False, False, True, True, True]
    with pytest.raises(OverflowError):
        Tokens.from_items([type(items[0])([2**31], [True])])


@pytest.mark.parametrize("engine", ["fake", "tiny llama"])
def test_engines_embed_flat_token_views_as_they_embed_lists(engine, tiny_engine):
    engine = tiny_engine if engine == "tiny llama" else HashEngine(dim=8, max_length=64)
    texts = ["a short text", ("an instruction:", "with a text"), "long " * 40, "x"]
    items = engine.tokenize(texts)
    views = Tokens.from_items(items).items()
    assert isinstance(views[0].input_ids, np.ndarray)
    np.testing.assert_array_equal(engine.embed(views), engine.embed(items))
