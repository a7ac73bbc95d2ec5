"""llm2vec-fast index: build, search through it, staleness, update, batch queries, binary."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2vec_fast.cli import main
from llm2vec_fast.corpus import embed_corpus, read_embeddings
from llm2vec_fast.corpus.engine import HashEngine
from llm2vec_fast.corpus.index import (
    INDEX_FILES,
    IndexSettings,
    StaleIndexError,
    build_index,
    index_state,
    load_index,
)
from llm2vec_fast.corpus.manifest import load_manifest
from llm2vec_fast.corpus.nearest import search_many
from llm2vec_fast.corpus.writer import ShardWriter

DIM = 16
ROWS = 300


def _engine():
    return HashEngine(dim=DIM, max_length=64)


def _texts(n, start=0):
    return [f"passage {i}: {'lorem ipsum dolor'[: i % 17]}" for i in range(start, start + n)]


def _write(path, texts, start=0):
    lines = [json.dumps({"id": f"d{start + i}", "text": t}) for i, t in enumerate(texts)]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _embed(inputs, out, **options):
    options.setdefault("progress", False)
    options.setdefault("shard_rows", 64)
    return embed_corpus(inputs, out, engine=_engine(), id_field="id", **options)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    _write(folder / "in.jsonl", _texts(ROWS))
    _embed(folder / "in.jsonl", folder / "out")
    return folder / "out"


def _queries(count=20):
    return _texts(ROWS)[::15][:count]


def _search(folder, queries, k=10, **options):
    return search_many(folder, queries, k, engine=_engine(), **options)


def _recall(found, expected):
    hits = [len({i for i, _ in f} & {i for i, _ in e}) for f, e in zip(found, expected)]
    return sum(hits) / sum(len(e) for e in expected)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-pq"])
def test_each_kind_finds_what_the_exact_scan_finds(job, tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    for path in job.iterdir():  # a copy of the job, its own index
        if path.is_dir():
            (folder / path.name).mkdir()
            for shard in path.iterdir():
                (folder / path.name / shard.name).write_bytes(shard.read_bytes())
        elif path.name not in INDEX_FILES:
            (folder / path.name).write_bytes(path.read_bytes())
    report = build_index(folder, IndexSettings(kind=kind), progress=False)
    assert (report.kind, report.rows, report.added, report.rebuilt) == (kind, ROWS, ROWS, True)
    assert index_state(folder) == "fresh"
    exact = _search(folder, _queries(), exact=True)
    found = _search(folder, _queries())
    assert [hits[0][0] for hits in found] == [f"d{i}" for i in range(0, ROWS, 15)][:20]
    if kind == "flat":
        assert [[i for i, _ in hits] for hits in found] == [[i for i, _ in e] for e in exact]
        np.testing.assert_allclose(
            [[s for _, s in hits] for hits in found], [[s for _, s in e] for e in exact], atol=1e-5
        )
    else:
        assert _recall(found, exact) >= 0.9
    meta = json.loads((folder / "index.json").read_text())
    assert meta["settings"]["kind"] == kind and meta["rows"] == ROWS
    assert [s["sha256"] for s in meta["shards"]] == [
        s["sha256"] for s in load_manifest(folder)["shards"]
    ]
    assert len(read_embeddings(folder)[0]) == ROWS


def test_an_index_of_a_job_extended_later_is_refused_until_updated(tmp_path):
    _write(tmp_path / "a.jsonl", _texts(128))
    _embed(tmp_path / "a.jsonl", tmp_path / "out")
    build_index(tmp_path / "out", IndexSettings(kind="hnsw"), progress=False)
    _write(tmp_path / "b.jsonl", _texts(40, start=128), start=128)
    summary = _embed([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "out", overwrite=True)
    assert f"run `llm2vec-fast index {tmp_path / 'out'}`" in str(summary)
    with pytest.raises(
        StaleIndexError, match=r"stale: the index holds 128 rows.*llm2vec-fast index"
    ):
        _search(tmp_path / "out", _texts(1, start=130))
    assert _search(tmp_path / "out", _texts(1, start=130), exact=True)[0][0][0] == "d130"
    report = build_index(tmp_path / "out", progress=False)  # the two shards of a.jsonl unchanged
    assert (report.rows, report.added, report.rebuilt) == (168, 40, False)
    assert _search(tmp_path / "out", _texts(1, start=130))[0][0][0] == "d130"


def test_an_index_whose_shards_changed_is_rebuilt(tmp_path):
    _write(tmp_path / "a.jsonl", _texts(100))
    _embed(tmp_path / "a.jsonl", tmp_path / "out")
    build_index(tmp_path / "out", IndexSettings(kind="flat"), progress=False)
    _write(tmp_path / "a.jsonl", _texts(100, start=1))
    _embed(tmp_path / "a.jsonl", tmp_path / "out", overwrite=True)
    assert "shards [0, 1] changed" in index_state(tmp_path / "out")
    report = build_index(tmp_path / "out", progress=False)
    assert (report.rows, report.rebuilt) == (100, True)
    assert load_index(tmp_path / "out").ids[0] == "d0"


def test_an_index_of_an_unfinished_job_is_updated_once_the_job_is_resumed(tmp_path, monkeypatch):
    _write(tmp_path / "in.jsonl", _texts(ROWS))
    write = ShardWriter.write

    def stop_at_the_third_shard(self, shard):
        if shard.index == 2:
            raise RuntimeError("stopped")  # as a killed run would
        return write(self, shard)

    monkeypatch.setattr(ShardWriter, "write", stop_at_the_third_shard)
    with pytest.raises(RuntimeError, match="stopped"):
        _embed(tmp_path / "in.jsonl", tmp_path / "out")
    monkeypatch.setattr(ShardWriter, "write", write)
    with pytest.raises(RuntimeError, match="--allow-incomplete"):
        build_index(tmp_path / "out", progress=False)
    first = build_index(tmp_path / "out", allow_incomplete=True, progress=False)
    assert first.rows == 128
    _embed(tmp_path / "in.jsonl", tmp_path / "out", resume=True)
    assert "the index holds 128 rows" in index_state(tmp_path / "out")
    report = build_index(tmp_path / "out", progress=False)
    assert (report.rows, report.added, report.rebuilt) == (ROWS, ROWS - 128, False)
    found = _search(tmp_path / "out", _queries())
    assert _recall(found, _search(tmp_path / "out", _queries(), exact=True)) >= 0.9


@pytest.mark.parametrize("keep_float", [True, False])
def test_binary_index_is_hamming_then_rescored(tmp_path, keep_float):
    _write(tmp_path / "in.jsonl", _texts(ROWS))
    _embed(tmp_path / "in.jsonl", tmp_path / "out", quantize="ubinary", keep_float=keep_float)
    with pytest.raises(ValueError, match="binary job is indexed with kind flat or hnsw"):
        build_index(tmp_path / "out", IndexSettings(kind="ivf-pq"), progress=False)
    build_index(tmp_path / "out", IndexSettings(kind="flat"), progress=False)
    index = load_index(tmp_path / "out")
    assert index.binary and index.meta["metric"] == "hamming"
    assert index.rescore.dtype == (np.float32 if keep_float else np.uint8)
    # with every row a candidate, the rescoring alone ranks: the exact scan's order
    found = _search(tmp_path / "out", _queries(), rescore_multiplier=ROWS)
    exact = _search(tmp_path / "out", _queries(), exact=True)
    assert [[i for i, _ in hits] for hits in found] == [[i for i, _ in e] for e in exact]
    np.testing.assert_allclose(
        [[s for _, s in hits] for hits in found], [[s for _, s in e] for e in exact], atol=1e-5
    )
    two_stage = _search(tmp_path / "out", _queries(), rescore_multiplier=4)
    assert [hits[0][0] for hits in two_stage] == [hits[0][0] for hits in exact]
    build_index(tmp_path / "out", IndexSettings(kind="hnsw", rescore=False), progress=False)
    assert not (tmp_path / "out" / "index.rescore.npy").exists()
    hamming_only = _search(tmp_path / "out", _queries())  # scores: cosine of the sign vectors
    assert [hits[0] for hits in hamming_only] == [(hits[0][0], 1.0) for hits in exact]


def test_int8_job_index_holds_the_dequantized_rows(tmp_path):
    _write(tmp_path / "in.jsonl", _texts(ROWS))
    _embed(tmp_path / "in.jsonl", tmp_path / "out", quantize="int8")
    build_index(tmp_path / "out", IndexSettings(kind="flat"), progress=False)
    found = _search(tmp_path / "out", _queries())
    exact = _search(tmp_path / "out", _queries(), exact=True)  # also the dequantized rows
    assert [[i for i, _ in hits] for hits in found] == [[i for i, _ in e] for e in exact]


def test_float16_job_index_equals_its_exact_scan(tmp_path):
    _write(tmp_path / "in.jsonl", _texts(ROWS))
    _embed(tmp_path / "in.jsonl", tmp_path / "out", output_dtype="float16")
    build_index(tmp_path / "out", IndexSettings(kind="flat"), progress=False)
    found = _search(tmp_path / "out", _queries(), k=5)
    exact = _search(tmp_path / "out", _queries(), k=5, exact=True)
    assert [[i for i, _ in hits] for hits in found] == [[i for i, _ in e] for e in exact]


def test_cli_index_then_batch_queries_as_jsonl(job, tmp_path, capsys):
    out = tmp_path / "job"
    _write(tmp_path / "in.jsonl", _texts(ROWS))
    embed = ["embed", "--model", f"fake:dim={DIM}", "--input", str(tmp_path / "in.jsonl")]
    assert main(embed + ["--output", str(out), "--id-field", "id", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", str(out), "--kind", "hnsw", "--no-progress"]) == 0
    assert "hnsw index built, 300 rows" in capsys.readouterr().err
    assert main(["index", str(out), "--no-progress"]) == 0  # the options it was built with
    assert "hnsw index up to date, 300 rows" in capsys.readouterr().err
    queries = tmp_path / "queries.jsonl"
    texts = _queries(3)
    queries.write_text(
        json.dumps({"id": "q1", "query": texts[0]})
        + "\n"
        + json.dumps({"query": texts[1]})
        + "\n"
        + json.dumps({"id": 3, "query": texts[2], "instruction": "Find:"})
        + "\n"
    )
    assert main(["search", str(out), "--queries", str(queries), "-k", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("id") for line in lines] == ["q1", None, 3]
    assert [line["query"] for line in lines] == texts
    assert [r["rank"] for r in lines[0]["results"]] == [1, 2, 3]
    expected = search_many(out, texts[:2], 3, engine=_engine(), exact=True)
    for line, hits in zip(lines, expected):
        assert [r["id"] for r in line["results"]] == [i for i, _ in hits]
        assert [r["score"] for r in line["results"]] == pytest.approx(
            [s for _, s in hits], abs=1e-5
        )
    assert lines[2]["results"][0]["id"] == "d30"  # the instruction is not pooled
    assert (
        main(["search", str(out), "--queries", str(queries), "--output", str(tmp_path / "r")]) == 0
    )
    assert [json.loads(x) for x in (tmp_path / "r").read_text().splitlines()][0]["id"] == "q1"
    assert main(["search", str(out), "--query", texts[0], "-k", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[0] == "1" and first[2] == "d0" and float(first[1]) == pytest.approx(1.0)


def test_cli_bad_queries_file_names_its_line(job, tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "fine"}\n{"text": "wrong field"}\n')
    assert main(["search", str(job), "--queries", str(queries)]) == 2
    assert f"{queries}:2: expected" in capsys.readouterr().err
    assert main(["search", str(job), "--query", "x", "--output", str(tmp_path / "o")]) == 2
    assert "--output writes the results of --queries" in capsys.readouterr().err


def test_index_files_that_disagree_are_refused_naming_the_fix(job, tmp_path):
    build_index(job, IndexSettings(kind="flat"), progress=False)
    ids = job / "index.ids.parquet"
    saved = ids.read_bytes()
    pq.write_table(pa.table({"id": ["d0"]}), ids)  # as a build killed between two files leaves it
    try:
        with pytest.raises(StaleIndexError, match=f"interrupted.*llm2vec-fast index {job}"):
            load_index(job)
    finally:
        ids.write_bytes(saved)


def test_without_faiss_the_index_command_says_what_to_install(job, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(["index", str(job), "--no-progress"]) == 2
    assert "pip install 'llm2vec-fast[index]'" in capsys.readouterr().err
