"""Row-wise L2 normalisation helpers shared by ``pooling`` and ``contrastive``.

``F.normalize(x, dim=-1, eps)`` divides each row by ``max(||x||, eps)``; these kernels compute
that in fp32 (each program takes a few whole rows, walking them in blocks so any width works) and
its backward, which ``masked_pool(normalize=True)`` and the contrastive loss both need.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12
TILE_ELEMENTS = 2048


@triton.jit
def _inverse_norm_kernel(
    x_ptr, inv_ptr, n_rows, width, stride_x, eps, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr
):
    """inv[r] = 1 / max(||x[r]||, eps) for a block of rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    sum_sq = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for col0 in range(0, width, BLOCK_W):
        cols = col0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (cols < width)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
        sum_sq += x * x
    norm = tl.sqrt(tl.sum(sum_sq, axis=1))
    tl.store(inv_ptr + rows, 1.0 / tl.maximum(norm, eps), mask=row_ok)


@triton.jit
def _scale_rows_kernel(
    x_ptr,
    inv_ptr,
    out_ptr,
    n_rows,
    width,
    stride_x,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """out[r] = x[r] * inv[r], cast to out's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    inv = tl.load(inv_ptr + rows, mask=row_ok, other=0.0)
    for col0 in range(0, width, BLOCK_W):
        cols = col0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (cols < width)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
        y = x * inv[:, None]
        tl.store(
            out_ptr + rows[:, None] * stride_out + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=ok,
        )


@triton.jit
def _normalize_backward_kernel(
    x_ptr,
    grad_y_ptr,
    grad_x_ptr,
    n_rows,
    width,
    stride_x,
    stride_gy,
    stride_gx,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Gradient of y = x / max(||x||, eps) for a block of rows.

    With n = ||x|| and d = max(n, eps): dx = dy / d - x (x . dy) / n^3 where n >= eps (there
    d = n), and dx = dy / eps below it (the clamp passes no gradient), as PyTorch's autograd gives.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    sum_sq = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    x_dot_dy = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for col0 in range(0, width, BLOCK_W):
        cols = col0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (cols < width)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
        dy = tl.load(grad_y_ptr + rows[:, None] * stride_gy + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
        sum_sq += x * x
        x_dot_dy += x * dy
    norm = tl.sqrt(tl.sum(sum_sq, axis=1))
    denom = tl.maximum(norm, eps)
    projection = tl.where(norm >= eps, tl.sum(x_dot_dy, axis=1) / (denom * denom * denom), 0.0)
    for col0 in range(0, width, BLOCK_W):
        cols = col0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (cols < width)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
        dy = tl.load(grad_y_ptr + rows[:, None] * stride_gy + cols[None, :], mask=ok, other=0.0).to(
            tl.float32
        )
        dx = dy / denom[:, None] - x * projection[:, None]
        tl.store(
            grad_x_ptr + rows[:, None] * stride_gx + cols[None, :],
            dx.to(grad_x_ptr.dtype.element_ty),
            mask=ok,
        )


def _blocks(width: int) -> dict:
    """A tile of about TILE_ELEMENTS: whole rows when they fit, several rows per program."""
    block_w = min(triton.next_power_of_2(max(width, 16)), TILE_ELEMENTS)
    return {"BLOCK_R": TILE_ELEMENTS // block_w, "BLOCK_W": block_w}


def _grid(n_rows: int, blocks: dict) -> tuple[int]:
    return (triton.cdiv(n_rows, blocks["BLOCK_R"]),)


def inverse_row_norms(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """x ``(R, W)`` with unit column stride -> ``1 / max(||x_r||, eps)`` ``(R,)`` fp32."""
    rows, width = x.shape
    inv = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        blocks = _blocks(width)
        _inverse_norm_kernel[_grid(rows, blocks)](x, inv, rows, width, x.stride(0), eps, **blocks)
    return inv


def scale_rows(x: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x ``(R, W)`` times inv ``(R,)`` per row, as a new ``(R, W)`` tensor of ``dtype``."""
    rows, width = x.shape
    out = torch.empty(rows, width, device=x.device, dtype=dtype)
    if rows:
        blocks = _blocks(width)
        _scale_rows_kernel[_grid(rows, blocks)](
            x, inv, out, rows, width, x.stride(0), out.stride(0), **blocks
        )
    return out


def normalize_backward(
    x: torch.Tensor, grad_y: torch.Tensor, dtype: torch.dtype, eps: float = NORM_EPS
) -> torch.Tensor:
    """Gradient w.r.t. x ``(R, W)`` of ``F.normalize(x, dim=-1, eps=eps)`` given grad_y
    ``(R, W)``."""
    rows, width = x.shape
    grad_x = torch.empty(rows, width, device=x.device, dtype=dtype)
    if rows:
        blocks = _blocks(width)
        _normalize_backward_kernel[_grid(rows, blocks)](
            x,
            grad_y,
            grad_x,
            rows,
            width,
            x.stride(0),
            grad_y.stride(0),
            grad_x.stride(0),
            eps,
            **blocks,
            num_warps=8,  # two fp32 accumulator tiles: at 4 warps Triton 3.6 spills on sm_90
        )
    return grad_x
