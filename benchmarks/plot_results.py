"""PNG plots of the encode results in benchmarks/results/ (matplotlib, Agg backend).

For each ``*-encode-random.json`` (newest per device): encode tokens/s against sequence length
(equal-length sweep) and against the batch token budget, ours beside each baseline measured in
the same run, one line per side.

    python benchmarks/plot_results.py [--results benchmarks/results] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SWEEPS = {
    "seqlen": ("max_len", "sequence length (tokens, all equal)"),
    "batch_tokens": ("batch_tokens", "batch token budget"),
}


def newest_runs(folder: Path) -> dict[str, dict]:
    """The newest encode-random run per device (file names start with the date)."""
    runs: dict[str, dict] = {}
    for path in sorted(folder.glob("*-encode-random.json")):
        run = json.loads(path.read_text())
        runs[run["environment"]["device"]] = run
    return runs


def series(records: list[dict], sweep: str) -> dict[str, list[tuple[float, float]]]:
    """{side: [(x, tokens/s)]} for one sweep: ours (eager, and with CUDA graphs where measured)
    and one entry per baseline."""
    key = SWEEPS[sweep][0]
    lines: dict[str, dict[float, float]] = {}
    for record in records:
        if record["metric"] != "tokens/s" or record["config"].get("sweep") != sweep:
            continue
        x = record["config"][key]
        graphs = record["config"].get("variant") == "cuda-graphs"
        lines.setdefault("ours (packed, CUDA graphs)" if graphs else "ours (packed)", {})[x] = (
            record["value"]
        )
        if record["baseline_name"] != "ours-eager":  # that is the "ours (packed)" line
            lines.setdefault(record["baseline_name"], {})[x] = record["baseline"]
    return {side: sorted(points.items()) for side, points in lines.items()}


def plot_run(run: dict, out_dir: Path) -> list[Path]:
    env = run["environment"]
    model = next(
        (r["config"]["model"] for r in run["records"] if r["config"].get("sweep") == "seqlen"), "?"
    )
    written = []
    for sweep, (_, label) in SWEEPS.items():
        lines = series(run["records"], sweep)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for side, points in lines.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=side)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)  # ratios read true: no zoomed-in axis
        ax.set_title(
            f"encode {model}, {env['device']}\ntorch {env['torch']}, {env['date'][:10]}", fontsize=9
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-")
        path = out_dir / f"encode-{slug}-vs-{sweep.replace('_', '-')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    runs = newest_runs(args.results)
    if not runs:
        raise SystemExit(
            f"no *-encode-random.json in {args.results}: "
            "run benchmarks/bench_encode.py --source random first"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs.values():
        for path in plot_run(run, args.out):
            print(path)


if __name__ == "__main__":
    main()
