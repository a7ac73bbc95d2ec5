"""Reading a finished job back: ids and the embedding matrix, streamed or memory-mapped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from llm2vec_fast.corpus.manifest import ERRORS, load_manifest, recorded_shards, temporary_name
from llm2vec_fast.corpus.quantize import code_dtype, code_width, dequantize
from llm2vec_fast.files import sha256_file

MATRIX_CACHE = "embeddings.npy"


def job_shards(
    folder: Path,
    allow_incomplete: bool,
    how_to_go_on: str = "pass allow_incomplete=True to read the shards done so far",
) -> list[dict]:
    """The job's shard records: all of a complete job, else those written so far when
    ``allow_incomplete`` (``how_to_go_on`` says how the caller allows it)."""
    manifest = load_manifest(folder)
    if manifest.get("status") == "complete":
        return manifest["shards"]
    if not allow_incomplete:
        raise RuntimeError(
            f"{folder}: the embedding job is not complete; run the same command again to finish it"
            f" (or {how_to_go_on})"
        )
    shards = recorded_shards(folder)
    return [shards[k] for k in sorted(shards)]


@dataclass(frozen=True)
class StoredColumn:
    """Which Parquet column a read takes, and what it gives back."""

    name: str  # "embedding", or the codes' "embedding_<precision>"
    dtype: np.dtype  # of the matrix returned
    width: int  # its columns
    precision: str | None = None  # of the codes; None for the float column
    ranges: np.ndarray | None = None  # (2, dim) int8/uint8 calibration
    dequantize: bool = False

    def matrix(self, table) -> np.ndarray:
        column = table.column(self.name).combine_chunks()
        stored = column.flatten().to_numpy(zero_copy_only=False)
        stored = stored.reshape(-1, column.type.list_size)  # (n, stored width)
        if self.dequantize:
            return dequantize(stored, self.precision, self.width, self.ranges)
        return stored


def stored_column(
    folder: str | Path, quantized: bool | None = None, dequantize: bool = False
) -> StoredColumn:
    """The column to read: ``quantized=None`` takes the floats when the job stored them, else
    its codes; ``dequantize`` turns codes into approximate floats (see ``quantize.dequantize``).
    """
    if quantized is False and dequantize:
        raise ValueError("dequantize=True reads the codes: it does not go with quantized=False")
    folder = Path(folder)
    manifest = load_manifest(folder)
    dim = manifest["engine"]["dim"]
    quantization = manifest.get("quantization")
    has_float = quantization is None or quantization["keep_float"]
    if quantization is None and (quantized or dequantize):
        raise ValueError(f"{folder}: the job stored float embeddings only (no --quantize)")
    if quantized is False and not has_float:
        raise ValueError(
            f"{folder}: the job stored {quantization['precision']} codes only (--quantize without"
            " --keep-float); read them with quantized=True, or dequantize=True for approximate"
            " floats"
        )
    if has_float and not (quantized or dequantize):
        return StoredColumn("embedding", np.dtype(manifest["settings"]["output_dtype"]), dim)
    precision = quantization["precision"]
    ranges = quantization.get("ranges")
    ranges = None if ranges is None else np.asarray(ranges, dtype=np.float32)
    if dequantize:
        return StoredColumn(
            quantization["column"], np.dtype(np.float32), dim, precision, ranges, True
        )
    width = code_width(precision, dim)
    return StoredColumn(quantization["column"], code_dtype(precision), width, precision, ranges)


def iter_embeddings(
    folder: str | Path,
    *,
    allow_incomplete: bool = False,
    quantized: bool | None = None,
    dequantize: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, (n, width) matrix) per shard, in row order; one shard in memory. The matrix is the
    stored floats, or codes, as :func:`stored_column` chooses."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    column = stored_column(folder, quantized, dequantize)
    for shard in job_shards(folder, allow_incomplete):
        table = pq.read_table(folder / shard["file"], columns=["id", column.name], memory_map=True)
        yield table.column("id").to_pylist(), column.matrix(table)


def verify(folder: str | Path) -> None:
    """Raise if a shard or error file does not match the checksum its manifest records."""
    folder = Path(folder)
    for shard in job_shards(folder, allow_incomplete=True):
        for name, key in (("file", "sha256"), ("errors_file", "errors_sha256")):
            if sha256_file(folder / shard[name]) != shard[key]:
                raise ValueError(
                    f"{folder / shard[name]}: checksum differs from the manifest's;"
                    " the file is damaged"
                )


def read_embeddings(
    folder: str | Path,
    *,
    mmap: bool = False,
    allow_incomplete: bool = False,
    matrix_path: str | Path | None = None,
    quantized: bool | None = None,
    dequantize: bool = False,
) -> tuple[list[str], np.ndarray]:
    """``(ids, matrix)`` of a job folder, rows in input order, matrix as stored.

    A ``--quantize`` job gives its codes ((n, dim) int8/uint8, or (n, dim / 8) packed bits),
    unless it kept the floats (``--keep-float``), which are then the default; ``quantized=True``
    insists on the codes, ``quantized=False`` on the floats; ``dequantize=True`` gives float32
    approximations of the codes (int8/uint8 through the manifest's ranges, binary as +-1).

    ``mmap=False`` fills one array shard by shard (no second copy in memory). ``mmap=True`` writes
    the matrix once to ``embeddings.npy`` in the folder (``embeddings.<precision>.npy`` for codes;
    or to ``matrix_path``: for a read-only job folder, or another disk) and returns it
    memory-mapped (read-only), for corpora larger than memory; later calls reuse that file while
    the job's shards are unchanged.
    """
    folder = Path(folder)
    shards = job_shards(folder, allow_incomplete)
    total = sum(s["embedded"] for s in shards)
    column = stored_column(folder, quantized, dequantize)
    dtype = column.dtype
    options = dict(allow_incomplete=allow_incomplete, quantized=quantized, dequantize=dequantize)
    ids: list[str] = []
    cache = Path(matrix_path) if matrix_path is not None else folder / _cache_name(column)
    stamp = cache.with_name(cache.name + ".source")  # the shards' checksums behind the matrix
    source = json.dumps([column.name, column.dequantize] + [s["sha256"] for s in shards])
    if mmap and cache.is_file() and stamp.is_file() and stamp.read_text() == source:
        for shard_ids, _ in iter_embeddings(folder, **options):
            ids += shard_ids
        return ids, np.load(cache, mmap_mode="r")
    if mmap:
        # a reader killed here leaves a leftover (in a job folder, the next run removes it)
        tmp = temporary_name(cache)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            matrix = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=dtype, shape=(total, column.width)
            )
        except OSError as exc:  # permissions, a read-only mount, ...
            raise OSError(
                exc.errno,
                f"cannot write the memory-mapped matrix {cache} ({exc.strerror or exc}):"
                " pass matrix_path= a writable file",
            ) from exc  # errno kept: PermissionError stays one
    else:
        matrix = np.empty((total, column.width), dtype=dtype)
    row = 0
    for shard_ids, block in iter_embeddings(folder, **options):
        matrix[row : row + len(shard_ids)] = block
        ids += shard_ids
        row += len(shard_ids)
    if mmap:
        matrix.flush()
        del matrix
        # never a new matrix beside an old stamp (a matrix_path shared by jobs)
        stamp.unlink(missing_ok=True)
        tmp.replace(cache)
        stamp.write_text(source)
        return ids, np.load(cache, mmap_mode="r")
    return ids, matrix


def _cache_name(column: StoredColumn) -> str:
    if column.precision is None:
        return MATRIX_CACHE
    return f"embeddings.{column.precision}{'-dequantized' if column.dequantize else ''}.npy"


def read_errors(folder: str | Path) -> list[dict]:
    """The records of ``errors.jsonl``: every input row that was not embedded, and why."""
    with open(Path(folder) / ERRORS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
