"""The packed batch: B token sequences laid end to end in one stream of T tokens, no padding.

``Packed`` is what the runtime takes (``DecoderModel.forward``), and every caller builds it the
same way:

- ``pack_batches``: many tokenized texts -> batches of at most ``max_batch_tokens`` tokens (the
  encoder, and the corpus job through it). The plan comes from the C++ op of ``llm2vec_fast._C``
  when the extension is loaded and from its Python twin otherwise.
- ``Packed.from_sequences``: one batch of token lists in their order (a training step).
- ``Packed.padded_to``: a batch padded to a ``GraphShape`` (CUDA graphs).
- ``Packed.to``: the batch on a device.

A ``Packed`` is validated when it is built: shapes, dtypes and devices always, the values of
``cu_seqlens`` too unless the batch moved from one that was checked. Build it on the host, where
the values cost no device sync, and move it with ``to``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ._ext import extension_loaded, ops
from .kernels import validate_cu_seqlens
from .text import TokenizedText
from .varlen import varlen_metadata

_TENSOR_FIELDS = ("input_ids", "cu_seqlens", "position_ids", "pool_mask", "indices")


@dataclass(frozen=True, eq=False)  # eq: tensors have no single truth value
class Packed:
    """B sequences holding T tokens, as the runtime and the kernels take them."""

    input_ids: torch.Tensor  # (T,) integer token ids
    cu_seqlens: torch.Tensor  # (B + 1,) int32, from 0 to T; sequence b is [cu[b], cu[b + 1])
    position_ids: torch.Tensor  # (T,) integer, restarting at 0 for each sequence
    max_seqlen: int  # >= the longest sequence
    pool_mask: torch.Tensor | None = None  # (T,) bool: the tokens pooling reads (None: all)
    indices: torch.Tensor | None = None  # (B,) int64: each sequence's position in the input list
    # True when the values of cu_seqlens were validated where this batch was built (``to``)
    values_checked: InitVar[bool] = False
    # the attention kernels' work lists for this cu_seqlens, built by the first layer that needs
    # one and read by the others (``kernels.varlen_attention(schedules=...)``); never copied
    attention_schedules: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self, values_checked: bool) -> None:
        self._check_layout()
        if not values_checked:
            validate_cu_seqlens(self.cu_seqlens, self.num_tokens, self.max_seqlen)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        pool_masks: Sequence[Sequence[bool]] | None = None,
    ) -> Packed:
        """One batch of these token lists, in their order, on the host."""
        total = sum(len(sequence) for sequence in sequences)
        # a budget that holds every sequence: the packer fills exactly one batch
        batches = list(pack_batches(sequences, max(total, 1), pool_masks=pool_masks, sort=False))
        if not batches:
            raise ValueError("a packed batch needs at least one sequence")
        return batches[0]

    @classmethod
    def from_tokenized(cls, items: Sequence[TokenizedText]) -> Packed:
        """One batch of tokenized texts (their ``input_ids`` and ``pool_mask``), in their order."""
        return cls.from_sequences(
            [item.input_ids for item in items], [item.pool_mask for item in items]
        )

    def to(self, device: torch.device | str) -> Packed:
        """The same batch on ``device``; host to CUDA copies go from pinned memory without
        blocking the host."""
        device = torch.device(device)
        if device.type == "cuda" and self.device.type == "cpu":
            return self.pinned()._map_tensors(lambda tensor: tensor.to(device, non_blocking=True))
        return self._map_tensors(lambda tensor: tensor.to(device))

    def pinned(self) -> Packed:
        """This host batch in pinned (page-locked) memory, which CUDA copies read asynchronously."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def copy_from(self, source: Packed) -> None:
        """Copy a batch of the same shape into this one's tensors (the static inputs of a CUDA
        graph), without blocking the host when ``source`` is in pinned memory."""
        for name in _TENSOR_FIELDS:
            target, value = getattr(self, name), getattr(source, name)
            if (target is None) != (value is None) or (
                target is not None and target.shape != value.shape
            ):
                raise ValueError(f"{name} of the source batch does not match this batch's")
            if target is not None:
                target.copy_(value, non_blocking=True)
        self.attention_schedules.clear()  # they were built for the old cu_seqlens

    def _map_tensors(self, function) -> Packed:
        """The batch with ``function`` applied to each of its tensors; its values were checked."""
        tensors = {
            name: function(getattr(self, name))
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        return dataclasses.replace(self, **tensors, values_checked=True)

    def padded_to(self, shape: GraphShape) -> Packed:
        """This batch (on the host) padded to ``shape``, with a pool_mask and no indices.

        The first B sequences are this batch's, unchanged; padding tokens (id 0) fill further
        sequences of at most ``shape.max_seqlen`` tokens, and the slots left over are empty
        sequences. Padding tokens are never pooled.
        """
        padding = shape.tokens - self.num_tokens
        if padding < 0:
            raise ValueError(f"a batch of {self.num_tokens} tokens does not fit {shape}")
        lengths = torch.diff(self.cu_seqlens.long())  # (B,)
        padding_sequences = torch.tensor(
            padding_lengths(padding, shape.max_seqlen), dtype=torch.long
        )  # (P,)
        all_lengths = torch.cat([lengths, padding_sequences])  # (B + P,)
        count = all_lengths.numel()
        if count > shape.slots:
            raise ValueError(f"{count} sequences with the padding do not fit {shape}")
        cu_seqlens = torch.zeros(shape.slots + 1, dtype=torch.int32)
        cu_seqlens[1 : count + 1] = torch.cumsum(all_lengths, 0).to(torch.int32)
        cu_seqlens[count + 1 :] = shape.tokens
        _, position_ids = varlen_metadata(cu_seqlens, shape.tokens)  # (T',) from 0 per sequence
        pool_mask = (
            torch.ones(self.num_tokens, dtype=torch.bool)
            if self.pool_mask is None
            else self.pool_mask
        )
        return Packed(
            input_ids=torch.cat([self.input_ids.long(), torch.zeros(padding, dtype=torch.long)]),
            cu_seqlens=cu_seqlens,
            position_ids=position_ids.long(),
            max_seqlen=shape.max_seqlen,
            pool_mask=torch.cat([pool_mask, torch.zeros(padding, dtype=torch.bool)]),
        )

    def _check_layout(self) -> None:
        """Shapes, dtypes and devices: read no values."""
        input_ids, cu_seqlens = self.input_ids, self.cu_seqlens
        if input_ids.ndim != 1 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                "input_ids must be a 1-D integer tensor (T,),"
                f" got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(
                "cu_seqlens must be a 1-D int32 tensor (B + 1,) with B >= 1,"
                f" got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if self.position_ids.shape != input_ids.shape or self.position_ids.is_floating_point():
            raise ValueError(
                f"position_ids shape {tuple(self.position_ids.shape)} != input_ids shape"
                f" {tuple(input_ids.shape)}, or not integers ({self.position_ids.dtype})"
            )
        if isinstance(self.max_seqlen, bool) or not isinstance(self.max_seqlen, int):
            raise TypeError(f"max_seqlen must be an int, got {self.max_seqlen!r}")
        if self.pool_mask is not None and (
            self.pool_mask.shape != input_ids.shape or self.pool_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"pool_mask must be a bool tensor of input_ids' shape {tuple(input_ids.shape)},"
                f" got {self.pool_mask.dtype} {tuple(self.pool_mask.shape)}"
            )
        if self.indices is not None and self.indices.shape != (self.batch_size,):
            raise ValueError(
                f"indices must have one entry per sequence ({self.batch_size}),"
                f" got shape {tuple(self.indices.shape)}"
            )
        tensors = [input_ids, cu_seqlens, self.position_ids, self.pool_mask, self.indices]
        devices = {tensor.device for tensor in tensors if tensor is not None}
        if len(devices) > 1:
            raise ValueError(f"the tensors of a packed batch must share one device, got {devices}")


# --------------------------------------------------------------------------------------------
# Packing under a token budget
# --------------------------------------------------------------------------------------------


class FlatPlan(NamedTuple):
    """Every batch of a plan in flat tensors, the layout of csrc/pack_batches.cpp: batch b holds
    ``order[batch_offsets[b] : batch_offsets[b + 1]]``, its cu_seqlens are
    ``cu_seqlens[batch_offsets[b] + b : batch_offsets[b + 1] + b + 1]`` and its position_ids
    ``position_ids[token_offsets[b] : token_offsets[b + 1]]``."""

    order: torch.Tensor  # (N,) int64, input indices in packing order
    batch_offsets: torch.Tensor  # (NB + 1,) int64, from 0 to N
    cu_seqlens: torch.Tensor  # (N + NB,) int32
    position_ids: torch.Tensor  # (T_all,) int64
    token_offsets: torch.Tensor  # (NB + 1,) int64, from 0 to the total token count


def pack_batches(
    sequences: Sequence[Sequence[int]],
    max_batch_tokens: int,
    *,
    pool_masks: Sequence[Sequence[bool]] | None = None,
    max_batch_size: int | None = None,
    sort: bool = True,
) -> Iterator[Packed]:
    """Pack token sequences (lists, arrays or tensors of ids) into batches, on the host.

    See ``plan_batches`` for how sequences are grouped; each batch's ``indices`` give its
    sequences' positions in ``sequences``, and ``pool_masks`` (one per sequence) its pool_mask.
    A batch's tokens are gathered when the iterator reaches it.
    """
    if pool_masks is not None and len(pool_masks) != len(sequences):
        raise ValueError(f"{len(pool_masks)} pool masks for {len(sequences)} sequences")
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.int64)  # (N,)
    plan = plan_batches(lengths, max_batch_tokens, max_batch_size, sort)
    num_batches = plan.batch_offsets.numel() - 1
    if num_batches == 0:
        return
    max_seqlens = np.maximum.reduceat(
        lengths[plan.order].numpy(), plan.batch_offsets[:-1].numpy()
    ).tolist()
    seq_bounds, token_bounds = plan.batch_offsets.tolist(), plan.token_offsets.tolist()
    for b in range(num_batches):
        start, end = seq_bounds[b], seq_bounds[b + 1]
        indices = plan.order[start:end]  # (B,)
        members = indices.tolist()
        yield Packed(
            input_ids=_concatenate([sequences[i] for i in members], torch.long),
            cu_seqlens=plan.cu_seqlens[start + b : end + b + 1],
            position_ids=plan.position_ids[token_bounds[b] : token_bounds[b + 1]],
            max_seqlen=max_seqlens[b],
            pool_mask=None
            if pool_masks is None
            else _concatenate([pool_masks[i] for i in members], torch.bool),
            indices=indices,
        )


def _concatenate(parts: Sequence[Sequence], dtype: torch.dtype) -> torch.Tensor:
    """Lists, arrays or tensors laid end to end in one 1-D tensor."""
    if parts and all(isinstance(part, np.ndarray) for part in parts):  # no per-token Python
        return torch.from_numpy(np.concatenate(parts)).to(dtype)
    flat: list = []
    for part in parts:
        flat.extend(part.tolist() if hasattr(part, "tolist") else part)
    return torch.tensor(flat, dtype=dtype)


def plan_batches(
    lengths: Sequence[int] | torch.Tensor | np.ndarray,
    max_batch_tokens: int,
    max_batch_size: int | None = None,
    sort: bool = True,
) -> FlatPlan:
    """Group sequences of these token lengths into batches.

    Greedy filling: a batch takes the next sequence while its token count stays <=
    ``max_batch_tokens`` and its size <= ``max_batch_size`` (None: no limit); a sequence longer
    than the budget forms a batch alone. ``sort=True`` first orders the sequences by descending
    length (stable: ties keep input order), ``sort=False`` keeps input order. Every index lands
    in exactly one batch; zero-length sequences are legal.
    """
    lengths_tensor = _as_lengths_tensor(lengths)
    max_batch_tokens, size_limit = _check_budgets(max_batch_tokens, max_batch_size)
    if extension_loaded():
        flat = ops().pack_batches(lengths_tensor, max_batch_tokens, size_limit, bool(sort))
    else:
        flat = _pack_batches_python(lengths_tensor, max_batch_tokens, size_limit, bool(sort))
    return FlatPlan(*flat)


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
                f"pack_batches: a batch of {batch_tokens + seq_len} tokens does not fit the int32"
                " cu_seqlens"
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
    return FlatPlan(
        torch.tensor(order, dtype=torch.int64),
        torch.tensor(batch_offsets, dtype=torch.int64),
        cu_flat.to(torch.int32),
        position_ids,
        torch.tensor(token_offsets, dtype=torch.int64),
    )


# --------------------------------------------------------------------------------------------
# Padding to CUDA-graph shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphShape:
    """The static shape a batch is padded to: ``tokens`` T, ``slots`` B and ``max_seqlen``."""

    tokens: int
    slots: int
    max_seqlen: int


def round_up_size(n: int, minimum: int) -> int:
    """The smallest ``m * 2**e >= max(n, minimum)`` with ``m < 16``: at most 12.5% above n."""
    n = max(n, minimum)
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def padding_lengths(padding: int, max_seqlen: int) -> list[int]:
    """Lengths of the padding sequences holding ``padding`` tokens, none over ``max_seqlen``."""
    return [max_seqlen] * (padding // max_seqlen) + (
        [padding % max_seqlen] if padding % max_seqlen else []
    )


def graph_shape(lengths: list[int]) -> GraphShape:
    """The graph shape for a packed batch whose sequences have these token counts: tokens and
    max_seqlen rounded up by ``round_up_size``, sequence slots up to a power of two."""
    max_seqlen = round_up_size(max(lengths, default=0), 16)
    tokens = round_up_size(sum(lengths), 64)
    sequences = len(lengths) + len(padding_lengths(tokens - sum(lengths), max_seqlen))
    slots = 1 << max(0, sequences - 1).bit_length()
    return GraphShape(tokens, slots, max_seqlen)
