"""Masked pooling over packed sequences, forward and backward in Triton.

One program per (sequence, block of hidden columns) walks its sequence's tokens once and writes
the pooled vector; with ``normalize=True`` a second, tiny kernel L2-normalises the ``(B, H)``
result (the hidden states are still read only once). The backward spreads the pooled gradient
back over the tokens with the same weights and writes every token of every sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton
from ._l2norm import inverse_row_norms, normalize_backward, scale_rows
from .varlen_checks import validate_cu_seqlens

BLOCK_TOKENS = 32
BLOCK_HIDDEN = 128

# The kernels' MODE constant: 0 mean, 1 weighted mean, 2 the last token, 3 the first token.
MODE_CODES = {"mean": 0, "weighted_mean": 1, "eos_token": 2, "last_token": 2, "bos_token": 3}


@triton.jit
def _token_weights(mask_ptr, tokens, in_seq, rank_base, MODE: tl.constexpr, HAS_MASK: tl.constexpr):
    """Pooling weights of a block of tokens (fp32) and the number of pooled tokens so far.

    ``mean``: 1 for every pooled token; ``weighted_mean``: 1, 2, ... L over the pooled tokens of
    the sequence in order (``rank_base`` counts the pooled tokens of earlier blocks).
    """
    if HAS_MASK:
        pooled = tl.load(mask_ptr + tokens, mask=in_seq, other=0).to(tl.float32)
    else:
        pooled = in_seq.to(tl.float32)
    if MODE == 1:
        weights = (rank_base + tl.cumsum(pooled, axis=0)) * pooled
    else:
        weights = pooled
    return weights, rank_base + tl.sum(pooled, axis=0)


@triton.jit
def _sequence_and_columns(cu_seqlens_ptr, width, BLOCK_H: tl.constexpr):
    """This program's sequence, its ``[start, end)`` tokens (int64) and its block of hidden
    columns."""
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_width = cols < width
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    return seq, start, end, cols, in_width


@triton.jit
def _pool_forward_kernel(
    hidden_ptr,  # (T, H)
    cu_seqlens_ptr,  # (B + 1,) int32
    mask_ptr,  # (T,) uint8, unused without HAS_MASK
    out_ptr,  # (B, H)
    totals_ptr,  # (B,) fp32: sum of the weights, for the backward
    width,
    stride_hidden,
    stride_out,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seq, start, end, cols, in_width = _sequence_and_columns(cu_seqlens_ptr, width, BLOCK_H=BLOCK_H)
    out_row = out_ptr + seq.to(tl.int64) * stride_out + cols
    if MODE >= 2:
        if MODE == 2:
            token = end - 1
        else:
            token = start
        picked = tl.load(
            hidden_ptr + token * stride_hidden + cols, mask=in_width & (end > start), other=0.0
        )
        tl.store(out_row, picked.to(out_ptr.dtype.element_ty), mask=in_width)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        rank_base = tl.sum(total, axis=0)
        for offset in range(0, end - start, BLOCK_T):
            tokens = start + offset + tl.arange(0, BLOCK_T)
            in_seq = tokens < end
            weights, rank_base = _token_weights(
                mask_ptr, tokens, in_seq, rank_base, MODE=MODE, HAS_MASK=HAS_MASK
            )
            h = tl.load(
                hidden_ptr + tokens[:, None] * stride_hidden + cols[None, :],
                mask=in_seq[:, None] & in_width[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += h * weights[:, None]
            total += weights
        weight_sum = tl.sum(total, axis=0)
        pooled = tl.sum(acc, axis=0) / tl.maximum(weight_sum, 1e-9)
        tl.store(out_row, pooled.to(out_ptr.dtype.element_ty), mask=in_width)
        if tl.program_id(1) == 0:
            tl.store(totals_ptr + seq, weight_sum)


@triton.jit
def _pool_backward_kernel(
    grad_pooled_ptr,  # (B, H) fp32
    cu_seqlens_ptr,
    mask_ptr,
    totals_ptr,
    grad_hidden_ptr,  # (T, H)
    width,
    stride_grad_pooled,
    stride_grad_hidden,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seq, start, end, cols, in_width = _sequence_and_columns(cu_seqlens_ptr, width, BLOCK_H=BLOCK_H)
    grad = tl.load(
        grad_pooled_ptr + seq.to(tl.int64) * stride_grad_pooled + cols, mask=in_width, other=0.0
    )
    if MODE < 2:
        grad = grad / tl.maximum(tl.load(totals_ptr + seq), 1e-9)
    rank_base = tl.sum(tl.zeros((BLOCK_T,), dtype=tl.float32), axis=0)
    for offset in range(0, end - start, BLOCK_T):
        tokens = start + offset + tl.arange(0, BLOCK_T)
        in_seq = tokens < end
        if MODE == 2:
            weights = (tokens == end - 1).to(tl.float32)
        elif MODE == 3:
            weights = (tokens == start).to(tl.float32)
        else:
            weights, rank_base = _token_weights(
                mask_ptr, tokens, in_seq, rank_base, MODE=MODE, HAS_MASK=HAS_MASK
            )
        tl.store(
            grad_hidden_ptr + tokens[:, None] * stride_grad_hidden + cols[None, :],
            (weights[:, None] * grad[None, :]).to(grad_hidden_ptr.dtype.element_ty),
            mask=in_seq[:, None] & in_width[None, :],
        )


def _grid(batch: int, width: int) -> tuple[int, int]:
    return (batch, triton.cdiv(width, BLOCK_HIDDEN))


class _MaskedPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, cu_seqlens, mode_code, pool_mask, normalize):
        total, width = hidden.shape
        batch = cu_seqlens.numel() - 1
        has_mask = pool_mask is not None
        mask = (
            pool_mask.contiguous().view(torch.uint8) if has_mask else cu_seqlens
        )  # any pointer when unused
        # without normalisation the kernel writes the output dtype; with it, fp32 for the norm
        pooled = torch.empty(
            batch, width, device=hidden.device, dtype=torch.float32 if normalize else hidden.dtype
        )
        totals = torch.empty(batch, device=hidden.device, dtype=torch.float32)
        if batch and width:
            _pool_forward_kernel[_grid(batch, width)](
                hidden,
                cu_seqlens,
                mask,
                pooled,
                totals,
                width,
                hidden.stride(0),
                pooled.stride(0),
                MODE=mode_code,
                HAS_MASK=has_mask,
                BLOCK_T=BLOCK_TOKENS,
                BLOCK_H=BLOCK_HIDDEN,
            )
        out = pooled
        if normalize:
            out = scale_rows(pooled, inverse_row_norms(pooled), hidden.dtype)
        ctx.save_for_backward(cu_seqlens, mask, totals, pooled if normalize else None)
        ctx.mode_code = mode_code
        ctx.has_mask = has_mask
        ctx.normalize = normalize
        ctx.hidden_shape = (total, width)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cu_seqlens, mask, totals, pooled32 = ctx.saved_tensors
        total, width = ctx.hidden_shape
        batch = cu_seqlens.numel() - 1
        grad_out = grad_out.contiguous()
        grad_pooled = (
            normalize_backward(pooled32, grad_out, torch.float32)
            if ctx.normalize
            else grad_out.float()
        )
        grad_hidden = torch.empty(total, width, device=grad_out.device, dtype=ctx.hidden_dtype)
        if batch and width:
            _pool_backward_kernel[_grid(batch, width)](
                grad_pooled,
                cu_seqlens,
                mask,
                totals,
                grad_hidden,
                width,
                grad_pooled.stride(0),
                grad_hidden.stride(0),
                MODE=ctx.mode_code,
                HAS_MASK=ctx.has_mask,
                BLOCK_T=BLOCK_TOKENS,
                BLOCK_H=BLOCK_HIDDEN,
            )
        return grad_hidden, None, None, None, None


def _check_inputs(hidden, cu_seqlens, pooling_mode, pool_mask, check_cu_seqlens: bool) -> None:
    if pooling_mode not in reference.POOLING_MODES:
        raise ValueError(
            f"unknown pooling mode {pooling_mode!r};"
            f" expected one of {', '.join(reference.POOLING_MODES)}"
        )
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(
            f"hidden must be a 2-D (T, H) tensor, got shape {tuple(getattr(hidden, 'shape', ()))}"
        )
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    total = hidden.shape[0]
    if pool_mask is not None:
        if pool_mask.shape != (total,):
            raise ValueError(
                f"pool_mask must have shape ({total},) like hidden's tokens,"
                f" got {tuple(pool_mask.shape)}"
            )
        if pool_mask.dtype != torch.bool:
            raise TypeError(f"pool_mask must be bool, got {pool_mask.dtype}")
        if pool_mask.device != hidden.device:
            raise ValueError(f"pool_mask is on {pool_mask.device} but hidden is on {hidden.device}")
    if check_cu_seqlens:
        # a bad cu_seqlens would read or leave tokens out of bounds
        validate_cu_seqlens(cu_seqlens, total)


def masked_pool(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pooling_mode: str,
    pool_mask: torch.Tensor | None = None,
    normalize: bool = False,
    *,
    check_cu_seqlens: bool = True,
) -> torch.Tensor:
    """Pool each packed sequence of ``hidden`` into one vector.

    hidden ``(T, H)`` float; cu_seqlens int32 ``(B + 1,)`` (0, ..., T); pool_mask ``(T,)`` bool
    marks the tokens ``mean``/``weighted_mean`` pool (all when None); pooling_mode is one of
    ``reference.POOLING_MODES``. Returns ``(B, H)`` in hidden's dtype (computed in fp32),
    L2-normalised per row when ``normalize``. Sequences with nothing to pool give zeros.
    Differentiable w.r.t. ``hidden``. ``check_cu_seqlens=False`` skips the check of the values
    of cu_seqlens (0, non-decreasing, T), which costs a host sync on a GPU.
    """
    _check_inputs(hidden, cu_seqlens, pooling_mode, pool_mask, check_cu_seqlens)
    if not use_triton(hidden):
        return reference.masked_pool(hidden, cu_seqlens, pooling_mode, pool_mask, normalize)
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"Triton masked_pool supports float16, bfloat16 and float32, got {hidden.dtype}"
        )
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    return _MaskedPool.apply(
        hidden, cu_seqlens.contiguous(), MODE_CODES[pooling_mode], pool_mask, bool(normalize)
    )
