"""``llm2vec-fast index DIR``: build or update the faiss index of an embedding job."""

from __future__ import annotations

import argparse
import sys

from llm2vec_fast.corpus.cli import positive_int

# llm2vec_fast.corpus.index.KINDS, spelled out: building the parser must not import numpy
KINDS = ("flat", "hnsw", "ivf-pq")

INDEX_EPILOG = """\
kinds: flat (exact inner product, 4 bytes a dimension), hnsw (graph, fast and close to exact,
memory of flat plus the graph), ivf-pq (inverted lists of product-quantized codes: pq-m bytes a
vector, trained on a sample of the job's rows, rescored with the stored vectors). A job embedded
with --quantize binary/ubinary gets a faiss binary index (Hamming distance; flat or hnsw) whose
candidates are rescored with the stored floats (--keep-float) or else with the float query
against the sign bits.

files in DIR: index.faiss, index.ids.parquet (the id of each index row), index.rescore.npy
(vectors to rescore with, read by memory map), index.json (settings and the shards indexed).
Run it again after the job got more shards (a resumed job): the new rows are added. An index
whose shards changed is rebuilt; `llm2vec-fast search` refuses a stale index.
"""


def add_parser(subparsers) -> None:
    index = subparsers.add_parser(
        "index",
        help="build (or update) a faiss index of an embedded corpus for fast search",
        description="Build a faiss index of the embeddings in an `llm2vec-fast embed` folder,"
        " streaming its shards, and keep it in the folder for `llm2vec-fast search`. Options"
        " not given keep the values of the index already there, else their defaults.",
        epilog=INDEX_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index.add_argument("folder", metavar="DIR", help="output folder of `llm2vec-fast embed`")
    index.add_argument(
        "--kind",
        default=None,
        choices=KINDS,
        help="index kind (default: the existing index's, else hnsw)",
    )
    index.add_argument("--hnsw-m", type=positive_int, default=None, help="HNSW: links a node (32)")
    index.add_argument(
        "--ef-construction",
        type=positive_int,
        default=None,
        help="HNSW: candidates while building (100)",
    )
    index.add_argument(
        "--ef-search",
        type=positive_int,
        default=None,
        help="HNSW: candidates while searching (128)",
    )
    index.add_argument(
        "--nlist", type=positive_int, default=None, help="IVF-PQ: inverted lists (sqrt(rows))"
    )
    index.add_argument(
        "--pq-m", type=positive_int, default=None, help="IVF-PQ: bytes a vector (dim / 8)"
    )
    index.add_argument(
        "--nprobe", type=positive_int, default=None, help="IVF-PQ: lists searched per query (32)"
    )
    index.add_argument(
        "--train-rows",
        type=positive_int,
        default=None,
        help="IVF-PQ: rows sampled to train on (40 nlist, at least 10,000)",
    )
    rescore = index.add_mutually_exclusive_group()
    rescore.add_argument(
        "--rescore",
        dest="rescore",
        action="store_true",
        default=None,
        help="rescore candidates with the stored vectors (default for binary and ivf-pq)",
    )
    rescore.add_argument("--no-rescore", dest="rescore", action="store_false")
    index.add_argument(
        "--rescore-multiplier",
        type=positive_int,
        default=None,
        help="candidates rescored: k times this (10)",
    )
    index.add_argument(
        "--rebuild", action="store_true", help="build afresh even when the index could be updated"
    )
    index.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="index the shards of an unfinished job (run again once it is finished)",
    )
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.set_defaults(run=run_index)


def run_index(args: argparse.Namespace) -> int:
    from llm2vec_fast.corpus.index import (
        IndexSettings,
        build_index,
        import_faiss,
        requested_settings,
    )

    given = {
        "kind": args.kind,
        "hnsw_m": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
        "nlist": args.nlist,
        "pq_m": args.pq_m,
        "nprobe": args.nprobe,
        "train_rows": args.train_rows,
        "rescore": args.rescore,
        "rescore_multiplier": args.rescore_multiplier,
    }
    try:
        import_faiss()
    except ImportError as exc:
        print(f"llm2vec-fast index: error: {exc}", file=sys.stderr)
        return 2
    settings = requested_settings(args.folder) or {}
    settings.update({name: value for name, value in given.items() if value is not None})
    report = build_index(
        args.folder,
        IndexSettings(**settings),
        allow_incomplete=args.allow_incomplete,
        progress=not args.no_progress,
        rebuild=args.rebuild,
    )
    print(report, file=sys.stderr)
    return 0
