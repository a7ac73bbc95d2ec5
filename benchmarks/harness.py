"""The small harness every benchmark script shares.

Timing: CUDA events (via ``triton.testing.do_bench`` when available) on a GPU, ``perf_counter`` on
a CPU; always after warm-up, reporting the median of repeats. Results: one JSON file per run in
``benchmarks/results/`` (or ``--out``), named ``YYYY-MM-DD-<device>-<name>.json``, holding the
environment (device, versions, git commit) and one record per measurement with its baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from llm2vec_fast.info import describe_cpu_bf16

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """Common flags: ``--quick`` (small shapes, few repeats), ``--device``, ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="small shapes and few repeats (smoke test / GPU check)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON result")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The benchmarks' compute dtype: bf16 on a GPU, fp32 on a CPU (whose bf16 may be emulated)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_ms(
    fn: Callable[[], object], *, device: torch.device | str, warmup: int = 3, repeats: int = 10
) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=max(warmup, 1) * 10, rep=max(repeats, 1) * 20, return_mode="median"
            )
        )
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_calls_ms(
    fn: Callable[[], object], *, device: torch.device | str, warmup: int = 1, repeats: int = 3
) -> float:
    """Median wall time in milliseconds of whole calls of a long ``fn()`` (an end-to-end encode,
    host work included), synchronizing the device around each call, after ``warmup`` calls.

    ``measure_ms`` suits kernels; for calls of seconds, ``do_bench``'s own estimate runs would
    multiply the cost, so this runs exactly ``warmup + repeats`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(repeats, 1)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def matmul_tflops(device: torch.device | str, dtype: torch.dtype, size: int) -> float:
    """The achieved dense matmul rate (TFLOP/s) of a ``size`` cube ``torch.matmul`` in ``dtype``,
    measured now: the denominator of MFU, taken on the same card in the same run. On a GPU the
    median of ``do_bench``; on a (possibly shared) CPU the fastest of 10 calls, as a peak."""
    generator = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
        for _ in range(2)
    )
    if torch.device(device).type == "cuda":
        ms = measure_ms(lambda: torch.matmul(a, b), device=device, warmup=2, repeats=5)
    else:
        torch.matmul(a, b)
        ms = min(
            measure_ms(lambda: torch.matmul(a, b), device=device, warmup=0, repeats=1)
            for _ in range(10)
        )
    return 2 * size**3 / ms / 1e9


def peak_memory_bytes(fn: Callable[[], object], *, device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before; None on a CPU.

    One untimed call comes first, so that one-time allocations (optimizer state, library
    workspaces) do not land on whichever side is measured first."""
    if torch.device(device).type != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def device_name(device: torch.device | str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device | str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_bf16": describe_cpu_bf16(),  # decides whether CPU bf16 numbers mean anything
        "git_commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-").replace("--", "-")


class Results:
    """Collects the records of one benchmark run, prints them as a table and saves them as JSON."""

    def __init__(self, name: str, device: torch.device | str, out_dir: Path = RESULTS_DIR):
        self.name = name
        self.device = device
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self.notes: list[str] = []
        self._environment: dict | None = None

    def note(self, text: str) -> None:
        """A line for the reader (e.g. a configuration skipped and why): printed now, saved."""
        print(text, flush=True)
        self.notes.append(text)
        self._write()

    def add(
        self,
        config: dict,
        metric: str,
        value: float,
        *,
        baseline_name: str | None = None,
        baseline: float | None = None,
        higher_is_better: bool = True,
        **extra,
    ) -> dict:
        """One measurement beside its baseline; ``ratio`` is >1 when ours is better."""
        ratio = None
        if baseline is not None and value and baseline:
            ratio = value / baseline if higher_is_better else baseline / value
        record = {
            "config": config,
            "metric": metric,
            "value": value,
            "baseline_name": baseline_name,
            "baseline": baseline,
            "ratio": ratio,
            **extra,
        }
        self.records.append(record)
        self._write()  # on disk as it grows: a run cut short by a time limit keeps what it measured
        return record

    def table(self) -> str:
        rows = [("config", "metric", "ours", "baseline", "ratio")]
        for r in self.records:
            config = " ".join(f"{k}={v}" for k, v in r["config"].items())
            baseline = (
                "" if r["baseline"] is None else f"{r['baseline']:.4g} ({r['baseline_name']})"
            )
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            rows.append((config, r["metric"], f"{r['value']:.4g}", baseline, ratio))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)

    def _write(self) -> Path:
        """Write the JSON file (atomically: a reader never sees half of it); returns its path."""
        if self._environment is None:
            self._environment = environment(self.device)
        env = self._environment
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{env['date'][:10]}-{_slug(env['device'])}-{self.name}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "benchmark": self.name,
                    "environment": env,
                    "records": self.records,
                    "notes": self.notes,
                },
                indent=2,
            )
            + "\n"
        )
        os.replace(tmp, path)
        return path

    def save(self) -> Path:
        """Print the table and write the JSON file; returns its path."""
        path = self._write()
        env = self._environment
        print(f"\n{self.name} on {env['device']} (torch {env['torch']}, triton {env['triton']})")
        print(self.table())
        print(f"saved {path}")
        return path
