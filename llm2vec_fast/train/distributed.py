"""Data parallelism under ``torchrun``: process group, gradient averaging, collective helpers.

Each rank runs the same model on its slice of the global batch; after the backward pass the
LoRA gradients are averaged across ranks (what ``DistributedDataParallel`` does, done
explicitly: the trainable parameters are a few small LoRA matrices, and the contrastive loss
already runs its own collectives inside the backward pass, so one explicit reduction after it
keeps the order of collectives identical on every rank). gloo on a CPU, nccl on GPUs.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def average_gradients(parameters: Iterable[torch.nn.Parameter], context: DistContext) -> None:
    """Replace each gradient by its mean over the ranks (one flat all-reduce)."""
    if not context.distributed:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(parameters: Iterable[torch.nn.Parameter], context: DistContext) -> None:
    """Give every rank rank 0's values (the LoRA initialisation)."""
    if not context.distributed:
        return
    with torch.no_grad():
        for p in parameters:
            dist.broadcast(p.data, src=0)


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()
