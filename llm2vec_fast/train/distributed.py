"""Data parallelism under ``torchrun``: process group, the DDP wrapper, collective helpers.

Each rank runs the same model on its slice of the global batch under ``DistributedDataParallel``,
which averages the LoRA gradients across ranks. The contrastive loss's own collectives (the
all-gather of embeddings and its backward) run before any parameter gradient is ready, so every
rank issues the collectives in the same order. gloo on a CPU, nccl on GPUs.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str | None = None) -> DistContext:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    target = torch.device("cuda", local_rank) if use_cuda else torch.device(device or "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        # Joined once per process and kept for its lifetime: a second group made after destroying
        # the first can read the first one's stale keys from torchrun's store and hang, which
        # happened when one process ran two stages (mntp, then supervised).
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=target)


def all_reduce_sum(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    if context.distributed:
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_reduce_mean(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    return all_reduce_sum(value, context) / context.world


def data_parallel(model: torch.nn.Module, context: DistContext) -> torch.nn.Module:
    """The model wrapped in ``DistributedDataParallel`` under torchrun, the model itself otherwise.

    Only the trainable (LoRA) parameters take part: DDP gives every rank rank 0's initial values
    and averages their gradients during the backward pass. The frozen base weights and buffers are
    excluded, so a 7B base model is neither broadcast at start-up nor checked for gradients.
    """
    if not context.distributed:
        return model
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()
