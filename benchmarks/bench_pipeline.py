"""The corpus job's pipeline without a model in the way: does the job keep up with its tokenizers?

On the same JSONL files and with the same number of worker processes, it times (1) reading and
tokenization alone: the job's reader and tokenizer processes started as the job starts them, the
main process only draining their chunks, and (2) the whole job (``embed_corpus``, start to
summary) with the ``fake`` engine, which has no model to run: shards are still put together,
hashed into vectors, written and recorded. The target is (2) >= 0.8x (1): then on a GPU the
device, not the host, decides the speed. The job's summary names the stage that bounds it.

The two are measured in interleaved rounds (alone, job, job without hashing, alone, ...) after a
warm-up round that is not counted (the first job imports pyarrow and starts the forkserver), so
that a machine whose load changes during the run slows both sides alike; the ratio is the median
of the rounds' ratios. Beside the times it records CPU seconds (this process's, and the workers'
where /proc has them): on a machine with no idle core the job cannot beat the ratio of the CPU
seconds of both sides, whatever the pipeline overlaps.

    python benchmarks/bench_pipeline.py --rows 40000 --workers 1 2
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from llm2vec_fast.corpus import embed_corpus
from llm2vec_fast.corpus.engine import HashEngine
from llm2vec_fast.corpus.inputs import discover_inputs
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.workers import Failure, ReadEnd, WorkerPool, default_workers

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "unsup_corpus"
TARGET = 0.8


def _extra(parser) -> None:
    parser.add_argument("--rows", type=int, default=40000, help="JSONL rows to embed")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="worker process counts, each measured on its own (default: the job's)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
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


def main_cpu_seconds() -> float:
    """CPU seconds of this process so far, all its threads (the workers are not its children:
    they come from the forkserver)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a running process (Linux's /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def read_and_tokenize(files, engine: HashEngine, workers: int):
    """Seconds for the job's reader and tokenizer processes to go through every row, the CPU
    seconds of this process meanwhile, and those of the workers (None where unknown)."""
    settings = JobSettings(id_field="id")
    cpu = main_cpu_seconds()
    start = time.perf_counter()
    pool = WorkerPool.start(workers, engine, files, settings, 0, 1, set(), "max_length")
    per_worker: dict[int, float | None] = {}  # the last reading of each: the reader exits first
    try:
        while True:
            message = pool.next(lambda: False)
            for process in pool.processes:
                per_worker[process.pid] = worker_cpu_seconds(process.pid) or per_worker.get(
                    process.pid
                )
            if isinstance(message, ReadEnd):  # each tokenizer is done with its chunks
                break
            if isinstance(message, Failure):
                raise message.error
    finally:
        pool.close(finished=True)
    seconds, cpu = time.perf_counter() - start, main_cpu_seconds() - cpu
    readings = list(per_worker.values())
    return seconds, cpu, None if None in readings else sum(readings)


def run_job(corpus: Path, out: Path, engine: HashEngine, workers: int):
    """Seconds for the whole job, the CPU seconds of this process meanwhile, and its summary."""
    cpu = main_cpu_seconds()
    start = time.perf_counter()
    summary = embed_corpus(
        corpus, out, engine=engine, id_field="id", workers=workers, progress=False
    )
    seconds = time.perf_counter() - start
    cpu = main_cpu_seconds() - cpu
    shutil.rmtree(out)
    return seconds, cpu, summary


def measure(results, corpus: Path, workdir: Path, workers: int, args) -> None:
    """Interleaved rounds of read+tokenize alone and of the job with each engine, recorded."""
    files = discover_inputs(corpus)
    engines = {
        f"fake:dim={args.dim}": HashEngine(dim=args.dim),
        f"fake:dim={args.dim}, no hashing": NoComputeEngine(dim=args.dim),
    }
    alone: list[tuple] = []
    jobs: dict[str, list] = {label: [] for label in engines}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        alone.append(read_and_tokenize(files, HashEngine(dim=args.dim), workers))
        for label, engine in engines.items():
            jobs[label].append(run_job(corpus, workdir / "out", engine, workers))
    load = f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"
    best_alone = min(run[0] for run in alone)
    alone_cpu = statistics.median(run[1] for run in alone)
    workers_cpu = (
        None if None in (run[2] for run in alone) else statistics.median(r[2] for r in alone)
    )
    results.add(
        {"rows": args.rows, "workers": workers},
        "read+tokenize rows/s",
        args.rows / best_alone,
        seconds=[round(run[0], 3) for run in alone],
        main_process_cpu_seconds=round(alone_cpu, 3),
        workers_cpu_seconds=None if workers_cpu is None else round(workers_cpu, 3),
    )
    for label, runs in jobs.items():
        seconds = [run[0] for run in runs]
        ratios = [a[0] / s for a, s in zip(alone, seconds)]
        ratio = statistics.median(ratios)
        best, _, summary = min(runs, key=lambda run: run[0])
        job_cpu = statistics.median(run[1] for run in runs)
        # with no idle core the job can go no faster than its CPU seconds allow
        cpu_ratio = (
            None if workers_cpu is None else (workers_cpu + alone_cpu) / (workers_cpu + job_cpu)
        )
        results.add(
            {"rows": args.rows, "workers": workers, "engine": label},
            "job rows/s",
            args.rows / best,
            baseline_name="read+tokenize alone",
            baseline=args.rows / best_alone,
            target=TARGET,
            median_round_ratio=round(ratio, 3),
            round_ratios=[round(value, 3) for value in ratios],
            job_seconds=[round(value, 3) for value in seconds],
            main_process_cpu_seconds=round(job_cpu, 3),
            cpu_seconds_ratio=None if cpu_ratio is None else round(cpu_ratio, 3),
            bound=summary.bound,
            busy={stage: round(share, 3) for stage, share in summary.busy.items()},
            summary_seconds={stage: round(v, 3) for stage, v in summary.seconds.items()},
        )
        verdict = "met" if ratio >= TARGET else "not met"
        results.note(
            f"{label}, {workers} workers: job / read+tokenize alone = {ratio:.2f} (median of"
            f" {len(ratios)} interleaved rounds; target {TARGET}: {verdict}); {os.cpu_count()}"
            f" CPUs, {load}; CPU seconds: workers {workers_cpu or 0:.2f}, main process alone"
            f" {alone_cpu:.2f}, in the job {job_cpu:.2f} (their ratio {cpu_ratio or 0:.2f}: what"
            f" a machine with no idle core allows)\nfastest job's summary:\n{summary}"
        )


def main() -> None:
    # here, not at the top: worker processes import this script again, and harness imports torch
    from harness import Results, parse_args

    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.quick:
        args.rows, args.repeats = min(args.rows, 5000), 1
    worker_counts = args.workers or [max(1, default_workers())]
    results = Results("pipeline", "cpu", args.out)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        corpus = write_corpus(workdir / "in.jsonl", args.rows, args.corpus)
        warm_up = write_corpus(workdir / "warm-up.jsonl", 2000, args.corpus)
        read_and_tokenize(discover_inputs(warm_up), HashEngine(dim=args.dim), worker_counts[0])
        run_job(warm_up, workdir / "out", HashEngine(dim=args.dim), worker_counts[0])
        for workers in worker_counts:
            measure(results, corpus, workdir, workers, args)
        results.save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
