"""The work list of the varlen attention kernels: which tiles to run, longest first.

A launch grid of (query block, head, sequence) runs ``cdiv(max_seqlen, BLOCK)`` programs per
sequence: a batch of 20-token texts spends most of each 128-row tile, and most programs, on
nothing, and the grid's third axis caps a batch at 65,535 sequences. Instead the kernels read a
list of work items built here on the device (no host sync, so CUDA graphs can capture it):

- **groups**: consecutive token ranges made of whole sequences, found without a sequential
  scan. A sequence longer than the tile is a group alone. Shorter ones go with the others that
  lie in the same tile-sized window of packed tokens; one that runs across a window's end joins
  the next window's group when the two fit in one tile, else stays alone. So a group of short
  sequences fits in one tile, which runs them together, masked block-diagonally (``segments``
  says which sequence each token is in). On the short-text mix (log-normal lengths around 28
  tokens, 128-token tiles, 64-key blocks) that runs 1.4x fewer tile x key-block steps than one
  tile per sequence, within 4% of a sequential next-fit packing.
- **items**: one per (group, tile of the group), each ``(first token, group length, tile start
  in the group, packed)`` with ``packed`` 1 for a group of several non-empty sequences, whose
  blocks all take the masked path. Sorted by the work of the tile, longest first: the GPU
  starts programs roughly in launch order, so the long tiles do not finish last.

The item list has room for an upper bound (``item_capacity``) known on the host; ``count`` (a
one-element device tensor) holds how many are real, and the rest are empty (group length 0).
The kernels launch one program per item of the capacity and head, and the programs past
``count`` return at once: a persistent grid that loops over the items would launch fewer, but
on sm_90 its loop raised the forward kernel from 195 to 255 registers and made it spill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ITEM_FIELDS = 4  # first token, group length, tile start in the group, packed


@dataclass(frozen=True)
class TileSchedule:
    items: torch.Tensor  # (capacity, ITEM_FIELDS) int32, real items first
    count: torch.Tensor  # (1,) int32: how many items are real
    segments: torch.Tensor  # (T,) int32: the sequence index of each packed token

    @property
    def capacity(self) -> int:
        return self.items.shape[0]


def tile_schedule(
    cu_seqlens: torch.Tensor,
    total: int,
    tile: int,
    *,
    causal: bool,
    window: int | None,
    key_tiles: bool = False,
) -> TileSchedule:
    """The work items of tiles of ``tile`` tokens over the packed batch ``cu_seqlens`` (int32,
    B + 1) of ``total`` tokens: query tiles, or with ``key_tiles`` the key tiles of the dK/dV
    kernel. ``causal``, ``window`` and ``key_tiles`` only order the items by their work."""
    device = cu_seqlens.device
    # clamped to [0, T]: an unchecked cu_seqlens past T must not index out of bounds or put
    # items past the tokens (for a valid one, a no-op)
    bounds = torch.clamp(cu_seqlens.long(), 0, total)
    batch = bounds.numel() - 1
    starts, ends = bounds[:-1], bounds[1:]  # (B,)
    lengths = ends - starts
    short = (lengths > 0) & (lengths <= tile)
    windows = -(-total // tile) + 1
    window_of_start = torch.div(starts, tile, rounding_mode="floor")  # (B,) at most T // tile
    window_of_last = torch.div(ends - 1, tile, rounding_mode="floor")
    crossing = short & (window_of_last != window_of_start)  # runs into the next window
    # the end of the sequences lying wholly in each window (0 where none does)
    contained_end = torch.zeros(windows + 1, dtype=torch.long, device=device)
    contained_end.scatter_reduce_(
        0, window_of_start, torch.where(short & ~crossing, ends, 0), "amax"
    )
    # a crossing sequence joins the next window's group when the two fit in one tile
    next_window = torch.clamp(window_of_start + 1, max=windows)
    joins = crossing & (torch.maximum(contained_end[next_window], ends) - starts <= tile)
    group_key = torch.where(joins, next_window, window_of_start)
    alone = (lengths > tile) | (crossing & ~joins)  # a group of one sequence
    opens_group = torch.ones(batch, dtype=torch.bool, device=device)
    opens_group[1:] = alone[1:] | alone[:-1] | (group_key[1:] != group_key[:-1])
    group_of = torch.cumsum(opens_group, 0) - 1  # (B,) group index of each sequence

    # Group g covers sequences [first, last]: its tokens run from the first one's start to the
    # last one's end. Groups past the real count receive nothing and keep length 0.
    group_start = torch.zeros(batch + 1, dtype=torch.long, device=device)
    group_end = torch.zeros(batch + 1, dtype=torch.long, device=device)
    group_start.scatter_reduce_(0, group_of, starts, "amin", include_self=False)
    group_end.scatter_reduce_(0, group_of, ends, "amax", include_self=False)
    # packed: several non-empty sequences share the group (the masked path for all its blocks)
    sequences_in = torch.zeros(batch + 1, dtype=torch.long, device=device)
    sequences_in.scatter_add_(0, group_of, (lengths > 0).long())
    packed = (sequences_in > 1).long()
    group_length = group_end - group_start  # (B + 1,); the last group stays empty
    tiles = torch.div(group_length + tile - 1, tile, rounding_mode="floor")

    # One item per (group, tile); the spare capacity goes to the empty last group, so that the
    # repeat has a size known on the host.
    capacity = item_capacity(total, batch, tile)
    tiles[batch] = capacity - tiles[:batch].sum()
    group_of_item = torch.repeat_interleave(
        torch.arange(batch + 1, device=device), tiles, output_size=capacity
    )  # (capacity,)
    first_item = torch.cumsum(tiles, 0) - tiles  # (B + 1,) first item index of each group
    tile_start = (torch.arange(capacity, device=device) - first_item[group_of_item]) * tile
    length = group_length[group_of_item]
    items = torch.stack(
        [group_start[group_of_item], length, tile_start, packed[group_of_item]], dim=1
    )  # (capacity, ITEM_FIELDS)

    work = _tile_work(length, tile_start, tile, causal, window, key_tiles)
    work = torch.where(tile_start < length, work, -1)  # empty items last
    order = torch.argsort(work, descending=True, stable=True)
    count = (capacity - tiles[batch]).reshape(1)
    # (T,) the sequence of each token: the number of sequence starts at or before it, less one
    # (a search, not a repeat, so that a cu_seqlens not ending at T cannot trip a device assert).
    # Tokens before an unchecked cu_seqlens' first sequence get -1, a segment no query has (the
    # kernels' padding for keys past the group), so that dropout's aligned key blocks mask them.
    tokens = torch.arange(total, device=device)
    segments = (torch.searchsorted(bounds, tokens, right=True) - 1).to(torch.int32)
    return TileSchedule(items[order].to(torch.int32).contiguous(), count.to(torch.int32), segments)


def item_capacity(total: int, batch: int, tile: int) -> int:
    """An upper bound on the items of ``batch`` sequences of ``total`` tokens, plus one spare.

    With W = cdiv(total, tile): a group has at most len / tile + 1 tiles, so the items are at
    most W + (non-empty groups). Those are at most B, and at most 3 W: the sequences longer
    than a tile (each holds more than a tile of tokens), one group per window for the
    sequences inside it, and one per window boundary for a sequence across it."""
    windows = -(-total // tile)
    return windows + min(batch, 3 * windows) + 1


def _tile_work(
    length: torch.Tensor,
    tile_start: torch.Tensor,
    tile: int,
    causal: bool,
    window: int | None,
    key_tiles: bool,
) -> torch.Tensor:
    """About how many tokens of the other side (keys for a query tile, queries for a key tile)
    the tile at ``tile_start`` of a group of ``length`` tokens visits."""
    visited = length
    if causal:  # a query tile sees the keys up to its end; a key tile, the queries from its start
        visited = length - tile_start if key_tiles else torch.minimum(tile_start + tile, length)
    if window is not None:
        visited = torch.clamp(visited, max=(1 if causal else 2) * window + tile)
    return visited


def schedule_for(
    cu_seqlens: torch.Tensor,
    total: int,
    tile: int,
    *,
    causal: bool,
    window: int | None,
    key_tiles: bool = False,
    schedules: dict | None = None,
) -> TileSchedule:
    """``tile_schedule``, kept in ``schedules`` when given: a dict that the caller holds for one
    packed batch (``Packed.attention_schedules``), so that every layer of a forward pass and its
    backward build each work list once. The caller empties it when cu_seqlens changes, and
    before a CUDA graph capture (so that the graph builds its own)."""
    if schedules is None:
        schedules = {}  # kept for this call only
    key = (total, tile, causal, window, key_tiles)
    if key not in schedules:
        schedules[key] = tile_schedule(
            cu_seqlens, total, tile, causal=causal, window=window, key_tiles=key_tiles
        )
    return schedules[key]
