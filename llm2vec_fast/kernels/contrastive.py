"""In-batch contrastive (InfoNCE) loss over cosine similarities, forward and backward in Triton.

Never holds the ``B x N`` similarity matrix. With ``r_i = 1 / max(||x_i||, eps)`` the logits are
``s_ij = scale * (a_i . b_j) * ra_i * rb_j``: the raw dot products run on the tensor cores in the
input dtype with fp32 accumulation (exact products), the norms are applied in fp32 afterwards.

- forward: a grid of (query row blocks x doc splits). Each program walks the doc tiles of its
  split with an online log-sum-exp and keeps, per row, a partial max, a partial sum of
  exponentials and the positive logit ``s_ii`` if it lies in its split; the ``(3, S, M)``
  partials are merged on the host side of the launch into the exact ``lse_i``, kept as its two
  parts ``max_i + log(sum_i)`` (a few bytes per row). The splits let a small batch fill the
  GPU: at B = 512 with one hard negative per query, 8 row blocks alone would occupy 8 of an
  H100's 132 SMs, 8 x 16 splits occupy 128.
- backward, by recomputation, for column chunks of at most ``max(D, MIN_GRAD_CHUNK_COLS)``
  docs (so the buffer stays ``O(B x D)``): one kernel recomputes ``g_ij = p_ij - [i == j]``
  for the chunk, two GEMM kernels add ``g @ (rb * b)`` to the fp32 gradient of the normalised
  queries and ``g.T @ (ra * a)`` to that of the normalised docs, and a row kernel turns those
  into gradients of the raw inputs (the backward of the L2 normalisation).
  The GEMM kernels split the fp32 ``g`` into a high and a low 16-bit part (two tensor-core
  dots) so the gradients keep fp32 accuracy, as the fp32 PyTorch reference has.

``symmetric`` runs the same kernels for ``docs[:B]`` against the queries, adding into the same
fp32 gradient buffers. The loss over the batches of all torch.distributed ranks is training's
(``llm2vec_fast.train.distributed``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton
from ._l2norm import inverse_row_norms, normalize_backward

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64
MIN_GRAD_CHUNK_COLS = 2048
PROGRAMS_PER_SM = 2  # forward programs aimed at per SM: enough to hide one program's tail
INTERPRETER_PROGRAMS = 4  # without a GPU: several splits, so the merge runs in every test


@triton.jit
def _logits_tile(
    a_ptr,
    b_ptr,
    inv_a,
    inv_b,
    rows,
    cols,
    row_ok,
    col_ok,
    dim,
    stride_a,
    stride_b,
    scale,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """scale * cos(a_rows, b_cols) as a (BLOCK_M, BLOCK_N) fp32 tile."""
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_b + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if IEEE:
            dots += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            dots += tl.dot(a, tl.trans(b))
    return scale * dots * inv_a[:, None] * inv_b[None, :]


@triton.jit
def _dot_fp32_lhs(g, x, IEEE: tl.constexpr):
    """g (fp32) @ x with fp32 accuracy: IEEE dot for fp32 x, else g split into two 16-bit parts."""
    if IEEE:
        return tl.dot(g, x, input_precision="ieee")
    high = g.to(x.dtype)
    low = (g - high.to(tl.float32)).to(x.dtype)
    return tl.dot(high, x) + tl.dot(low, x)


@triton.jit
def _power_of_two_split(inv):
    """``(p, f)`` with ``p * f == inv`` exactly and ``p`` a power of two: ``inv`` with its
    mantissa cleared."""
    power = (inv.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return power, inv / power


@triton.jit
def _scaled_operands(g, inv, x, IEEE: tl.constexpr):
    """``(g * inv[None, :], x)`` for ``g @ (inv[:, None] * x)``, ready for :func:`_dot_fp32_lhs`.

    16-bit ``x``: the power of two of ``inv`` moves onto ``x`` (exact, and ``|x * p| <= 1`` since
    ``inv <= 1 / ||x_row||``), the rest onto ``g``. Otherwise ``g * inv`` reaches 1e12 for a zero
    row (``inv = 1 / eps``), overflows fp16 in the split of ``g`` and turns ``inf * 0`` into NaN.
    """
    if IEEE:
        return g * inv[None, :], x
    power, fraction = _power_of_two_split(inv)
    return g * fraction[None, :], (x.to(tl.float32) * power[:, None]).to(x.dtype)


@triton.jit
def _add_scaled_tile(grad_ptr, out_rows, out_row_ok, ds, d_ok, stride_grad, coef_ptr, scale, acc):
    """grad[out_rows, ds] += coef * scale * acc on an fp32 gradient buffer (read-modify-write)."""
    coef = tl.load(coef_ptr) * scale
    out = grad_ptr + out_rows[:, None] * stride_grad + ds[None, :]
    out_ok = out_row_ok[:, None] & d_ok[None, :]
    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + coef * acc, mask=out_ok)


@triton.jit
def _forward_kernel(
    a_ptr,  # (M, D) rows: queries
    b_ptr,  # (N, D) columns: docs, b[i] is the positive of a[i]
    inv_a_ptr,  # (M,) fp32
    inv_b_ptr,  # (N,) fp32
    partial_ptr,  # (3, S, M) fp32: per split, the max of the row's logits over its docs, the
    # sum of exp(logit - max) over them, and s_ii if doc i is among them (else 0)
    n_rows,
    n_cols,
    dim,
    stride_a,
    stride_b,
    scale,
    cols_per_split,  # a multiple of BLOCK_N: never 1, always divisible by 16 (one JIT variant)
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=0.0)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    positive = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_start = split.to(tl.int64) * cols_per_split
    for col0 in range(0, tl.minimum(cols_per_split, n_cols - col_start), BLOCK_N):
        cols = col_start + col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        inv_b = tl.load(inv_b_ptr + cols, mask=col_ok, other=0.0)
        logits = _logits_tile(
            a_ptr,
            b_ptr,
            inv_a,
            inv_b,
            rows,
            cols,
            row_ok,
            col_ok,
            dim,
            stride_a,
            stride_b,
            scale,
            IEEE=IEEE,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        positive += tl.sum(tl.where(cols[None, :] == rows[:, None], logits, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        running_max = new_max
    out = partial_ptr + split.to(tl.int64) * n_rows + rows
    part = tl.num_programs(1).to(tl.int64) * n_rows  # elements of one of the three (S, M) parts
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + part, running_sum, mask=row_ok)
    tl.store(out + 2 * part, positive, mask=row_ok)


@triton.jit
def _score_grad_kernel(
    a_ptr,
    b_ptr,
    inv_a_ptr,
    inv_b_ptr,
    max_ptr,  # (M,) fp32: the row's max logit
    log_sum_ptr,  # (M,) fp32: log sum_j exp(s_ij - max_i)
    g_ptr,  # (M, chunk) fp32: g_ij = softmax_ij - [i == j] for the chunk's columns
    n_rows,
    col_start,
    col_end,
    dim,
    stride_a,
    stride_b,
    stride_g,
    scale,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_start + local
    row_ok = rows < n_rows
    col_ok = cols < col_end
    inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=0.0)
    inv_b = tl.load(inv_b_ptr + cols, mask=col_ok, other=0.0)
    row_max = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=row_ok, other=0.0)
    logits = _logits_tile(
        a_ptr,
        b_ptr,
        inv_a,
        inv_b,
        rows,
        cols,
        row_ok,
        col_ok,
        dim,
        stride_a,
        stride_b,
        scale,
        IEEE=IEEE,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    # (s_ij - max_i) first: exact near the max, so p_ii - 1 keeps fp32 accuracy when p_ii ~ 1
    probs = tl.exp((logits - row_max[:, None]) - log_sum[:, None])
    g = probs - (cols[None, :] == rows[:, None]).to(tl.float32)
    tl.store(
        g_ptr + rows[:, None] * stride_g + local[None, :], g, mask=row_ok[:, None] & col_ok[None, :]
    )


@triton.jit
def _row_grad_kernel(
    g_ptr,  # (M, chunk) fp32
    b_ptr,  # (N, D)
    inv_b_ptr,  # (N,) fp32
    coef_ptr,  # () fp32: d loss / d s_ij = coef * g_ij
    grad_a_hat_ptr,  # (M, D) fp32, accumulated: += coef * scale * g @ (inv_b * b)
    n_rows,
    col_start,
    chunk_cols,
    dim,
    stride_g,
    stride_b,
    stride_grad,
    scale,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = ds < dim
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, chunk_cols, BLOCK_N):
        local = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cols = col_start + local
        col_ok = local < chunk_cols
        g = tl.load(
            g_ptr + rows[:, None] * stride_g + local[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        inv_b = tl.load(inv_b_ptr + cols, mask=col_ok, other=1.0)
        b = tl.load(
            b_ptr + cols[:, None] * stride_b + ds[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        g, b = _scaled_operands(g, inv_b, b, IEEE=IEEE)
        acc += _dot_fp32_lhs(g, b, IEEE=IEEE)
    _add_scaled_tile(grad_a_hat_ptr, rows, row_ok, ds, d_ok, stride_grad, coef_ptr, scale, acc)


@triton.jit
def _col_grad_kernel(
    g_ptr,  # (M, chunk) fp32
    a_ptr,  # (M, D)
    inv_a_ptr,  # (M,) fp32
    coef_ptr,  # () fp32
    grad_b_hat_ptr,  # (N, D) fp32, accumulated: += coef * scale * g.T @ (inv_a * a)
    n_rows,
    col_start,
    chunk_cols,
    dim,
    stride_g,
    stride_a,
    stride_grad,
    scale,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    local = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = local < chunk_cols
    d_ok = ds < dim
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < n_rows
        g = tl.load(
            g_ptr + rows[:, None] * stride_g + local[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        inv_a = tl.load(inv_a_ptr + rows, mask=row_ok, other=1.0)
        a = tl.load(
            a_ptr + rows[:, None] * stride_a + ds[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        g_t, a = _scaled_operands(tl.trans(g), inv_a, a, IEEE=IEEE)
        acc += _dot_fp32_lhs(g_t, a, IEEE=IEEE)
    _add_scaled_tile(
        grad_b_hat_ptr, col_start + local, col_ok, ds, d_ok, stride_grad, coef_ptr, scale, acc
    )


def grad_chunk_cols(n_cols: int, dim: int) -> int:
    """Columns per backward chunk: the ``(B, chunk)`` fp32 buffer stays within ``O(B x D)``."""
    chunk = triton.cdiv(max(dim, MIN_GRAD_CHUNK_COLS), BLOCK_N) * BLOCK_N
    return min(chunk, triton.cdiv(n_cols, BLOCK_N) * BLOCK_N)


def block_k(dtype: torch.dtype) -> int:
    """Width of the tiles along D. fp32 dots (IEEE, no tensor cores) keep their operands in
    registers, where 64-wide tiles spill; 16-bit ones run on the tensor cores at 64."""
    return BLOCK_K // 2 if dtype == torch.float32 else BLOCK_K


def target_programs(device: torch.device) -> int:
    """Forward programs that fill the device: a few per SM on a GPU."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def forward_splits(row_blocks: int, col_tiles: int, programs: int) -> tuple[int, int]:
    """``(splits, tiles per split)`` of the forward's doc tiles: about ``programs`` programs in
    all, never more splits than doc tiles, no split empty."""
    wanted = max(1, min(col_tiles, triton.cdiv(programs, row_blocks)))
    tiles_per_split = triton.cdiv(col_tiles, wanted)
    return triton.cdiv(col_tiles, tiles_per_split), tiles_per_split


def _direction_forward(
    rows, cols, inv_rows, inv_cols, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy ``lse_i - s_ii`` ``(M,)`` and ``lse`` as ``(max_i, log sum_i)``
    ``(2, M)`` of one direction."""
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    row_blocks = triton.cdiv(n_rows, BLOCK_M)
    splits, tiles_per_split = forward_splits(
        row_blocks, triton.cdiv(n_cols, BLOCK_N), target_programs(rows.device)
    )
    partial = torch.empty(3, splits, n_rows, device=rows.device, dtype=torch.float32)  # (3, S, M)
    _forward_kernel[(row_blocks, splits)](
        rows,
        cols,
        inv_rows,
        inv_cols,
        partial,
        n_rows,
        n_cols,
        dim,
        rows.stride(0),
        cols.stride(0),
        scale,
        tiles_per_split * BLOCK_N,
        IEEE=rows.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k(rows.dtype),
    )
    split_max, split_sum_exp, split_positive = partial.unbind(0)  # (S, M) each
    row_max = split_max.max(0).values  # (M,)
    log_sum_exp = torch.log((split_sum_exp * torch.exp(split_max - row_max)).sum(0))  # (M,)
    # (max - s_ii) + log sum: no cancellation between the rounded lse and s_ii for a small loss
    row_losses = (row_max - split_positive.sum(0)) + log_sum_exp
    return row_losses, torch.stack((row_max, log_sum_exp))


def _direction_backward(
    rows, cols, inv_rows, inv_cols, lse, coef, scale: float, grad_rows_hat, grad_cols_hat
):
    """Add one direction's gradients w.r.t. the normalised rows and columns to the fp32 buffers.

    ``coef`` () fp32 is d loss / d (per-row cross-entropy), the same for every row.
    """
    n_rows, dim = rows.shape
    n_cols = cols.shape[0]
    ieee = rows.dtype == torch.float32
    chunk = grad_chunk_cols(n_cols, dim)
    g = torch.empty(n_rows, chunk, device=rows.device, dtype=torch.float32)
    width_d = block_k(rows.dtype)
    row_blocks, dim_blocks = triton.cdiv(n_rows, BLOCK_M), triton.cdiv(dim, width_d)
    for col_start in range(0, n_cols, chunk):
        col_end = min(col_start + chunk, n_cols)
        width = col_end - col_start
        _score_grad_kernel[(row_blocks, triton.cdiv(width, BLOCK_N))](
            rows,
            cols,
            inv_rows,
            inv_cols,
            lse[0],
            lse[1],
            g,
            n_rows,
            col_start,
            col_end,
            dim,
            rows.stride(0),
            cols.stride(0),
            g.stride(0),
            scale,
            IEEE=ieee,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=width_d,
        )
        # fp32 (IEEE) tiles live in registers: at 4 warps Triton 3.6 spills them on sm_90
        grad_warps = 8 if ieee else 4
        _row_grad_kernel[(row_blocks, dim_blocks)](
            g,
            cols,
            inv_cols,
            coef,
            grad_rows_hat,
            n_rows,
            col_start,
            width,
            dim,
            g.stride(0),
            cols.stride(0),
            grad_rows_hat.stride(0),
            scale,
            IEEE=ieee,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=width_d,
            num_warps=grad_warps,
        )
        _col_grad_kernel[(triton.cdiv(width, BLOCK_N), dim_blocks)](
            g,
            rows,
            inv_rows,
            coef,
            grad_cols_hat,
            n_rows,
            col_start,
            width,
            dim,
            g.stride(0),
            rows.stride(0),
            grad_cols_hat.stride(0),
            scale,
            IEEE=ieee,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_D=width_d,
            num_warps=grad_warps,
        )


class _InfoNCE(torch.autograd.Function):
    """Mean over rows i of cross-entropy(scale * cos(q_i, d_j) over j, target i); with
    ``symmetric`` averaged with the same loss of d[:B] against q. Both directions add into the
    same fp32 gradient buffers, so the gradients are rounded to the input dtype once."""

    @staticmethod
    def forward(ctx, queries, docs, scale, symmetric):
        batch = queries.shape[0]
        inv_q = inverse_row_norms(queries)
        inv_d = inverse_row_norms(docs)
        row_losses, lse = _direction_forward(queries, docs, inv_q, inv_d, scale)
        loss = row_losses.mean()
        lse_reverse = None
        if symmetric:
            reverse_losses, lse_reverse = _direction_forward(
                docs[:batch], queries, inv_d[:batch], inv_q, scale
            )
            loss = 0.5 * (loss + reverse_losses.mean())
        ctx.save_for_backward(queries, docs, inv_q, inv_d, lse, lse_reverse)
        ctx.scale = scale
        ctx.symmetric = symmetric
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        queries, docs, inv_q, inv_d, lse, lse_reverse = ctx.saved_tensors
        batch, dim = queries.shape
        coef = (grad_loss.float() / batch).reshape(())
        if ctx.symmetric:
            coef = 0.5 * coef
        grad_q_hat = torch.zeros(batch, dim, device=queries.device, dtype=torch.float32)
        grad_d_hat = torch.zeros(docs.shape[0], dim, device=queries.device, dtype=torch.float32)
        _direction_backward(
            queries, docs, inv_q, inv_d, lse, coef, ctx.scale, grad_q_hat, grad_d_hat
        )
        if ctx.symmetric:
            positives = docs[:batch]
            _direction_backward(
                positives,
                queries,
                inv_d[:batch],
                inv_q,
                lse_reverse,
                coef,
                ctx.scale,
                grad_d_hat[:batch],
                grad_q_hat,
            )
        # grad_x_hat is d loss / d normalised x; the normalisation's backward turns it into
        # d loss / d x
        grad_q = normalize_backward(queries, grad_q_hat, queries.dtype)
        grad_d = normalize_backward(docs, grad_d_hat, docs.dtype)
        return grad_q, grad_d, None, None


def check_contrastive_inputs(queries, docs, scale) -> None:
    """Raise on inputs ``contrastive_loss`` does not take (shapes, dtypes, devices, scale)."""
    for name, x in (("queries", queries), ("docs", docs)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(
                f"{name} must be a 2-D tensor, got shape {tuple(getattr(x, 'shape', ()))}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(
            f"queries and docs must have the same width D: {queries.shape[1]} vs {docs.shape[1]}"
        )
    if queries.shape[1] == 0:
        raise ValueError("queries and docs must have a width D >= 1")
    if queries.shape[0] == 0:
        raise ValueError("need at least one query")
    if docs.shape[0] < queries.shape[0]:
        raise ValueError(
            f"need at least one doc per query: {queries.shape[0]} queries, {docs.shape[0]} docs "
            "(docs[:B] are the positives)"
        )
    if queries.dtype != docs.dtype:
        raise TypeError(f"queries and docs must share a dtype: {queries.dtype} vs {docs.dtype}")
    if queries.device != docs.device:
        raise ValueError(
            f"queries and docs must be on the same device: {queries.device} vs {docs.device}"
        )
    if not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")


def contrastive_loss(
    queries: torch.Tensor,
    docs: torch.Tensor,
    *,
    scale: float = 20.0,
    symmetric: bool = False,
) -> torch.Tensor:
    """In-batch InfoNCE over cosine similarities; scalar fp32 loss.

    queries ``(B, D)``, docs ``(N, D)`` with ``N >= B``: ``docs[i]`` is the positive of
    ``queries[i]`` and rows ``B..N-1`` are hard negatives of every query. The loss is the mean
    cross-entropy of ``scale * cos(q_i, d_j)`` over all ``j`` with target ``i``; ``symmetric``
    averages it with the positives-to-queries direction (``scale * cos(d_i, q_j)``, ``j < B``).
    """
    check_contrastive_inputs(queries, docs, scale)
    if use_triton(queries, docs):
        return _InfoNCE.apply(queries.contiguous(), docs.contiguous(), float(scale), symmetric)
    return reference.contrastive_loss(queries, docs, scale=scale, symmetric=symmetric)
