"""The Triton kernels and the PyTorch reference give the same 30-step training loss curve (fp32).

On a CPU the kernels run in Triton's interpreter (about a minute per objective on a one-layer
model); the ``gpu`` test runs the compiled kernels. Attention dropout is off: the attention kernel
draws its own random numbers, so curves with it cannot match. LoRA dropout is on: it draws from
PyTorch's generator in the same order on both paths, and makes SimCSE's two copies differ once
LoRA's B matrices have left zero (from step 2).
"""

import json
import random
import statistics

import pytest
import torch
from model_helpers import save_tiny_folder, tiny_hf_model

from llm2vec_fast.train import run


def _data(tmp_path):
    base = save_tiny_folder(tiny_hf_model("llama", seed=0, num_hidden_layers=1), tmp_path / "base")
    rng = random.Random(2)
    lines = [
        " ".join(f"w{rng.randrange(3, 96)}" for _ in range(rng.randrange(2, 7))) for _ in range(48)
    ]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for i in range(16):
            handle.write(
                json.dumps(
                    {
                        "query": lines[i],
                        "positive": lines[i + 16],
                        "negative": lines[i + 32],
                        "instruction": "w4",
                    }
                )
                + "\n"
            )
    return base


def _config(tmp_path, base, objective: str, steps: int, batch: int) -> dict:
    data = {"supervised": "pairs.jsonl"}.get(objective, "corpus.txt")
    # without attention dropout SimCSE's two copies differ only by LoRA dropout; a low scale keeps
    # its loss well above 0, so the curve says something
    loss_scale = 1.0 if objective == "simcse" else 20.0
    return {
        "model_name_or_path": str(base),
        "dataset_file_path": str(tmp_path / data),
        "per_device_train_batch_size": batch,
        "max_seq_length": 8,
        "max_steps": steps,
        "stop_after_n_steps": steps,
        "lora_r": 4,
        "lora_dropout": 0.1,
        "simcse_dropout": 0.0,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "mask_token_type": "eos",
        "mlm_probability": 0.3,
        "loss_scale": loss_scale,
        "torch_dtype": "float32",
    }


def _curves(
    tmp_path, monkeypatch, objective: str, steps: int, batch: int
) -> tuple[list[float], list[float]]:
    base = _data(tmp_path)
    curves = []
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LLM2VEC_FAST_BACKEND", backend)
        config = dict(
            _config(tmp_path, base, objective, steps, batch), output_dir=str(tmp_path / backend)
        )
        curves.append(run(objective, config).losses)
    return curves[0], curves[1]


@pytest.mark.parametrize(
    ("objective", "steps", "batch"), [("mntp", 30, 4), ("simcse", 30, 3), ("supervised", 30, 2)]
)
def test_triton_interpreter_matches_reference_curve(tmp_path, monkeypatch, objective, steps, batch):
    reference, triton = _curves(tmp_path, monkeypatch, objective, steps, batch)
    assert len(triton) == steps
    assert statistics.pstdev(reference) > 0.01  # a curve that moves, not a constant (say all zeros)
    # fp32 throughout; the two paths only sum in different orders
    torch.testing.assert_close(triton, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_triton_matches_reference_curve_for_30_steps_on_gpu(tmp_path, monkeypatch, objective):
    assert torch.cuda.is_available()
    reference, triton = _curves(tmp_path, monkeypatch, objective, 30, 4)
    assert len(triton) == 30
    torch.testing.assert_close(triton, reference, rtol=2e-3, atol=1e-4)
