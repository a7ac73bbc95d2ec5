"""Plan encoding batches: sort sequences by token length and pack them into token budgets.

``plan_batches`` is what the encoder, the training loop and the corpus job use. It runs the C++
packer of ``llm2vec_fast._C`` when the extension is loaded and an identical Python one otherwise.

Greedy filling over the (sorted) sequences: a batch takes the next sequence while its total
token count stays <= ``max_batch_tokens`` and its size <= ``max_batch_size``; a sequence longer
than the token budget forms a batch alone. Zero-length sequences are legal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ._ext import extension_loaded, ops

# (order, batch_offsets, cu_seqlens, position_ids, token_offsets): the flat layout described in
# csrc/pack_batches.cpp, returned by both packers.
FlatPlan = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BatchPlan:
    """One packed batch of B sequences holding T tokens."""

    indices: torch.Tensor  # (B,) int64, positions in the input list
    cu_seqlens: torch.Tensor  # (B + 1,) int32, from 0
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 for each sequence
    max_seqlen: int
    num_tokens: int

    @property
    def batch_size(self) -> int:
        return self.indices.numel()


def plan_batches(
    lengths: Sequence[int] | torch.Tensor | np.ndarray,
    max_batch_tokens: int,
    max_batch_size: int | None = None,
    sort: bool = True,
) -> list[BatchPlan]:
    """Pack sequences of the given token lengths into batches.

    ``sort=True`` orders the sequences by descending length (stable, so ties keep input order)
    before packing; ``sort=False`` packs them in input order. ``max_batch_size=None`` puts no
    limit on the number of sequences per batch. Every input index appears in exactly one batch.
    """
    lengths_tensor = _as_lengths_tensor(lengths)
    max_batch_tokens, size_limit = _check_budgets(max_batch_tokens, max_batch_size)
    if extension_loaded():
        flat = ops().pack_batches(lengths_tensor, max_batch_tokens, size_limit, bool(sort))
    else:
        flat = _pack_batches_python(lengths_tensor, max_batch_tokens, size_limit, bool(sort))
    return split_flat_plan(flat, lengths_tensor)


def _as_lengths_tensor(lengths: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Any 1-D collection of non-negative integers -> int64 CPU tensor ``(N,)``."""
    if isinstance(lengths, torch.Tensor):
        tensor = lengths.detach().cpu()
    else:
        array = np.asarray(lengths)
        if array.size == 0:
            array = array.astype(np.int64)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"lengths must be integers, got {tensor.dtype}")
    tensor = tensor.to(torch.int64)
    if tensor.numel() > 0 and int(tensor.min()) < 0:
        index = int(torch.argmin(tensor))
        raise ValueError(f"lengths must be >= 0, got {int(tensor[index])} at index {index}")
    return tensor.contiguous()


def _check_budgets(max_batch_tokens: int, max_batch_size: int | None) -> tuple[int, int]:
    """Validated budgets; the size limit as the op takes it (0 = unlimited)."""
    if isinstance(max_batch_tokens, bool) or int(max_batch_tokens) != max_batch_tokens:
        raise TypeError(f"max_batch_tokens must be an int, got {max_batch_tokens!r}")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if max_batch_size is None:
        return int(max_batch_tokens), 0
    if isinstance(max_batch_size, bool) or int(max_batch_size) != max_batch_size:
        raise TypeError(f"max_batch_size must be an int or None, got {max_batch_size!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (None for no limit), got {max_batch_size}")
    return int(max_batch_tokens), int(max_batch_size)


def _pack_batches_python(
    lengths: torch.Tensor, max_batch_tokens: int, max_batch_size: int, sort: bool
) -> FlatPlan:
    """The Python twin of the C++ ``pack_batches`` op: same inputs, same outputs."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0 (0 = unlimited), got {max_batch_size}")
    length_list = lengths.tolist()
    order = list(range(len(length_list)))
    if sort:
        order.sort(key=lambda i: -length_list[i])  # list.sort is stable

    batch_offsets = [0]
    token_offsets = [0]
    batch_tokens = batch_size = total_tokens = 0
    for k, index in enumerate(order):
        seq_len = length_list[index]
        fits = batch_size == 0 or (
            batch_tokens + seq_len <= max_batch_tokens
            and (max_batch_size == 0 or batch_size < max_batch_size)
        )
        if not fits:
            batch_offsets.append(k)
            token_offsets.append(total_tokens)
            batch_tokens = batch_size = 0
        if batch_tokens + seq_len > torch.iinfo(torch.int32).max:
            raise ValueError(
                f"pack_batches: a batch of {batch_tokens + seq_len} tokens does not fit the int32 cu_seqlens"
            )
        batch_tokens += seq_len
        batch_size += 1
        total_tokens += seq_len
    if batch_size > 0:
        batch_offsets.append(len(order))
        token_offsets.append(total_tokens)

    ordered_lengths = torch.tensor([length_list[i] for i in order], dtype=torch.int64)  # (N,)
    cu_seqlens = []
    for start, end in zip(batch_offsets[:-1], batch_offsets[1:]):
        cu_seqlens.append(torch.zeros(1, dtype=torch.int64))
        cu_seqlens.append(torch.cumsum(ordered_lengths[start:end], dim=0))
    cu_flat = torch.cat(cu_seqlens) if cu_seqlens else torch.zeros(0, dtype=torch.int64)

    # Position of each token inside its sequence: a running count reset at every sequence start.
    sequence_starts = torch.cumsum(ordered_lengths, dim=0) - ordered_lengths  # (N,)
    position_ids = torch.arange(total_tokens, dtype=torch.int64) - torch.repeat_interleave(
        sequence_starts, ordered_lengths, output_size=total_tokens
    )
    return (
        torch.tensor(order, dtype=torch.int64),
        torch.tensor(batch_offsets, dtype=torch.int64),
        cu_flat.to(torch.int32),
        position_ids,
        torch.tensor(token_offsets, dtype=torch.int64),
    )


def split_flat_plan(flat: FlatPlan, lengths: torch.Tensor) -> list[BatchPlan]:
    """The flat packer outputs -> one ``BatchPlan`` per batch (views into the flat tensors)."""
    order, batch_offsets, cu_seqlens, position_ids, token_offsets = flat
    num_batches = batch_offsets.numel() - 1
    if num_batches == 0:
        return []
    ordered_lengths = lengths[order].numpy()  # (N,)
    max_seqlens = np.maximum.reduceat(ordered_lengths, batch_offsets[:-1].numpy()).tolist()
    seq_bounds, token_bounds = batch_offsets.tolist(), token_offsets.tolist()
    plans = []
    for b in range(num_batches):
        start, end = seq_bounds[b], seq_bounds[b + 1]
        token_start, token_end = token_bounds[b], token_bounds[b + 1]
        plans.append(
            BatchPlan(
                indices=order[start:end],
                cu_seqlens=cu_seqlens[start + b : end + b + 1],
                position_ids=position_ids[token_start:token_end],
                max_seqlen=max_seqlens[b],
                num_tokens=token_end - token_start,
            )
        )
    return plans
