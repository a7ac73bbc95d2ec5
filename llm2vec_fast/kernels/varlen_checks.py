"""The value checks of ``cu_seqlens``, shared by every op that takes packed sequences.

A packed batch of B sequences over T tokens has ``cu_seqlens`` int32 ``(B + 1,)`` that starts
at 0, never decreases and ends at T; ``max_seqlen`` is at least the longest sequence. Reading
the values costs one host sync on a GPU, so callers that checked them once (on the host, or
for all layers of a forward pass) skip this.
"""

from __future__ import annotations

import torch


def validate_cu_seqlens(
    cu_seqlens: torch.Tensor, total: int | None = None, max_seqlen: int | None = None
) -> None:
    """Raise ValueError unless ``cu_seqlens`` (1-D, at least one entry) starts at 0 and never
    decreases; with ``total``, unless it ends at ``total``; with ``max_seqlen``, unless no
    sequence is longer. One host sync when the tensor is on a GPU."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (B,)
    summary = [cu_seqlens[0], cu_seqlens[-1]]
    if lengths.numel():
        summary += [lengths.min(), torch.argmin(lengths), lengths.max()]
    first, last, *length_facts = torch.stack([value.long() for value in summary]).tolist()
    shortest, shortest_at, longest = length_facts or (0, 0, 0)
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if shortest < 0:
        before, after = cu_seqlens[shortest_at : shortest_at + 2].tolist()
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got {before} then {after} at index {shortest_at}"
        )
    if total is not None and last != total:
        raise ValueError(f"cu_seqlens must end at T={total} (the token count), got {last}")
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(
            f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})"
        )
