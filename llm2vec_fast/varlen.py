"""Per-token metadata of a packed (varlen) batch, computed where the tensors live."""

from __future__ import annotations

import torch

from ._ext import cuda_ops_loaded, extension_loaded, ops
from .kernels import validate_cu_seqlens


def varlen_metadata(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens int32 ``(B + 1,)`` -> (seq_index, positions), both int32 ``(total,)``.

    Token t belongs to sequence b when ``cu_seqlens[b] <= t < cu_seqlens[b + 1]`` and sits at
    position ``t - cu_seqlens[b]``; tokens at or past ``cu_seqlens[-1]`` get -1 in both.
    ``total`` is passed in so that nothing reads ``cu_seqlens`` back to the host: on a GPU the
    result is computed on the device (CUDA op, else torch) without a synchronization. CPU inputs
    are checked to start at 0 and never decrease; CUDA inputs are not (that would synchronize).
    """
    _check_inputs(cu_seqlens, total)
    if cu_seqlens.is_cuda:
        if cuda_ops_loaded():
            return ops().varlen_metadata(cu_seqlens, total)
        return _varlen_metadata_torch(cu_seqlens, total)
    validate_cu_seqlens(cu_seqlens)  # start at 0, never decrease
    if extension_loaded():
        return ops().varlen_metadata(cu_seqlens, total)
    return _varlen_metadata_torch(cu_seqlens, total)


def _check_inputs(cu_seqlens: torch.Tensor, total: int) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens needs at least one entry (B + 1 for B sequences)")
    if isinstance(total, bool) or int(total) != total:
        raise TypeError(f"total must be an int, got {total!r}")
    if not 0 <= total <= torch.iinfo(torch.int32).max:
        raise ValueError(f"total must be in [0, 2^31 - 1], got {total}")


def _varlen_metadata_torch(
    cu_seqlens: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch definition; runs on any device without reading values to the host."""
    num_seqs = cu_seqlens.numel() - 1
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)  # (T,)
    seq_index = torch.searchsorted(cu_seqlens, tokens, right=True) - 1  # (T,) int64
    covered = (seq_index >= 0) & (seq_index < num_seqs)
    starts = cu_seqlens[seq_index.clamp(0, max(num_seqs - 1, 0))]  # (T,)
    positions = torch.where(covered, tokens - starts, -1)
    seq_index = torch.where(covered, seq_index, -1)
    return seq_index.to(torch.int32), positions.to(torch.int32)
