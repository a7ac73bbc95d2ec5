"""torchrun with 2 CPU processes (gloo, DDP) gives the loss curve of one process on the whole
batch."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch
from model_helpers import save_tiny_folder, tiny_hf_model

from llm2vec_fast.train import run

TESTS_DIR = Path(__file__).parent
CHILD = """
import json, sys
from llm2vec_fast.train import run
for objective, config in json.loads(sys.argv[1]):
    run(objective, config)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    rng = random.Random(1)
    lines = [
        " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(3, 12))) for _ in range(24)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for i in range(12):
            handle.write(
                json.dumps(
                    {
                        "query": lines[i],
                        "positive": lines[i + 6],
                        "negative": lines[i + 12],
                        "instruction": "w4",
                    }
                )
                + "\n"
            )
    common = {
        "model_name_or_path": str(base),
        "max_seq_length": 10,
        "stop_after_n_steps": 3,
        "lora_r": 4,
        "lora_dropout": 0.0,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "seed": 3,
    }
    jobs = {
        "mntp": dict(
            common,
            dataset_file_path=str(tmp_path / "corpus.txt"),
            mask_token_type="eos",
            mlm_probability=0.3,
        ),
        "supervised": dict(
            common,
            dataset_file_path=str(tmp_path / "pairs.jsonl"),
            loss_scale=20.0,
            gradient_checkpointing=True,
        ),
        # two micro-batches per step, the first under DDP.no_sync
        "simcse": dict(
            common,
            dataset_file_path=str(tmp_path / "corpus.txt"),
            simcse_dropout=0.0,
            loss_scale=1.0,
            gradient_accumulation_steps=2,
        ),
    }
    per_process = [
        (name, dict(job, per_device_train_batch_size=2, output_dir=str(tmp_path / f"{name}-ddp")))
        for name, job in jobs.items()
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS_DIR))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run(
        [*command, str(script), json.dumps(per_process)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    for name, job in jobs.items():
        single = run(
            name,
            dict(job, per_device_train_batch_size=4, output_dir=str(tmp_path / f"{name}-single")),
        ).losses
        lines_ = (tmp_path / f"{name}-ddp" / "train_log.jsonl").read_text().splitlines()
        ddp = [json.loads(line)["loss"] for line in lines_]
        assert len(ddp) == 3
        # step 1 checks the loss, steps 2-3 the averaged gradients that produced them
        torch.testing.assert_close(
            ddp, single, rtol=2e-5, atol=1e-6, msg=f"{name}: {ddp} vs {single}"
        )
