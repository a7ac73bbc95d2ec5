"""SwiGLU activation on the fused gate/up projection: ``silu(gate) * up``.

One program per tile of rows x intermediate columns; the forward reads gate and up once and writes
the product, the backward recomputes ``sigmoid(gate)`` instead of saving any activation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton

_TILE_ELEMENTS = 2048
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_gate_up(
    gate_up_ptr, rows, intermediate, stride_in_row, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr
):
    """This program's tile: (row_ids, cols, mask, gate, up), gate and up ``(BLOCK_T, BLOCK_I)``
    in fp32."""
    row_ids = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (row_ids < rows)[:, None] & (cols < intermediate)[None, :]
    gate_ptrs = gate_up_ptr + row_ids[:, None] * stride_in_row + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + intermediate, mask=mask, other=0.0).to(tl.float32)
    return row_ids, cols, mask, gate, up


@triton.jit
def _swiglu_forward_kernel(
    gate_up_ptr,
    out_ptr,
    rows,
    intermediate,
    stride_in_row,
    stride_out_row,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    row_ids, cols, mask, gate, up = _load_gate_up(
        gate_up_ptr, rows, intermediate, stride_in_row, BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I
    )
    silu = gate * tl.sigmoid(gate)
    out_ptrs = out_ptr + row_ids[:, None] * stride_out_row + cols[None, :]
    tl.store(out_ptrs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    gate_up_ptr,
    grad_out_ptr,
    grad_in_ptr,
    rows,
    intermediate,
    stride_in_row,
    stride_grad_out_row,
    stride_grad_in_row,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    row_ids, cols, mask, gate, up = _load_gate_up(
        gate_up_ptr, rows, intermediate, stride_in_row, BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I
    )
    grad_out_ptrs = grad_out_ptr + row_ids[:, None] * stride_grad_out_row + cols[None, :]
    grad_out = tl.load(grad_out_ptrs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu / d gate = sig * (1 + gate * (1 - sig))
    grad_gate = grad_out * up * sig * (1.0 + gate * (1.0 - sig))
    grad_up = grad_out * silu
    grad_ptrs = grad_in_ptr + row_ids[:, None] * stride_grad_in_row + cols[None, :]
    tl.store(grad_ptrs, grad_gate.to(grad_in_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_ptrs + intermediate, grad_up.to(grad_in_ptr.dtype.element_ty), mask=mask)


def _launch_config(rows: int, intermediate: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_T, BLOCK_I): tiles of about _TILE_ELEMENTS, several rows when I is small."""
    block_i = min(triton.next_power_of_2(intermediate), _TILE_ELEMENTS)
    block_t = min(triton.next_power_of_2(rows), _TILE_ELEMENTS // block_i)
    return (triton.cdiv(rows, block_t), triton.cdiv(intermediate, block_i)), block_t, block_i


def _swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    intermediate = width // 2
    out = torch.empty(rows, intermediate, dtype=gate_up.dtype, device=gate_up.device)  # (T, I)
    if rows == 0 or intermediate == 0:
        return out
    grid, block_t, block_i = _launch_config(rows, intermediate)
    _swiglu_forward_kernel[grid](
        gate_up,
        out,
        rows,
        intermediate,
        gate_up.stride(0),
        out.stride(0),
        BLOCK_T=block_t,
        BLOCK_I=block_i,
    )
    return out


def _swiglu_backward(gate_up: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape
    intermediate = width // 2
    grad_in = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)  # (T, 2I)
    if rows == 0 or intermediate == 0:
        return grad_in
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grid, block_t, block_i = _launch_config(rows, intermediate)
    _swiglu_backward_kernel[grid](
        gate_up,
        grad_out,
        grad_in,
        rows,
        intermediate,
        gate_up.stride(0),
        grad_out.stride(0),
        grad_in.stride(0),
        BLOCK_T=block_t,
        BLOCK_I=block_i,
    )
    return grad_in


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
        ctx.save_for_backward(gate_up)
        return _swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return _swiglu_backward(gate_up, grad_out)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused gate/up projection.

    gate_up ``(T, 2I)`` holds the gate in its first half and up in its second; returns
    ``silu(gate) * up`` ``(T, I)`` in the input dtype, computed in fp32.
    """
    if not isinstance(gate_up, torch.Tensor):
        raise TypeError(f"gate_up must be a tensor, got {type(gate_up).__name__}")
    if gate_up.dim() != 2:
        raise ValueError(f"gate_up must be 2-D (T, 2I), got shape {tuple(gate_up.shape)}")
    if gate_up.shape[1] % 2:
        raise ValueError(
            f"gate_up's last dim must be even (gate and up halves), got {gate_up.shape[1]}"
        )
    if not gate_up.is_floating_point():
        raise TypeError(f"gate_up must be a floating-point tensor, got {gate_up.dtype}")
    if use_triton(gate_up):
        if gate_up.dtype not in _TRITON_DTYPES:
            raise TypeError(f"Triton swiglu supports fp16, bf16 and fp32, got {gate_up.dtype}")
        return SwiGLUFunction.apply(gate_up)
    return reference.swiglu(gate_up)
