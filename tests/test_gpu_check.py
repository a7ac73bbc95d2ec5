"""The GPU check on a CPU, so that a typo never burns GPU minutes.

The rehearsal (the same script, tiny shapes, no install, gpu tests only collected) takes
minutes: ``make test-slow`` runs it. The default run drives the script's own functions with fake
steps and a fake GPU machine: the deadline, the results saved after every step, the step order
and the settings of a GPU run, in seconds."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BENCHMARK_STEPS = [
    "attention",
    "encode",
    "tuning",
    "contrastive",
    "mntp_loss",
    "fusions",
    "pooling",
    "model",
    "embed",
    "train",
]
EXPECTED_STEPS = ["environment", "pytest", *BENCHMARK_STEPS, "encode-texts", "micro"]
EXPECTED_GPU_STEPS = ["nvidia-smi", "install", "environment", "pytest", *BENCHMARK_STEPS, "micro"]
EXPECTED_BENCHMARKS = {
    "encode-random",
    "encode",
    "attention",
    "tuning",
    "contrastive",
    "mntp_loss",
    "pooling",
    "fusions",
    "embed-corpus",
    "train",
    "micro",
}


def script_env(out: Path, **env: str) -> dict[str, str]:
    """This process's environment without GPU_CHECK_* settings, with $OUT, $PYTHON and ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    return {**environ, "OUT": str(out), "PYTHON": sys.executable, **env}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check_out")
    done = subprocess.run(
        ["bash", str(SCRIPT), "--rehearsal"],
        cwd=ROOT,
        env=script_env(out),
        capture_output=True,
        text=True,
        timeout=480,
    )
    return done, out


@pytest.mark.slow
def test_rehearsal_succeeds_and_prints_the_table_last(rehearsal):
    done, out = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("GPU check (rehearsal)")
    assert summary.strip().splitlines()[-1] in done.stdout


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_tuning_table_comes_back_in_out(rehearsal):
    """The tuning step writes its table straight into $OUT, in the format the launchers read."""
    from llm2vec_fast.kernels.tuning import load_table

    _, out = rehearsal
    [table] = [p for p in out.glob("*.json") if p.name != "results.json"]
    load_table(table)  # raises on a malformed table
    assert json.loads(table.read_text())["device_name"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_gpu_tests_are_collected_not_run(rehearsal):
    _, out = rehearsal
    log = (out / "gpu_check.log").read_text()
    assert "tests collected" in log
    assert "install" not in [
        line.split(":")[0].removeprefix("=== ")
        for line in log.splitlines()
        if line.startswith("===")
    ]


@pytest.mark.slow
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


@pytest.mark.slow
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
    """A benchmark cut by its time limit keeps what it measured; one unreadable file loses
    nothing else."""
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


def script_constant(name: str) -> int:
    """A number the script defines at its top, e.g. COMBINE_LIMIT_S."""
    return int(re.search(rf"^{name}=(\d+)", SCRIPT.read_text(), re.MULTILINE)[1])


def sourced(lines: str) -> list[str]:
    """A bash command that sources gpu_check.sh (its functions, not its main), then runs lines."""
    return ["bash", "-c", f'source "{SCRIPT}"\n{lines}']


def drive(lines: str, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        sourced(lines),
        cwd=ROOT,
        env=script_env(out, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def archive(out: Path) -> dict[str, bytes]:
    """The files of $OUT/bench-json.tar.gz by name."""
    with tarfile.open(out / "bench-json.tar.gz") as tar:
        return {
            member.name.removeprefix("./"): tar.extractfile(member).read()
            for member in tar.getmembers()
            if member.isfile()
        }


# A fake benchmark step: writes one harness-format JSON into the results folder.
FAKE_BENCH = """bash -c 'printf "{\\"benchmark\\": \\"%s\\", \\"records\\": []}" "$0" >"$1"'"""


def test_a_budget_that_cuts_the_last_step_keeps_every_finished_step(tmp_path):
    steps_window_s = 5  # what the budget leaves for the steps after the summary's reserve
    budget = script_constant("COMBINE_LIMIT_S") + 2 * script_constant("KILL_GRACE_S")
    budget += steps_window_s
    started = time.monotonic()
    done = drive(
        f"""setup_run --rehearsal
run_step attention 60 {FAKE_BENCH} attention "$BENCH_DIR/attention.json"
run_step encode 60 {FAKE_BENCH} encode "$BENCH_DIR/encode.json"
run_step pooling 60 sleep 100
run_step micro 60 true
finish""",
        tmp_path,
        GPU_CHECK_BUDGET_S=str(budget),
    )
    assert time.monotonic() - started < budget
    files = archive(tmp_path)
    assert {"bench/attention.json", "bench/encode.json", "steps.tsv"} <= set(files)
    combined = json.loads((tmp_path / "results.json").read_text())
    status = {step["step"]: step["status"] for step in combined["steps"]}
    assert status["attention"] == status["encode"] == "ok"
    assert status["pooling"].startswith("cut at the deadline")
    assert status["micro"] == "not run: deadline reached"
    assert {run["benchmark"] for run in combined["benchmarks"]} == {"attention", "encode"}
    rerun = "rerun: GPU_CHECK_ONLY=pooling,micro bash benchmarks/gpu_check.sh --rehearsal"
    assert (tmp_path / "summary.txt").read_text().strip().splitlines()[-1] == rerun
    assert done.returncode == 1 and rerun in done.stdout


def test_a_call_killed_mid_step_returns_every_finished_step(tmp_path):
    """Each step's results are under $OUT as soon as it ends, not in one archive at the end."""
    lines = f"""setup_run --rehearsal
run_step attention 60 {FAKE_BENCH} attention "$BENCH_DIR/attention.json"
run_step pooling 60 sleep 100
finish"""
    call = subprocess.Popen(
        sourced(lines),
        cwd=ROOT,
        env=script_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = tmp_path / "gpu_check.log"
    deadline = time.monotonic() + 60
    while "=== pooling (limit" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and call.poll() is None
        time.sleep(0.1)
    os.killpg(call.pid, signal.SIGKILL)  # the device call's own limit, without warning
    call.wait()
    files = archive(tmp_path)
    assert json.loads(files["bench/attention.json"])["benchmark"] == "attention"
    assert files["steps.tsv"].decode().startswith("attention\t0\t")


@pytest.fixture
def fake_gpu_machine(tmp_path) -> dict[str, str]:
    """nvidia-smi reporting an H100/H200 and a python that logs its calls and succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    (bin_dir / "nvidia-smi").write_text(
        '#!/usr/bin/env bash\n[[ "$*" == *compute_cap* ]] && echo 9.0\nexit 0\n'
    )
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "python $*" >>"{calls}"\n'
        '[[ "$*" == *" -m gpu "* ]] && env | grep -E '
        f"'^(PYTHONPATH|HF_HUB_OFFLINE|LLM2VEC_FAST_CUDA_ARCHS|MAX_JOBS)=' >>\"{calls}\"\n"
        "exit 0\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}


def gpu_run(out: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str], str]:
    done = drive('main "$@"', out, **env)
    steps = [line.split("\t")[0] for line in archive(out)["steps.tsv"].decode().splitlines()]
    return done, steps, (out.parent / "calls.log").read_text()


def test_gpu_mode_runs_the_steps_by_value_under_the_right_settings(tmp_path, fake_gpu_machine):
    out = tmp_path / "out"
    done, steps, calls = gpu_run(out, fake_gpu_machine)
    assert done.returncode == 0, done.stdout + done.stderr
    assert steps == EXPECTED_GPU_STEPS
    [pytest_call] = [line for line in calls.splitlines() if " -m gpu " in line]
    assert "--continue-on-collection-errors" in pytest_call and " -n " in pytest_call
    assert f"--junitxml={out}/pytest_gpu.xml" in pytest_call
    [tuning_call] = [line for line in calls.splitlines() if "tune_kernels.py" in line]
    assert "--quick --device cuda" in tuning_call and f"--table-dir {out} " in tuning_call
    assert f"PYTHONPATH={ROOT}\n" in calls and "HF_HUB_OFFLINE=1\n" in calls
    assert "LLM2VEC_FAST_CUDA_ARCHS=9.0a\n" in calls  # built once, for the card at hand
    assert "every selected step passed" in done.stdout


def test_gpu_check_only_reruns_the_named_steps(tmp_path, fake_gpu_machine):
    _, steps, _ = gpu_run(tmp_path / "out", {**fake_gpu_machine, "GPU_CHECK_ONLY": "pytest,embed"})
    assert steps == ["nvidia-smi", "install", "environment", "pytest", "model", "embed"]


def test_an_unknown_step_is_refused_with_the_list_of_steps(tmp_path):
    done = drive('main "$@"', tmp_path, GPU_CHECK_ONLY="pytest,atention")
    assert done.returncode == 2
    assert "unknown step: atention" in done.stderr and "pytest, attention" in done.stderr
