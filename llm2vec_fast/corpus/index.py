"""A faiss index of a job's embeddings, kept in the job folder (``llm2vec-fast index DIR``).

Files, each written under a temporary name and renamed, ``index.json`` last:

- ``index.faiss``: the index (cosine similarity as inner product of unit vectors; a binary
  job's sign bits in a faiss binary index, Hamming distance);
- ``index.ids.parquet``: the id map, row r of the index is the row with id ``ids[r]``;
- ``index.rescore.npy``: for kinds that rescore (binary, ivf-pq), each row's vector in index row
  order (unit floats when the job stored floats, else its codes), memory-mapped at search so
  that only the candidates are read;
- ``index.json``: the settings, what was indexed, and the shards it holds (index, sha256, rows).

An index holds the shards listed in ``index.json``. When the job has other shards (a job resumed,
or redone with ``--overwrite``) the index is stale: searching it is refused. ``build_index`` on a
stale index adds the rows of the new shards when the ones it holds are unchanged (same sha256),
and builds it afresh otherwise.

Vectors are read shard by shard: an IVF-PQ index is trained on a sample of rows spread over the
whole job and filled one shard at a time, so the job's matrix is never in memory.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from llm2vec_fast.corpus.manifest import (
    atomic_write_json,
    load_manifest,
    read_json,
    temporary_name,
)
from llm2vec_fast.corpus.output import StoredColumn, job_shards, stored_column
from llm2vec_fast.corpus.quantize import SCALAR, dequantize, packed_bits
from llm2vec_fast.files import fsync_dir

INDEX_FILE = "index.faiss"
INDEX_META = "index.json"
INDEX_IDS = "index.ids.parquet"
INDEX_RESCORE = "index.rescore.npy"
INDEX_FILES = (INDEX_FILE, INDEX_META, INDEX_IDS, INDEX_RESCORE)
INDEX_FORMAT = "llm2vec-fast-index"
KINDS = ("flat", "hnsw", "ivf-pq")
BINARY_KINDS = ("flat", "hnsw")
ADD_ROWS = 65536  # rows handed to faiss at once
SEARCH_QUERIES = 256  # queries searched (and their candidates rescored) at once
SAMPLE_SEED = 0


class StaleIndexError(ValueError):
    """The index does not hold the job's current shards."""


@dataclass(frozen=True)
class IndexSettings:
    """How the index is built and searched (``llm2vec-fast index --help``).

    ``None`` means: chosen from the job's size (``nlist`` sqrt(rows), ``pq_m`` dim / 8,
    ``train_rows`` 40 nlist, at least 10,000, ``pq_bits`` 8, fewer when there are fewer than 256
    training rows) or kind (``rescore``: on for binary and ivf-pq).
    """

    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 100
    ef_search: int = 128
    nlist: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None
    nprobe: int = 32
    train_rows: int | None = None
    rescore: bool | None = None
    rescore_multiplier: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "rescore_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "pq_m", "pq_bits", "train_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "the index needs faiss: pip install 'llm2vec-fast[index]' (or pip install faiss-cpu)"
        ) from exc
    return faiss


def _shard_key(shard: dict) -> dict:
    return {"index": shard["index"], "sha256": shard["sha256"], "rows": shard["embedded"]}


def _vectors_column(folder: Path) -> StoredColumn:
    """What the index holds: the floats when stored, else int8/uint8 codes dequantized; a binary
    job's sign bits in any case (a Hamming index)."""
    quantization = load_manifest(folder).get("quantization")
    if quantization is None:
        return stored_column(folder, quantized=False)
    if quantization["precision"] in SCALAR:
        if quantization["keep_float"]:
            return stored_column(folder, quantized=False)
        return stored_column(folder, dequantize=True)
    return stored_column(folder, quantized=True)


def _rescore_column(folder: Path) -> StoredColumn:
    """What a rescoring reads: the floats when stored, else the codes (dequantized at search)."""
    quantization = load_manifest(folder).get("quantization")
    if quantization is None or quantization["keep_float"]:
        return stored_column(folder, quantized=False)
    return stored_column(folder, quantized=True)


def _storage(column: StoredColumn) -> dict:
    return {
        "column": column.name,
        "precision": column.precision,
        "dequantized": column.dequantize,
        "width": column.width,
    }


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _read_shard(folder: Path, shard: dict, columns: list[StoredColumn]):
    import pyarrow.parquet as pq

    names = ["id"] + list(dict.fromkeys(c.name for c in columns))
    table = pq.read_table(folder / shard["file"], columns=names, memory_map=True)
    return table.column("id").to_pylist(), [c.matrix(table) for c in columns]


def _is_binary(column: StoredColumn) -> bool:
    return column.precision in ("binary", "ubinary") and not column.dequantize


def _index_vectors(column: StoredColumn, matrix: np.ndarray) -> np.ndarray:
    """What faiss gets: packed sign bytes (binary) or unit float32 rows."""
    return packed_bits(matrix, column.precision) if _is_binary(column) else _unit_rows(matrix)


def _rescore_vectors(column: StoredColumn, matrix: np.ndarray) -> np.ndarray:
    """What ``index.rescore.npy`` keeps: unit float32 rows, or codes as stored."""
    return matrix if column.precision is not None else _unit_rows(matrix)


def _resolved(settings: IndexSettings, rows: int, dim: int, binary: bool) -> IndexSettings:
    """``settings`` with its automatic values filled in for ``rows`` vectors of ``dim``."""
    if binary and settings.kind not in BINARY_KINDS:
        raise ValueError(
            f"a binary job is indexed with kind {' or '.join(BINARY_KINDS)} (Hamming distance),"
            f" not {settings.kind}"
        )
    rescore = settings.rescore
    if rescore is None:
        rescore = binary or settings.kind == "ivf-pq"
    if settings.kind != "ivf-pq":
        return replace(settings, rescore=rescore)
    nlist = settings.nlist or max(1, min(round(math.sqrt(rows)), rows // 39 or 1))
    pq_m = settings.pq_m or _largest_divisor(dim, max(1, dim // 8))
    if dim % pq_m:
        raise ValueError(f"pq_m must divide the dimension {dim}, got {pq_m}")
    train_rows = min(rows, settings.train_rows or max(40 * nlist, 10000))
    pq_bits = settings.pq_bits or min(8, max(1, int(math.log2(train_rows))))
    return replace(
        settings,
        nlist=nlist,
        pq_m=pq_m,
        pq_bits=pq_bits,
        train_rows=train_rows,
        rescore=rescore,
    )


def _largest_divisor(dim: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if dim % d == 0)


def _new_index(faiss, settings: IndexSettings, width: int, binary: bool, sample_rows):
    """An empty index of ``settings.kind``; ``sample_rows()`` gives IVF-PQ its training rows."""
    if binary:
        bits = width * 8
        if settings.kind == "flat":
            return faiss.IndexBinaryFlat(bits)
        index = faiss.IndexBinaryHNSW(bits, settings.hnsw_m)
        index.hnsw.efConstruction = settings.ef_construction
        return index
    inner_product = faiss.METRIC_INNER_PRODUCT
    if settings.kind == "flat":
        return faiss.IndexFlatIP(width)
    if settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(width, settings.hnsw_m, inner_product)
        index.hnsw.efConstruction = settings.ef_construction
        return index
    quantizer = faiss.IndexFlatIP(width)
    index = faiss.IndexIVFPQ(
        quantizer, width, settings.nlist, settings.pq_m, settings.pq_bits, inner_product
    )
    # the sample is sized on purpose (faiss' warning of under 39 rows per centroid is for small
    # jobs only, where fewer rows per centroid still beat fewer centroids)
    index.cp.min_points_per_centroid = 1
    index.pq.cp.min_points_per_centroid = 1
    sample = sample_rows()
    if len(sample) < settings.nlist:
        raise ValueError(
            f"ivf-pq: {len(sample)} training rows for nlist={settings.nlist} lists;"
            " give a smaller --nlist"
        )
    index.train(sample)
    return index


def _sample(folder: Path, shards: list[dict], column: StoredColumn, count: int) -> np.ndarray:
    """``count`` rows drawn uniformly from all ``shards``, one shard in memory at a time."""
    total = sum(s["embedded"] for s in shards)
    chosen = np.sort(np.random.default_rng(SAMPLE_SEED).choice(total, count, replace=False))
    parts = []
    offset = 0
    for shard in shards:
        stop = offset + shard["embedded"]
        wanted = chosen[(chosen >= offset) & (chosen < stop)] - offset
        if len(wanted):
            _, (matrix,) = _read_shard(folder, shard, [column])
            parts.append(_index_vectors(column, matrix[wanted]))
        offset = stop
    return np.concatenate(parts) if parts else np.empty((0, column.width), np.float32)


@dataclass
class IndexReport:
    """What ``build_index`` did."""

    folder: Path
    kind: str
    rows: int
    added: int
    rebuilt: bool
    seconds: float
    bytes: int

    def __str__(self) -> str:
        action = "built" if self.rebuilt else ("updated" if self.added else "up to date")
        return (
            f"{self.folder / INDEX_FILE}: {self.kind} index {action}, {self.rows:,} rows"
            f" ({self.added:,} added) in {self.seconds:.1f}s, {self.bytes / 2**20:,.1f} MiB"
        )


def build_index(
    folder: str | Path,
    settings: IndexSettings | None = None,
    *,
    allow_incomplete: bool = False,
    progress: bool = True,
    rebuild: bool = False,
) -> IndexReport:
    """Build the index of the job in ``folder``, or bring an existing one up to date.

    ``settings=None`` keeps an existing index's settings (else the defaults). An existing index
    with these settings whose shards are all unchanged gets the rows of the job's new shards;
    anything else (or ``rebuild``) builds it afresh.
    """
    faiss = import_faiss()
    folder = Path(folder)
    started = time.perf_counter()
    old = _read_meta(folder)
    if settings is None:
        settings = IndexSettings(**old["requested"]) if old else IndexSettings()
    shards = job_shards(
        folder, allow_incomplete, "index the shards done so far with --allow-incomplete"
    )
    column = _vectors_column(folder)
    rows = sum(s["embedded"] for s in shards)
    if rows == 0:
        raise ValueError(f"{folder}: the job has no embedded rows to index")
    binary = _is_binary(column)
    resolved = _resolved(settings, rows, load_manifest(folder)["engine"]["dim"], binary)
    keys = [_shard_key(s) for s in shards]
    held = old["shards"] if old else []
    extendable = (
        old is not None
        and not rebuild
        and old["requested"] == asdict(settings)
        and old["storage"] == _storage(column)
        and all(key in keys for key in held)
        and _files_intact(folder, old)
    )
    if extendable:
        new_shards = [s for s, key in zip(shards, keys) if key not in held]
        if not new_shards:
            size = (folder / INDEX_FILE).stat().st_size
            return IndexReport(folder, old["settings"]["kind"], old["rows"], 0, False, 0.0, size)
        resolved = IndexSettings(**old["settings"])
        index = _read_index(faiss, folder, binary)
        ids = _read_ids(folder)
    else:
        new_shards = shards
        index = _new_index(
            faiss,
            resolved,
            column.width,
            binary,
            lambda: _sample(folder, shards, column, resolved.train_rows),
        )
        ids = []
        held = []
    rescore = _rescore_column(folder) if resolved.rescore else None
    kept = old["rows"] if extendable else 0
    added = sum(s["embedded"] for s in new_shards)
    rescore_file = _RescoreFile(folder, rescore, kept, kept + added) if rescore else None
    bar = _progress(added, progress)
    try:
        for shard in new_shards:
            shard_ids, matrices = _read_shard(folder, shard, [column] + [rescore] * bool(rescore))
            vectors = _index_vectors(column, matrices[0])
            for start in range(0, len(vectors), ADD_ROWS):
                index.add(vectors[start : start + ADD_ROWS])
                if bar is not None:
                    bar.update(len(vectors[start : start + ADD_ROWS]))
            if rescore_file is not None:
                rescore_file.append(_rescore_vectors(rescore, matrices[1]))
            ids += shard_ids
    finally:
        if bar is not None:
            bar.close()
    if rescore_file is not None:
        rescore_file.close()
    elif (folder / INDEX_RESCORE).exists():
        (folder / INDEX_RESCORE).unlink()
    _write_ids(folder / INDEX_IDS, ids)
    _write_index(faiss, folder / INDEX_FILE, index, binary)
    meta = {
        "format": INDEX_FORMAT,
        "version": 1,
        "requested": asdict(settings),
        "settings": asdict(resolved),
        "storage": _storage(column),
        "rescore_storage": _storage(rescore) if rescore is not None else None,
        "metric": "hamming" if binary else "inner_product of unit vectors (cosine)",
        "rows": index.ntotal,
        "dim": load_manifest(folder)["engine"]["dim"],
        "shards": held + [_shard_key(s) for s in new_shards],
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(folder / INDEX_META, meta)
    return IndexReport(
        folder,
        resolved.kind,
        index.ntotal,
        added,
        not extendable,
        time.perf_counter() - started,
        (folder / INDEX_FILE).stat().st_size,
    )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="vec", unit_scale=True, file=sys.stderr, desc="index")


def requested_settings(folder: str | Path) -> dict | None:
    """The settings the index in ``folder`` was asked for (``None`` when there is none)."""
    meta = _read_meta(Path(folder))
    return None if meta is None else dict(meta["requested"])


def _read_meta(folder: Path) -> dict | None:
    path = folder / INDEX_META
    if not path.is_file():
        return None
    meta = read_json(path)
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an index of llm2vec-fast (format {meta.get('format')!r})")
    return meta


def _files_intact(folder: Path, meta: dict) -> bool:
    names = [INDEX_FILE, INDEX_IDS] + ([INDEX_RESCORE] if meta["rescore_storage"] else [])
    return all((folder / name).is_file() for name in names)


def _write_index(faiss, path: Path, index, binary: bool) -> None:
    tmp = temporary_name(path)
    (faiss.write_index_binary if binary else faiss.write_index)(index, str(tmp))
    _sync_and_rename(tmp, path)


def _read_index(faiss, folder: Path, binary: bool):
    path = str(folder / INDEX_FILE)
    return faiss.read_index_binary(path) if binary else faiss.read_index(path)


def _write_ids(path: Path, ids: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = temporary_name(path)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), tmp)
    _sync_and_rename(tmp, path)


def _read_ids(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(folder / INDEX_IDS).column("id").to_pylist()


class _RescoreFile:
    """``index.rescore.npy`` written shard by shard at a temporary name: the ``kept`` first rows
    of the old file, then what is appended; renamed into place by ``close``."""

    def __init__(self, folder: Path, column: StoredColumn, kept: int, rows: int) -> None:
        self.path = folder / INDEX_RESCORE
        self.tmp = temporary_name(self.path)
        dtype = np.float32 if column.precision is None else column.dtype
        self.out = np.lib.format.open_memmap(
            self.tmp, mode="w+", dtype=dtype, shape=(rows, column.width)
        )
        if kept:
            old = np.load(self.path, mmap_mode="r")
            for start in range(0, kept, ADD_ROWS):
                self.out[start : start + ADD_ROWS] = old[start : min(start + ADD_ROWS, kept)]
        self.row = kept

    def append(self, block: np.ndarray) -> None:
        self.out[self.row : self.row + len(block)] = block
        self.row += len(block)

    def close(self) -> None:
        self.out.flush()
        del self.out
        _sync_and_rename(self.tmp, self.path)


def _sync_and_rename(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def index_state(folder: str | Path) -> str | None:
    """``None`` (no index), ``"fresh"``, or why the index is stale (one sentence)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        return None
    manifest = load_manifest(folder)
    current = [_shard_key(s) for s in manifest.get("shards", [])]
    if manifest.get("status") != "complete":
        return "the job is not complete"
    if meta["storage"] != _storage(_vectors_column(folder)):
        return "the job stores other vectors than the index holds (another --quantize)"
    if sorted(meta["shards"], key=lambda s: s["index"]) != current:
        held = sum(s["rows"] for s in meta["shards"])
        changed = [s["index"] for s in meta["shards"] if s not in current]
        if changed:
            return f"shards {changed[:5]} changed since the index was built"
        return (
            f"the index holds {held:,} rows of {len(meta['shards'])} shards, the job has"
            f" {manifest['counts']['embedded']:,} rows in {len(current)} shards"
        )
    if not _files_intact(folder, meta):
        return "index files are missing"
    return "fresh"


@dataclass
class JobIndex:
    """A fresh index of a job, ready to search with query embeddings."""

    folder: Path
    meta: dict
    index: object
    ids: list[str]
    rescore: np.ndarray | None  # (rows, width) memory-mapped, index row order

    @property
    def binary(self) -> bool:
        return self.meta["metric"] == "hamming"

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        rescore_multiplier: int | None = None,
    ) -> list[list[tuple[int, float]]]:
        """(index row, score) of the ``k`` best rows per query (q, dim), best first; score is
        the cosine similarity (with the rescoring vectors when the index rescores)."""
        settings = self.meta["settings"]
        queries = _unit_rows(queries)  # (q, dim)
        multiplier = rescore_multiplier or settings["rescore_multiplier"]
        wanted = min(self.index.ntotal, k * multiplier if self.rescore is not None else k)
        if settings["kind"] == "hnsw":
            self.index.hnsw.efSearch = max(ef_search or settings["ef_search"], wanted)
        if settings["kind"] == "ivf-pq":
            self.index.nprobe = nprobe or settings["nprobe"]
        results = []
        for start in range(0, len(queries), SEARCH_QUERIES):
            chunk = queries[start : start + SEARCH_QUERIES]
            if self.binary:
                distances, rows = self.index.search(np.packbits(chunk > 0, axis=-1), wanted)
                dim = self.meta["dim"]
                scores = (dim - 2 * distances) / dim  # the cosine of the +-1 sign vectors
            else:
                scores, rows = self.index.search(chunk, wanted)
            if self.rescore is not None:
                scores = self._rescored(chunk, rows)
            for query_rows, query_scores in zip(rows, scores):
                found = [(int(r), float(s)) for r, s in zip(query_rows, query_scores) if r >= 0]
                found.sort(key=lambda pair: (-pair[1], pair[0]))
                results.append(found[:k])
        return results

    def _rescored(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(q, candidates) cosine of each query with its candidates' rescoring vectors."""
        storage = self.meta["rescore_storage"]
        flat = np.sort(np.unique(rows[rows >= 0]))
        vectors = np.asarray(self.rescore[flat])  # sorted reads of the memory map
        if storage["precision"] is not None:  # codes, as stored
            vectors = _unit_rows(_decode(vectors, storage, self.meta["dim"], self.folder))
        else:
            vectors = vectors.astype(np.float32)
        position = np.searchsorted(flat, np.where(rows >= 0, rows, flat[0]))
        scores = np.einsum("qd,qcd->qc", queries, vectors[position])
        return np.where(rows >= 0, scores, -np.inf)


def _decode(codes: np.ndarray, storage: dict, dim: int, folder: Path) -> np.ndarray:
    quantization = load_manifest(folder)["quantization"]
    ranges = quantization.get("ranges")
    ranges = None if ranges is None else np.asarray(ranges, dtype=np.float32)
    return dequantize(codes, storage["precision"], dim, ranges)


def load_index(folder: str | Path) -> JobIndex | None:
    """The job's index, or ``None`` when it has none; a stale one raises
    :class:`StaleIndexError` naming the fix."""
    folder = Path(folder)
    state = index_state(folder)
    if state is None:
        return None
    if state != "fresh":
        raise StaleIndexError(
            f"the index in {folder} is stale: {state}. Run `llm2vec-fast index {folder}` to"
            " update it (or search with --exact)"
        )
    faiss = import_faiss()
    meta = _read_meta(folder)
    binary = meta["metric"] == "hamming"
    index = _read_index(faiss, folder, binary)
    ids = _read_ids(folder)
    rescore = None
    if meta["rescore_storage"] is not None:
        rescore = np.load(folder / INDEX_RESCORE, mmap_mode="r")
    rescore_rows = meta["rows"] if rescore is None else len(rescore)
    if {index.ntotal, len(ids), rescore_rows} != {meta["rows"]}:
        raise StaleIndexError(
            f"the index files in {folder} do not match {INDEX_META} (a build was interrupted)."
            f" Run `llm2vec-fast index {folder}` to rebuild it"
        )
    return JobIndex(folder, meta, index, ids, rescore)
