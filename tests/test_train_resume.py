"""A training run killed by SIGKILL and resumed reproduces the uninterrupted run's loss curve."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from model_helpers import save_tiny_folder, tiny_hf_model

from llm2vec_fast.train import run
from llm2vec_fast.train.loop import LOG_FILE

TESTS_DIR = Path(__file__).parent
STEPS = 7
# The child trains slowly (a pause after each step) so that the test can kill it mid-run.
CHILD = """
import json, sys, time
from llm2vec_fast.train import run
run("mntp", json.loads(sys.argv[1]), step_callback=lambda step, loss: time.sleep(0.4))
"""


def _setup(tmp_path: Path) -> dict:
    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    rng = random.Random(0)
    lines = [
        " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(3, 12))) for _ in range(40)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    return {
        "model_name_or_path": str(base),
        "dataset_file_path": str(tmp_path / "corpus.txt"),
        "per_device_train_batch_size": 4,
        "max_seq_length": 10,
        "mask_token_type": "eos",
        "mlm_probability": 0.3,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "stop_after_n_steps": STEPS,
        "save_steps": 2,
        "lora_r": 4,
        "lora_dropout": 0.1,
        "seed": 7,
    }


def _losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / LOG_FILE).read_text().splitlines()]


def test_sigkill_then_resume_reproduces_the_loss_curve(tmp_path):
    config = _setup(tmp_path)
    torch.set_num_threads(1)  # the child runs with one thread too: same reductions, same numbers
    expected = run("mntp", dict(config, output_dir=str(tmp_path / "straight"))).losses
    assert len(expected) == STEPS

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS_DIR))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(dict(config, output_dir=str(killed)))], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not ((killed / LOG_FILE).is_file() and len(_losses(killed)) >= 5):
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.monotonic() < deadline, "the child made no progress"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # it did not finish
    # no pickle: the optimizer state is safetensors + JSON; config.json: the base's, as
    # llm2vec's folders have it
    assert sorted(p.name for p in (killed / "checkpoint-4").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "train_config.json",
        "training_state.json",
        "training_state.safetensors",
    ]

    resumed = run("mntp", dict(config, output_dir=str(killed)), resume=True)
    assert (
        resumed.steps == STEPS and len(resumed.losses) == STEPS - 4
    )  # continued from checkpoint-4
    torch.testing.assert_close(_losses(killed), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.losses, expected[4:], rtol=1e-6, atol=1e-7)


def test_existing_checkpoints_need_resume(tmp_path):
    config = dict(_setup(tmp_path), stop_after_n_steps=2, output_dir=str(tmp_path / "out"))
    run("mntp", config)
    try:
        run("mntp", config)
    except FileExistsError as error:
        assert "--resume" in str(error)
    else:
        raise AssertionError("a second run over checkpoints must not start silently")


def test_resume_needs_a_checkpoint_of_the_same_config_and_output_dir_is_not_a_source(tmp_path):
    config = dict(_setup(tmp_path), stop_after_n_steps=2, output_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in"):
        run("mntp", config, resume=True)
    run("mntp", config)
    (tmp_path / "out" / ".checkpoint-3.abcd.tmp").mkdir()  # what a kill during a save leaves
    with pytest.raises(
        ValueError,
        match="--resume: .*checkpoint-2 was trained with another config"
        " \\(learning_rate: 0.003 -> 0.5\\)",
    ):
        run("mntp", dict(config, learning_rate=0.5), resume=True)
    with pytest.raises(ValueError, match="objective: 'mntp' -> 'simcse'"):
        run("simcse", config, resume=True)
    resumed = run("mntp", dict(config, stop_after_n_steps=3), resume=True)  # a longer run: allowed
    assert resumed.steps == 3 and not list((tmp_path / "out").glob(".checkpoint-*"))
    for source in ("model_name_or_path", "peft_model_name_or_path"):
        with pytest.raises(ValueError, match=f"output_dir is the {source} folder"):
            run(
                "mntp",
                dict(config, output_dir=config["model_name_or_path"], peft_model_name_or_path=None)
                if source == "model_name_or_path"
                else dict(config, peft_model_name_or_path=str(tmp_path / "out")),
            )


def test_gradient_accumulation_longer_than_an_epoch_is_refused(tmp_path):
    config = dict(
        _setup(tmp_path),
        stop_after_n_steps=None,
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=50,
    )  # 40 short lines: a few batches
    with pytest.raises(
        ValueError, match=r"gradient_accumulation_steps=50 batches, but an epoch has \d+"
    ):
        run("mntp", config)


def test_resume_accepts_the_same_data_path_written_another_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dict(
        _setup(tmp_path), stop_after_n_steps=2, output_dir="out", dataset_file_path="corpus.txt"
    )
    run("mntp", config)
    absolute = dict(
        config, output_dir=str(tmp_path / "out"), dataset_file_path=str(tmp_path / "corpus.txt")
    )
    assert run("mntp", dict(absolute, stop_after_n_steps=3), resume=True).steps == 3
