"""The job index (``llm2vec-fast index``) of each kind vs the exact scan: build time, memory per
vector, recall@10 and queries/s.

Data: synthetic unit vectors (768-d, default 1,000,000 rows) drawn around random cluster centres
(a vector is its centre plus Gaussian noise of the same norm, so neighbours share a cluster and
the order inside it is the hard part), written as real job folders (Parquet shards + manifest):
one with floats (flat, hnsw, ivf-pq) and one with ``--quantize ubinary --keep-float`` (binary
Hamming index rescored with the floats). Queries: new points drawn the same way. ``--job DIR``
runs the same on a real job's folder (queries: a sample of its rows, held out of nothing: each
finds itself first).

Exact baseline: ``llm2vec_fast.corpus.nearest.top_k`` (what ``search --exact`` runs) over the
matrix already in memory, i.e. without reading the shards: its best case. Ground truth: the same
scan. Queries/s is measured two ways: one query at a time (``search --query``) and all at once
(``search --queries``). Memory per vector: the size of ``index.faiss`` (what a search holds in
memory) over the rows; ``index.rescore.npy`` stays on disk, read by memory map.

Run: ``python benchmarks/bench_index.py [--rows 200000] [--job DIR] [--kinds hnsw binary-flat]``
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import Results, parse_args

from llm2vec_fast.corpus.index import INDEX_FILE, IndexSettings, build_index, load_index
from llm2vec_fast.corpus.manifest import MANIFEST, atomic_write_json, new_manifest, with_shards
from llm2vec_fast.corpus.nearest import top_k
from llm2vec_fast.corpus.output import read_embeddings
from llm2vec_fast.corpus.writer import errors_file, shard_file, write_parquet
from llm2vec_fast.files import sha256_file

K = 10
KINDS = ("flat", "hnsw", "ivf-pq", "binary-flat", "binary-hnsw")
SHARD_ROWS = 50000


def _extra(parser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (1,000,000)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=None, help="default: rows / 100")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall and batch")
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--ef-construction", type=int, default=None, help="HNSW (index default)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW (index default)")
    parser.add_argument("--job", type=Path, default=None, help="also a real job's folder")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the synthetic job folders go (a temp dir)"
    )


def clustered_unit_vectors(rows: int, dim: int, clusters: int, rng) -> np.ndarray:
    """(rows, dim) float32 unit vectors, each its cluster centre plus noise of the same norm."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((rows, dim), dtype=np.float32)
    step = 65536
    for start in range(0, rows, step):
        n = min(step, rows - start)
        noise = rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        block = centres[rng.integers(0, clusters, n)] + noise
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def write_job(folder: Path, matrix: np.ndarray, quantization: dict | None = None) -> None:
    """A complete job folder holding ``matrix`` as the shards ``embed`` would write."""
    folder.mkdir(parents=True)
    (folder / "shards").mkdir()
    settings = {"output_dtype": "float32", "shard_rows": SHARD_ROWS}
    if quantization is not None:
        settings.update({"quantize": quantization["precision"], "keep_float": True})
    identity = {
        "settings": settings,
        "inputs": [],
        "engine": {"model": "synthetic", "dim": matrix.shape[1]},
    }
    header = new_manifest(identity)
    if quantization is not None:
        header["quantization"] = quantization
    shards = {}
    for k, start in enumerate(range(0, len(matrix), SHARD_ROWS)):
        stop = min(start + SHARD_ROWS, len(matrix))
        path = folder / shard_file(k)
        ids = [f"row{i}" for i in range(start, stop)]
        write_parquet(path, ids, matrix[start:stop], "float32", quantization)
        (folder / errors_file(k)).write_bytes(b"")
        shards[k] = {
            "index": k,
            "rows": [start, stop],
            "file": shard_file(k),
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "errors_file": errors_file(k),
            "errors_sha256": sha256_file(folder / errors_file(k)),
            "embedded": stop - start,
            "errors": 0,
            "truncated": 0,
            "tokens": 0,
        }
    manifest = with_shards(header, shards, status="complete", total_rows=len(matrix))
    atomic_write_json(folder / MANIFEST, manifest)


def recall_at_k(found: list[list[tuple[int, float]]], truth: list[list[tuple[int, float]]]):
    hits = [len({r for r, _ in f} & {r for r, _ in t}) for f, t in zip(found, truth)]
    return sum(hits) / (K * len(truth))


def queries_per_second(search, queries: np.ndarray, single: int) -> tuple[float, float]:
    """(one at a time, all at once) queries/s of ``search(queries (q, dim))``."""
    search(queries[:1])  # warm-up
    start = time.perf_counter()
    for row in range(single):
        search(queries[row : row + 1])
    one = single / (time.perf_counter() - start)
    start = time.perf_counter()
    search(queries)
    return one, len(queries) / (time.perf_counter() - start)


def bench_folder(results: Results, label: str, folders: dict, queries, truth, exact_qps, args):
    """Every kind asked for, on the job folders of one data set."""
    for kind in args.kinds:
        folder = folders["binary" if kind.startswith("binary") else "float"]
        if folder is None:
            continue
        for name in list(folder.glob("index.*")):
            name.unlink()
        hnsw = {"ef_construction": args.ef_construction, "ef_search": args.ef_search}
        tuning = {name: value for name, value in hnsw.items() if value is not None}
        settings = IndexSettings(kind=kind.removeprefix("binary-"), **tuning)
        start = time.perf_counter()
        report = build_index(folder, settings, progress=False)
        build_seconds = time.perf_counter() - start
        index = load_index(folder)
        to_rows = np.array([int(i.removeprefix("row")) for i in index.ids])  # index -> job row

        def search(q, index=index, to_rows=to_rows):
            return [[(int(to_rows[r]), s) for r, s in hits] for hits in index.search(q, K)]

        recall = recall_at_k(search(queries), truth)
        one, batch = queries_per_second(search, queries, args.single)
        config = {"data": label, "rows": report.rows, "kind": kind, **_tuning(index.meta)}
        bytes_per_vector = (folder / INDEX_FILE).stat().st_size / report.rows
        float_bytes = 4 * index.meta["dim"]
        results.add(config, "build_s", build_seconds, higher_is_better=False)
        results.add(
            config,
            "bytes_per_vector",
            bytes_per_vector,
            baseline_name="float32",
            baseline=float_bytes,
            higher_is_better=False,
        )
        results.add(config, "recall@10", recall)
        results.add(config, "qps_single", one, baseline_name="exact scan", baseline=exact_qps[0])
        results.add(config, "qps_batch", batch, baseline_name="exact scan", baseline=exact_qps[1])
        print(
            f"{label} {kind}: build {build_seconds:.1f}s, {bytes_per_vector:.0f} B/vector,"
            f" recall@10 {recall:.3f}, {one:,.0f} q/s single ({one / exact_qps[0]:.0f}x exact),"
            f" {batch:,.0f} q/s batch ({batch / exact_qps[1]:.1f}x exact)",
            flush=True,
        )


def _tuning(meta: dict) -> dict:
    settings = meta["settings"]
    keys = {
        "flat": (),
        "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
        "ivf-pq": ("nlist", "pq_m", "nprobe"),
    }[settings["kind"]]
    tuning = {key: settings[key] for key in keys}
    if settings["rescore"]:
        tuning["rescore_x"] = settings["rescore_multiplier"]
    return tuning


def exact_baseline(matrix: np.ndarray, queries: np.ndarray, single: int):
    """Ground truth and the exact scan's (one at a time, all at once) queries/s."""

    def search(q):
        return top_k([matrix], q, K)

    truth = search(queries)
    return truth, queries_per_second(search, queries, min(single, 20))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.quick:
        args.rows, args.queries, args.single = min(args.rows, 20000), 200, 20
    rng = np.random.default_rng(0)
    results = Results("index", "cpu", args.out)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir))
    try:
        clusters = args.clusters or max(1, args.rows // 100)
        matrix = clustered_unit_vectors(args.rows + args.queries, args.dim, clusters, rng)
        queries, matrix = matrix[: args.queries], matrix[args.queries :]
        folders = {"float": None, "binary": None}
        if any(not kind.startswith("binary") for kind in args.kinds):
            folders["float"] = workdir / "float"
            write_job(folders["float"], matrix)
        if any(kind.startswith("binary") for kind in args.kinds):
            folders["binary"] = workdir / "binary"
            binary = {"precision": "ubinary", "column": "embedding_ubinary", "keep_float": True}
            write_job(folders["binary"], matrix, binary)
        truth, exact_qps = exact_baseline(matrix, queries, args.single)
        results.note(
            f"synthetic: {args.rows:,} rows x {args.dim}, {clusters:,} clusters,"
            f" {args.queries} queries; exact scan {exact_qps[0]:,.1f} q/s one at a time,"
            f" {exact_qps[1]:,.1f} q/s all at once"
        )
        del matrix
        bench_folder(results, "synthetic", folders, queries, truth, exact_qps, args)
        if args.job is not None:
            bench_job(results, args, rng)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results.save()


def bench_job(results: Results, args, rng) -> None:
    """The kinds on a copy of a real job's folder (its index files are not touched)."""
    ids, matrix = read_embeddings(args.job)
    matrix = np.asarray(matrix, dtype=np.float32)
    queries = matrix[rng.choice(len(matrix), min(args.queries, len(matrix)), replace=False)]
    truth, exact_qps = exact_baseline(matrix, queries, args.single)
    results.note(
        f"job {args.job}: {len(ids):,} rows x {matrix.shape[1]}; exact scan {exact_qps[0]:,.1f}"
        f" q/s one at a time, {exact_qps[1]:,.1f} q/s all at once"
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-index-job-", dir=args.workdir))
    try:
        folders = {"float": workdir / "float", "binary": workdir / "binary"}
        write_job(folders["float"], matrix)
        binary = {"precision": "ubinary", "column": "embedding_ubinary", "keep_float": True}
        write_job(folders["binary"], matrix, binary)
        bench_folder(results, f"job:{args.job.name}", folders, queries, truth, exact_qps, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
