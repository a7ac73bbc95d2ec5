"""Writes one finished shard (Parquet + its error records) and records it in the manifest.

Order, so that a kill at any point loses at most this shard: errors file and Parquet file are
each written to a temporary name, fsynced and renamed; only then is the manifest rewritten
(atomically) to list the shard. A shard whose files exist but that no manifest lists is simply
written again on resume, with the same content.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm2vec_fast.corpus.manifest import (
    SHARDS_DIR,
    atomic_write_bytes,
    atomic_write_json,
    crash_point,
    temporary_name,
    with_shards,
)
from llm2vec_fast.corpus.quantize import quantize
from llm2vec_fast.files import fsync_dir, sha256_file

ROW_GROUP_ROWS = 4096


@dataclass
class ShardResult:
    index: int
    start: int  # first global row of the shard
    stop: int  # one past its last row
    ids: list[str]
    embeddings: np.ndarray  # (len(ids), dim) float32
    errors: list[dict]
    truncated: int
    tokens: int


def shard_file(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:06d}.parquet"


def errors_file(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:06d}.errors.jsonl"


def write_parquet(
    path: Path, ids: list[str], embeddings: np.ndarray, dtype: str, quantization: dict | None = None
) -> None:
    """``id`` string and ``embedding`` fixed_size_list<dtype>[dim]; with ``quantization`` (the
    manifest's record) its codes column instead (or beside, with ``keep_float``). Fsynced at a
    temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"id": pa.array(ids, pa.string())}
    if quantization is None or quantization["keep_float"]:
        columns["embedding"] = _fixed_size_lists(np.asarray(embeddings, dtype=dtype))
    if quantization is not None:
        ranges = quantization.get("ranges")
        codes = quantize(embeddings, quantization["precision"], ranges)  # (n, code width)
        columns[quantization["column"]] = _fixed_size_lists(codes)
    table = pa.table(columns)
    tmp = temporary_name(path)
    with open(tmp, "wb") as sink:
        with pq.ParquetWriter(sink, table.schema) as writer:
            for start in range(0, max(table.num_rows, 1), ROW_GROUP_ROWS):
                writer.write_table(table.slice(start, ROW_GROUP_ROWS))
                crash_point("mid-write")
        sink.flush()
        os.fsync(sink.fileno())
    crash_point("before-rename")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def warm_up() -> None:
    """Import what a first write imports: pyarrow.parquet, and pandas, which pyarrow imports the
    first time it builds an array (seconds on a busy machine). The writer thread calls it while
    the first shard is on its way."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401

    pa.array([], pa.string())


def _fixed_size_lists(matrix: np.ndarray):
    import pyarrow as pa

    values = pa.array(np.ascontiguousarray(matrix).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1])


@dataclass
class ShardWriter:
    """Writes shards of one process and keeps its manifest (``manifest.json`` when it is the
    only process, its rank's part otherwise) listing every shard known to be done."""

    folder: Path
    manifest_path: Path
    header: dict
    output_dtype: str
    shards: dict[int, dict] = field(default_factory=dict)

    def write(self, shard: ShardResult) -> dict:
        crash_point("before-write")
        shards_dir = self.folder / SHARDS_DIR
        shards_dir.mkdir(exist_ok=True)
        errors_path = self.folder / errors_file(shard.index)
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in shard.errors).encode()
        atomic_write_bytes(errors_path, lines)
        parquet_path = self.folder / shard_file(shard.index)
        write_parquet(
            parquet_path,
            shard.ids,
            shard.embeddings,
            self.output_dtype,
            self.header.get("quantization"),
        )
        entry = {
            "index": shard.index,
            "rows": [shard.start, shard.stop],
            "file": shard_file(shard.index),
            "bytes": parquet_path.stat().st_size,
            "sha256": sha256_file(parquet_path),
            "errors_file": errors_file(shard.index),
            "errors_sha256": hashlib.sha256(lines).hexdigest(),
            "embedded": len(shard.ids),
            "errors": len(shard.errors),
            "truncated": shard.truncated,
            "tokens": shard.tokens,
        }
        crash_point("before-manifest")
        self.shards[shard.index] = entry
        self.save()
        return entry

    def save(self, **changes) -> None:
        atomic_write_json(self.manifest_path, with_shards(self.header, self.shards, **changes))
