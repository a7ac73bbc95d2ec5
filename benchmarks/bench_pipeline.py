"""The corpus job's pipeline without a model in the way: does the job keep up with its tokenizers?

On the same JSONL files and with the same number of worker processes, it times (1) reading and
tokenization alone: the job's reader and tokenizer processes, their chunks consumed and dropped,
and (2) the whole job (``embed_corpus``) with the ``fake`` engine, which has no model to run:
shards are still put together, hashed into vectors, written and recorded. The target is (2) >=
0.8x (1): then on a GPU the device, not the host, decides the speed. The job's summary names the
stage that bounds it.

    python benchmarks/bench_pipeline.py --rows 40000 --workers 1
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from llm2vec_fast.corpus import embed_corpus
from llm2vec_fast.corpus.engine import HashEngine
from llm2vec_fast.corpus.inputs import discover_inputs
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.workers import ReadEnd, WorkerPool, default_workers

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "unsup_corpus"
TARGET = 0.8


def _extra(parser) -> None:
    parser.add_argument("--rows", type=int, default=40000, help="JSONL rows to embed")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: the job's)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument(
        "--dim",
        type=int,
        default=16,
        help="the fake engine's dim: its hashing and the Parquet bytes grow with it",
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="folder of text files")


class NoComputeEngine(HashEngine):
    """The fake engine's tokens with zero vectors: the pipeline alone, not even hashing."""

    def embed(self, items, progress=None):
        return np.zeros((len(items), self.dim), dtype=np.float32)


def write_corpus(path: Path, rows: int, corpus: Path) -> Path:
    """``rows`` JSONL records cycling over the non-empty lines of the corpus's text files."""
    lines = [
        line.strip()
        for file in sorted(corpus.glob("*"))
        if file.is_file()
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]
    if not lines:  # no corpus here: synthetic text
        lines = [f"synthetic sentence {i} " + "lorem ipsum " * (i % 20) for i in range(1000)]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(json.dumps({"id": f"r{i}", "text": lines[i % len(lines)]}) + "\n")
    return path


def read_and_tokenize(files, engine: HashEngine, workers: int) -> float:
    """Seconds for the job's reader and tokenizer processes to go through every row."""
    settings = JobSettings(id_field="id")
    start = time.perf_counter()
    pool = WorkerPool.start(workers, engine, files, settings, 0, 1, set())
    try:
        while True:
            message = pool.next(lambda: False)
            if isinstance(message, ReadEnd):
                break
            if not hasattr(message, "ids"):
                raise message.error
    finally:
        pool.close(finished=True)
    return time.perf_counter() - start


def main() -> None:
    # here, not at the top: worker processes import this script again, and harness imports torch
    from harness import Results, parse_args

    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.quick:
        args.rows, args.repeats = min(args.rows, 5000), 1
    workers = args.workers if args.workers is not None else max(1, default_workers())
    results = Results("pipeline", "cpu", args.out)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        corpus = write_corpus(workdir / "in.jsonl", args.rows, args.corpus)
        files = discover_inputs(corpus)
        alone = min(
            read_and_tokenize(files, HashEngine(dim=args.dim), workers) for _ in range(args.repeats)
        )
        for label, engine in [
            (f"fake:dim={args.dim}", HashEngine(dim=args.dim)),
            (f"fake:dim={args.dim}, no hashing", NoComputeEngine(dim=args.dim)),
        ]:
            job_seconds, summary = float("inf"), None
            for repeat in range(args.repeats):
                out = workdir / f"out-{repeat}"
                start = time.perf_counter()
                run = embed_corpus(
                    corpus, out, engine=engine, id_field="id", workers=workers, progress=False
                )
                seconds = time.perf_counter() - start
                if seconds < job_seconds:
                    job_seconds, summary = seconds, run
                shutil.rmtree(out)
            config = {"rows": args.rows, "workers": workers, "engine": label}
            results.add(config, "read+tokenize rows/s", args.rows / alone)
            results.add(
                config,
                "job rows/s",
                args.rows / job_seconds,
                baseline_name="read+tokenize alone",
                baseline=args.rows / alone,
                target=TARGET,
                bound=summary.bound,
                busy={stage: round(share, 3) for stage, share in summary.busy.items()},
                seconds={stage: round(value, 3) for stage, value in summary.seconds.items()},
            )
            ratio = alone / job_seconds
            verdict = "met" if ratio >= TARGET else "not met"
            results.note(
                f"{label}: job / read+tokenize alone = {ratio:.2f} (target {TARGET}: {verdict}),"
                f" {os.cpu_count()} CPUs, {workers} workers\n{summary}"
            )
        results.save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
