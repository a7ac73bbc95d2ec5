"""Reading a finished job back: ids and the embedding matrix, streamed or memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from llm2vec_fast.corpus.manifest import ERRORS, load_manifest, recorded_shards, temporary_name
from llm2vec_fast.files import sha256_file

MATRIX_CACHE = "embeddings.npy"


def _shards(folder: Path, allow_incomplete: bool) -> list[dict]:
    manifest = load_manifest(folder)
    if manifest.get("status") == "complete":
        return manifest["shards"]
    if not allow_incomplete:
        raise RuntimeError(
            f"{folder}: the embedding job is not complete; run the same command again to finish it"
            " (or pass allow_incomplete=True to read the shards done so far)"
        )
    shards = recorded_shards(folder)
    return [shards[k] for k in sorted(shards)]


def _embedding_matrix(table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)  # (n, dim)


def iter_embeddings(
    folder: str | Path, *, allow_incomplete: bool = False
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, (n, dim) matrix in the stored dtype) per shard, in row order; one shard in memory."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    for shard in _shards(folder, allow_incomplete):
        table = pq.read_table(folder / shard["file"], memory_map=True)
        yield table.column("id").to_pylist(), _embedding_matrix(table)


def verify(folder: str | Path) -> None:
    """Raise if a shard or error file does not match the checksum its manifest records."""
    folder = Path(folder)
    for shard in _shards(folder, allow_incomplete=True):
        for name, key in (("file", "sha256"), ("errors_file", "errors_sha256")):
            if sha256_file(folder / shard[name]) != shard[key]:
                raise ValueError(
                    f"{folder / shard[name]}: checksum differs from the manifest's; the file is damaged"
                )


def read_embeddings(
    folder: str | Path,
    *,
    mmap: bool = False,
    allow_incomplete: bool = False,
    matrix_path: str | Path | None = None,
) -> tuple[list[str], np.ndarray]:
    """``(ids, matrix)`` of a job folder, rows in input order, matrix in the stored dtype.

    ``mmap=False`` fills one array shard by shard (no second copy in memory). ``mmap=True`` writes
    the matrix once to ``embeddings.npy`` in the folder (or to ``matrix_path``: for a read-only job
    folder, or another disk) and returns it memory-mapped (read-only), for corpora larger than
    memory; later calls reuse that file while the job's shards are unchanged.
    """
    folder = Path(folder)
    shards = _shards(folder, allow_incomplete)
    total = sum(s["embedded"] for s in shards)
    manifest = load_manifest(folder)
    dtype = np.dtype(manifest["settings"]["output_dtype"])
    dim = manifest["engine"]["dim"]
    ids: list[str] = []
    cache = Path(matrix_path) if matrix_path is not None else folder / MATRIX_CACHE
    stamp = cache.with_name(
        cache.name + ".source"
    )  # the shards' checksums the matrix was built from
    source = json.dumps([s["sha256"] for s in shards])
    if mmap and cache.is_file() and stamp.is_file() and stamp.read_text() == source:
        for shard_ids, _ in iter_embeddings(folder, allow_incomplete=allow_incomplete):
            ids += shard_ids
        return ids, np.load(cache, mmap_mode="r")
    if mmap:
        tmp = temporary_name(
            cache
        )  # a reader killed here leaves a leftover (in a job folder, the next run removes it)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, dim))
        except OSError as exc:  # permissions, a read-only mount, ...
            raise OSError(
                exc.errno,
                f"cannot write the memory-mapped matrix {cache} ({exc.strerror or exc}):"
                " pass matrix_path= a writable file",
            ) from exc  # errno kept: PermissionError stays one
    else:
        matrix = np.empty((total, dim), dtype=dtype)
    row = 0
    for shard_ids, block in iter_embeddings(folder, allow_incomplete=allow_incomplete):
        matrix[row : row + len(shard_ids)] = block
        ids += shard_ids
        row += len(shard_ids)
    if mmap:
        matrix.flush()
        del matrix
        stamp.unlink(
            missing_ok=True
        )  # never a new matrix beside an old stamp (a matrix_path shared by jobs)
        tmp.replace(cache)
        stamp.write_text(source)
        return ids, np.load(cache, mmap_mode="r")
    return ids, matrix


def read_errors(folder: str | Path) -> list[dict]:
    """The records of ``errors.jsonl``: every input row that was not embedded, and why."""
    with open(Path(folder) / ERRORS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
