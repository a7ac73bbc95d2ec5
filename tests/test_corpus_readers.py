"""The corpus readers: every input format streamed with line numbers, bad rows as error records."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm2vec_fast.corpus.inputs import (
    Fields,
    InputError,
    discover_inputs,
    estimate_rows,
    read_rows,
)

DOCS = [("a1", "first document"), ("a2", "second, with a comma"), ("a3", 'third "quoted"')]


def _write(path, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS))
    elif fmt == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "text"])
            writer.writerows(DOCS)
    elif fmt == "tsv":  # plain tab-separated lines, quotes kept as they are
        path.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in DOCS))
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": [i for i, _ in DOCS], "text": [t for _, t in DOCS]}), path)
    elif fmt == "text":
        path.write_text("".join(t + "\n" for _, t in DOCS))


@pytest.mark.parametrize(
    "suffix,fmt",
    [
        (".jsonl", "jsonl"),
        (".csv", "csv"),
        (".tsv", "tsv"),
        (".parquet", "parquet"),
        (".txt", "text"),
    ],
)
def test_each_format_yields_every_row_with_its_line(tmp_path, suffix, fmt):
    path = tmp_path / f"docs{suffix}"
    _write(path, fmt)
    [file] = discover_inputs(path)
    assert file.format == fmt
    fields = Fields(id=None if fmt == "text" else "id")
    rows = list(read_rows(file, fields))
    assert [r.text for r in rows] == [t for _, t in DOCS]
    assert all(r.error is None for r in rows)
    if fmt != "text":
        assert [r.id for r in rows] == [i for i, _ in DOCS]
    first_line = 2 if fmt in ("csv", "tsv") else 1
    assert [r.line for r in rows] == list(range(first_line, first_line + len(DOCS)))
    assert estimate_rows(file) == len(DOCS)


def test_gzip_jsonl_and_csv_record_spanning_lines(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write('{"text": "zipped"}\n')
    (tmp_path / "b.csv").write_text('text\n"two\nlines"\nafter\n')
    files = discover_inputs(tmp_path)
    assert [f.name for f in files] == ["a.jsonl.gz", "b.csv"]
    assert [r.text for r in read_rows(files[0], Fields())] == ["zipped"]
    rows = list(read_rows(files[1], Fields()))
    assert [(r.line, r.text) for r in rows] == [(2, "two\nlines"), (4, "after")]


def test_discovery_sorts_folders_and_globs_and_skips_unknown_and_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b.txt", "a.jsonl", "sub/c.txt", ".hidden/d.txt", "notes.md"]:
        (tmp_path / name).write_text("x\n")
    assert [f.name for f in discover_inputs(tmp_path)] == ["a.jsonl", "b.txt", "sub/c.txt"]
    assert [f.name for f in discover_inputs(str(tmp_path / "*.txt"))] == ["b.txt"]
    with pytest.raises(InputError, match="unknown input format"):
        discover_inputs(tmp_path / "notes.md")
    with pytest.raises(InputError, match="no such file"):
        discover_inputs(tmp_path / "missing-*.jsonl")


def test_bad_jsonl_rows_become_error_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"id": 1, "text": "ok"}\n'
        b'{"id": 2, "text": "broken\n'
        b"\n"
        b'{"id": 3, "text": "caf\xe9"}\n'
        b'{"id": 4}\n'
        b'{"text": "no id"}\n'
        b'{"id": 6, "text": ["a list"]}\n'
        b"[1, 2]\n"
    )
    rows = list(read_rows(discover_inputs(path)[0], Fields(id="id")))
    assert [(r.line, r.error is None) for r in rows] == [
        (1, True),
        (2, False),
        (4, False),
        (5, False),
        (6, False),
        (7, False),
        (8, False),
    ]
    reasons = [r.error for r in rows[1:]]
    assert reasons[0].startswith("malformed JSON")
    assert reasons[1] == "invalid UTF-8"
    assert reasons[2] == "missing field 'text'"
    assert reasons[3] == "missing field 'id'"
    assert reasons[4] == "field 'text' holds a list, not a string"
    assert reasons[5] == "not a JSON object but a list"


def test_invalid_utf8_in_text_and_csv(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"good\nbad \xff byte\r\nlast")
    (tmp_path / "c.csv").write_bytes(b"text\nfine\n\xc3\x28 broken\n")
    text_rows = list(read_rows(discover_inputs(tmp_path / "t.txt")[0], Fields()))
    assert [(r.text, r.error) for r in text_rows] == [
        ("good", None),
        (None, "invalid UTF-8"),
        ("last", None),
    ]
    csv_rows = list(read_rows(discover_inputs(tmp_path / "c.csv")[0], Fields()))
    assert [(r.line, r.error) for r in csv_rows] == [(2, None), (3, "invalid UTF-8")]


def test_missing_column_stops_naming_the_file(tmp_path):
    (tmp_path / "c.csv").write_text("body\nhello\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"c\.csv:1: the header has no column 'text'"):
        list(read_rows(discover_inputs(tmp_path / "c.csv")[0], Fields()))
    with pytest.raises(InputError, match=r"p\.parquet: no column 'text'"):
        list(read_rows(discover_inputs(tmp_path / "p.parquet")[0], Fields()))
    (tmp_path / "t.txt").write_text("x\n")
    with pytest.raises(InputError, match="plain text has no fields"):
        read_rows(discover_inputs(tmp_path / "t.txt")[0], Fields(id="id"))


def test_byte_order_mark_is_dropped_and_json_arrays_are_refused(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufefftext\nhello\n".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "hi"}\n'.encode())
    (tmp_path / "array.json").write_text('[\n{"text": "a"}\n]\n')
    assert [r.text for r in read_rows(discover_inputs(tmp_path / "bom.csv")[0], Fields())] == [
        "hello"
    ]
    assert [r.text for r in read_rows(discover_inputs(tmp_path / "bom.jsonl")[0], Fields())] == [
        "hi"
    ]
    with pytest.raises(InputError, match=r"array\.json:1: a JSON array is not JSON Lines"):
        list(read_rows(discover_inputs(tmp_path / "array.json")[0], Fields()))


def test_csv_quote_left_open_stops_and_malformed_rows_are_error_rows(tmp_path):
    (tmp_path / "open.csv").write_text('id,text\nr1,fine\nr2,"never closed\nr3,b\nr4,c\n')
    with pytest.raises(
        InputError, match=r"open\.csv:3: a quoted field opened here is never closed"
    ):
        list(read_rows(discover_inputs(tmp_path / "open.csv")[0], Fields(id="id")))
    (tmp_path / "bad.csv").write_text(
        'id,text\nr1,"ok"x\nr2,b\nr3,c,extra\nr4\nr5,"two\nlines"\nr6,f\n'
    )
    rows = list(read_rows(discover_inputs(tmp_path / "bad.csv")[0], Fields(id="id")))
    assert [(r.line, r.id, r.error) for r in rows] == [
        (2, None, "malformed CSV: ',' expected after '\"'"),
        (3, "r2", None),
        (4, None, "3 fields where the header has 2"),
        (5, None, "1 fields where the header has 2"),
        (6, "r5", None),
        (8, "r6", None),
    ]


def test_texts_must_be_strings_ids_may_be_integers(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": 7, "text": "seven"}\n{"id": 8, "text": 5}\n{"id": 9.5, "text": "x"}\n'
        '{"id": true, "text": "x"}\n{"id": 10, "text": "half \\ud800 a pair"}\n'
    )
    rows = list(read_rows(discover_inputs(path)[0], Fields(id="id")))
    # a JSON escape can say that
    assert rows.pop().error == "field 'text' holds a lone surrogate (not valid Unicode)"
    assert [(r.id, r.text, r.error) for r in rows] == [
        ("7", "seven", None),
        ("8", None, "field 'text' holds a number, not a string"),
        (None, None, "field 'id' holds a number, not a string"),
        (None, None, "field 'id' holds a boolean, not a string"),
    ]


def test_json_too_deep_or_pretty_printed_and_a_wrong_text_field(tmp_path, monkeypatch):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "ok"}\n' + '{"text": ' + "[" * 100000 + "\n")
    rows = list(read_rows(discover_inputs(deep)[0], Fields()))
    assert [r.error for r in rows] == [None, "malformed JSON: nested too deeply"]
    pretty = tmp_path / "pretty.json"
    pretty.write_text('{\n  "text": "a"\n}\n')
    with pytest.raises(
        InputError, match=r"pretty\.json:1: a JSON document spread over lines is not JSON Lines"
    ):
        list(read_rows(discover_inputs(pretty)[0], Fields()))
    control = tmp_path / "control.jsonl"
    control.write_bytes(b'{"text": "a\x01b"}\n')
    [row] = read_rows(discover_inputs(control)[0], Fields())
    assert row.error == "malformed JSON: Invalid control character at (column 12)"
    monkeypatch.setattr("llm2vec_fast.corpus.inputs.FIELD_CHECK_ROWS", 5)
    typo = tmp_path / "typo.jsonl"
    typo.write_text('{"body": "x"}\n' * 6)
    with pytest.raises(
        InputError,
        match=r"typo\.jsonl:5: none of the first 5 rows has a field 'text' \(line 5 has"
        r" 'body'\); check --text-field",
    ):
        list(read_rows(discover_inputs(typo)[0], Fields()))
    some = tmp_path / "some.jsonl"  # one good row early on: the rest are ordinary error rows
    some.write_text('{"body": "x"}\n{"text": "y"}\n' + '{"body": "x"}\n' * 8)
    assert sum(r.error is None for r in read_rows(discover_inputs(some)[0], Fields())) == 1


def test_damaged_compressed_files_stop_naming_the_file(tmp_path):
    whole = gzip.compress(b"".join(b'{"text": "row %d"}\n' % i for i in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.txt.gz").write_text("not gzip at all\n")
    with pytest.raises(
        InputError, match=r"cut\.jsonl\.gz: cannot be read after line \d+: EOFError"
    ):
        list(read_rows(discover_inputs(tmp_path / "cut.jsonl.gz")[0], Fields()))
    with pytest.raises(
        InputError, match=r"fake\.txt\.gz: cannot be read before its first row: BadGzipFile"
    ):
        list(read_rows(discover_inputs(tmp_path / "fake.txt.gz")[0], Fields()))


def test_discovery_skips_the_output_folder_and_other_jobs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    for job in ("out", "older/job"):
        (tmp_path / job / "shards").mkdir(parents=True)
        (tmp_path / job / "manifest.json").write_text('{"format": "llm2vec-fast-embeddings"}')
        (tmp_path / job / "errors.jsonl").write_text("")
    (tmp_path / "older" / "b.txt").write_text("b\n")
    assert [f.name for f in discover_inputs(tmp_path, output=tmp_path / "out")] == [
        "a.jsonl",
        "older/b.txt",
    ]
    assert [
        f.name for f in discover_inputs(str(tmp_path / "**" / "*.json*"), output=tmp_path / "out")
    ] == ["a.jsonl"]
    with pytest.raises(InputError, match="lies inside the output folder"):
        discover_inputs(tmp_path / "out" / "errors.jsonl", output=tmp_path / "out")
