"""A checkpoint's training state (optimizer, LR schedule, RNG) in safetensors + JSON, never pickle.

``torch.save`` writes a pickle, and this package never reads one, not even its own. The state is
split in two files: ``training_state.safetensors`` holds every tensor (the optimizer's per-parameter
moments and step counts, the RNG states), ``training_state.json`` everything else (step, world
size, optimizer hyper-parameters, the scheduler's counters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "training_state.safetensors"
JSON_FILE = "training_state.json"
_CPU_RNG = "rng.cpu"
_CUDA_RNG = "rng.cuda.{}"


def save_training_state(
    folder: Path, step: int, world: int, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    """Write the two state files into ``folder``."""
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {_CPU_RNG: torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[_CUDA_RNG.format(index)] = rng
    for param_index, param_state in optimizer_state["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{param_index}.{name}"] = value.detach().cpu().contiguous()
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    save_file(tensors, str(folder / TENSORS_FILE))
    record = {
        "step": step,
        "world": world,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler_state,
    }
    (folder / JSON_FILE).write_text(json.dumps(record, indent=1) + "\n")


def load_training_state(
    folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, int]:
    """Restore optimizer, scheduler and RNG from ``folder``; returns the ``(step, world)`` it was
    saved with."""
    record = json.loads((folder / JSON_FILE).read_text())
    tensors = load_file(str(folder / TENSORS_FILE))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": per_param, "param_groups": record["optimizer_param_groups"]}
    )
    scheduler_state = scheduler.state_dict()  # keeps the scheduler's own lr_lambdas entry
    scheduler_state.update(record["scheduler"])
    scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(tensors[_CPU_RNG])
    cuda_keys = sorted(
        (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
    )
    cuda_states = [tensors[key] for key in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(record["step"]), int(record["world"])
