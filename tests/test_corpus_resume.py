"""Crash and resume: the job killed with SIGKILL (at chosen stages and at random moments, in one
process or one of two gloo ranks) and resumed must end exactly like an uninterrupted run."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llm2vec_fast.corpus import embed_corpus, read_embeddings, read_errors
from llm2vec_fast.corpus.engine import HashEngine
from llm2vec_fast.corpus.manifest import CRASH_ENV, load_manifest, recorded_shards

SHARD_ROWS = 10
ROWS = 125  # 13 shards, the last one short


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    rng = random.Random(0)
    lines = []
    for i in range(ROWS):
        if i % 17 == 5:
            lines.append('{"id": "broken", ')
        elif i % 23 == 7:
            lines.append(json.dumps({"id": f"doc{i}", "text": "   "}))
        elif i % 29 == 11:
            lines.append(json.dumps({"id": "doc0", "text": "duplicate"}))
        else:
            lines.append(
                json.dumps(
                    {
                        "id": f"doc{i}",
                        "text": " ".join(
                            rng.choice("abcdefgh") * rng.randint(1, 9)
                            for _ in range(rng.randint(1, 30))
                        ),
                    }
                )
            )
    half = ROWS // 2
    (folder / "part-a.jsonl").write_text("\n".join(lines[:half]) + "\n")
    (folder / "part-b.jsonl").write_text("\n".join(lines[half:]) + "\n")
    return folder


def _command(corpus: Path, out: Path, model: str = "fake:dim=8") -> list[str]:
    return [
        sys.executable,
        "-m",
        "llm2vec_fast.cli",
        "embed",
        "--model",
        model,
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--id-field",
        "id",
        "--shard-rows",
        str(SHARD_ROWS),
        "--max-batch-tokens",
        "64",
        "--no-progress",
    ]


def _env(**extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (CRASH_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def corpus_and_clean(tmp_path_factory):
    """The corpus and an uninterrupted in-process run over it."""
    root = tmp_path_factory.mktemp("corpus")
    corpus = _corpus(root / "in")
    embed_corpus(
        corpus,
        root / "clean",
        engine=HashEngine(dim=8),
        id_field="id",
        shard_rows=SHARD_ROWS,
        max_batch_tokens=64,
        progress=False,
    )
    return corpus, root / "clean"


def _assert_same_as_clean(out: Path, clean: Path) -> None:
    ids, matrix = read_embeddings(out)
    clean_ids, clean_matrix = read_embeddings(clean)
    assert len(ids) == len(set(ids))
    assert ids == clean_ids
    np.testing.assert_array_equal(matrix, clean_matrix)
    assert read_errors(out) == read_errors(clean)
    manifest, clean_manifest = load_manifest(out), load_manifest(clean)
    assert manifest["counts"] == clean_manifest["counts"]
    assert manifest["counts"]["rows_in"] == ROWS
    assert [s["sha256"] for s in manifest["shards"]] == [
        s["sha256"] for s in clean_manifest["shards"]
    ]
    assert not list(out.glob("manifest.rank-*")) and not list(out.rglob("*.tmp-*"))


def _assert_partial_state_is_consistent(out: Path) -> None:
    """What a killed run left: every recorded shard intact, no id twice."""
    if not (out / "manifest.json").exists():
        return
    ids, _ = read_embeddings(out, allow_incomplete=True)
    assert len(ids) == len(set(ids))
    for shard in recorded_shards(out).values():
        assert shard["embedded"] + shard["errors"] == shard["rows"][1] - shard["rows"][0]


def test_killed_at_every_stage_of_a_shard_write_then_resumed(corpus_and_clean, tmp_path):
    corpus, clean = corpus_and_clean
    out = tmp_path / "out"
    recorded = []
    for crash in [
        "mid-write:2",
        "before-rename:2",
        "before-manifest:3",
        "mid-manifest:2",
        "before-write:2",
        "mid-manifest:1",
    ]:
        result = subprocess.run(
            _command(corpus, out), env=_env(**{CRASH_ENV: crash}), capture_output=True, text=True
        )
        assert result.returncode == -signal.SIGKILL, f"{crash}: {result.stderr}"
        _assert_partial_state_is_consistent(out)
        recorded.append(len(recorded_shards(out)))
    assert recorded == sorted(recorded) and 0 < recorded[-1] < 13
    result = subprocess.run(_command(corpus, out), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"shards written now {13 - recorded[-1]}, total 13" in result.stderr
    _assert_same_as_clean(out, clean)


def test_killed_at_random_moments_then_resumed(corpus_and_clean, tmp_path):
    corpus, clean = corpus_and_clean
    out = tmp_path / "out"
    command = _command(corpus, out, model="fake:dim=8,delay=0.1")  # delay: a call per shard
    rng = random.Random(1234)
    progress = []
    for target in (2, 5, 9):
        process = subprocess.Popen(
            command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        while process.poll() is None and not (
            (out / "manifest.json").exists() and len(recorded_shards(out)) >= target
        ):
            time.sleep(0.01)
        # somewhere inside a later shard: tokenizing, embedding or writing
        time.sleep(rng.uniform(0.0, 0.2))
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        _assert_partial_state_is_consistent(out)
        progress.append(len(recorded_shards(out)))
    assert progress == sorted(progress) and progress[-1] < 13
    result = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    _assert_same_as_clean(out, clean)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_ranks(command: list[str], crash_rank_1: str | None) -> list[subprocess.Popen]:
    port = str(_free_port())
    processes = []
    for rank in range(2):
        extra = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        if rank == 1 and crash_rank_1:
            extra[CRASH_ENV] = crash_rank_1
        processes.append(
            subprocess.Popen(
                command,
                env=_env(**extra),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def test_two_gloo_ranks_one_killed_then_resumed_equal_one_process(corpus_and_clean, tmp_path):
    corpus, clean = corpus_and_clean
    out = tmp_path / "out"
    command = _command(corpus, out)
    rank0, rank1 = _launch_ranks(command, crash_rank_1="before-manifest:3")
    assert rank1.wait(timeout=120) == -signal.SIGKILL
    rank0_shards = set(range(0, 13, 2))
    deadline = time.monotonic() + 60
    while rank0.poll() is None and time.monotonic() < deadline:
        part = out / "manifest.rank-0.json"
        if part.exists() and rank0_shards <= {
            s["index"] for s in json.loads(part.read_text())["shards"]
        }:
            break  # rank 0 finished its shards and waits for rank 1 at the barrier
        time.sleep(0.1)
    if rank0.poll() is None:
        rank0.send_signal(signal.SIGKILL)
    rank0.wait()
    done = set(recorded_shards(out))
    assert rank0_shards <= done
    assert {
        1,
        3,
    } <= done and 5 not in done  # rank 1 lost only the shard it was writing, and what followed
    _assert_partial_state_is_consistent(out)
    processes = _launch_ranks(command, crash_rank_1=None)
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    _assert_same_as_clean(out, clean)


def test_a_real_torchrun_launch_of_the_console_script_equals_one_process(
    corpus_and_clean, tmp_path
):
    """The issue's form: ``torchrun --nproc-per-node 2 --no-python llm2vec-fast embed ...``."""
    corpus, clean = corpus_and_clean
    script = Path(sys.executable).with_name("llm2vec-fast")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
        str(script),
    ] + _command(corpus, tmp_path / "out")[3:]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "shards written now 7, total 13" in result.stderr  # rank 0 wrote every other shard of 13
    _assert_same_as_clean(tmp_path / "out", clean)
