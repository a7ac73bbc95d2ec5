"""Rotary position embedding on packed tokens (Hugging Face's rotate-half layout).

One program per tile of tokens x heads: it computes the angles ``position * inv_freq`` and their
cos/sin in fp32 for its tokens, so no ``(T, D)`` table is ever materialised, and rotates the two
halves of every head with them. The backward is the same kernel with the inverse rotation (sin
negated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE_ELEMENTS = 2048  # elements of one half per program


@triton.jit
def _rotary_kernel(
    x_ptr,
    out_ptr,
    position_ids_ptr,
    inv_freq_ptr,
    tokens,
    heads,
    half_dim,
    stride_x_token,
    stride_x_head,
    stride_out_token,
    stride_out_head,
    attention_scaling,
    INVERSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token_ids = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    head_ids = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_HALF)
    token_mask = token_ids < tokens
    dim_mask = dims < half_dim
    positions = tl.load(position_ids_ptr + token_ids, mask=token_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
    angle = (
        positions[:, None] * inv_freq[None, :]
    )  # (BLOCK_T, BLOCK_HALF), one fp32 rounding as in HF
    cos = (tl.cos(angle) * attention_scaling)[:, None, :]
    sin = (tl.sin(angle) * attention_scaling)[:, None, :]
    if INVERSE:
        sin = -sin
    mask = token_mask[:, None, None] & (head_ids < heads)[None, :, None] & dim_mask[None, None, :]
    x_ptrs = (
        x_ptr
        + token_ids[:, None, None] * stride_x_token
        + head_ids[None, :, None] * stride_x_head
        + dims[None, None, :]
    )
    first = tl.load(x_ptrs, mask=mask, other=0.0).to(
        tl.float32
    )  # (BLOCK_T, BLOCK_HEADS, BLOCK_HALF)
    second = tl.load(x_ptrs + half_dim, mask=mask, other=0.0).to(tl.float32)
    out_first = first * cos - second * sin
    out_second = second * cos + first * sin
    out_ptrs = (
        out_ptr
        + token_ids[:, None, None] * stride_out_token
        + head_ids[None, :, None] * stride_out_head
        + dims[None, None, :]
    )
    tl.store(out_ptrs, out_first.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + half_dim, out_second.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    inverse: bool,
) -> torch.Tensor:
    """Rotate every head of x ``(T, H, D)``; returns a new contiguous tensor."""
    tokens, heads, head_dim = x.shape
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype, device=x.device)  # (T, H, D)
    if tokens == 0 or heads == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    half_dim = head_dim // 2
    block_half = triton.next_power_of_2(half_dim)
    block_heads = min(triton.next_power_of_2(heads), max(1, _TILE_ELEMENTS // block_half))
    block_t = min(
        triton.next_power_of_2(tokens), max(1, _TILE_ELEMENTS // (block_heads * block_half))
    )
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(heads, block_heads))
    _rotary_kernel[grid](
        x,
        out,
        position_ids,
        inv_freq,
        tokens,
        heads,
        half_dim,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        attention_scaling,
        INVERSE=inverse,
        BLOCK_T=block_t,
        BLOCK_HEADS=block_heads,
        BLOCK_HALF=block_half,
    )
    return out


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        position_ids: torch.Tensor,
        inv_freq: torch.Tensor,
        attention_scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.attention_scaling = attention_scaling
        ctx.set_materialize_grads(False)
        q_out = _rotate(q, position_ids, inv_freq, attention_scaling, inverse=False)
        k_out = _rotate(k, position_ids, inv_freq, attention_scaling, inverse=False)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None):
        position_ids, inv_freq = ctx.saved_tensors
        scaling = ctx.attention_scaling
        grad_q = (
            None
            if grad_q is None
            else _rotate(grad_q, position_ids, inv_freq, scaling, inverse=True)
        )
        grad_k = (
            None
            if grad_k is None
            else _rotate(grad_k, position_ids, inv_freq, scaling, inverse=True)
        )
        return grad_q, grad_k, None, None, None


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"q and k must be 3-D (T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on tokens and head_dim"
        )
    head_dim = q.shape[2]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for the rotate-half layout, got {head_dim}")
    if not q.is_floating_point() or not k.is_floating_point():
        raise TypeError(f"q and k must be floating-point, got {q.dtype} and {k.dtype}")
    if position_ids.dim() != 1 or position_ids.shape[0] != q.shape[0]:
        raise ValueError(
            f"position_ids must have shape ({q.shape[0]},), got {tuple(position_ids.shape)}"
        )
    if (
        position_ids.is_floating_point()
        or position_ids.is_complex()
        or position_ids.dtype == torch.bool
    ):
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if inv_freq.dim() != 1 or inv_freq.shape[0] != head_dim // 2:
        raise ValueError(
            f"inv_freq must have shape ({head_dim // 2},) for head_dim {head_dim}, "
            f"got {tuple(inv_freq.shape)}"
        )
    if not inv_freq.is_floating_point():
        raise TypeError(f"inv_freq must be floating-point, got {inv_freq.dtype}")
    for name, tensor in (("k", k), ("position_ids", position_ids), ("inv_freq", inv_freq)):
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of packed queries and keys.

    q ``(T, Hq, D)``, k ``(T, Hkv, D)`` (views with any token/head strides are fine),
    position_ids ``(T,)`` integer, restarting at 0 for each packed sequence, inv_freq ``(D/2,)``
    (already rope-scaled, e.g. llama3). cos and sin of ``position * inv_freq`` are computed in fp32
    and multiplied by ``attention_scaling``. Returns the rotated ``(q, k)`` in their dtypes.
    """
    _check_inputs(q, k, position_ids, inv_freq)
    if not use_triton(q, k):
        return reference.apply_rotary(q, k, position_ids, inv_freq, attention_scaling)
    if q.dtype not in _TRITON_DTYPES or k.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"Triton apply_rotary supports fp16, bf16 and fp32, got {q.dtype} and {k.dtype}"
        )
    return RotaryFunction.apply(
        q, k, position_ids.contiguous(), inv_freq.float().contiguous(), float(attention_scaling)
    )
