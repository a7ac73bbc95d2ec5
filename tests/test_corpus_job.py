"""The corpus job in-process with the hash engine: outputs, bad input, settings, reading, search."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm2vec_fast.corpus import embed_corpus, read_embeddings, read_errors, search, verify
from llm2vec_fast.corpus.cli import read_queries
from llm2vec_fast.corpus.engine import HashEngine
from llm2vec_fast.corpus.inputs import InputError
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.manifest import JobMismatchError, load_manifest
from llm2vec_fast.settings import DEFAULT_MAX_BATCH_TOKENS


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _embed(inputs, out, engine=None, **options):
    options.setdefault("progress", False)
    return embed_corpus(inputs, out, engine=engine or HashEngine(dim=8, max_length=64), **options)


def _expected(engine, texts):
    return engine.embed(engine.tokenize(texts))


def test_embeddings_are_the_engines_in_input_order_across_shards(tmp_path):
    texts = [f"document number {i} " + "x" * (i * 7 % 40) for i in range(53)]
    _jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    engine = HashEngine(dim=8, max_length=64)
    summary = _embed(
        tmp_path / "in.jsonl",
        tmp_path / "out",
        engine,
        id_field="id",
        shard_rows=10,
        max_batch_tokens=100,
    )
    assert (summary.rows_in, summary.embedded, summary.errors, summary.shards_total) == (
        53,
        53,
        0,
        6,
    )
    assert summary.complete
    ids, matrix = read_embeddings(tmp_path / "out")
    assert ids == [f"d{i}" for i in range(53)]
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, _expected(engine, texts))
    table = pq.read_table(tmp_path / "out" / "shards" / "shard-000000.parquet")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[8]"
    manifest = load_manifest(tmp_path / "out")
    assert [s["rows"] for s in manifest["shards"]][-1] == [50, 53]
    assert manifest["inputs"][0]["bytes"] == (tmp_path / "in.jsonl").stat().st_size
    verify(tmp_path / "out")


def test_every_bad_row_is_an_error_record_and_counts_add_up(tmp_path):
    _jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "text": "fine"},
            {"id": "b", "text": ""},
            {"id": "c", "text": " \t "},
            '{"id": "d", "text": ',
            {"id": "e"},
            {"text": "no id"},
            {"id": "a", "text": "same id again"},
            {"id": "f", "text": "y" * 100},
            {"id": "", "text": "empty id"},
        ],
    )
    (tmp_path / "bytes.jsonl").write_bytes(b'{"id": "g", "text": "bad \xfe"}\n')
    summary = _embed(tmp_path, tmp_path / "out", id_field="id", shard_rows=4)
    reasons = {(e["file"], e["line"]): e["reason"] for e in read_errors(tmp_path / "out")}
    assert reasons == {
        ("bytes.jsonl", 1): "invalid UTF-8",
        ("in.jsonl", 2): "empty or whitespace-only text",
        ("in.jsonl", 3): "empty or whitespace-only text",
        ("in.jsonl", 4): reasons[("in.jsonl", 4)],
        ("in.jsonl", 5): "missing field 'text'",
        ("in.jsonl", 6): "missing field 'id'",
        ("in.jsonl", 7): "duplicate id (first at in.jsonl:1)",
        ("in.jsonl", 9): "empty id",
    }
    assert reasons[("in.jsonl", 4)].startswith("malformed JSON")
    ids, _ = read_embeddings(tmp_path / "out")
    assert ids == ["a", "f"]
    assert (summary.rows_in, summary.embedded, summary.errors, summary.truncated) == (10, 2, 8, 1)
    assert "rows in 10 = embedded 2 + errors 8" in str(summary)


class _DroppingEngine(HashEngine):
    """A tokenizer that keeps no "x": a text of x's gets no tokens at all."""

    def tokenize(self, texts):
        return super().tokenize([t.replace("x", "") for t in texts])


def test_a_text_without_tokens_to_pool_is_an_error_record_not_a_zero_vector(tmp_path):
    (tmp_path / "in.txt").write_text("one\nxxx\ntwo\n")
    summary = _embed(
        tmp_path / "in.txt", tmp_path / "out", _DroppingEngine(dim=8, max_length=64), shard_rows=2
    )
    assert (summary.embedded, summary.errors) == (2, 1)
    assert read_embeddings(tmp_path / "out")[0] == ["in.txt:1", "in.txt:3"]
    assert read_errors(tmp_path / "out") == [
        {
            "id": "in.txt:2",
            "file": "in.txt",
            "line": 2,
            "reason": "the text has no tokens to pool (the tokenizer kept none of it)",
        }
    ]


def test_on_long_error_stops_naming_file_and_line(tmp_path):
    (tmp_path / "in.txt").write_text("short\n" + "z" * 65 + "\n")
    with pytest.raises(InputError, match=r"in\.txt:2: text is longer than max_length=64"):
        _embed(tmp_path / "in.txt", tmp_path / "out", on_long="error")


def test_instruction_is_given_to_the_engine_but_not_pooled(tmp_path):
    _jsonl(tmp_path / "in.jsonl", [{"text": "t1", "q": "find this:"}, {"text": "t2", "q": ""}])
    engine = HashEngine(dim=8, max_length=64)
    _embed(tmp_path / "in.jsonl", tmp_path / "field", engine, instruction_field="q")
    _embed(tmp_path / "in.jsonl", tmp_path / "fixed", engine, instruction="find this:")
    _, by_field = read_embeddings(tmp_path / "field")
    _, fixed = read_embeddings(tmp_path / "fixed")
    np.testing.assert_array_equal(by_field, _expected(engine, [("find this:", "t1"), "t2"]))
    np.testing.assert_array_equal(
        fixed, _expected(engine, [("find this:", "t1"), ("find this:", "t2")])
    )


def test_float16_output_limit_and_default_ids(tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"line {i}\n" for i in range(30)))
    engine = HashEngine(dim=8, max_length=64, normalize=True)
    summary = _embed(
        tmp_path / "in.txt",
        tmp_path / "out",
        engine,
        output_dtype="float16",
        limit=12,
        shard_rows=5,
    )
    ids, matrix = read_embeddings(tmp_path / "out")
    assert summary.rows_in == 12
    assert ids == [f"in.txt:{i}" for i in range(1, 13)]
    assert matrix.dtype == np.float16
    expected = _expected(engine, [f"line {i}" for i in range(12)])
    np.testing.assert_array_equal(matrix, expected.astype(np.float16))
    np.testing.assert_allclose(np.linalg.norm(matrix.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_other_settings_or_changed_input_refuse_to_resume_unless_overwrite(tmp_path):
    path = _jsonl(tmp_path / "in.jsonl", [{"text": f"t{i}"} for i in range(6)])
    _embed(path, tmp_path / "out", shard_rows=3)
    with pytest.raises(JobMismatchError, match="settings.shard_rows: 3 -> 2"):
        _embed(path, tmp_path / "out", shard_rows=2)
    with pytest.raises(JobMismatchError, match=r"engine.dim: 8 -> 4"):
        _embed(path, tmp_path / "out", HashEngine(dim=4, max_length=64), shard_rows=3)
    _jsonl(path, [{"text": f"T{i}"} for i in range(6)])
    with pytest.raises(JobMismatchError, match="input in.jsonl: content changed"):
        _embed(path, tmp_path / "out", shard_rows=3)
    (tmp_path / "more.jsonl").write_text('{"text": "more"}\n')
    with pytest.raises(JobMismatchError, match="input more.jsonl: new"):
        _embed(tmp_path, tmp_path / "out", shard_rows=3)
    with pytest.raises(ValueError, match="give one"):
        _embed(path, tmp_path / "out", shard_rows=3, resume=True, overwrite=True)
    summary = _embed(path, tmp_path / "out", shard_rows=3, overwrite=True)
    assert summary.complete and summary.shards_written == 2
    again = _embed(path, tmp_path / "out", shard_rows=3, resume=True)
    assert again.shards_written == 0 and again.embedded == 6
    with pytest.raises(FileNotFoundError, match="no embedding job to resume"):
        _embed(path, tmp_path / "new", resume=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(JobMismatchError, match="not empty"):
        _embed(path, tmp_path / "busy")


def test_a_job_stopped_before_its_first_shard_restarts_with_new_settings(tmp_path):
    (tmp_path / "in.txt").write_text("short\n" + "z" * 65 + "\n")
    with pytest.raises(InputError, match="longer than max_length"):
        _embed(tmp_path / "in.txt", tmp_path / "out", on_long="error")
    summary = _embed(tmp_path / "in.txt", tmp_path / "out")  # the advice of the error: truncate
    assert (summary.embedded, summary.truncated) == (2, 1)
    assert load_manifest(tmp_path / "out")["settings"]["on_long"] == "truncate"


def test_the_output_folder_inside_the_input_folder_is_not_read(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    first = _embed(tmp_path, tmp_path / "out")
    again = _embed(tmp_path, tmp_path / "out")  # its own manifest, shards and errors are no inputs
    other = _embed(tmp_path, tmp_path / "out2")  # nor are another job's
    assert first.embedded == again.embedded == other.embedded == 2 and again.shards_written == 0


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_delimited_and_parquet_inputs_end_to_end(tmp_path, fmt):
    import pyarrow as pa

    texts = [f"row {i} text" for i in range(7)]
    path = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"key": [f"k{i}" for i in range(7)], "body": texts}), path)
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"key{sep}body\n" + "".join(f"k{i}{sep}{t}\n" for i, t in enumerate(texts)))
    engine = HashEngine(dim=8, max_length=64)
    summary = _embed(
        path, tmp_path / "out", engine, id_field="key", text_field="body", shard_rows=3
    )
    ids, matrix = read_embeddings(tmp_path / "out")
    assert summary.embedded == 7 and ids == [f"k{i}" for i in range(7)]
    np.testing.assert_array_equal(matrix, _expected(engine, texts))
    assert "docs/s" in str(summary)


def test_read_embeddings_memory_mapped_and_search(tmp_path):
    texts = [f"sentence {i}" for i in range(40)]
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts))
    _embed(tmp_path / "in.txt", tmp_path / "out", shard_rows=7)
    ids, in_memory = read_embeddings(tmp_path / "out")
    mapped_ids, mapped = read_embeddings(tmp_path / "out", mmap=True)
    assert isinstance(mapped, np.memmap) and mapped_ids == ids
    np.testing.assert_array_equal(mapped, in_memory)
    assert read_embeddings(tmp_path / "out", mmap=True)[1].filename == mapped.filename
    elsewhere = read_embeddings(
        tmp_path / "out", mmap=True, matrix_path=tmp_path / "m" / "corpus.npy"
    )[1]
    # a read-only job folder needs this
    assert Path(elsewhere.filename) == tmp_path / "m" / "corpus.npy"
    np.testing.assert_array_equal(elsewhere, in_memory)
    (tmp_path / "out" / "embeddings.npy.tmp-99999").write_bytes(b"left by a killed reader")
    assert (
        _embed(tmp_path / "in.txt", tmp_path / "out", shard_rows=7, overwrite=True).embedded == 40
    )
    hits = search(tmp_path / "out", "sentence 17", k=3)
    assert hits[0][0] == "in.txt:18" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    normalized = in_memory / np.linalg.norm(in_memory, axis=1, keepdims=True)
    expected = np.argsort(-(normalized @ normalized[17]), kind="stable")[:3]
    assert [h[0] for h in hits] == [ids[i] for i in expected]


class _CallRecordingEngine(HashEngine):
    def __init__(self, **options):
        super().__init__(**options)
        self.calls: list[int] = []
        self.progress_seen: list[object] = []

    def embed(self, items, progress=None):
        self.calls.append(len(items))
        self.progress_seen.append(progress)
        return super().embed(items, progress)


def test_the_engine_gets_whole_shards_in_even_calls_of_at_most_embed_call_rows(
    tmp_path, monkeypatch
):
    """The engine packs its own batches: one call per shard lets a GPU run them without a wait
    for each batch's result; EMBED_CALL_ROWS bounds what one call holds on the device."""
    lines = ["" if i % 6 == 5 else f"line {i} " + "y" * (i % 9) for i in range(25)]  # 4 empty
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    engine = _CallRecordingEngine(dim=4, max_length=64)
    _embed(tmp_path / "in.txt", tmp_path / "whole", engine, shard_rows=10, max_batch_tokens=8)
    assert engine.calls == [9, 8, 4]  # shards of 10 rows, less their error rows
    monkeypatch.setattr("llm2vec_fast.corpus.pipeline.EMBED_CALL_ROWS", 4)
    engine = _CallRecordingEngine(dim=4, max_length=64)
    summary = _embed(
        tmp_path / "in.txt", tmp_path / "chunked", engine, shard_rows=10, progress=True
    )
    assert engine.calls == [3, 3, 3, 4, 4, 4]  # 9 rows in 3 even calls, not 4 + 4 + 1
    bar = engine.progress_seen[-1]
    assert all(seen is bar for seen in engine.progress_seen)
    # embedded rows counted once (by the engine), error rows by the job
    assert bar.n == summary.rows_in == 25
    np.testing.assert_array_equal(
        read_embeddings(tmp_path / "whole")[1], read_embeddings(tmp_path / "chunked")[1]
    )


def test_a_shard_of_error_rows_only_makes_no_engine_call(tmp_path):
    (tmp_path / "in.txt").write_text("a\nb\n\n \nc\n")
    engine = _CallRecordingEngine(dim=4, max_length=64)
    summary = _embed(tmp_path / "in.txt", tmp_path / "out", engine, shard_rows=2)
    assert engine.calls == [2, 1] and (summary.embedded, summary.errors, summary.shards_total) == (
        3,
        2,
        3,
    )


def _cli(*args) -> int:
    from llm2vec_fast.cli import main

    return main([str(a) for a in args])


def _cli_embed(inputs, out, *options) -> int:
    return _cli("embed", "--input", inputs, "--output", out, "--no-progress", *options)


def test_cli_embed_defaults_are_the_python_apis():
    from llm2vec_fast.cli import build_parser

    args = build_parser().parse_args(["embed", "--input", "in.txt", "--output", "out"])
    defaults = JobSettings()
    assert args.max_batch_tokens == defaults.max_batch_tokens == DEFAULT_MAX_BATCH_TOKENS
    for name in [
        "model",
        "id_field",
        "text_field",
        "instruction",
        "instruction_field",
        "pooling_mode",
        "max_length",
        "normalize",
        "causal",
        "cuda_graphs",
        "dtype",
        "output_dtype",
        "device",
        "limit",
        "resume",
        "overwrite",
        "on_long",
        "shard_rows",
    ]:
        assert getattr(args, name) == getattr(defaults, name), name
    assert tuple(args.adapter) == defaults.adapters and args.no_progress is not defaults.progress


def test_cli_pooling_mode_choices_are_the_kernels():
    from llm2vec_fast.corpus.cli import POOLING_MODES
    from llm2vec_fast.kernels import POOLING_MODES as KERNEL_POOLING_MODES

    assert POOLING_MODES == KERNEL_POOLING_MODES


def _recording_load_engine(monkeypatch) -> list:
    calls = []

    def load_engine(model, adapters=(), **options):
        calls.append((model, tuple(adapters), options))
        return HashEngine(dim=4, max_length=options["max_length"] or 64)

    monkeypatch.setattr("llm2vec_fast.corpus.job.load_engine", load_engine)
    return calls


def test_cli_model_options_reach_the_engine(tmp_path, monkeypatch):
    calls = _recording_load_engine(monkeypatch)
    (tmp_path / "in.txt").write_text("alpha\n")
    given = "--model m --adapter a1 --adapter a2 --pooling-mode last_token --max-length 32"
    given += " --max-batch-tokens 77 --normalize --causal --cuda-graphs --dtype float16"
    assert (
        _cli_embed(tmp_path / "in.txt", tmp_path / "given", *given.split(), "--device", "cpu") == 0
    )
    assert _cli_embed(tmp_path / "in.txt", tmp_path / "default") == 0
    options = dict(device="cpu", dtype="float16", normalize=True, causal=True, cuda_graphs=True)
    assert calls[0] == (
        "m",
        ("a1", "a2"),
        dict(
            pooling_mode="last_token",
            max_length=32,
            max_batch_tokens=77,
            doc_max_length=None,
            dim=None,
            prompt=None,
            prompt_name=None,
            **options,
        ),
    )
    assert calls[1] == (
        None,
        (),
        dict(
            pooling_mode=None,
            max_length=None,
            device=None,
            dtype=None,
            max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS,
            normalize=False,
            causal=False,
            cuda_graphs=False,
            doc_max_length=None,
            dim=None,
            prompt=None,
            prompt_name=None,
        ),
    )


def test_cli_row_options_choose_ids_texts_instructions_and_storage(tmp_path, capsys):
    rows = [{"key": f"k{i}", "body": f"text {i}", "q": "find:" if i % 2 else ""} for i in range(5)]
    _jsonl(tmp_path / "in.jsonl", rows)
    options = ["--model", "fake:dim=4", "--id-field", "key", "--text-field", "body"]
    options += ["--instruction-field", "q", "--output-dtype", "float16"]
    assert _cli_embed(tmp_path / "in.jsonl", tmp_path / "out", *options, "--limit", "4") == 0
    assert "rows in 4 = embedded 4 + errors 0" in capsys.readouterr().err
    ids, matrix = read_embeddings(tmp_path / "out")
    assert ids == ["k0", "k1", "k2", "k3"] and matrix.dtype == np.float16
    texts = ["text 0", ("find:", "text 1"), "text 2", ("find:", "text 3")]
    np.testing.assert_array_equal(matrix, _expected(HashEngine(dim=4), texts).astype(np.float16))
    fixed = ["--model", "fake:dim=4", "--text-field", "body", "--instruction", "find:"]
    assert _cli_embed(tmp_path / "in.jsonl", tmp_path / "fixed", *fixed) == 0
    ids, matrix = read_embeddings(tmp_path / "fixed")
    assert ids == [f"in.jsonl:{line}" for line in range(1, 6)]
    texts = [("find:", row["body"]) for row in rows]
    np.testing.assert_array_equal(matrix, _expected(HashEngine(dim=4), texts))


def test_cli_shard_rows_sets_the_unit_of_resume(tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"line {i}\n" for i in range(7)))
    options = ["--model", "fake:dim=4", "--shard-rows", "3"]
    assert _cli_embed(tmp_path / "in.txt", tmp_path / "out", *options) == 0
    shards = load_manifest(tmp_path / "out")["shards"]
    assert [shard["rows"] for shard in shards] == [[0, 3], [3, 6], [6, 7]]


def test_cli_on_long_error_exits_2_naming_the_line_and_truncate_counts_it(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("short\n" + "z" * 9 + "\n")
    model = ["--model", "fake:dim=4", "--max-length", "8"]
    assert _cli_embed(tmp_path / "in.txt", tmp_path / "out", *model, "--on-long", "error") == 2
    assert "in.txt:2: text is longer than max_length=8 tokens" in capsys.readouterr().err
    assert _cli_embed(tmp_path / "in.txt", tmp_path / "out", *model) == 0
    assert "truncated 1;" in capsys.readouterr().err


def test_cli_resume_insists_on_a_job_and_overwrite_starts_over(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("alpha\nbeta\ngamma\n")
    inputs, out = tmp_path / "in.txt", tmp_path / "out"
    assert _cli_embed(inputs, out, "--model", "fake:dim=4", "--resume") == 2
    assert "no embedding job to resume" in capsys.readouterr().err
    assert _cli_embed(inputs, out, "--model", "fake:dim=4") == 0
    assert _cli_embed(inputs, out, "--model", "fake:dim=5") == 2
    assert "engine.dim: 4 -> 5" in capsys.readouterr().err
    assert _cli_embed(inputs, out, "--model", "fake:dim=4", "--resume") == 0
    assert "shards written now 0" in capsys.readouterr().err
    assert _cli_embed(inputs, out, "--model", "fake:dim=5", "--overwrite") == 0
    assert read_embeddings(out)[1].shape == (3, 5)
    with pytest.raises(SystemExit):
        _cli_embed(inputs, out, "--model", "fake:dim=5", "--resume", "--overwrite")
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_shows_a_progress_bar_unless_no_progress(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("alpha\nbeta\n")
    command = ["embed", "--model", "fake:dim=4", "--input", tmp_path / "in.txt"]
    assert _cli(*command, "--output", tmp_path / "bar") == 0
    assert "embed: " in capsys.readouterr().err
    assert _cli(*command, "--output", tmp_path / "quiet", "--no-progress") == 0
    assert "embed: " not in capsys.readouterr().err


@pytest.fixture
def embedded_job(tmp_path):
    (tmp_path / "in.txt").write_text("alpha\nbeta\ngamma\n")
    assert _cli_embed(tmp_path / "in.txt", tmp_path / "out", "--model", "fake:dim=4") == 0
    return tmp_path / "out"


def test_cli_search_prints_rank_score_and_id_of_the_k_nearest(embedded_job, capsys):
    capsys.readouterr()
    assert _cli("search", embedded_job, "--query", "beta", "-k", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split() == ["1", "1.0000", "in.txt:2"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"query": "a"}\n\n{"query": \n', r"q\.jsonl:3: malformed JSON"),
        ('{"query": "a"}\n["a"]\n', r'q\.jsonl:2: expected \{"query": TEXT'),
        ('{"text": "a"}\n', r'q\.jsonl:1: expected \{"query": TEXT'),
        ('{"query": " "}\n', r"q\.jsonl:1: the query is empty"),
        ("\n\n", r"q\.jsonl holds no queries"),
    ],
)
def test_a_bad_queries_file_names_its_line(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_queries(str(path))


def test_cli_search_refuses_an_empty_query(embedded_job, capsys):
    assert _cli("search", embedded_job, "--query", "  ", "-k", "2") == 2  # not k rows at 0.0
    assert "the query is empty" in capsys.readouterr().err


def test_search_refuses_a_query_with_no_tokens_to_pool(embedded_job):
    with pytest.raises(ValueError, match="has no tokens to pool"):
        search(embedded_job, "xxx", engine=_DroppingEngine(dim=4, max_length=512))


def test_an_edit_that_keeps_the_size_is_caught_anywhere_in_the_file(tmp_path):
    path = tmp_path / "in.txt"
    lines = [f"line {i:07d}" for i in range(300_000)]  # 4 MB: the edit lies far from both ends
    path.write_text("\n".join(lines) + "\n")
    _embed(path, tmp_path / "out", shard_rows=100_000, limit=10)
    lines[150_000] = lines[150_000].replace("line", "LINE")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JobMismatchError, match="input in.txt: content changed"):
        _embed(path, tmp_path / "out", shard_rows=100_000, limit=10)


def test_a_foreign_manifest_is_never_deleted(tmp_path):
    (tmp_path / "in.txt").write_text("alpha\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my project"}')
    (out / "errors.jsonl").write_text("mine\n")
    with pytest.raises(ValueError, match="not a manifest of llm2vec-fast-embeddings"):
        _embed(tmp_path / "in.txt", out)
    assert (out / "manifest.json").read_text() == '{"name": "my project"}' and (
        out / "errors.jsonl"
    ).exists()


def test_a_relative_input_folder_still_skips_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "a.jsonl", [{"text": "alpha"}])
    (tmp_path / "data" / "out").mkdir()
    # an output folder without its manifest yet
    (tmp_path / "data" / "out" / "errors.jsonl").write_text("")
    from llm2vec_fast.corpus.inputs import discover_inputs

    assert [f.name for f in discover_inputs("data", output="data/out")] == ["a.jsonl"]


def test_an_input_fingerprint_of_an_older_version_is_named_as_such():
    from llm2vec_fast.corpus.manifest import identity_differences

    old = {"inputs": [{"path": "in.txt", "format": "text", "bytes": 6, "sample_sha256": "ab"}]}
    new = {"inputs": [{"path": "in.txt", "format": "text", "bytes": 6, "sha256": "cd"}]}
    assert identity_differences(old, new) == [
        "input in.txt: recorded by an older llm2vec-fast (sampled hash), cannot be compared"
    ]
