"""RMSNorm fused with the residual add (Llama's form, or Gemma's with ``unit_offset``).

Forward: each program takes a few rows (one when H is large), adds the residual, stores the sum
(the residual stream), and writes ``weight * (sum * rstd)`` with the statistics in fp32 and the
normalised row rounded to the input dtype before the weight multiplies it, as Hugging Face's
``LlamaRMSNorm`` does. ``unit_offset`` scales by ``1 + weight`` instead, the whole product in fp32
and rounded once, as ``Gemma3RMSNorm`` does; the weight stays the checkpoint's (zero-centred), so
training, LoRA and export see transformers' parameter, and the kernel adds the 1 in fp32 where a
stored ``1 + w`` would lose w's low bits in 16-bit weights.

Backward: each program walks a contiguous range of row tiles, writes the input gradients tile by
tile and keeps its partial sum of the weight gradient in registers; the partial sums ``(P, H)`` are
added up afterwards, so no atomics and a deterministic result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HIDDEN = 65536
_TILE_ELEMENTS = 4096  # a tile holds several rows when H is small


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    summed_ptr,
    rstd_ptr,
    rows,
    hidden,
    stride_x,
    stride_residual,
    stride_out,
    stride_summed,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row_ids = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_mask = row_ids < rows
    mask = row_mask[:, None] & (cols < hidden)[None, :]
    h = tl.load(x_ptr + row_ids[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row_ids[:, None] * stride_residual + cols[None, :]
        h += tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
        # round the sum to the stream dtype first, as `x + residual` in PyTorch does
        h = h.to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row_ids[:, None] * stride_summed + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / hidden + eps)  # (BLOCK_T,)
    weight = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        out = (h * rstd[:, None] * (1.0 + weight[None, :])).to(out_ptr.dtype.element_ty)
    else:
        normed = (h * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        out = (normed * weight[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row_ids[:, None] * stride_out + cols[None, :], out, mask=mask)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    summed_ptr,
    weight_ptr,
    rstd_ptr,
    grad_out_ptr,
    grad_summed_ptr,
    grad_in_ptr,
    weight_grad_partial_ptr,
    rows,
    hidden,
    blocks_per_program,
    stride_summed,
    stride_grad_out,
    stride_grad_summed,
    stride_grad_in,
    HAS_GRAD_SUMMED: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        weight += 1.0  # the scale is 1 + weight; its gradient is the weight's
    weight_grad = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    block_start = pid * blocks_per_program
    block_end = tl.minimum(block_start + blocks_per_program, tl.cdiv(rows, BLOCK_T))
    for block in range(block_start, block_end):
        row_ids = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_mask = row_ids < rows
        mask = row_mask[:, None] & col_mask[None, :]
        h = tl.load(
            summed_ptr + row_ids[:, None] * stride_summed + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)
        normed = h * rstd[:, None]  # (BLOCK_T, BLOCK_H)
        grad_out_ptrs = grad_out_ptr + row_ids[:, None] * stride_grad_out + cols[None, :]
        grad_out = tl.load(grad_out_ptrs, mask=mask, other=0.0).to(tl.float32)
        grad_normed = grad_out * weight[None, :]
        # d/dh of h * rstd(h): rstd * (g - normed * mean(g * normed)) per row
        row_dot = tl.sum(grad_normed * normed, axis=1) / hidden
        grad_h = rstd[:, None] * (grad_normed - normed * row_dot[:, None])
        if HAS_GRAD_SUMMED:
            grad_summed_ptrs = (
                grad_summed_ptr + row_ids[:, None] * stride_grad_summed + cols[None, :]
            )
            grad_h += tl.load(grad_summed_ptrs, mask=mask, other=0.0).to(tl.float32)
        grad_in_ptrs = grad_in_ptr + row_ids[:, None] * stride_grad_in + cols[None, :]
        tl.store(grad_in_ptrs, grad_h.to(grad_in_ptr.dtype.element_ty), mask=mask)
        weight_grad += grad_out * normed
    partial_ptrs = weight_grad_partial_ptr + pid.to(tl.int64) * hidden + cols
    tl.store(partial_ptrs, tl.sum(weight_grad, axis=0), mask=col_mask)


def _num_warps(tile_elements: int) -> int:
    if tile_elements <= 2048:
        return 4
    if tile_elements <= 8192:
        return 8
    return 16


def _rows_per_tile(rows: int, block_h: int) -> int:
    return min(triton.next_power_of_2(max(rows, 1)), max(1, _TILE_ELEMENTS // block_h))


def _backward_programs(row_blocks: int, device: torch.device) -> int:
    """Programs of the backward: a few per SM on a GPU (each keeps one partial weight gradient)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: few programs, several row blocks each, so the loop is exercised
    return max(1, min(row_blocks, target))


def _rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    unit_offset: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    rows, hidden = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows, hidden, dtype=out_dtype, device=x.device)  # (T, H)
    summed = (
        None if residual is None else torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    )  # (T, H)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)  # (T,)
    if rows == 0:
        return out, summed, rstd
    block_h = triton.next_power_of_2(hidden)
    block_t = _rows_per_tile(rows, block_h)
    _rms_norm_forward_kernel[(triton.cdiv(rows, block_t),)](
        x,
        x if residual is None else residual,
        weight,
        out,
        x if summed is None else summed,
        rstd,
        rows,
        hidden,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        0 if summed is None else summed.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        UNIT_OFFSET=unit_offset,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_t * block_h),
    )
    return out, summed, rstd


def _rms_norm_backward(
    summed: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    grad_out: torch.Tensor,
    grad_summed: torch.Tensor | None,
    unit_offset: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, hidden = summed.shape
    grad_in = torch.empty(rows, hidden, dtype=summed.dtype, device=summed.device)  # (T, H)
    if rows == 0:
        return grad_in, torch.zeros_like(weight)
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    if grad_summed is not None and grad_summed.stride(-1) != 1:
        grad_summed = grad_summed.contiguous()
    block_h = triton.next_power_of_2(hidden)
    block_t = _rows_per_tile(rows, block_h)
    row_blocks = triton.cdiv(rows, block_t)
    blocks_per_program = triton.cdiv(row_blocks, _backward_programs(row_blocks, summed.device))
    programs = triton.cdiv(row_blocks, blocks_per_program)
    weight_grad_partial = torch.empty(
        programs, hidden, dtype=torch.float32, device=summed.device
    )  # (P, H)
    _rms_norm_backward_kernel[(programs,)](
        summed,
        weight,
        rstd,
        grad_out,
        grad_out if grad_summed is None else grad_summed,
        grad_in,
        weight_grad_partial,
        rows,
        hidden,
        blocks_per_program,
        summed.stride(0),
        grad_out.stride(0),
        0 if grad_summed is None else grad_summed.stride(0),
        grad_in.stride(0),
        HAS_GRAD_SUMMED=grad_summed is not None,
        UNIT_OFFSET=unit_offset,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=_num_warps(block_t * block_h),
    )
    return grad_in, weight_grad_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """``(x, weight, residual)`` -> ``(normed, x + residual)``; without a residual only
    ``normed``."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        unit_offset: bool = False,
    ):
        out, summed, rstd = _rms_norm_forward(x, weight, eps, residual, unit_offset)
        ctx.has_residual = residual is not None
        ctx.unit_offset = unit_offset
        ctx.save_for_backward(x if summed is None else summed, weight, rstd)
        ctx.set_materialize_grads(False)
        if summed is None:
            return out
        return out, summed

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_summed: torch.Tensor | None = None):
        summed, weight, rstd = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros(summed.shape, dtype=summed.dtype, device=summed.device)
        grad_in, grad_weight = _rms_norm_backward(
            summed, weight, rstd, grad_out, grad_summed, ctx.unit_offset
        )
        grad_weight = grad_weight if ctx.needs_input_grad[1] else None
        grad_residual = grad_in if ctx.has_residual else None
        return grad_in, grad_weight, None, grad_residual, None


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (T, H), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight must have shape ({x.shape[1]},) to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x + residual``, scaled by ``weight`` (by ``1 + weight`` with ``unit_offset``,
    Gemma's form), with the sum returned for the residual stream.

    x, residual ``(T, H)``, weight ``(H,)``; returns ``(normed, summed)``: ``normed`` ``(T, H)`` in
    the promoted dtype of weight and x, ``summed = x + residual`` ``(T, H)`` (``x`` itself without a
    residual). Statistics in fp32; gradients flow through both outputs.
    """
    _check_inputs(x, weight, eps, residual)
    if not use_triton(x, weight, residual):
        return reference.rms_norm(x, weight, eps, residual, unit_offset=unit_offset)
    if x.dtype not in _TRITON_DTYPES or weight.dtype not in _TRITON_DTYPES:
        raise TypeError(
            "Triton rms_norm supports fp16, bf16 and fp32, "
            f"got x {x.dtype} and weight {weight.dtype}"
        )
    if x.shape[1] > _MAX_HIDDEN:
        raise ValueError(
            f"Triton rms_norm keeps a row in registers: hidden size {x.shape[1]} > {_MAX_HIDDEN}"
        )
    x_rows = x if x.stride(-1) == 1 else x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    weight = weight.contiguous()
    if residual is None:
        return RMSNormFunction.apply(x_rows, weight, float(eps), None, unit_offset), x
    normed, summed = RMSNormFunction.apply(x_rows, weight, float(eps), residual, unit_offset)
    return normed, summed
