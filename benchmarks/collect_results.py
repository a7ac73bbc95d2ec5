"""Combine a GPU check's outputs into one JSON and a table; split that JSON into result files.

    python benchmarks/collect_results.py combine --steps S.tsv --bench-dir D --out results.json ...
    python benchmarks/collect_results.py split results.json [--dest benchmarks/results]

``combine`` (called by gpu_check.sh) reads the step outcomes, the pytest junit file, and every
benchmark JSON (harness format; pytest-benchmark's for the micro-benchmarks), writes one
``results.json`` and prints the table last. ``split`` writes each benchmark run of it as its own
``YYYY-MM-DD-<device>-<name>.json`` in ``benchmarks/results/``, the files the README and plots use.
"""

from __future__ import annotations

import argparse
import json
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

from harness import RESULTS_DIR, _slug, environment


def read_steps(path: Path) -> list[dict]:
    steps = []
    for line in path.read_text().splitlines():
        name, rc, seconds, status = line.split("\t")
        steps.append(
            {
                "step": name,
                "exit_code": None if rc == "-" else int(rc),
                "seconds": float(seconds),
                "status": status,
            }
        )
    return steps


def read_junit(path: Path) -> dict | None:
    """Counts and the failed test ids of a pytest junit file; None when there is none."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:  # pytest cut mid-write: keep the rest of the results
        return {
            "tests": 0,
            "failures": 0,
            "errors": 1,
            "skipped": 0,
            "passed": 0,
            "failed": [f"unreadable {path.name}: {exc}"],
        }
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": failed,
    }


def read_micro(path: Path) -> dict:
    """pytest-benchmark's JSON reduced to one record per micro-benchmark (median milliseconds)."""
    raw = json.loads(path.read_text())
    records = [
        {
            "config": {"test": bench["name"]},
            "metric": "median_ms",
            "value": bench["stats"]["median"] * 1e3,
            "baseline_name": None,
            "baseline": None,
            "ratio": None,
        }
        for bench in raw.get("benchmarks", [])
    ]
    return {"benchmark": "micro", "records": records, "notes": []}


def read_benchmarks(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            run = read_micro(path) if path.name == "micro.json" else json.loads(path.read_text())
        except (ValueError, KeyError) as exc:  # one unreadable file must not lose the others
            run = {
                "benchmark": path.stem,
                "records": [],
                "notes": [f"skipped: unreadable {path.name}: {exc}"],
            }
        run["file"] = path.name
        runs.append(run)
    return runs


def headline(run: dict) -> str:
    """One line per benchmark: the range of its ratios vs baseline, or its record count."""
    ratios = [r["ratio"] for r in run["records"] if r.get("ratio")]
    if not ratios:
        return f"{len(run['records'])} records"
    median = sorted(ratios)[len(ratios) // 2]
    return (
        f"{len(run['records'])} records, ratio vs baseline {min(ratios):.2f}x .. "
        f"{max(ratios):.2f}x (median {median:.2f}x)"
    )


def table(combined: dict) -> str:
    env = combined["environment"]
    lines = [
        f"GPU check ({combined['mode']}) on {env['device']}: torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}, commit {env['git_commit']}"
    ]
    width = max(len(s["step"]) for s in combined["steps"]) if combined["steps"] else 10
    lines += [
        f"  {s['step'].ljust(width)}  {s['seconds']:7.1f}s  {s['status']}"
        for s in combined["steps"]
    ]
    pytest = combined["pytest_gpu"]
    if pytest is not None:
        lines.append(
            f"pytest -m gpu: {pytest['passed']} passed, {pytest['failures']} failed, "
            f"{pytest['errors']} errors, {pytest['skipped']} skipped of {pytest['tests']}"
        )
        lines += [f"  FAILED {test}" for test in pytest["failed"][:20]]
    for run in combined["benchmarks"]:
        lines.append(f"{run['benchmark']:>14}: {headline(run)}")
        lines += [f"{'':>16}{note}" for note in run.get("notes", []) if note.startswith("skip")]
    return "\n".join(lines)


def combine(args: argparse.Namespace) -> int:
    env = environment("cuda" if args.mode == "gpu" else "cpu")
    env["platform"] = platform.platform()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    combined = {
        "mode": args.mode,
        "environment": env,
        "steps": read_steps(args.steps),
        "pytest_gpu": read_junit(args.junit),
        "benchmarks": read_benchmarks(args.bench_dir),
    }
    args.out.write_text(json.dumps(combined, indent=2) + "\n")
    text = table(combined)
    args.summary.write_text(text + "\n")
    with args.log.open("a") as log:
        log.write(text + "\n")
    print(text)
    return 0 if all(s["status"] == "ok" for s in combined["steps"]) else 1


def split(args: argparse.Namespace) -> int:
    combined = json.loads(args.combined.read_text())
    args.dest.mkdir(parents=True, exist_ok=True)
    env = combined["environment"]
    for run in combined["benchmarks"]:
        run_env = run.get("environment", env)
        path = (
            args.dest / f"{run_env['date'][:10]}-{_slug(run_env['device'])}-{run['benchmark']}.json"
        )
        body = {
            "benchmark": run["benchmark"],
            "environment": run_env,
            "records": run["records"],
            "notes": run.get("notes", []),
        }
        path.write_text(json.dumps(body, indent=2) + "\n")
        print(path)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("combine")
    c.add_argument("--mode", choices=["gpu", "rehearsal"], required=True)
    c.add_argument("--steps", type=Path, required=True)
    c.add_argument("--bench-dir", type=Path, required=True)
    c.add_argument("--junit", type=Path, required=True)
    c.add_argument("--log", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--summary", type=Path, required=True)
    s = commands.add_parser("split")
    s.add_argument("combined", type=Path)
    s.add_argument("--dest", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    return combine(args) if args.command == "combine" else split(args)


if __name__ == "__main__":
    raise SystemExit(main())
