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
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text"}


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


def discover_inputs(specs: str | Path | Sequence[str | Path]) -> list[InputFile]:
    """The files named by files, folders (searched recursively) and globs, sorted by path.

    A folder contributes the files with a known extension (hidden ones skipped); a file named
    directly must have a known extension.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    found: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            for child in path.rglob("*"):
                relative = child.relative_to(path).parts
                if child.is_file() and file_format(child) and not any(p.startswith(".") for p in relative):
                    found.add(child.resolve())
        elif path.is_file():
            if file_format(path) is None:
                raise InputError(f"{path}: unknown input format {path.suffix!r}; known: {', '.join(sorted(FORMATS))} (optionally .gz)")
            found.add(path.resolve())
        else:
            matches = [Path(m) for m in glob.glob(str(spec), recursive=True)]
            files = [m for m in matches if m.is_file() and file_format(m)]
            if not files:
                raise InputError(f"{spec}: no such file or folder, and no input files match it as a glob")
            found.update(m.resolve() for m in files)
    if not found:
        raise InputError(f"no input files found in {', '.join(map(str, specs))}")
    paths = sorted(found)
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [InputFile(p, p.relative_to(root).as_posix(), file_format(p)) for p in paths]


def fingerprint(file: InputFile, sample_bytes: int = 1 << 20) -> dict:
    """Name, size and a sha256 of the first and last MiB: cheap, and catches edits and swaps."""
    size = file.path.stat().st_size
    digest = hashlib.sha256()
    with open(file.path, "rb") as handle:
        digest.update(handle.read(sample_bytes))
        if size > sample_bytes:
            handle.seek(max(sample_bytes, size - sample_bytes))
            digest.update(handle.read(sample_bytes))
    return {"path": file.name, "format": file.format, "bytes": size, "sample_sha256": digest.hexdigest()}


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
    """Rows in ``file`` for the progress bar: exact for Parquet and plain text, close for the rest."""
    if file.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file.path).metadata.num_rows
    lines = _line_count(file.path)
    return max(lines - 1, 0) if file.format in ("csv", "tsv") else lines


def _decode(raw: bytes, first_line: bool = False) -> str | None:
    """UTF-8 text, or None when it is not valid UTF-8; a byte order mark opening a file is dropped."""
    try:
        return raw.decode("utf-8-sig" if first_line else "utf-8")
    except UnicodeDecodeError:
        return None


def _field(record: dict, name: str) -> tuple[str | None, str | None]:
    """(value, error): numbers are accepted as ids and texts are not."""
    if name not in record or record[name] is None:
        return None, f"missing field {name!r}"
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"field {name!r} is a {type(value).__name__}, not a string"
    return str(value), None


def _from_record(line: int, record: object, fields: Fields) -> RawRow:
    if not isinstance(record, dict):
        return RawRow(line, None, None, None, f"not a JSON object but a {type(record).__name__}")
    row_id = instruction = None
    if fields.id is not None:
        row_id, error = _field(record, fields.id)
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
    with _open_binary(path) as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # a blank line in JSONL is no row
            decoded = _decode(raw, first_line=line == 1)
            if decoded is None:
                yield RawRow(line, None, None, None, "invalid UTF-8")
                continue
            if line == 1 and decoded.lstrip().startswith("["):
                raise InputError(f"{path}:1: a JSON array is not JSON Lines; write one JSON object per line")
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as exc:
                yield RawRow(line, None, None, None, f"malformed JSON: {exc.msg} at column {exc.colno}")
                continue
            yield _from_record(line, record, fields)


def _read_text(path: Path) -> Iterator[RawRow]:
    with _open_binary(path) as handle:
        for line, raw in enumerate(handle, start=1):
            decoded = _decode(raw.rstrip(b"\r\n"), first_line=line == 1)
            yield RawRow(line, None, decoded, None, None if decoded is not None else "invalid UTF-8")


def _read_delimited(path: Path, fields: Fields, delimiter: str) -> Iterator[RawRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text_stream = io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="surrogateescape", newline="")
    with text_stream:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        reader = csv.reader(text_stream, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            return
        header[0] = header[0].removeprefix("\ufeff")
        wanted = [f for f in (fields.text, fields.id, fields.instruction) if f is not None]
        missing = [f for f in wanted if f not in header]
        if missing:
            raise InputError(f"{path}:1: the header has no column {missing[0]!r} (columns: {', '.join(header)})")
        column = {name: header.index(name) for name in wanted}
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(cells):
                continue  # a blank line is no row
            if any("\udc80" <= ch <= "\udcff" for cell in cells for ch in cell):
                yield RawRow(line, None, None, None, "invalid UTF-8")
                continue
            record = {name: cells[index] for name, index in column.items() if index < len(cells)}
            yield _from_record(line, record, fields)


def _read_parquet(path: Path, fields: Fields) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = [f for f in (fields.text, fields.id, fields.instruction) if f is not None]
    missing = [f for f in wanted if f not in parquet.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(parquet.schema_arrow.names)})")
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
    if file.format == "text":
        if fields.id is not None or fields.instruction is not None:
            raise InputError(f"{file.path}: plain text has no fields, so --id-field / --instruction-field cannot apply")
        return _read_text(file.path)
    if file.format == "jsonl":
        return _read_jsonl(file.path, fields)
    if file.format in ("csv", "tsv"):
        return _read_delimited(file.path, fields, "," if file.format == "csv" else "\t")
    return _read_parquet(file.path, fields)
