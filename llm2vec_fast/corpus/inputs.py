"""Streaming readers for the corpus job: JSONL, CSV/TSV, Parquet and plain text.

Every reader yields :class:`RawRow` records one at a time (nothing is loaded whole), numbered by
their line in the file (Parquet: by row, from 1). A row the reader cannot make sense of (invalid
UTF-8, malformed JSON, a missing field) comes out with ``error`` set; a file that cannot be read at
all (unknown format, a column missing from the header) raises :class:`InputError`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

from llm2vec_fast.corpus.manifest import FORMAT, MANIFEST
from llm2vec_fast.files import sha256_file

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
}


# A JSONL file whose first rows all lack the text field is taken for a wrong --text-field
FIELD_CHECK_ROWS = 1000


class InputError(ValueError):
    """An input problem the job cannot turn into an error record; names the file (and line)."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # shown in ids and error records: relative to the inputs' common folder
    format: str


@dataclass
class RawRow:
    line: int
    id: str | None
    text: str | None
    instruction: str | None
    error: str | None = None


@dataclass(frozen=True)
class Fields:
    text: str = "text"
    id: str | None = None
    instruction: str | None = None


def file_format(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1].lower()) if suffixes else None
    return None if fmt == "parquet" and path.suffix == ".gz" else fmt


def is_job_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an embedding job (its manifest names the job format)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        with open(manifest, encoding="utf-8") as handle:
            return json.load(handle).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.is_relative_to(folder)


def _folder_files(folder: Path, output: Path | None) -> Iterator[Path]:
    """Files under ``folder`` with a known format; hidden entries, the output folder and other
    jobs' folders are skipped (a job must never read its own or another job's shards)."""
    for current, dirs, files in os.walk(folder):
        here = Path(current)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and not _inside((here / d).resolve(), output)
            and not is_job_folder(here / d)
        ]
        for name in files:
            if not name.startswith(".") and file_format(here / name):
                yield here / name


def discover_inputs(
    specs: str | Path | Sequence[str | Path], output: str | Path | None = None
) -> list[InputFile]:
    """The files named by files, folders (searched recursively) and globs, sorted by path.

    A folder contributes the files with a known extension (hidden ones skipped); a file named
    directly must have a known extension. Nothing inside ``output`` (the job's own folder) or
    inside another embedding job's folder is taken from a folder or a glob.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    output = Path(output).resolve() if output is not None else None
    found: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            if _inside(path.resolve(), output):
                raise InputError(f"{path}: the input folder lies inside the output folder {output}")
            found.update(p.resolve() for p in _folder_files(path, output))
        elif path.is_file():
            if file_format(path) is None:
                raise InputError(
                    f"{path}: unknown input format {path.suffix!r};"
                    f" known: {', '.join(sorted(FORMATS))} (optionally .gz)"
                )
            if _inside(path.resolve(), output):
                raise InputError(f"{path}: the input file lies inside the output folder {output}")
            found.add(path.resolve())
        else:
            matches = [Path(m) for m in glob.glob(str(spec), recursive=True)]
            files = [m for m in matches if m.is_file() and file_format(m)]
            if not files:
                raise InputError(
                    f"{spec}: no such file or folder, and no input files match it as a glob"
                )
            resolved = [m.resolve() for m in files]
            found.update(
                m
                for m in resolved
                if not _inside(m, output) and not any(map(is_job_folder, m.parents))
            )
    if not found:
        raise InputError(f"no input files found in {', '.join(map(str, specs))}")
    paths = sorted(found)
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [InputFile(p, p.relative_to(root).as_posix(), file_format(p)) for p in paths]


def fingerprint(file: InputFile) -> dict:
    """Name, size and sha256 of the whole file: a resumed job must see exactly the bytes the first
    run read (one extra read of the inputs, small beside embedding them)."""
    return {
        "path": file.name,
        "format": file.format,
        "bytes": file.path.stat().st_size,
        "sha256": sha256_file(file.path),
    }


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _line_count(path: Path) -> int:
    count, last = 0, b"\n"
    with _open_binary(path) as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def estimate_rows(file: InputFile) -> int:
    """Rows in ``file`` for the progress bar: exact for Parquet and plain text, close for the
    rest."""
    if file.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file.path).metadata.num_rows
    lines = _line_count(file.path)
    return max(lines - 1, 0) if file.format in ("csv", "tsv") else lines


def _decode(raw: bytes, first_line: bool = False) -> str | None:
    """UTF-8 text, or None when it is not valid UTF-8; a byte order mark opening a file is
    dropped."""
    try:
        return raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError:
        return None


def _field(record: dict, name: str, integer_ok: bool = False) -> tuple[str | None, str | None]:
    """(value, error): a string, or an integer where ``integer_ok`` (ids); never a float or a
    list."""
    if name not in record or record[name] is None:
        return None, f"missing field {name!r}"
    value = record[name]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"field {name!r} holds a lone surrogate (not valid Unicode)"
        return value, None
    if integer_ok and isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    kind = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }
    return None, f"field {name!r} holds {kind.get(type(value), type(value).__name__)}, not a string"


def _from_record(line: int, record: object, fields: Fields) -> RawRow:
    if not isinstance(record, dict):
        return RawRow(line, None, None, None, f"not a JSON object but a {type(record).__name__}")
    row_id = instruction = None
    if fields.id is not None:
        row_id, error = _field(record, fields.id, integer_ok=True)
        if error:
            return RawRow(line, None, None, None, error)
    text, error = _field(record, fields.text)
    if error:
        return RawRow(line, row_id, None, None, error)
    if fields.instruction is not None:
        instruction, error = _field(record, fields.instruction)
        if error:
            return RawRow(line, row_id, None, None, error)
    return RawRow(line, row_id, text, instruction)


def _read_jsonl(path: Path, fields: Fields) -> Iterator[RawRow]:
    without_text = 0  # rows from the top of the file without the text field, none with it
    with _open_binary(path) as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # a blank line in JSONL is no row
            decoded = _decode(raw, first_line=line == 1)
            if decoded is None:
                yield RawRow(line, None, None, None, "invalid UTF-8")
                continue
            if line == 1 and decoded.lstrip().startswith("["):
                raise InputError(
                    f"{path}:1: a JSON array is not JSON Lines; write one JSON object per line"
                )
            if line == 1 and decoded.strip() == "{":
                raise InputError(
                    f"{path}:1: a JSON document spread over lines is not JSON Lines;"
                    " write one JSON object per line"
                )
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield RawRow(
                    line, None, None, None, f"malformed JSON: {exc.msg} (column {exc.colno})"
                )
                continue
            except RecursionError:
                yield RawRow(line, None, None, None, "malformed JSON: nested too deeply")
                continue
            row = _from_record(line, record, fields)
            if without_text >= 0:
                without_text = (
                    without_text + 1 if row.error == f"missing field {fields.text!r}" else -1
                )
                if without_text == FIELD_CHECK_ROWS:
                    raise InputError(
                        f"{path}:{line}: none of the first {FIELD_CHECK_ROWS} rows has a field"
                        f" {fields.text!r} (line {line} has"
                        f" {', '.join(map(repr, record)) or 'no field'}); check --text-field"
                    )
            yield row


def _read_text(path: Path) -> Iterator[RawRow]:
    with _open_binary(path) as handle:
        for line, raw in enumerate(handle, start=1):
            decoded = _decode(raw.rstrip(b"\r\n"), first_line=line == 1)
            yield RawRow(
                line, None, decoded, None, None if decoded is not None else "invalid UTF-8"
            )


def _read_delimited(path: Path, fields: Fields, delimiter: str) -> Iterator[RawRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text_stream = io.TextIOWrapper(
        _open_binary(path), encoding="utf-8", errors="surrogateescape", newline=""
    )
    with text_stream:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        # strict: a quote left open raises at the end of the file instead of swallowing every
        # later row
        reader = csv.reader(text_stream, delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise InputError(f"{path}:1: the header is malformed CSV: {exc}") from None
        if header is None:
            return
        header[0] = header[0].removeprefix("\ufeff")
        wanted = [f for f in (fields.text, fields.id, fields.instruction) if f is not None]
        missing = [f for f in wanted if f not in header]
        if missing:
            raise InputError(
                f"{path}:1: the header has no column {missing[0]!r} (columns: {', '.join(header)})"
            )
        column = {name: header.index(name) for name in wanted}
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader, None)
            except csv.Error as exc:
                if "end of data" in str(exc):
                    raise InputError(
                        f"{path}:{start}: a quoted field opened here is never closed (the rest of"
                        " the file would be read as part of it); close the quote and run again"
                    ) from None
                line, start = start, reader.line_num + 1
                yield RawRow(line, None, None, None, f"malformed CSV: {exc}")
                continue
            if cells is None:
                return
            line, start = start, reader.line_num + 1
            if not any(cells):
                continue  # a blank line is no row
            try:  # bytes that are not UTF-8 were decoded as lone surrogates (surrogateescape)
                "".join(cells).encode("utf-8")
            except UnicodeEncodeError:
                yield RawRow(line, None, None, None, "invalid UTF-8")
                continue
            if len(cells) != len(header):
                yield RawRow(
                    line,
                    None,
                    None,
                    None,
                    f"{len(cells)} fields where the header has {len(header)}",
                )
                continue
            yield _from_record(line, {name: cells[index] for name, index in column.items()}, fields)


def _read_parquet(path: Path, fields: Fields) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = [f for f in (fields.text, fields.id, fields.instruction) if f is not None]
    missing = [f for f in wanted if f not in parquet.schema_arrow.names]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(parquet.schema_arrow.names)})"
        )
    line = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=wanted):
        columns = {name: batch.column(name).to_pylist() for name in wanted}
        for values in zip(*columns.values()):
            line += 1
            record = {}
            for name, value in zip(wanted, values):
                if isinstance(value, bytes):
                    value = _decode(value)
                    if value is None:
                        break
                record[name] = value
            else:
                yield _from_record(line, record, fields)
                continue
            yield RawRow(line, None, None, None, "invalid UTF-8")


def read_rows(file: InputFile, fields: Fields) -> Iterator[RawRow]:
    """The rows of ``file``; a file that breaks while being read (a truncated gzip stream, a damaged
    Parquet page) raises :class:`InputError` naming it and the last line read."""
    if file.format == "text":
        if fields.id is not None or fields.instruction is not None:
            raise InputError(
                f"{file.path}: plain text has no fields, so --id-field / --instruction-field"
                " cannot apply"
            )
        rows = _read_text(file.path)
    elif file.format == "jsonl":
        rows = _read_jsonl(file.path, fields)
    elif file.format in ("csv", "tsv"):
        rows = _read_delimited(file.path, fields, "," if file.format == "csv" else "\t")
    else:
        rows = _read_parquet(file.path, fields)
    return _naming_the_file(file, rows)


def _naming_the_file(file: InputFile, rows: Iterator[RawRow]) -> Iterator[RawRow]:
    line = 0
    try:
        for row in rows:
            line = row.line
            yield row
    except InputError:
        raise
    except (
        OSError,
        EOFError,
        ValueError,
        RuntimeError,
        zlib.error,
    ) as exc:  # gzip, zlib, pyarrow errors
        where = f"after line {line}" if line else "before its first row"
        raise InputError(
            f"{file.path}: cannot be read {where}: {type(exc).__name__}: {exc}"
        ) from exc
