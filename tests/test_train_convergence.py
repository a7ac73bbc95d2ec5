"""The Triton kernels and the PyTorch reference give the same training loss curve (fp32).

On a CPU the kernels run in Triton's interpreter, which is slow, so the CPU test runs a few steps
of each objective on a one-layer model; the ``gpu`` test runs 30 steps of each on CUDA. Dropout
is off: the attention kernel draws its own random numbers, so curves with dropout cannot match.
"""

import json
import random

import pytest
import torch
from model_helpers import save_tiny_folder, tiny_hf_model

from llm2vec_fast.train import run


def _data(tmp_path):
    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    rng = random.Random(2)
    lines = [" ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 7))) for _ in range(48)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for i in range(16):
            handle.write(json.dumps({"query": lines[i], "positive": lines[i + 16], "negative": lines[i + 32], "instruction": "w4"}) + "\n")
    return base


def _config(tmp_path, base, objective: str, steps: int, batch: int) -> dict:
    data = {"supervised": "pairs.jsonl"}.get(objective, "corpus.txt")
    return {
        "model_name_or_path": str(base), "dataset_file_path": str(tmp_path / data), "per_device_train_batch_size": batch,
        "max_seq_length": 8, "stop_after_n_steps": steps, "lora_r": 4, "lora_dropout": 0.0, "simcse_dropout": 0.0,
        "learning_rate": 2e-3, "warmup_steps": 0, "mask_token_type": "eos", "mlm_probability": 0.3, "loss_scale": 20.0,
        "torch_dtype": "float32",
    }  # fmt: skip


def _curves(tmp_path, monkeypatch, objective: str, steps: int, batch: int) -> tuple[list[float], list[float]]:
    base = _data(tmp_path)
    curves = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LLM2VEC_FAST_BACKEND", backend)
        config = dict(_config(tmp_path, base, objective, steps, batch), output_dir=str(tmp_path / backend))
        curves.append(run(objective, config).losses)
    return curves[0], curves[1]


@pytest.mark.parametrize(("objective", "steps", "batch"), [("mntp", 3, 4), ("simcse", 3, 3), ("supervised", 2, 2)])
def test_triton_interpreter_matches_reference_curve(tmp_path, monkeypatch, objective, steps, batch):
    reference, triton = _curves(tmp_path, monkeypatch, objective, steps, batch)
    assert len(triton) == steps
    # fp32 throughout; the two paths only sum in different orders
    torch.testing.assert_close(triton, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_triton_matches_reference_curve_for_30_steps_on_gpu(tmp_path, monkeypatch, objective):
    assert torch.cuda.is_available()
    reference, triton = _curves(tmp_path, monkeypatch, objective, 30, 4)
    assert len(triton) == 30
    torch.testing.assert_close(triton, reference, rtol=2e-3, atol=1e-4)
