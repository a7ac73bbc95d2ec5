"""The job's rows in work order: numbered across all files, with the job-level checks.

Every row, good or bad, gets the next global number, so the rows of a shard depend on the inputs
alone. A row that cannot be embedded keeps its place with ``error`` set and becomes an error
record.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

from llm2vec_fast.corpus.duplicates import FirstOccurrences, pack_location, unpack_location
from llm2vec_fast.corpus.engine import Text
from llm2vec_fast.corpus.inputs import Fields, InputFile, read_rows

EMPTY_TEXT = "empty or whitespace-only text"  # the reason of a row with nothing to embed

DUPLICATE_CHECK_ROWS = 4096  # ids checked for duplicates at once


@dataclass
class Row:
    index: int  # global row number, from 0
    file: str
    line: int
    id: str | None
    text: Text | None
    error: str | None


def error_record(row: Row) -> dict:
    """The row's line in ``errors.jsonl``."""
    return {"id": row.id, "file": row.file, "line": row.line, "reason": row.error}


def job_rows(
    files: list[InputFile], fields: Fields, instruction: str | None, limit: int | None
) -> Iterator[Row]:
    """Every input row in work order; with an id field, a repeated id is an error row."""
    rows = _checked_rows(files, fields, instruction, limit)
    if fields.id is None:  # ids are FILE:LINE, unique by construction
        yield from rows
        return
    seen = FirstOccurrences()
    file_numbers = {file.name: number for number, file in enumerate(files)}
    while chunk := list(itertools.islice(rows, DUPLICATE_CHECK_ROWS)):
        candidates = [row for row in chunk if row.error is None]
        earlier = seen.check(
            [row.id for row in candidates],
            [pack_location(file_numbers[row.file], row.line) for row in candidates],
        )
        for row, where in zip(candidates, earlier):
            if where is not None:
                file_number, line = unpack_location(where)
                row.error = f"duplicate id (first at {files[file_number].name}:{line})"
                row.text = None
        yield from chunk


def _checked_rows(
    files: list[InputFile], fields: Fields, instruction: str | None, limit: int | None
) -> Iterator[Row]:
    """Every input row in work order, with the row-level checks (empty text, empty id)."""
    index = 0
    for file in files:
        for raw in read_rows(file, fields):
            if limit is not None and index >= limit:
                return
            error = raw.error
            if error is None and not raw.text.strip():
                error = EMPTY_TEXT
            if error is None and raw.id is not None and not raw.id.strip():
                error = "empty id"
            row_id = raw.id if fields.id is not None else f"{file.name}:{raw.line}"
            row_instruction = raw.instruction if fields.instruction is not None else instruction
            text = (row_instruction, raw.text) if error is None and row_instruction else raw.text
            yield Row(index, file.name, raw.line, row_id, text if error is None else None, error)
            index += 1
