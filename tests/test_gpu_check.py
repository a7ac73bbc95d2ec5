"""The GPU check's CPU rehearsal: the same script, tiny shapes, no install, gpu tests only
collected. Run here so that a typo never burns GPU minutes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
EXPECTED_STEPS = [
    "environment",
    "pytest -m gpu --collect-only",
    "bench attention",
    "bench contrastive",
    "bench mntp_loss",
    "bench encode",
    "random model + corpus",
    "bench embed",
    "bench pooling",
    "bench fusions",
    "bench train",
    "bench encode-texts",
    "micro-benchmarks",
]
EXPECTED_BENCHMARKS = {
    "encode-random",
    "encode",
    "attention",
    "contrastive",
    "mntp_loss",
    "pooling",
    "fusions",
    "embed-corpus",
    "train",
    "micro",
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--rehearsal"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    return done, out


def test_rehearsal_succeeds_and_prints_the_table_last(rehearsal):
    done, out = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("GPU check (rehearsal)")
    assert summary.strip().splitlines()[-1] in done.stdout


def test_rehearsal_writes_few_well_formed_files(rehearsal):
    _, out = rehearsal
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert {"gpu_check.log", "results.json", "summary.txt", "bench-json.tar.gz"} <= set(files)
    assert len(files) <= 8, files
    combined = json.loads((out / "results.json").read_text())
    assert combined["mode"] == "rehearsal"
    env = combined["environment"]
    for key in ("device", "torch", "triton", "cuda", "git_commit", "date"):
        assert key in env, key
    assert [step["step"] for step in combined["steps"]] == EXPECTED_STEPS
    assert all(step["status"] == "ok" and step["exit_code"] == 0 for step in combined["steps"]), (
        combined["steps"]
    )


def test_every_benchmark_ran_and_reported_finite_numbers(rehearsal):
    _, out = rehearsal
    runs = json.loads((out / "results.json").read_text())["benchmarks"]
    assert {run["benchmark"] for run in runs} == EXPECTED_BENCHMARKS
    for run in runs:
        assert run["records"], run["benchmark"]
        for record in run["records"]:
            assert {"config", "metric", "value"} <= set(record)
            assert math.isfinite(record["value"]) and record["value"] > 0, (
                run["benchmark"],
                record,
            )
            if record.get("baseline") is not None:
                assert math.isclose(
                    record["ratio"], record["value"] / record["baseline"], rel_tol=1e-9
                ) or math.isclose(
                    record["ratio"], record["baseline"] / record["value"], rel_tol=1e-9
                )


def test_encode_agrees_with_transformers_and_reports_mfu(rehearsal):
    _, out = rehearsal
    run = next(
        r
        for r in json.loads((out / "results.json").read_text())["benchmarks"]
        if r["benchmark"] == "encode-random"
    )
    sweeps = {r["config"]["sweep"] for r in run["records"]}
    assert sweeps == {"mix", "seqlen", "batch_tokens"}
    baselines = {r["baseline_name"] for r in run["records"]}
    assert baselines == {"transformers-sdpa-sorted", "st-loop-32", "ours-eager"}
    graphed = [r for r in run["records"] if r["config"].get("variant") == "cuda-graphs"]
    assert {
        r["config"]["sweep"] for r in graphed
    } == sweeps  # the CUDA-graph variant is rehearsed everywhere
    assert all(
        r["min_cosine_vs_baseline"] > 0.999 for r in run["records"] if "min_cosine_vs_baseline" in r
    )
    mfu = [r for r in run["records"] if r["metric"] == "MFU"]
    assert mfu and all(0 < r["value"] < 1 and r["matmul_tflops"] > 0 for r in mfu)


def test_gpu_tests_are_collected_not_run(rehearsal):
    _, out = rehearsal
    log = (out / "gpu_check.log").read_text()
    assert "tests collected" in log
    assert "install" not in [
        line.split(":")[0].removeprefix("=== ")
        for line in log.splitlines()
        if line.startswith("===")
    ]


def test_split_writes_one_result_file_per_benchmark(rehearsal, tmp_path):
    _, out = rehearsal
    subprocess.run(
        [
            sys.executable,
            "benchmarks/collect_results.py",
            "split",
            str(out / "results.json"),
            "--dest",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    names = {json.loads(p.read_text())["benchmark"] for p in tmp_path.glob("*.json")}
    assert names == EXPECTED_BENCHMARKS


def test_unknown_argument_is_refused():
    done = subprocess.run(
        ["bash", str(SCRIPT), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "usage" in done.stderr


def test_micro_benchmarks_stay_out_of_the_default_run():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert not list((ROOT / "tests").rglob("test_micro_*.py"))


def test_plots_are_drawn_from_the_split_results(rehearsal, tmp_path):
    _, out = rehearsal
    subprocess.run(
        [
            sys.executable,
            "benchmarks/collect_results.py",
            "split",
            str(out / "results.json"),
            "--dest",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            "benchmarks/plot_results.py",
            "--results",
            str(tmp_path),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert [name.rsplit("-vs-", 1)[1] for name in pngs] == ["batch-tokens.png", "seqlen.png"]
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)


def test_results_are_on_disk_after_every_record_and_combine_survives_a_broken_file(tmp_path):
    """A benchmark cut by its time limit keeps what it measured; one unreadable file loses nothing else."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from collect_results import read_benchmarks, read_junit
    from harness import Results

    results = Results("demo", "cpu", tmp_path)
    results.add({"n": 1}, "speed", 2.0, baseline_name="base", baseline=1.0)
    [saved] = tmp_path.glob("*-demo.json")
    assert [r["ratio"] for r in json.loads(saved.read_text())["records"]] == [2.0]  # before save()
    (tmp_path / "broken.json").write_text('{"benchmark": "cut')
    runs = {run["file"]: run for run in read_benchmarks(tmp_path)}
    assert len(runs[saved.name]["records"]) == 1 and runs["broken.json"]["notes"][0].startswith(
        "skipped: unreadable"
    )
    (tmp_path / "junit.xml").write_text("<testsuite tests=")
    assert read_junit(tmp_path / "junit.xml")["errors"] == 1
