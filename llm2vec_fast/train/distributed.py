"""Data parallelism under ``torchrun``: process group, the DDP wrapper, collective helpers.

Each rank runs the same model on its slice of the global batch under ``DistributedDataParallel``,
which averages the LoRA gradients across ranks. The contrastive loss's own collectives (the
all-gather of embeddings and its backward, :func:`gathered_contrastive_loss`) run before any
parameter gradient is ready, so every rank issues the collectives in the same order. gloo on a
CPU, nccl on GPUs.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..kernels import contrastive_loss
from ..kernels.contrastive import check_contrastive_inputs


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


class _AllGather(torch.autograd.Function):
    """Concatenate equal-shaped ``(n, D)`` tensors of all ranks; the backward sums every rank's
    gradient of the gathered tensor and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = dist.get_rank()
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def contrastive_loss_over_ranks(
    queries: torch.Tensor, docs: torch.Tensor, *, scale: float, symmetric: bool
) -> torch.Tensor:
    """This rank's share of ``contrastive_loss`` over the batch concatenated across the ranks of
    the initialised process group (equal ``B`` and ``N`` on every rank).

    The loss is over this rank's queries against the docs of every rank, so the DDP-averaged
    gradient equals that of the loss over the concatenated batch. The docs are laid out as
    [this rank's positives, the other ranks' positives, every rank's hard negatives]:
    cross-entropy does not depend on the column order, so this equals the layout [all positives,
    all negatives] with targets offset by this rank's query offset, and the first ``B`` columns
    stay the positives of this rank's queries.
    """
    check_contrastive_inputs(queries, docs, scale)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "the contrastive loss over ranks needs an initialised torch.distributed process group"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    batch, n_docs = queries.shape[0], docs.shape[0]
    sizes = [torch.zeros(2, dtype=torch.int64, device=queries.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([batch, n_docs], device=queries.device))
    sizes = [tuple(s.tolist()) for s in sizes]
    if any(s != (batch, n_docs) for s in sizes):
        raise ValueError(
            "the contrastive loss over ranks needs equal batch sizes on every rank; "
            f"(queries, docs) per rank: {sizes}"
        )
    all_queries = _AllGather.apply(queries)  # (R*B, D)
    all_docs = _AllGather.apply(docs)  # (R*N, D), rank k's rows at k*N
    ranks = torch.tensor([rank] + [k for k in range(world) if k != rank], device=docs.device)
    doc_index = torch.arange(world * n_docs, device=docs.device).view(world, n_docs)
    doc_order = torch.cat([doc_index[ranks, :batch].flatten(), doc_index[:, batch:].flatten()])
    laid_out_docs = all_docs[doc_order]  # (R*N, D)
    own_queries = all_queries[rank * batch : (rank + 1) * batch]  # (B, D)
    loss = contrastive_loss(own_queries, laid_out_docs, scale=scale)
    if not symmetric:
        return loss
    query_index = torch.arange(world * batch, device=queries.device).view(world, batch)
    laid_out_queries = all_queries[query_index[ranks].flatten()]  # (R*B, D), own rows first
    reverse = contrastive_loss(laid_out_docs[:batch], laid_out_queries, scale=scale)
    return 0.5 * (loss + reverse)


def gathered_contrastive_loss(
    queries: torch.Tensor,
    docs: torch.Tensor,
    *,
    scale: float,
    symmetric: bool,
    context: DistContext,
) -> torch.Tensor:
    """``contrastive_loss`` against the queries and docs of every rank under torchrun
    (:func:`contrastive_loss_over_ranks`), of this rank's batch alone otherwise."""
    if context.distributed:
        return contrastive_loss_over_ranks(queries, docs, scale=scale, symmetric=symmetric)
    return contrastive_loss(queries, docs, scale=scale, symmetric=symmetric)
