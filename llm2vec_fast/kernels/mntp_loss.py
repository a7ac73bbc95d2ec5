"""Fused LM head + cross-entropy for masked next-token prediction.

Forward: a program owns a block of rows and a contiguous range of vocabulary tiles. For each tile it
computes the ``(BLOCK_N, BLOCK_V)`` logits with ``tl.dot`` over the hidden size (fp32 accumulation)
and folds them into a running max, a running sum of exponentials (online log-sum-exp) and the target
logit; only that tile of logits ever exists. The per-range partials ``(S, N)`` are merged into one
log-sum-exp per row on the host side of the launch, a few bytes per row.

Backward, by recomputation: a kernel recomputes the logits tile by tile and writes their gradient
``(softmax - onehot) * grad / count`` in the input dtype for one ``(row chunk, vocab chunk)`` block
at a time; two cuBLAS matmuls turn that block into its share of the hidden gradient (accumulated in
fp32 across vocab chunks) and, only when the weight requires grad, of the weight gradient
(accumulated in fp32 across row chunks). :func:`grad_chunk_plan` keeps a block within
``_GRAD_CHUNK_ELEMENTS`` logits whatever N and V are, and splits the rows only when even a block of
``_MIN_VOCAB_CHUNK`` columns over all rows would not fit, so the matmuls stay large and the usual
case (all rows in one chunk) rounds exactly as one chunk per vocab range would. A fully tiled
backward would need fp32 atomics on both (N, H) and (V, H) from every tile and be bandwidth-bound.
Ignored rows are dropped before the kernels run, so they cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRAD_CHUNK_ELEMENTS = 1 << 26  # logits gradients held at once by the backward (128 MiB in bf16)
_MIN_VOCAB_CHUNK = 4096  # columns of a backward block before rows are split: the matmuls' depth
_BLOCK_V = 128
# row chunks start at multiples of this: whole row tiles, and the chunks' hidden, label and lse
# pointers keep the 16-byte alignment the JIT specializes on
_ROW_ALIGN = 128


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    hidden_size,
    stride_hidden,
    stride_weight,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    """fp32 logits ``hidden[rows] @ weight[cols].T + bias[cols]``: ``(BLOCK_N, BLOCK_V)``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    for h_start in range(0, hidden_size, BLOCK_H):
        hs = h_start + offs_h
        h_mask = hs < hidden_size
        a = tl.load(
            hidden_ptr + rows[:, None] * stride_hidden + hs[None, :],
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_H)
        b = tl.load(
            weight_ptr + cols[None, :] * stride_weight + hs[:, None],
            mask=col_mask[None, :] & h_mask[:, None],
            other=0.0,
        )  # (BLOCK_H, BLOCK_V)
        if EXACT_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _mntp_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    running_max_ptr,
    sum_exp_ptr,
    target_ptr,
    rows_total,
    vocab,
    hidden_size,
    stride_hidden,
    stride_weight,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < rows_total
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    num_tiles = tl.cdiv(vocab, BLOCK_V)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    for tile in range(tile_start, tile_end):
        cols = (tile * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < vocab
        logits = _logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            hidden_size,
            stride_hidden,
            stride_weight,
            HAS_BIAS=HAS_BIAS,
            BLOCK_N=BLOCK_N,
            BLOCK_V=BLOCK_V,
            BLOCK_H=BLOCK_H,
            EXACT_FP32=EXACT_FP32,
        )
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        running_max = new_max
    out = split.to(tl.int64) * rows_total + rows
    tl.store(running_max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_mask)
    tl.store(target_ptr + out, target, mask=row_mask)


@triton.jit
def _mntp_logits_grad_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    lse_ptr,
    scale_ptr,
    grad_ptr,
    rows_total,
    vocab_start,
    vocab_count,
    hidden_size,
    stride_hidden,
    stride_weight,
    stride_grad,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    """grad[:, j] = (softmax(logits)[:, vocab_start + j] - onehot) * scale for j < vocab_count."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = vocab_start + local_cols
    row_mask = rows < rows_total
    col_mask = local_cols < vocab_count
    logits = _logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        rows,
        cols,
        row_mask,
        col_mask,
        hidden_size,
        stride_hidden,
        stride_weight,
        HAS_BIAS=HAS_BIAS,
        BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V,
        BLOCK_H=BLOCK_H,
        EXACT_FP32=EXACT_FP32,
    )
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr)
    probs = tl.exp(logits - lse[:, None])
    grad = (probs - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)) * scale
    tl.store(
        grad_ptr + rows[:, None] * stride_grad + local_cols[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def _tile_config(rows: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options; every ``tl.dot`` dimension is >= 16."""
    block_n = min(128, max(16, triton.next_power_of_2(rows)))
    return {
        "BLOCK_N": block_n,
        "BLOCK_V": _BLOCK_V,
        "BLOCK_H": 32 if dtype == torch.float32 else 64,
        # fp32 inputs get true fp32 products (no TF32), as PyTorch's fp32 matmul does by default
        "EXACT_FP32": dtype == torch.float32,
        "num_warps": 8 if block_n * _BLOCK_V >= 128 * 128 else 4,
        "num_stages": 3,
    }


def _vocab_splits(row_blocks: int, vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) so that the grid fills the GPU and no split is empty."""
    if device.type == "cuda":
        target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target_programs = 4  # interpreter: several splits, so the merge is exercised by the tests
    wanted = max(1, min(vocab_tiles, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(vocab_tiles, wanted)
    return triton.cdiv(vocab_tiles, tiles_per_split), tiles_per_split


def _mntp_forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp and target logit of every row: two ``(M,)`` fp32 tensors."""
    rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    config = _tile_config(rows, hidden.dtype)
    row_blocks = triton.cdiv(rows, config["BLOCK_N"])
    splits, tiles_per_split = _vocab_splits(
        row_blocks, triton.cdiv(vocab, config["BLOCK_V"]), hidden.device
    )
    partial = torch.empty(3, splits, rows, dtype=torch.float32, device=hidden.device)  # (3, S, M)
    running_max, sum_exp, target = partial.unbind(0)
    _mntp_forward_kernel[(row_blocks, splits)](
        hidden,
        weight,
        weight if bias is None else bias,
        labels,
        running_max,
        sum_exp,
        target,
        rows,
        vocab,
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        tiles_per_split,
        HAS_BIAS=bias is not None,
        **config,
    )
    overall_max = running_max.max(0).values  # (M,)
    lse = overall_max + torch.log((sum_exp * torch.exp(running_max - overall_max)).sum(0))
    return lse, target.sum(0)


def grad_chunk_plan(rows: int, vocab: int) -> tuple[int, int]:
    """``(row chunk, vocab chunk)`` of the backward's logits-gradient blocks, at most
    ``_GRAD_CHUNK_ELEMENTS`` elements each: all rows while a block of them spans at least
    ``_MIN_VOCAB_CHUNK`` columns (or the whole vocabulary), else ``_MIN_VOCAB_CHUNK`` columns and
    as many rows as fit, a multiple of ``_ROW_ALIGN``. The vocab chunk is a multiple of the tile or
    the whole vocabulary."""
    min_columns = min(vocab, _MIN_VOCAB_CHUNK)
    if rows * min_columns <= _GRAD_CHUNK_ELEMENTS:
        columns = max(min_columns, _GRAD_CHUNK_ELEMENTS // rows // _BLOCK_V * _BLOCK_V)
        return rows, min(columns, vocab)
    row_chunk = _GRAD_CHUNK_ELEMENTS // min_columns
    if row_chunk >= _ROW_ALIGN:
        row_chunk = row_chunk // _ROW_ALIGN * _ROW_ALIGN
    return max(row_chunk, 1), min_columns


def _mntp_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    need_hidden, need_weight, need_bias = needs_grad
    config = _tile_config(rows, hidden.dtype)
    row_chunk, vocab_chunk = grad_chunk_plan(rows, vocab)
    one_vocab_chunk, one_row_chunk = vocab_chunk == vocab, row_chunk >= rows
    new = {"dtype": hidden.dtype, "device": hidden.device}
    new32 = {"dtype": torch.float32, "device": hidden.device}
    grad_hidden = torch.empty(rows, hidden_size, **new) if need_hidden else None  # (M, H)
    grad_hidden32 = (
        torch.zeros(rows, hidden_size, **new32) if need_hidden and not one_vocab_chunk else None
    )  # (M, H)
    grad_weight = torch.empty(vocab, hidden_size, **new) if need_weight else None  # (V, H)
    grad_weight32 = (
        torch.empty(vocab_chunk, hidden_size, **new32)
        if need_weight and not one_row_chunk
        else None
    )  # (vocab chunk, H)
    grad_bias = torch.zeros(vocab, **new32) if need_bias else None  # (V,)
    for vocab_start in range(0, vocab, vocab_chunk):
        count = min(vocab_chunk, vocab - vocab_start)
        weight_chunk = weight[vocab_start : vocab_start + count]  # (vocab chunk, H)
        grad_weight_chunk = (
            None if grad_weight is None else grad_weight[vocab_start : vocab_start + count]
        )
        if grad_weight32 is not None:
            grad_weight32.zero_()
        for row_start in range(0, rows, row_chunk):
            row_count = min(row_chunk, rows - row_start)
            row_range = slice(row_start, row_start + row_count)
            hidden_rows = hidden[row_range]  # (row chunk, H)
            logits_grad = torch.empty(row_count, count, **new)  # (row chunk, vocab chunk)
            grid = (
                triton.cdiv(row_count, config["BLOCK_N"]),
                triton.cdiv(count, config["BLOCK_V"]),
            )
            _mntp_logits_grad_kernel[grid](
                hidden_rows,
                weight,
                weight if bias is None else bias,
                labels[row_range],
                lse[row_range],
                scale,
                logits_grad,
                row_count,
                vocab_start,
                count,
                hidden_size,
                hidden.stride(0),
                weight.stride(0),
                logits_grad.stride(0),
                HAS_BIAS=bias is not None,
                **config,
            )
            if need_hidden:
                if one_vocab_chunk:
                    torch.mm(logits_grad, weight_chunk, out=grad_hidden[row_range])
                else:
                    grad_hidden32[row_range] += logits_grad @ weight_chunk
            if need_weight:
                if one_row_chunk:
                    torch.mm(logits_grad.t(), hidden_rows, out=grad_weight_chunk)
                else:
                    grad_weight32[:count] += logits_grad.t() @ hidden_rows
            if need_bias:
                grad_bias[vocab_start : vocab_start + count] += logits_grad.sum(
                    0, dtype=torch.float32
                )
        if grad_weight32 is not None:
            grad_weight_chunk.copy_(grad_weight32[:count])
    if grad_hidden32 is not None:
        grad_hidden.copy_(grad_hidden32)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


class MNTPLossFunction(torch.autograd.Function):
    """Mean cross-entropy over rows that all count (ignored rows were dropped by the caller)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        lse, target = _mntp_forward(hidden, weight, bias, labels)
        ctx.save_for_backward(hidden, weight, labels, bias, lse)
        return (lse - target).sum() / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad
        scale = (grad_loss.float() / hidden.shape[0]).reshape(1)
        grad_hidden, grad_weight, grad_bias = _mntp_backward(
            hidden,
            weight,
            bias,
            labels,
            lse,
            scale,
            (need_hidden, need_weight, need_bias and bias is not None),
        )
        return grad_hidden, grad_weight, None, grad_bias


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (V, {hidden.shape[1]}) to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must have shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        raise TypeError(
            "hidden and weight must share one floating dtype, "
            f"got {hidden.dtype} and {weight.dtype}"
        )
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")


def mntp_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, never holding N x V
    logits.

    hidden ``(N, H)``, weight ``(V, H)`` (the LM head), labels ``(N,)`` integer, bias ``(V,)``.
    Rows labelled ``ignore_index`` do not count; with no counted row the loss is 0 (not NaN).
    Returns a scalar fp32 loss, equal to ``F.cross_entropy`` on the fp32 logits. The weight gets a
    gradient only when it requires one (a frozen LM head allocates no ``(V, H)`` buffer). The Triton
    path syncs with the host once, to drop ignored rows and reject labels outside ``[0, V)``.
    """
    _check_inputs(hidden, weight, labels, bias)
    if not use_triton(hidden, weight, bias):
        return reference.mntp_loss(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    if hidden.dtype not in _TRITON_DTYPES:
        raise TypeError(f"Triton mntp_loss supports fp16, bf16 and fp32, got {hidden.dtype}")
    keep = labels != ignore_index
    kept_rows = keep.nonzero().squeeze(1)  # (M,)
    vocab = weight.shape[0]
    kept_labels = labels.index_select(0, kept_rows)
    out_of_range = (kept_labels < 0) | (kept_labels >= vocab)
    if bool(out_of_range.any()):
        bad = kept_labels[out_of_range][0].item()
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )
    if kept_rows.numel() == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        if bias is not None:
            zero = zero + bias.sum() * 0.0
        return zero.float()
    if kept_rows.numel() < hidden.shape[0]:
        hidden = hidden.index_select(0, kept_rows)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return MNTPLossFunction.apply(hidden, weight, kept_labels.contiguous(), bias)
