"""Varlen attention over packed sequences (bidirectional or causal, GQA, optionally a sliding
window), forward and backward.

FlashAttention-2 in Triton. The kernels run over a work list (``attention_schedule``): tiles of
*groups*, a group being one sequence longer than a tile or several shorter ones packed into one
tile, whose tokens then see only their own sequence's (a block-diagonal mask from each token's
sequence index). A batch of 20-token texts thus runs full tiles, not one mostly empty tile per
text, and the number of sequences has no limit. Positions in the kernels count from the group's
first token; within one sequence their differences are the sequence's own.

Forward: one program per (query tile, query head) walks the key blocks of its group with an
online softmax in fp32 and saves the log-sum-exp per (head, token). Backward recomputes the
probabilities from that log-sum-exp: a preprocess kernel computes ``delta = rowsum(dO * O)``, one
program per (key tile, kv head) accumulates dK/dV over every query head of its group (no
atomics), and a separate pass per (query tile, query head) computes dQ. Every kernel writes its
own outputs once, so the backward pass is deterministic (bitwise reproducible) by construction.
``deterministic=False`` drops the dQ pass: the dK/dV kernel adds each key block's share of dQ to
an fp32 buffer with atomics instead.

Head dims that are not powers of two run in a padded ``BLOCK_D`` with masks. Scores live in
log2 units (``qk * scale * log2(e)``) so the softmax uses ``exp2``. Key and query loops are split
into blocks that need no mask and the few (diagonal, tail, window edge) blocks that do; with a
sliding window the loops start and stop at the band's edges, so blocks outside it cost nothing.
In a group of several sequences every block takes the masked path.

On sm_90 a forward config may read K and V by TMA (``KV_TMA``: ragged descriptors bounded at
the group's end, Triton's ``ragged_tma``), in the tuning space beside the plain loads: the tuner
keeps it where it measures faster.

Dropout: the keep-mask of element (query head h, query token i, key token j; packed token
indices) is output ``j % 4`` of Philox keyed on ``seed`` with counters ``(i, j // 4, h, 0)``, so the
backward pass regenerates the forward mask exactly however its tiles fall, and one Philox call
serves four keys. The forward and dQ kernels draw a key block at once (``_dropout_keep_aligned``):
with dropout on, their key blocks start at a multiple of 4 in packed tokens, the group's start
rounded down, the up to 3 tokens before it masked like any other sequence's keys. The
dK/dV kernel, whose small transposed tiles would need a shuffle through shared memory to do the
same, draws per element (``_dropout_keep``). ``dropout_keep_mask`` materializes the mask for tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.ragged_tma import create_ragged_descriptor, load_ragged

from . import reference, tuning
from ._dispatch import interpreting, use_triton
from .attention_schedule import TileSchedule, schedule_for
from .varlen_checks import validate_cu_seqlens

LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, head, q_tokens, k_tokens, dropout_p):
    """Keep-mask for a tile: q_tokens ``(M, 1)`` and k_tokens ``(1, N)`` (or transposed) packed
    token indices of one query head; True with probability ``1 - dropout_p``. One Philox call
    per element, of which output ``k_token % 4`` is used."""
    rows = q_tokens + k_tokens * 0  # broadcast both to the full tile
    cols = k_tokens + q_tokens * 0
    zeros = rows * 0
    r0, r1, r2, r3 = tl.philox(seed, rows, cols >> 2, zeros + head, zeros)
    odd = (cols & 1) != 0
    bits = tl.where((cols & 2) != 0, tl.where(odd, r3, r2), tl.where(odd, r1, r0))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _dropout_keep_aligned(seed, head, q_tokens, first_key, dropout_p, BLOCK_N: tl.constexpr):
    """``_dropout_keep`` ``(M, BLOCK_N)`` for q_tokens ``(M,)`` and the keys ``first_key +
    arange(BLOCK_N)``, ``first_key % 4 == 0``: one Philox call per four keys."""
    tl.static_assert(BLOCK_N % 4 == 0)
    quads = (first_key >> 2) + tl.arange(0, BLOCK_N // 4)  # (BLOCK_N // 4,)
    rows = q_tokens[:, None] + quads[None, :] * 0  # (M, BLOCK_N // 4)
    cols = quads[None, :] + q_tokens[:, None] * 0
    zeros = rows * 0
    r0, r1, r2, r3 = tl.philox(seed, rows, cols, zeros + head, zeros)
    # (M, BLOCK_N // 4, 2, 2): [m, c, a, b] is output 2a + b, i.e. key 4c + 2a + b
    bits = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    return tl.uint_to_uniform_float(tl.reshape(bits, (q_tokens.shape[0], BLOCK_N))) >= dropout_p


@triton.jit
def _load_rows(
    base,
    positions,
    stride,
    seqlen,
    MASK_LENGTH: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows ``positions`` of one head's ``(seqlen, HEAD_DIM)`` slice at ``base`` as a
    ``(len, BLOCK_D)`` tile; zeros past HEAD_DIM and, with MASK_LENGTH, at positions >= seqlen."""
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    mask = d_valid[None, :]
    if MASK_LENGTH:
        mask = (positions < seqlen)[:, None] & d_valid[None, :]
    # int64: one long sequence's position x token stride (a fused qkv view's, say) can pass 2^31
    return tl.load(
        base + positions.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=mask, other=0.0
    )


@triton.jit
def _load_key_rows(
    base,
    desc,
    kv_head,
    positions,
    first,
    stride,
    seq_start,
    seqlen,
    MASK_LENGTH: tl.constexpr,
    KV_TMA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``_load_rows`` of K or V, or with KV_TMA the same rows (``positions = first + arange``)
    copied by TMA from ``desc``, a ragged descriptor of the whole tensor bounded to the group at
    ``seq_start``: rows at or past ``seqlen`` and head dims past HEAD_DIM read as zeros."""
    if KV_TMA:
        rows = load_ragged(desc, seq_start, seqlen, [first, kv_head, 0])  # (len, 1, BLOCK_D)
        return tl.reshape(rows, (positions.shape[0], BLOCK_D))
    else:
        return _load_rows(
            base,
            positions,
            stride,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )


@triton.jit
def _visible_keys(
    rows,
    cols,
    row_segments,
    col_segments,
    window,
    MASK_CAUSAL: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
):
    """``(BLOCK_M, BLOCK_N)`` mask of the keys ``cols`` that the queries ``rows`` (positions in
    their group) attend to: keys of the query's own sequence (``*_segments``, the sequence index
    of each token: -1 for keys past the group, -2 for rows past it), with MASK_CAUSAL not after
    the query, with MASK_WINDOW within the window (``_in_window``)."""
    valid = row_segments[:, None] == col_segments[None, :]
    if MASK_CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if MASK_WINDOW:
        valid = valid & _in_window(rows[:, None], cols[None, :], window)
    return valid


@triton.jit
def _in_window(rows, cols, window):
    """Query ``i`` sees key ``j`` when ``|i - j| < window`` (with the causal mask: ``j <= i``,
    so ``i - window < j <= i``)."""
    distance = rows - cols
    return (distance < window) & (distance > -window)


@triton.jit
def _key_block_ranges(
    start_m,
    seqlen,
    first_key,
    window,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key ranges ``lo <= full_lo <= full_hi`` and ``hi`` for the query block at ``start_m``: the
    key blocks in [full_lo, full_hi) need no mask, those in [lo, full_lo) and [full_hi, hi) do
    (the diagonal block if causal, the tail block, the window's edges, the block holding the
    ``first_key`` keys of another sequence read before this one); keys outside [lo, hi) are never
    visible, so whole key blocks outside the window are skipped. Positions count from the first
    key read; ``seqlen`` is the end of the sequence's keys."""
    if CAUSAL:
        # key blocks before the query block's: visible to every row
        full_hi = (start_m // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
        hi = seqlen
    lo = start_m * 0
    full_lo = lo
    if WINDOWED:
        last_row = start_m + BLOCK_M - 1
        # operands kept >= 0: the interpreter floors integer division, a GPU truncates
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_row - window + 1, 0), BLOCK_N) * BLOCK_N
        if not CAUSAL:
            full_hi = tl.minimum(full_hi, ((start_m + window) // BLOCK_N) * BLOCK_N)
            hi = tl.minimum(hi, last_row + window)
        full_lo = tl.minimum(full_lo, full_hi)
    full_lo = tl.maximum(full_lo, tl.cdiv(first_key, BLOCK_N) * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_block_ranges(
    start_n,
    seqlen,
    window,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Query ranges ``lo <= full_lo <= full_hi <= hi`` for the key block at ``start_n`` of the
    dK/dV kernel, as ``_key_block_ranges`` with queries and keys swapped: the query blocks in
    [full_lo, full_hi) see every key of the block, those in [lo, full_lo) and [full_hi, hi) some
    (the diagonal if causal, the tail block, the window's edges), the others none."""
    full_hi = (seqlen // BLOCK_M) * BLOCK_M
    hi = seqlen
    lo = start_n * 0
    full_lo = lo
    if CAUSAL:
        lo = start_n  # earlier queries see none of the block
        full_lo = start_n + BLOCK_N  # later queries see all of it
    if WINDOWED:
        last_col = start_n + BLOCK_N - 1
        hi = tl.minimum(hi, last_col + window)
        full_hi = tl.minimum(full_hi, ((start_n + window) // BLOCK_M) * BLOCK_M)
        if not CAUSAL:
            lo = (tl.maximum(start_n - window + 1, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(last_col - window + 1, 0), BLOCK_M) * BLOCK_M
    return lo, tl.minimum(full_lo, full_hi), full_hi, hi


@triton.jit
def _work_item(Items, item):
    """Work item ``item`` of ``attention_schedule`` (``ITEM_FIELDS`` int32 each): its group's
    first token, the group's length, the tile's first position in the group, and whether the
    group is packed (several sequences)."""
    fields = Items + item.to(tl.int64) * 4
    return tl.load(fields), tl.load(fields + 1), tl.load(fields + 2), tl.load(fields + 3) != 0


@triton.jit
def _query_tile(
    Items,
    Segments,
    item,
    head,
    K,
    V,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    group_size,
    ALIGN_KEYS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The query tile of work item ``item`` (``attention_schedule``) for query ``head``, in the
    forward and dQ kernels. Positions count from ``seq_start``: the group's first token, or with
    ALIGN_KEYS (dropout) that token rounded down to a multiple of 4, so that every key block
    starts at one; the ``first_key`` tokens before the group (another sequence's) are then read
    as keys and masked.

    Returns the tile's first row ``start_m`` and the end of the group ``seqlen`` (the tile is
    empty when ``start_m >= seqlen``), ``first_key``, whether the group is ``packed`` (several
    short sequences: every key block masked), ``seq_start``, the tile's positions ``rows``
    (BLOCK_M,) and packed token indices ``tokens`` (int64), ``offs_d`` (BLOCK_D,), ``row_valid``
    (BLOCK_M,) and ``io_mask`` (BLOCK_M, BLOCK_D) of its rows, their sequence indices
    ``row_segments`` (-2 past the group), the segments base at ``seq_start``, and the K and V
    bases there at the kv head this query head reads (GQA).
    """
    seq_start, seqlen, start_m, packed = _work_item(Items, item)
    if ALIGN_KEYS:
        first_key = seq_start & 3
    else:
        first_key = seq_start * 0
    seq_start -= first_key
    seqlen += first_key
    start_m += first_key
    kv_head = head // group_size
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions in the group
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < seqlen
    io_mask = row_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    tokens = (seq_start + rows).to(tl.int64)
    row_segments = tl.load(Segments + tokens, mask=row_valid, other=-2)
    seg_base = Segments + seq_start
    k_base = K + seq_start.to(tl.int64) * stride_kt + kv_head.to(tl.int64) * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + kv_head.to(tl.int64) * stride_vh
    return (
        start_m,
        seqlen,
        first_key,
        packed,
        seq_start,
        rows,
        tokens,
        offs_d,
        row_valid,
        io_mask,
        row_segments,
        seg_base,
        k_base,
        v_base,
    )


@triton.jit
def _all_blocks_masked(lo, full_lo, full_hi, packed):
    """``(full_lo, full_hi)`` of a block range, emptied for a packed group: a block of several
    sequences always needs the mask, so its blocks all go to the masked range from ``lo``."""
    return tl.where(packed, lo, full_lo), tl.where(packed, lo, full_hi)


@triton.jit
def _fwd_key_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    kv_head,
    seg_base,
    stride_kt,
    stride_vt,
    rows,
    row_segments,
    seq_start,
    seqlen,
    lo,
    hi,
    head,
    qk_scale,
    dropout_p,
    seed,
    window,
    MASK_LENGTH: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    KV_TMA: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi) of one group; with
    MASK_LENGTH each query sees only its own sequence's keys; with KV_TMA K and V come by TMA
    (``_load_key_rows``)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions in the group
        k = _load_key_rows(
            k_base,
            k_desc,
            kv_head,
            cols,
            start_n,
            stride_kt,
            seq_start,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            KV_TMA=KV_TMA,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )  # (BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) unscaled
        if MASK_LENGTH:
            col_segments = tl.load(seg_base + cols, mask=cols < seqlen, other=-1)
            visible = _visible_keys(
                rows,
                cols,
                row_segments,
                col_segments,
                window,
                MASK_CAUSAL=MASK_CAUSAL,
                MASK_WINDOW=MASK_WINDOW,
            )
            qk = tl.where(visible, qk, float("-inf"))
        # qk_scale > 0: the scaled row max is the unscaled one, scaled; scale and max-subtract
        # fuse into one FMA per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:  # seq_start and start_n are multiples of 4 (_query_tile)
            keep = _dropout_keep_aligned(
                seed, head, seq_start + rows, seq_start + start_n, dropout_p, BLOCK_N=BLOCK_N
            )
            p = tl.where(keep, p, 0.0)
        v = _load_key_rows(
            v_base,
            v_desc,
            kv_head,
            cols,
            start_n,
            stride_vt,
            seq_start,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            KV_TMA=KV_TMA,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    KDesc,
    VDesc,
    Out,
    Lse,
    Items,
    ItemCount,
    Segments,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    total_tokens,
    num_heads,
    group_size,
    qk_scale,
    dropout_p,
    keep_scale,
    seed,
    window,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_TMA: tl.constexpr = False,
):
    """Program p runs query head ``p % num_heads`` of work item ``p // num_heads``: the heads
    of one item side by side (GQA heads share their K/V in L2), the longest items first; the
    programs past the real items return at once. With KV_TMA, K and V are read through the
    ragged TMA descriptors KDesc and VDesc (None otherwise)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    work = tl.program_id(0)
    if work >= tl.load(ItemCount) * num_heads:
        return
    head = work % num_heads
    kv_head = head // group_size
    (
        start_m,
        seqlen,
        first_key,
        packed,
        seq_start,
        rows,
        tokens,
        offs_d,
        row_valid,
        io_mask,
        row_segments,
        seg_base,
        k_base,
        v_base,
    ) = _query_tile(
        Items,
        Segments,
        work // num_heads,
        head,
        K,
        V,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        group_size,
        ALIGN_KEYS=HAS_DROPOUT,
        HEAD_DIM=HEAD_DIM,
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
    )
    if start_m >= seqlen:
        return
    q = tl.load(
        Q + tokens[:, None] * stride_qt + head.to(tl.int64) * stride_qh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_block_ranges(
        start_m,
        seqlen,
        first_key,
        window,
        CAUSAL=CAUSAL,
        WINDOWED=WINDOWED,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    full_lo, full_hi = _all_blocks_masked(lo, full_lo, full_hi, packed)
    # the key blocks that the window's left edge cuts, or that hold another sequence's keys
    if WINDOWED or HAS_DROPOUT:
        acc, l_i, m_i = _fwd_key_blocks(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            KDesc,
            VDesc,
            kv_head,
            seg_base,
            stride_kt,
            stride_vt,
            rows,
            row_segments,
            seq_start,
            seqlen,
            lo,
            full_lo,
            head,
            qk_scale,
            dropout_p,
            seed,
            window,
            MASK_LENGTH=True,
            MASK_CAUSAL=CAUSAL,
            MASK_WINDOW=WINDOWED,
            HAS_DROPOUT=HAS_DROPOUT,
            KV_TMA=KV_TMA,
            PRECISION=PRECISION,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
        )
    acc, l_i, m_i = _fwd_key_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        KDesc,
        VDesc,
        kv_head,
        seg_base,
        stride_kt,
        stride_vt,
        rows,
        row_segments,
        seq_start,
        seqlen,
        full_lo,
        full_hi,
        head,
        qk_scale,
        dropout_p,
        seed,
        window,
        MASK_LENGTH=False,
        MASK_CAUSAL=False,
        MASK_WINDOW=False,
        HAS_DROPOUT=HAS_DROPOUT,
        KV_TMA=KV_TMA,
        PRECISION=PRECISION,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )
    acc, l_i, m_i = _fwd_key_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        KDesc,
        VDesc,
        kv_head,
        seg_base,
        stride_kt,
        stride_vt,
        rows,
        row_segments,
        seq_start,
        seqlen,
        full_hi,
        hi,
        head,
        qk_scale,
        dropout_p,
        seed,
        window,
        MASK_LENGTH=True,
        MASK_CAUSAL=CAUSAL,
        MASK_WINDOW=WINDOWED,
        HAS_DROPOUT=HAS_DROPOUT,
        KV_TMA=KV_TMA,
        PRECISION=PRECISION,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )

    l_i = tl.where(row_valid, l_i, 1.0)  # rows past the group see no key: 0 / 0
    out = acc / l_i[:, None]
    if HAS_DROPOUT:
        out = out * keep_scale
    tl.store(
        Out + tokens[:, None] * stride_ot + head.to(tl.int64) * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=io_mask,
    )
    lse = m_i + tl.log2(l_i)  # (BLOCK_M,) log2 units
    tl.store(Lse + head.to(tl.int64) * total_tokens + tokens, lse, mask=row_valid)


@triton.jit
def _bwd_delta_kernel(
    Out,
    dOut,
    Delta,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    total_tokens,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d] (fp32)."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tokens < total_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        dOut + tokens[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * total_tokens + tokens, delta, mask=tokens < total_tokens)


@triton.jit
def _dkdv_query_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    dq_base,
    seg_base,
    stride_qt,
    stride_dot,
    stride_dqt,
    cols,
    col_segments,
    seq_start,
    seqlen,
    lo,
    hi,
    head,
    qk_scale,
    dropout_p,
    keep_scale,
    seed,
    window,
    MASK_LENGTH: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Accumulate dK, dV ``(BLOCK_N, BLOCK_D)`` of one key block over query blocks [lo, hi) of one
    head; with MASK_LENGTH only the queries of each key's own sequence count.

    Works on transposed tiles (keys x queries) so the key block stays the left operand. With
    ``ATOMIC_DQ`` it also adds this key block's share of dQ, unscaled, into the fp32 buffer at
    ``dq_base``."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m  # (BLOCK_M,) query positions in the sequence
        if MASK_LENGTH:
            row_valid = rows < seqlen
            lse = tl.load(
                lse_base + rows, mask=row_valid, other=float("inf")
            )  # padded rows get p = 0
            delta = tl.load(delta_base + rows, mask=row_valid, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        q = _load_rows(
            q_base,
            rows,
            stride_qt,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )  # (BLOCK_M, BLOCK_D)
        do = _load_rows(
            do_base,
            rows,
            stride_dot,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M) unscaled
        p_t = tl.exp2(qk_t * qk_scale - lse[None, :])  # scale and subtract: one FMA
        if MASK_LENGTH:
            row_segments = tl.load(seg_base + rows, mask=row_valid, other=-2)
            p_t = tl.where(col_segments[:, None] == row_segments[None, :], p_t, 0.0)
        if MASK_CAUSAL:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        if MASK_WINDOW:
            p_t = tl.where(_in_window(rows[None, :], cols[:, None], window), p_t, 0.0)
        if ATOMIC_DQ:
            # keys past the sequence (zeros) get p = exp2(-lse): dK/dV never store their rows, but
            # their ds, overflowing fp16 when lse is very negative, would reach dQ as inf * 0
            p_t = tl.where((cols < seqlen)[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = _dropout_keep(
                seed, head, (seq_start + rows)[None, :], (seq_start + cols)[:, None], dropout_p
            )
            dv = tl.dot(
                tl.where(keep, p_t * keep_scale, 0.0).to(do.dtype),
                do,
                dv,
                input_precision=PRECISION,
            )
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            # (BLOCK_M, BLOCK_D), unscaled: the launcher scales the sum once
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=PRECISION)
            dq_mask = (rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
            tl.atomic_add(
                dq_base + rows.to(tl.int64)[:, None] * stride_dqt + offs_d[None, :],
                dq,
                mask=dq_mask,
                sem="relaxed",
            )
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dK,
    dV,
    dQacc,
    Items,
    ItemCount,
    Segments,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_dqt,
    stride_dqh,
    total_tokens,
    num_kv_heads,
    group_size,
    sm_scale,
    qk_scale,
    dropout_p,
    keep_scale,
    seed,
    window,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program p runs kv head ``p % num_kv_heads`` of work item ``p // num_kv_heads``, a key
    tile of one group (``attention_schedule``), the longest first."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    work = tl.program_id(0)
    if work >= tl.load(ItemCount) * num_kv_heads:
        return
    kv_head = work % num_kv_heads
    seq_start, seqlen, start_n, packed = _work_item(Items, work // num_kv_heads)
    if start_n >= seqlen:
        return
    cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions in the group
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tokens = (seq_start + cols).to(tl.int64)
    col_segments = tl.load(Segments + tokens, mask=cols < seqlen, other=-1)
    seg_base = Segments + seq_start
    k = tl.load(
        K + tokens[:, None] * stride_kt + kv_head.to(tl.int64) * stride_kh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + tokens[:, None] * stride_vt + kv_head.to(tl.int64) * stride_vh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _query_block_ranges(
        start_n,
        seqlen,
        window,
        CAUSAL=CAUSAL,
        WINDOWED=WINDOWED,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    full_lo, full_hi = _all_blocks_masked(lo, full_lo, full_hi, packed)
    for g in range(group_size):
        head = kv_head * group_size + g
        q_base = Q + seq_start.to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
        do_base = dOut + seq_start.to(tl.int64) * stride_dot + head.to(tl.int64) * stride_doh
        lse_base = Lse + head.to(tl.int64) * total_tokens + seq_start
        delta_base = Delta + head.to(tl.int64) * total_tokens + seq_start
        dq_base = dQacc + seq_start.to(tl.int64) * stride_dqt + head.to(tl.int64) * stride_dqh
        if CAUSAL or WINDOWED:  # queries that see part of the key block, before the full ones
            dk, dv = _dkdv_query_blocks(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                dq_base,
                seg_base,
                stride_qt,
                stride_dot,
                stride_dqt,
                cols,
                col_segments,
                seq_start,
                seqlen,
                lo,
                full_lo,
                head,
                qk_scale,
                dropout_p,
                keep_scale,
                seed,
                window,
                MASK_LENGTH=True,
                MASK_CAUSAL=CAUSAL,
                MASK_WINDOW=WINDOWED,
                HAS_DROPOUT=HAS_DROPOUT,
                ATOMIC_DQ=ATOMIC_DQ,
                PRECISION=PRECISION,
                HEAD_DIM=HEAD_DIM,
                BLOCK_M=BLOCK_M,
                BLOCK_D=BLOCK_D,
            )
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            dq_base,
            seg_base,
            stride_qt,
            stride_dot,
            stride_dqt,
            cols,
            col_segments,
            seq_start,
            seqlen,
            full_lo,
            full_hi,
            head,
            qk_scale,
            dropout_p,
            keep_scale,
            seed,
            window,
            MASK_LENGTH=False,
            MASK_CAUSAL=False,
            MASK_WINDOW=False,
            HAS_DROPOUT=HAS_DROPOUT,
            ATOMIC_DQ=ATOMIC_DQ,
            PRECISION=PRECISION,
            HEAD_DIM=HEAD_DIM,
            BLOCK_M=BLOCK_M,
            BLOCK_D=BLOCK_D,
        )
        dk, dv = _dkdv_query_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            dq_base,
            seg_base,
            stride_qt,
            stride_dot,
            stride_dqt,
            cols,
            col_segments,
            seq_start,
            seqlen,
            full_hi,
            hi,
            head,
            qk_scale,
            dropout_p,
            keep_scale,
            seed,
            window,
            MASK_LENGTH=True,
            MASK_CAUSAL=CAUSAL,
            MASK_WINDOW=WINDOWED,
            HAS_DROPOUT=HAS_DROPOUT,
            ATOMIC_DQ=ATOMIC_DQ,
            PRECISION=PRECISION,
            HEAD_DIM=HEAD_DIM,
            BLOCK_M=BLOCK_M,
            BLOCK_D=BLOCK_D,
        )
    dk = dk * sm_scale
    tl.store(
        dK + tokens[:, None] * stride_dkt + kv_head.to(tl.int64) * stride_dkh + offs_d[None, :],
        dk.to(dK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dV + tokens[:, None] * stride_dvt + kv_head.to(tl.int64) * stride_dvh + offs_d[None, :],
        dv.to(dV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_key_blocks(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    seg_base,
    stride_kt,
    stride_vt,
    rows,
    row_segments,
    seq_start,
    seqlen,
    lo,
    hi,
    head,
    qk_scale,
    dropout_p,
    keep_scale,
    seed,
    window,
    MASK_LENGTH: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
    MASK_WINDOW: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Accumulate dQ ``(BLOCK_M, BLOCK_D)`` of one query block over key blocks [lo, hi); with
    MASK_LENGTH each query sees only its own sequence's keys."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions in the group
        k = _load_rows(
            k_base,
            cols,
            stride_kt,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )  # (BLOCK_N, BLOCK_D)
        v = _load_rows(
            v_base,
            cols,
            stride_vt,
            seqlen,
            MASK_LENGTH=MASK_LENGTH,
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=BLOCK_D,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) unscaled
        p = tl.exp2(qk * qk_scale - lse[:, None])  # scale and subtract: one FMA
        if MASK_LENGTH:
            col_segments = tl.load(seg_base + cols, mask=cols < seqlen, other=-1)
            visible = _visible_keys(
                rows,
                cols,
                row_segments,
                col_segments,
                window,
                MASK_CAUSAL=MASK_CAUSAL,
                MASK_WINDOW=MASK_WINDOW,
            )
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:  # seq_start and start_n are multiples of 4 (_query_tile)
            keep = _dropout_keep_aligned(
                seed, head, seq_start + rows, seq_start + start_n, dropout_p, BLOCK_N=BLOCK_N
            )
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    dOut,
    Lse,
    Delta,
    dQ,
    Items,
    ItemCount,
    Segments,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    total_tokens,
    num_heads,
    group_size,
    sm_scale,
    qk_scale,
    dropout_p,
    keep_scale,
    seed,
    window,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (work item, query head), as the forward kernel."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    work = tl.program_id(0)
    if work >= tl.load(ItemCount) * num_heads:
        return
    head = work % num_heads
    (
        start_m,
        seqlen,
        first_key,
        packed,
        seq_start,
        rows,
        tokens,
        offs_d,
        row_valid,
        io_mask,
        row_segments,
        seg_base,
        k_base,
        v_base,
    ) = _query_tile(
        Items,
        Segments,
        work // num_heads,
        head,
        K,
        V,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        group_size,
        ALIGN_KEYS=HAS_DROPOUT,
        HEAD_DIM=HEAD_DIM,
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
    )
    if start_m >= seqlen:
        return
    q = tl.load(
        Q + tokens[:, None] * stride_qt + head.to(tl.int64) * stride_qh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )
    do = tl.load(
        dOut + tokens[:, None] * stride_dot + head.to(tl.int64) * stride_doh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )
    lse = tl.load(Lse + head.to(tl.int64) * total_tokens + tokens, mask=row_valid, other=0.0)
    delta = tl.load(Delta + head.to(tl.int64) * total_tokens + tokens, mask=row_valid, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_block_ranges(
        start_m,
        seqlen,
        first_key,
        window,
        CAUSAL=CAUSAL,
        WINDOWED=WINDOWED,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    full_lo, full_hi = _all_blocks_masked(lo, full_lo, full_hi, packed)
    # the key blocks that the window's left edge cuts, or that hold another sequence's keys
    if WINDOWED or HAS_DROPOUT:
        dq = _dq_key_blocks(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            seg_base,
            stride_kt,
            stride_vt,
            rows,
            row_segments,
            seq_start,
            seqlen,
            lo,
            full_lo,
            head,
            qk_scale,
            dropout_p,
            keep_scale,
            seed,
            window,
            MASK_LENGTH=True,
            MASK_CAUSAL=CAUSAL,
            MASK_WINDOW=WINDOWED,
            HAS_DROPOUT=HAS_DROPOUT,
            PRECISION=PRECISION,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
        )
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        seg_base,
        stride_kt,
        stride_vt,
        rows,
        row_segments,
        seq_start,
        seqlen,
        full_lo,
        full_hi,
        head,
        qk_scale,
        dropout_p,
        keep_scale,
        seed,
        window,
        MASK_LENGTH=False,
        MASK_CAUSAL=False,
        MASK_WINDOW=False,
        HAS_DROPOUT=HAS_DROPOUT,
        PRECISION=PRECISION,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )
    dq = _dq_key_blocks(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        seg_base,
        stride_kt,
        stride_vt,
        rows,
        row_segments,
        seq_start,
        seqlen,
        full_hi,
        hi,
        head,
        qk_scale,
        dropout_p,
        keep_scale,
        seed,
        window,
        MASK_LENGTH=True,
        MASK_CAUSAL=CAUSAL,
        MASK_WINDOW=WINDOWED,
        HAS_DROPOUT=HAS_DROPOUT,
        PRECISION=PRECISION,
        HEAD_DIM=HEAD_DIM,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )
    dq = dq * sm_scale
    tl.store(
        dQ + tokens[:, None] * stride_dqt + head.to(tl.int64) * stride_dqh + offs_d[None, :],
        dq.to(dQ.dtype.element_ty),
        mask=io_mask,
    )


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    Keep,
    total_tokens,
    dropout_p,
    seed,
    BLOCK: tl.constexpr,
):
    """Keep[h, i, j] for packed token indices i (query), j (key): the mask the kernels apply."""
    q_tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k_tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(2)
    keep = _dropout_keep(seed, head, q_tokens[:, None], k_tokens[None, :], dropout_p)
    offsets = (
        head.to(tl.int64) * total_tokens * total_tokens
        + q_tokens[:, None].to(tl.int64) * total_tokens
        + k_tokens[None, :]
    )
    mask = (q_tokens < total_tokens)[:, None] & (k_tokens < total_tokens)[None, :]
    tl.store(Keep + offsets, keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (tests fill it with NaN to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 dots (not TF32); fp16/bf16 dots always accumulate in fp32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _config(
    kernel: str,
    q: torch.Tensor,
    causal: bool,
    window: int | None,
    dropout_p: float,
    max_seqlen: int,
) -> dict:
    """Block sizes, warps and stages of ``kernel`` (a name of ``tuning.KERNELS``) for this call:
    the card's tuned table where it has the key, the heuristics otherwise."""
    key = _tuning_key(kernel, q, causal, window, dropout_p, max_seqlen)
    tuned = tuning.tuned_config(key, q.device)
    if tuned is not None:
        return tuned.launch_options()
    return _configs(q.shape[2], q.dtype)[kernel]


def _tuning_key(
    kernel: str,
    q: torch.Tensor,
    causal: bool,
    window: int | None,
    dropout_p: float,
    max_seqlen: int,
) -> tuning.Key:
    """The key of the tuning tables for ``kernel`` in this call."""
    return tuning.Key.of(
        kernel,
        q.shape[2],
        q.dtype,
        causal=causal,
        windowed=window is not None,
        dropout=dropout_p > 0.0,
        max_seqlen=max_seqlen,
    )


def _configs(head_dim: int, dtype: torch.dtype) -> dict[str, dict]:
    """Block sizes, warps and pipeline stages per kernel (``tuning.KERNELS``; for an H100), each
    one of ``tuning.config_space``.

    The forward and dQ kernels need BLOCK_M % BLOCK_N == 0, the dK/dV kernel BLOCK_N % BLOCK_M == 0.
    fp32 tiles take twice the shared memory, so fp32 runs small unpipelined blocks. Up to head dim
    128 no choice spills registers on sm_90 (``tests/compile_kernels.py``), with or without dropout:
    the dK/dV kernel, which holds two fp32 (BLOCK_N, BLOCK_D) accumulators, gets small key blocks,
    and its atomic-dQ form (``deterministic=False``) no pipelining at head dim 128.
    """
    if interpreting():
        query_blocks = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
        key_blocks = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)
        forward = dq = query_blocks
        dkdv = dkdv_atomic = key_blocks
    elif dtype == torch.float32:
        forward = dq = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        dkdv = dkdv_atomic = dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    elif head_dim <= 128:
        forward = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        dq = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
        if head_dim <= 64:
            dkdv = dkdv_atomic = dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)
        else:
            dkdv = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2)
            dkdv_atomic = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)
    else:
        forward = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        dkdv = dkdv_atomic = dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)
        dq = dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2)
    return {
        "attn_fwd": forward,
        "attn_bwd_dkdv": dkdv,
        "attn_bwd_dkdv_atomic": dkdv_atomic,
        "attn_bwd_dq": dq,
    }


def _tma_can_read(x: torch.Tensor) -> bool:
    """Whether TMA can read ``x`` (T, H, D): an NVIDIA Hopper or later card (or the
    interpreter), the last dim contiguous, the base and the other strides 16-byte aligned, and at
    most 2^30 rows (the ragged descriptor's coordinates are int32)."""
    if x.is_cuda and (
        torch.version.hip is not None or torch.cuda.get_device_capability(x.device)[0] < 9
    ):
        return False
    size = x.element_size()
    return (
        x.shape[0] <= 2**30
        and x.stride(-1) == 1
        and x.data_ptr() % 16 == 0
        and all(stride * size % 16 == 0 for stride in x.stride()[:-1])
    )


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0


def _grid(schedule: TileSchedule, heads: int) -> tuple[int]:
    """One program per (work item, head) of the schedule's capacity: the real items' programs
    run, the rest return at once (the real count is known on the device only). The interpreter,
    where each program costs milliseconds and reading the count nothing, launches the real ones
    only."""
    items = int(schedule.count) if interpreting() else schedule.capacity
    return (max(1, items * heads),)


def _attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    window: int | None,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
    schedules: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out ``(T, Hq, D)`` and the log2-sum-exp ``(Hq, T)`` fp32 of the scaled scores."""
    total, num_heads, head_dim = q.shape
    out = _empty((total, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = _empty((num_heads, total), dtype=torch.float32, device=q.device)
    config = dict(_config("attn_fwd", q, causal, window, dropout_p, max_seqlen))
    schedule = schedule_for(
        cu_seqlens, total, config["BLOCK_M"], causal=causal, window=window, schedules=schedules
    )
    config["KV_TMA"] = config.get("KV_TMA", False) and _tma_can_read(k) and _tma_can_read(v)
    k_desc, v_desc = None, None
    if config["KV_TMA"]:
        block = [config["BLOCK_N"], 1, _block_d(head_dim)]
        k_desc, v_desc = create_ragged_descriptor(k, block), create_ragged_descriptor(v, block)
    _attn_fwd_kernel[_grid(schedule, num_heads)](
        q,
        k,
        v,
        k_desc,
        v_desc,
        out,
        lse,
        schedule.items,
        schedule.count,
        schedule.segments,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        total,
        num_heads,
        num_heads // k.shape[1],
        softmax_scale * LOG2E,
        dropout_p,
        _keep_scale(dropout_p),
        seed,
        window or 0,
        CAUSAL=causal,
        WINDOWED=window is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=_precision(q.dtype),
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        **config,
    )
    return out, lse


def _attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    window: int | None,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
    deterministic: bool,
    schedules: dict | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ ``(T, Hq, D)``, dK and dV ``(T, Hkv, D)``.

    ``deterministic``: dQ in its own pass (each program writes its rows once: bitwise reproducible).
    Otherwise the dK/dV kernel also adds every key block's share of dQ into an fp32 buffer with
    atomics (one pass fewer over the scores; the summation order varies from run to run)."""
    total, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    block_d = _block_d(head_dim)
    grad_out = grad_out.contiguous()

    delta = _empty((num_heads, total), dtype=torch.float32, device=q.device)
    block_t = 64
    _bwd_delta_kernel[(triton.cdiv(total, block_t), num_heads)](
        out,
        grad_out,
        delta,
        out.stride(0),
        out.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        total,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )

    dq = _empty(q.shape, dtype=q.dtype, device=q.device)
    dk = _empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _empty(v.shape, dtype=v.dtype, device=v.device)
    dq_acc = (
        dq if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    )  # (T, Hq, D)
    dkdv_kernel = "attn_bwd_dkdv" if deterministic else "attn_bwd_dkdv_atomic"
    dkdv_config = _config(dkdv_kernel, q, causal, window, dropout_p, max_seqlen)
    dq_config = _config("attn_bwd_dq", q, causal, window, dropout_p, max_seqlen)
    common = dict(
        CAUSAL=causal,
        WINDOWED=window is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        PRECISION=_precision(q.dtype),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
    )
    scalars = (
        num_heads // num_kv_heads,
        softmax_scale,
        softmax_scale * LOG2E,
        dropout_p,
        _keep_scale(dropout_p),
        seed,
        window or 0,
    )
    key_schedule = schedule_for(
        cu_seqlens,
        total,
        dkdv_config["BLOCK_N"],
        causal=causal,
        window=window,
        key_tiles=True,
        schedules=schedules,
    )
    _attn_bwd_dkdv_kernel[_grid(key_schedule, num_kv_heads)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        dq_acc,
        key_schedule.items,
        key_schedule.count,
        key_schedule.segments,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        dq_acc.stride(0),
        dq_acc.stride(1),
        total,
        num_kv_heads,
        *scalars,
        ATOMIC_DQ=not deterministic,
        **common,
        **dkdv_config,
    )
    if not deterministic:
        torch.mul(dq_acc, softmax_scale, out=dq)  # the kernel sums unscaled shares of dQ
        return dq, dk, dv
    query_schedule = schedule_for(
        cu_seqlens, total, dq_config["BLOCK_M"], causal=causal, window=window, schedules=schedules
    )
    _attn_bwd_dq_kernel[_grid(query_schedule, num_heads)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        query_schedule.items,
        query_schedule.count,
        query_schedule.segments,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        dq.stride(0),
        dq.stride(1),
        total,
        num_heads,
        *scalars,
        **common,
        **dq_config,
    )
    return dq, dk, dv


def dropout_keep_mask(
    num_heads: int, total_tokens: int, dropout_p: float, seed: int, device: torch.device | str
) -> torch.Tensor:
    """The dropout keep-mask the Triton kernels apply, materialized: bool ``(Hq, T, T)``.

    Entry ``[h, i, j]`` says whether query head h keeps the probability of packed query token i
    for packed key token j (only entries within one sequence are ever used). For tests: it holds
    ``Hq * T * T`` elements.
    """
    keep = torch.empty((num_heads, total_tokens, total_tokens), dtype=torch.int8, device=device)
    block = 64
    grid = (triton.cdiv(total_tokens, block), triton.cdiv(total_tokens, block), num_heads)
    if keep.numel():
        _dropout_mask_kernel[grid](keep, total_tokens, dropout_p, seed, BLOCK=block)
    return keep.bool()


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton varlen attention; call through ``varlen_attention`` (which validates inputs)."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        causal,
        window,
        softmax_scale,
        dropout_p,
        dropout_seed,
        deterministic,
        schedules,
    ):
        out, lse = _attention_forward(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            causal,
            window,
            softmax_scale,
            dropout_p,
            dropout_seed,
            schedules,
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.causal = causal
        ctx.window = window
        ctx.softmax_scale = softmax_scale
        ctx.dropout_p = dropout_p
        ctx.dropout_seed = dropout_seed
        ctx.deterministic = deterministic
        ctx.schedules = schedules
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.causal,
            ctx.window,
            ctx.softmax_scale,
            ctx.dropout_p,
            ctx.dropout_seed,
            ctx.deterministic,
            ctx.schedules,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, window, dropout_p) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            raise ValueError(
                f"{name} must be a 3-D tensor (T, heads, head_dim),"
                f" got {getattr(tensor, 'shape', type(tensor))}"
            )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on tokens (dim 0) and"
            " head_dim (dim 2)"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            "q, k, v must share one dtype among float16, bfloat16, float32;"
            f" got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(
            "q, k, v and cu_seqlens must be on one device;"
            f" got {q.device}, {k.device}, {v.device}, {cu_seqlens.device}"
        )
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be a 1-D int32 tensor of length B + 1 >= 2,"
            f" got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    window: int | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    check_cu_seqlens: bool = True,
    deterministic: bool | None = True,
    schedules: dict | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence, never across sequences; differentiable.

    q ``(T, Hq, D)``, k/v ``(T, Hkv, D)`` with ``Hq % Hkv == 0`` (GQA: query head h reads kv head
    ``h // (Hq // Hkv)``), cu_seqlens int32 ``(B + 1,)`` from 0 to T, ``max_seqlen`` >= the
    longest sequence. Returns ``(T, Hq, D)``. ``softmax_scale`` defaults to ``1 / sqrt(D)``.

    ``window``: sliding-window attention, query i sees key j only when ``|i - j| < window``
    (positions within the sequence). Causal, that is ``i - window < j <= i``: transformers'
    ``masking_utils.sliding_window_causal_mask_function`` (Mistral, Qwen2, Qwen3, Gemma 3).
    Bidirectional, ``|i - j| < window`` is Gemma 3's ``_bidirectional_window_overlay``
    (``modeling_gemma3``); ``masking_utils.sliding_window_bidirectional_overlay`` counts the
    distance inclusively (``|i - j| <= w``): pass ``window=w + 1`` for it. The kernels skip the
    key tiles outside the band.

    ``dropout_p`` drops attention probabilities; on the Triton path the mask is Philox keyed on
    ``dropout_seed`` (drawn from torch's generator when None), head and token indices, and the
    backward pass regenerates it. The CPU reference draws its mask from torch's RNG instead.
    ``check_cu_seqlens=False`` skips the value checks of cu_seqlens (they cost one device sync).
    ``deterministic=False`` lets the backward pass accumulate dQ with atomics in the dK/dV kernel
    (one pass fewer; gradients may differ in the last bits between runs); ``None`` does so where
    the card's tuning table measured that backward faster for this call (``kernels/tuning.py``),
    and keeps the deterministic one elsewhere.
    ``schedules``: a dict kept for one packed batch (``Packed.attention_schedules``) in which the
    Triton path keeps the kernels' work lists (``attention_schedule``), so that the layers of a
    forward pass build them once; empty it when cu_seqlens changes. None: built on every call.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, window, dropout_p)
    if check_cu_seqlens:
        validate_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if not use_triton(q, k, v):
        return reference.varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            causal=causal,
            window=window,
            softmax_scale=softmax_scale,
            dropout_p=dropout_p,
        )
    head_dim = q.shape[2]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim {head_dim} is larger than the {MAX_HEAD_DIM} the Triton kernel supports"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(
            "q, k, v must be contiguous along head_dim (stride 1 in the last dimension)"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if not 0.0 < scale < math.inf:  # the kernels scale each row's unscaled maximum
        raise ValueError(f"the Triton kernels need a positive finite softmax_scale, got {scale}")
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**62, (1,)).item())
    if window is not None and window >= max_seqlen:
        window = None  # it spans every sequence: the kernels without the window's masks
    if deterministic is None:  # read the table only when a backward pass will run
        needs_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        deterministic = not (
            needs_backward
            and tuning.atomic_dq_measured_faster(
                _tuning_key("attn_bwd_dq", q, causal, window, dropout_p, max_seqlen), q.device
            )
        )
    if (
        q.shape[0] == 0 or max_seqlen == 0
    ):  # nothing to attend; stay in the autograd graph of q, k, v
        return q.new_zeros(q.shape) + 0.0 * (q.sum() + k.sum() + v.sum())
    return VarlenAttentionFunction.apply(
        q,
        k,
        v,
        cu_seqlens.contiguous(),
        max_seqlen,
        bool(causal),
        window,
        float(scale),
        float(dropout_p),
        int(dropout_seed or 0),
        bool(deterministic),
        schedules,
    )  # the kernels index cu_seqlens as a contiguous array
