"""varlen_attention: the Triton kernels against the PyTorch reference, forward and backward.

On a CPU the Triton path runs under the interpreter (conftest sets TRITON_INTERPRET=1) in fp32 and
fp16; `gpu` tests repeat the cases in fp16 and bf16 on CUDA, plus large shapes.

Tolerance (DESIGN.md): the kernel's max error against a float64 reference must be at most 2x
(output) / 3x (gradients) the max error of the reference computed by PyTorch in the input dtype,
plus an atol of one epsilon of the input dtype: outputs and gradients are O(1), so that is one
unit in the last place, the rounding of the final store that PyTorch's result may happen to dodge.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from fusion_checks import FORWARD_FACTOR, GRADIENT_FACTOR, assert_close_to_oracle

from llm2vec_fast.kernels import attention, reference, tuning
from llm2vec_fast.kernels.attention import dropout_keep_mask, varlen_attention

# Interpreter blocks: 64 queries x 32 keys (32 x 64 in the dK/dV kernel). One packed batch hits
# empty sequences, a single token, both block sizes -1/0/+1 and a multi-block sequence.
CPU_LENGTHS = [0, 1, 31, 32, 33, 0, 63, 64, 65, 113]
# GPU blocks are 16 to 128 wide.
GPU_LENGTHS = [0, 1, 31, 33, 63, 64, 65, 127, 128, 129, 113, 0, 1023, 257]
GQA = [
    pytest.param(2, 2, id="Hq2-Hkv2"),
    pytest.param(3, 1, id="Hq3-Hkv1"),
    pytest.param(4, 1, id="Hq4-Hkv1"),
]
GRAD_NAMES = ("out", "dq", "dk", "dv")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton path and fill every kernel output with NaN before the kernel runs."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")

    def nan_empty(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(attention, "_empty", nan_empty)


def cu_seqlens_of(lengths: list[int], device: str) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def make_inputs(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """Random q, k, v and an upstream gradient dO, on ``device`` in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    shapes = [
        (total, num_q_heads, head_dim),
        (total, num_kv_heads, head_dim),
        (total, num_kv_heads, head_dim),
    ]
    shapes.append(shapes[0])
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for shape in shapes]


def forward_backward(fn, q, k, v, grad_out) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of ``fn(q, k, v)`` for the upstream gradient ``grad_out``."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


def assert_within_tolerance(ours, exact, torch_in_dtype, dtype, label=""):
    for name, mine, truth, theirs in zip(GRAD_NAMES, ours, exact, torch_in_dtype):
        assert mine.dtype == dtype, f"{label} {name}: dtype {mine.dtype} != {dtype}"
        factor = FORWARD_FACTOR if name == "out" else GRADIENT_FACTOR
        assert_close_to_oracle(
            f"{label} {name}", mine, theirs, truth, factor=factor, atol=torch.finfo(dtype).eps
        )


def check_against_reference(
    lengths,
    num_q_heads,
    num_kv_heads,
    head_dim,
    dtype,
    device,
    *,
    causal,
    window=None,
    softmax_scale=None,
    exact_dtype=torch.float64,
    deterministic=True,
):
    cu_seqlens = cu_seqlens_of(lengths, device)
    max_seqlen = max(lengths)
    q, k, v, grad_out = make_inputs(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device)
    options = dict(causal=causal, window=window, softmax_scale=softmax_scale)

    def ours(q_, k_, v_):
        return varlen_attention(
            q_, k_, v_, cu_seqlens, max_seqlen, deterministic=deterministic, **options
        )

    def ref(q_, k_, v_):
        return reference.varlen_attention(q_, k_, v_, cu_seqlens, max_seqlen, **options)

    mine = forward_backward(ours, q, k, v, grad_out)
    exact = forward_backward(ref, *(x.to(exact_dtype) for x in (q, k, v, grad_out)))
    in_dtype = forward_backward(ref, q, k, v, grad_out)
    assert_within_tolerance(
        mine, exact, in_dtype, dtype, label=f"lengths={lengths} window={window}"
    )


def check_backward_is_deterministic(
    lengths, num_q_heads, num_kv_heads, head_dim, dtype, device, *, causal
):
    """Two forward+backward runs on the same inputs give bitwise equal results."""
    cu_seqlens = cu_seqlens_of(lengths, device)
    q, k, v, grad_out = make_inputs(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device)

    def run():
        return forward_backward(
            lambda *x: varlen_attention(*x, cu_seqlens, max(lengths), causal=causal),
            q,
            k,
            v,
            grad_out,
        )

    first, second = run(), run()
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


# ---------------------------------------------------------------------------------------------
# CPU: the Triton kernels under the interpreter
# ---------------------------------------------------------------------------------------------


# Every pair of (dtype, causal, GQA ratio) values appears in one of these six cases.
@pytest.mark.parametrize(
    "dtype, causal, num_q_heads, num_kv_heads",
    [
        pytest.param(torch.float32, False, 3, 1, id="fp32-bidirectional-Hq3-Hkv1"),
        pytest.param(torch.float16, True, 3, 1, id="fp16-causal-Hq3-Hkv1"),
        pytest.param(torch.float32, True, 4, 1, id="fp32-causal-Hq4-Hkv1"),
        pytest.param(torch.float16, False, 4, 1, id="fp16-bidirectional-Hq4-Hkv1"),
        pytest.param(torch.float32, False, 2, 2, id="fp32-bidirectional-Hq2-Hkv2"),
        pytest.param(torch.float16, True, 2, 2, id="fp16-causal-Hq2-Hkv2"),
    ],
)
def test_matches_reference(triton_backend, dtype, causal, num_q_heads, num_kv_heads):
    check_against_reference(CPU_LENGTHS, num_q_heads, num_kv_heads, 64, dtype, "cpu", causal=causal)


@pytest.mark.parametrize(
    "head_dim, dtype, causal",
    [
        pytest.param(80, torch.float16, True, id="D80-fp16-causal"),
        pytest.param(96, torch.float32, False, id="D96-fp32-bidirectional"),
        pytest.param(128, torch.float16, False, id="D128-fp16-bidirectional"),
        pytest.param(256, torch.float32, True, id="D256-fp32-causal"),
    ],
)
def test_head_dims(triton_backend, head_dim, dtype, causal):
    check_against_reference([33, 0, 1, 65], 2, 1, head_dim, dtype, "cpu", causal=causal)


def test_long_sequence_and_custom_scale(triton_backend):
    check_against_reference(
        [1023, 2], 1, 1, 64, torch.float32, "cpu", causal=True, softmax_scale=0.3
    )


def test_strided_views_of_fused_qkv(triton_backend):
    """q, k, v as views into one fused projection output (token stride != heads * head_dim)."""
    lengths = [5, 40]
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(sum(lengths), 4 + 2 + 2, 32, generator=gen)  # (T, Hq + 2 Hkv, D)
    grad_out = torch.randn(sum(lengths), 4, 32, generator=gen)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]

    def run(fn, q_, k_, v_):
        return forward_backward(lambda *x: fn(*x, cu_seqlens, max(lengths)), q_, k_, v_, grad_out)

    mine = run(varlen_attention, q, k, v)
    exact = run(reference.varlen_attention, *(x.double() for x in (q, k, v)))
    in_dtype = run(reference.varlen_attention, q.contiguous(), k.contiguous(), v.contiguous())
    assert_within_tolerance(mine, exact, in_dtype, torch.float32)


def test_cu_seqlens_may_be_a_strided_view(triton_backend):
    q, k, v, _ = make_inputs([3, 5], 2, 1, 64, torch.float32, "cpu")
    strided = torch.tensor([0, 0, 3, 3, 8, 8], dtype=torch.int32)[::2]  # values 0, 3, 8 at stride 2
    torch.testing.assert_close(
        varlen_attention(q, k, v, strided, 5),
        varlen_attention(q, k, v, strided.contiguous(), 5),
        rtol=0,
        atol=0,
    )


def test_all_sequences_empty(triton_backend):
    q, k, v, grad_out = make_inputs([0, 0], 2, 1, 64, torch.float32, "cpu")
    out, dq, dk, dv = forward_backward(
        lambda *x: varlen_attention(*x, cu_seqlens_of([0, 0], "cpu"), 0), q, k, v, grad_out
    )
    assert out.shape == (0, 2, 64) and dq.shape == (0, 2, 64) and dk.shape == dv.shape == (0, 1, 64)


def test_backward_is_deterministic(triton_backend):
    check_backward_is_deterministic([70, 33], 4, 1, 64, torch.float16, "cpu", causal=True)


# Sliding windows: smaller than a key tile (5), window 1 (each query sees itself only), between
# the key and the query tile (40), longer than some sequences but not the longest (100). Every
# (dtype, direction) pair and both dQ paths appear.
@pytest.mark.parametrize(
    "dtype, causal, window, num_q_heads, num_kv_heads, deterministic",
    [
        pytest.param(torch.float32, True, 5, 4, 1, True, id="fp32-causal-W5-Hq4-Hkv1"),
        pytest.param(torch.float16, False, 5, 3, 1, False, id="fp16-bidirectional-W5-atomic"),
        pytest.param(torch.float32, False, 1, 2, 2, True, id="fp32-bidirectional-W1"),
        pytest.param(torch.float16, True, 40, 4, 1, True, id="fp16-causal-W40-Hq4-Hkv1"),
        pytest.param(torch.float32, True, 100, 3, 1, False, id="fp32-causal-W100-atomic"),
        pytest.param(torch.float32, False, 40, 2, 1, True, id="fp32-bidirectional-W40"),
    ],
)
def test_sliding_window_matches_reference(
    triton_backend, dtype, causal, window, num_q_heads, num_kv_heads, deterministic
):
    check_against_reference(
        CPU_LENGTHS,
        num_q_heads,
        num_kv_heads,
        32,
        dtype,
        "cpu",
        causal=causal,
        window=window,
        deterministic=deterministic,
    )


# The GPU's tile shapes (forward/dQ 128 x 64 and 128 x 32 queries x keys, dK/dV 32 x 128) and
# small square ones, so that the window's edges fall at other places in the tiles.
GPU_TILES = dict(
    attn_fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=1),
    attn_bwd_dkdv=dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1),
    attn_bwd_dkdv_atomic=dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1),
    attn_bwd_dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=1),
)
SMALL_TILES = dict.fromkeys(GPU_TILES, dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1))


@pytest.mark.parametrize(
    "tiles, causal, window, deterministic",
    [
        pytest.param(GPU_TILES, True, 33, True, id="gpu-tiles-causal-W33"),
        pytest.param(GPU_TILES, False, 64, False, id="gpu-tiles-bidirectional-W64-atomic"),
        pytest.param(SMALL_TILES, False, 17, True, id="small-tiles-bidirectional-W17"),
        pytest.param(SMALL_TILES, True, 2, False, id="small-tiles-causal-W2-atomic"),
    ],
)
def test_sliding_window_with_other_tile_sizes(
    triton_backend, monkeypatch, tiles, causal, window, deterministic
):
    monkeypatch.setattr(attention, "_configs", lambda head_dim, dtype: tiles)
    check_against_reference(
        [1, 31, 65, 200],
        2,
        1,
        16,
        torch.float32,
        "cpu",
        causal=causal,
        window=window,
        deterministic=deterministic,
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_window_covering_every_sequence_changes_nothing(triton_backend, causal):
    q, k, v, _ = make_inputs([7, 30], 2, 1, 32, torch.float32, "cpu")
    cu_seqlens = cu_seqlens_of([7, 30], "cpu")
    plain = varlen_attention(q, k, v, cu_seqlens, 30, causal=causal)
    for window in (30, 1000):
        windowed = varlen_attention(q, k, v, cu_seqlens, 30, causal=causal, window=window)
        torch.testing.assert_close(windowed, plain, rtol=0, atol=0)
    narrower = varlen_attention(q, k, v, cu_seqlens, 30, causal=causal, window=29)
    assert (narrower[7:] - plain[7:]).abs().max() > 1e-3  # the 30-token sequence's corners


def test_window_semantics_of_the_reference():
    """Query i sees key j when |i - j| < window (and j <= i if causal): with v = one-hot
    positions, each output row is the attention weight of every key."""
    length, window = 9, 3
    q = torch.zeros(length, 1, length, dtype=torch.float64)  # equal scores for every key
    v = torch.eye(length, dtype=torch.float64)[:, None, :]  # (L, 1, L)
    cu_seqlens = cu_seqlens_of([length], "cpu")
    for causal in (False, True):
        out = reference.varlen_attention(q, q, v, cu_seqlens, length, causal=causal, window=window)[
            :, 0
        ]  # (L, L) weights
        i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        visible = ((i - j).abs() < window) & ((j <= i) | (not causal))
        assert torch.equal(out > 0, visible)


@pytest.mark.parametrize("window", [0, -2, 2.0, True])
def test_rejects_bad_window(window):
    q, k, v, cu_seqlens, max_seqlen = _valid_inputs()
    with pytest.raises(ValueError, match="window must be a positive int"):
        varlen_attention(q, k, v, cu_seqlens, max_seqlen, window=window)


@pytest.mark.parametrize(
    "dtype, causal, num_q_heads, num_kv_heads, head_dim",
    [
        pytest.param(torch.float32, False, 3, 1, 64, id="fp32-bidirectional-Hq3-Hkv1"),
        pytest.param(torch.float16, True, 4, 1, 64, id="fp16-causal-Hq4-Hkv1"),
        pytest.param(torch.float16, True, 2, 2, 80, id="fp16-causal-D80"),
    ],
)
def test_atomic_dq_matches_reference(
    triton_backend, dtype, causal, num_q_heads, num_kv_heads, head_dim
):
    """deterministic=False: dQ accumulated with atomics in the dK/dV kernel, no dQ pass."""
    check_against_reference(
        CPU_LENGTHS,
        num_q_heads,
        num_kv_heads,
        head_dim,
        dtype,
        "cpu",
        causal=causal,
        deterministic=False,
    )


def test_atomic_dq_stays_finite_when_every_score_is_very_negative(triton_backend):
    """fp16, bidirectional, a tail key block past the sequence: its zero keys score 0, far above
    the real ones (~-22 in log2 units), so unmasked their ds overflowed fp16 into NaN dQ."""
    generator = torch.Generator().manual_seed(0)
    length, head_dim = 70, 64
    k = 1.0 + 0.01 * torch.randn(length, 1, head_dim, generator=generator)
    q = -1.9 + 0.01 * torch.randn(length, 1, head_dim, generator=generator)
    v = 4 * torch.randn(length, 1, head_dim, generator=generator)
    grads = {}
    for deterministic in (True, False):
        inputs = [t.half().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(
            *inputs, cu_seqlens_of([length], "cpu"), length, deterministic=deterministic
        )
        out.float().square().sum().backward()
        grads[deterministic] = [t.grad.float() for t in inputs]
    assert all(torch.isfinite(g).all() for g in grads[False])
    for atomic, separate in zip(grads[False], grads[True]):
        torch.testing.assert_close(atomic, separate, rtol=1e-2, atol=1e-2)


def test_atomic_dq_with_dropout(triton_backend):
    check_dropout_against_masked_reference(
        [0, 33, 1, 70],
        3,
        1,
        64,
        torch.float16,
        "cpu",
        causal=True,
        dropout_p=0.25,
        seed=1234,
        deterministic=False,
    )


def masked_attention(q, k, v, cu_seqlens, keep, dropout_p, *, causal, compute_dtype, window=None):
    """Attention with an explicit dropout keep-mask ``(Hq, T, T)``, in ``compute_dtype``; softmax in
    at least fp32 (what PyTorch's SDPA math path does)."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1).to(compute_dtype)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1).repeat_interleave(group, 0).to(compute_dtype)
        vs = v[start:end].transpose(0, 1).repeat_interleave(group, 0).to(compute_dtype)
        scores = (qs @ ks.transpose(1, 2)) * scale  # (Hq, L, L)
        positions = torch.arange(end - start, device=q.device)
        distance = positions[:, None] - positions[None, :]  # (L, L) query - key
        hidden = distance < 0 if causal else torch.zeros_like(distance, dtype=torch.bool)
        if window is not None:
            hidden |= distance.abs() >= window
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores.to(torch.promote_types(compute_dtype, torch.float32)), -1).to(
            compute_dtype
        )
        probs = probs * keep[:, start:end, start:end] / (1.0 - dropout_p)
        outputs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outputs).to(q.dtype)


def check_dropout_against_masked_reference(
    lengths,
    num_q_heads,
    num_kv_heads,
    head_dim,
    dtype,
    device,
    *,
    causal,
    dropout_p,
    seed,
    deterministic=True,
    window=None,
) -> None:
    """Triton dropout against ``masked_attention`` with the kernels' own keep-mask, and unlike no
    dropout."""
    cu_seqlens = cu_seqlens_of(lengths, device)
    max_seqlen = max(lengths)
    q, k, v, grad_out = make_inputs(lengths, num_q_heads, num_kv_heads, head_dim, dtype, device)
    keep = dropout_keep_mask(num_q_heads, sum(lengths), dropout_p, seed, device)

    def ours(q_, k_, v_):
        return varlen_attention(
            q_,
            k_,
            v_,
            cu_seqlens,
            max_seqlen,
            causal=causal,
            window=window,
            dropout_p=dropout_p,
            dropout_seed=seed,
            deterministic=deterministic,
        )

    def ref(compute_dtype):
        return lambda q_, k_, v_: masked_attention(
            q_,
            k_,
            v_,
            cu_seqlens,
            keep,
            dropout_p,
            causal=causal,
            compute_dtype=compute_dtype,
            window=window,
        )

    mine = forward_backward(ours, q, k, v, grad_out)
    exact = forward_backward(
        ref(torch.float64), *(x.double() for x in (q, k, v)), grad_out.double()
    )
    in_dtype = forward_backward(ref(dtype), q, k, v, grad_out)
    assert_within_tolerance(mine, exact, in_dtype, dtype)
    without_dropout = varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, window=window
    )
    assert not torch.allclose(mine[0], without_dropout), "dropout changed nothing"


@pytest.mark.parametrize(
    "dtype, causal, window",
    [
        pytest.param(torch.float32, False, None, id="fp32-bidirectional"),
        pytest.param(torch.float16, True, None, id="fp16-causal"),
        pytest.param(torch.float32, True, 10, id="fp32-causal-W10"),
        pytest.param(torch.float16, False, 20, id="fp16-bidirectional-W20"),
    ],
)
def test_dropout_matches_reference_with_same_mask(triton_backend, dtype, causal, window):
    check_dropout_against_masked_reference(
        [0, 33, 1, 70],
        3,
        1,
        64,
        dtype,
        "cpu",
        causal=causal,
        dropout_p=0.25,
        seed=1234,
        window=window,
    )


TMA_FORWARD = tuning.Config(64, 32, 4, 1, kv_tma=True)  # the interpreter's blocks, by TMA


def spy_on_tma_descriptors(monkeypatch) -> list:
    """The block shapes of the TMA descriptors the launcher builds from now on."""
    blocks = []
    make = attention.create_ragged_descriptor
    monkeypatch.setattr(
        attention,
        "create_ragged_descriptor",
        lambda tensor, block: blocks.append(block) or make(tensor, block),
    )
    return blocks


def forward_by_tma_and_not(q, k, v, cu_seqlens, config, **options):
    """The forward with ``config`` and with the same config reading K and V by plain loads."""
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    outputs = []
    for tma in (True, False):
        with tuning.forced({"attn_fwd": dataclasses.replace(config, kv_tma=tma)}):
            outputs.append(varlen_attention(q, k, v, cu_seqlens, max_seqlen, **options))
    return outputs


def test_forward_reads_k_and_v_by_tma_when_its_config_says_so(triton_backend, monkeypatch):
    """A forward config with KV_TMA reads K and V through ragged TMA descriptors (rows past the
    group and head dims past 80 come as zeros): the same results, masks and dropout included,
    and bit for bit those of plain loads."""
    blocks = spy_on_tma_descriptors(monkeypatch)
    lengths = [0, 33, 1, 70, 5, 3, 2]
    with tuning.forced({"attn_fwd": TMA_FORWARD}):
        for causal, window in ((False, None), (True, None), (False, 9)):
            check_against_reference(
                lengths, 4, 2, 80, torch.float16, "cpu", causal=causal, window=window
            )
        check_dropout_against_masked_reference(
            lengths, 4, 2, 80, torch.float16, "cpu", causal=False, dropout_p=0.2, seed=3
        )
    assert blocks and all(block == [32, 1, 128] for block in blocks), blocks
    q, k, v, _ = make_inputs(lengths, 4, 2, 80, torch.float16, "cpu")
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    for options in (dict(causal=True), dict(causal=False, dropout_p=0.3, dropout_seed=1)):
        by_tma, plain = forward_by_tma_and_not(q, k, v, cu_seqlens, TMA_FORWARD, **options)
        assert torch.equal(by_tma, plain), options


def test_tma_reads_only_what_it_can_address():
    aligned = torch.zeros(10, 2, 64, dtype=torch.float16)
    assert attention._tma_can_read(aligned)
    assert not attention._tma_can_read(torch.zeros(10, 2, 81, dtype=torch.float16)[..., 1:])
    shifted = torch.zeros(10 * 2 * 64 + 1, dtype=torch.float16)[1:].view(10, 2, 64)  # base + 2 B
    assert not attention._tma_can_read(shifted)
    assert not attention._tma_can_read(aligned.transpose(1, 2).contiguous().transpose(1, 2))


def test_dropout_keep_rate_and_independence():
    dropout_p = 0.3
    keep = dropout_keep_mask(2, 256, dropout_p, 7, "cpu")  # 131k draws: the rate's std is 1.3e-3
    assert keep.shape == (2, 256, 256)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - dropout_p)) < 0.006, rate
    expected_agreement = (
        dropout_p**2 + (1 - dropout_p) ** 2
    )  # of two independent masks; std 1.9e-3 here
    assert abs((keep[0] == keep[1]).float().mean().item() - expected_agreement) < 0.01, (
        "heads share a mask"
    )
    other_seed = dropout_keep_mask(1, 256, dropout_p, 8, "cpu")
    assert abs((keep[0] == other_seed[0]).float().mean().item() - expected_agreement) < 0.01, (
        "seeds share a mask"
    )
    assert torch.equal(dropout_keep_mask(1, 64, dropout_p, 7, "cpu")[0], keep[0, :64, :64])
    # four consecutive keys share one Philox call, each taking another of its outputs
    for lane in (1, 2, 3):
        lanes = (keep[0, :, 0::4] == keep[0, :, lane::4]).float().mean().item()  # std 2.7e-3
        assert abs(lanes - expected_agreement) < 0.012, f"keys 4j and 4j+{lane} agree"


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("LLM2VEC_FAST_BACKEND", raising=False)
    lengths = [3, 0, 5]
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    q, k, v, _ = make_inputs(lengths, 2, 2, 16, torch.float32, "cpu")
    expected = reference.varlen_attention(q, k, v, cu_seqlens, 5, causal=True)
    assert torch.equal(varlen_attention(q, k, v, cu_seqlens, 5, causal=True), expected)


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _valid_inputs():
    q, k, v, _ = make_inputs([3, 5], 4, 2, 16, torch.float32, "cpu")
    return q, k, v, cu_seqlens_of([3, 5], "cpu"), 5


@pytest.mark.parametrize(
    "change, error, message",
    [
        pytest.param(lambda q, k, v, cu, m: (q[0], k, v, cu, m), ValueError, "3-D", id="q-not-3d"),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v[:, :1], cu, m),
            ValueError,
            "same shape",
            id="k-v-shapes",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q[:, :, :8], k, v, cu, m),
            ValueError,
            "head_dim",
            id="head-dim-mismatch",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q[:, :3], k, v, cu, m),
            ValueError,
            "multiple",
            id="heads-not-multiple",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q.half(), k, v, cu, m), TypeError, "dtype", id="mixed-dtypes"
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q.int(), k.int(), v.int(), cu, m),
            TypeError,
            "dtype",
            id="int-dtype",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, cu.long(), m),
            ValueError,
            "int32",
            id="cu-seqlens-int64",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, cu[:1], m),
            ValueError,
            "B \\+ 1",
            id="cu-seqlens-too-short",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, cu + 1, m),
            ValueError,
            "start at 0",
            id="cu-seqlens-offset",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, cu[:2], m),
            ValueError,
            "end at T=",
            id="tokens-uncovered",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, torch.tensor([0, 6, 5, 8], dtype=torch.int32), 6),
            ValueError,
            "non-decreasing",
            id="cu-seqlens-decreasing",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, cu, 4),
            ValueError,
            "longest sequence",
            id="max-seqlen-too-small",
        ),
        pytest.param(
            lambda q, k, v, cu, m: (q, k, v, cu, 5.0),
            ValueError,
            "max_seqlen",
            id="max-seqlen-float",
        ),
    ],
)
def test_rejects_bad_inputs(change, error, message):
    q, k, v, cu_seqlens, max_seqlen = change(*_valid_inputs())
    with pytest.raises(error, match=message):
        varlen_attention(q, k, v, cu_seqlens, max_seqlen)


def test_rejects_bad_dropout():
    q, k, v, cu_seqlens, max_seqlen = _valid_inputs()
    with pytest.raises(ValueError, match="dropout_p"):
        varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=1.0)


def test_triton_path_rejects_what_the_kernel_cannot_run(triton_backend):
    q, k, v, cu_seqlens, max_seqlen = _valid_inputs()
    with pytest.raises(ValueError, match="head_dim 320"):
        big = torch.randn(8, 2, 320)
        varlen_attention(big, big, big, cu_seqlens, max_seqlen)
    with pytest.raises(ValueError, match="contiguous along head_dim"):
        varlen_attention(
            q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu_seqlens, max_seqlen
        )
    for scale in (0.0, -0.125, math.inf):
        with pytest.raises(ValueError, match="positive finite softmax_scale"):
            varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale)


# ---------------------------------------------------------------------------------------------
# GPU (pytest -m gpu): fp16 and bf16, against the reference on the same device in fp64/fp32
# ---------------------------------------------------------------------------------------------

GPU_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
CAUSAL = [pytest.param(False, id="bidirectional"), pytest.param(True, id="causal")]


@pytest.mark.gpu
@pytest.mark.parametrize("num_q_heads, num_kv_heads", GQA)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_matches_reference(triton_backend, dtype, causal, num_q_heads, num_kv_heads):
    check_against_reference(
        GPU_LENGTHS, num_q_heads, num_kv_heads, 128, dtype, "cuda", causal=causal
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "window, head_dim, deterministic",
    [
        pytest.param(1, 64, True, id="W1-D64"),
        pytest.param(100, 128, True, id="W100-D128"),
        pytest.param(300, 128, False, id="W300-D128-atomic"),
        pytest.param(512, 256, True, id="W512-D256"),
    ],
)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", [*GPU_DTYPES, pytest.param(torch.float32, id="fp32")])
def test_gpu_sliding_window_matches_reference(
    triton_backend, dtype, causal, window, head_dim, deterministic
):
    check_against_reference(
        GPU_LENGTHS,
        4,
        1,
        head_dim,
        dtype,
        "cuda",
        causal=causal,
        window=window,
        deterministic=deterministic,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim, causal",
    [
        pytest.param(64, True, id="D64-causal"),
        pytest.param(80, False, id="D80-bidirectional"),
        pytest.param(96, True, id="D96-causal"),
        pytest.param(256, False, id="D256-bidirectional"),
    ],
)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_head_dims(triton_backend, dtype, head_dim, causal):
    check_against_reference(GPU_LENGTHS, 4, 1, head_dim, dtype, "cuda", causal=causal)


@pytest.mark.gpu
def test_gpu_fp32(triton_backend):
    """fp32 at head dim 128 (at 256, compiled for sm_90, its kernels spill registers and take about
    a minute to build: a cost for the short GPU check; the interpreter tests D256 fp32)."""
    check_against_reference(GPU_LENGTHS, 3, 1, 128, torch.float32, "cuda", causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 80])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gpu_forward_by_tma(triton_backend, monkeypatch, causal, head_dim):
    """The forward's TMA configs (on sm_90; an older card falls back to plain loads) against the
    reference and bit for bit against plain loads, bf16, short sequences packed into tiles and
    long ones, with dropout, and K/V as views of a fused QKV projection."""
    blocks = spy_on_tma_descriptors(monkeypatch)
    lengths = [*GPU_LENGTHS, *[3, 5, 2, 7, 1] * 20]
    cu_seqlens = cu_seqlens_of(lengths, "cuda")
    qkv = torch.randn(sum(lengths), 8 + 2 * 2, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv[:, :8], qkv[:, 8:10], qkv[:, 10:]
    for config in (tuning.Config(128, 64, 8, 3, kv_tma=True), tuning.Config(128, 128, 8, 2, True)):
        with tuning.forced({"attn_fwd": config}):
            check_against_reference(lengths, 8, 2, head_dim, torch.bfloat16, "cuda", causal=causal)
        for options in (dict(causal=causal), dict(causal=causal, dropout_p=0.1, dropout_seed=4)):
            by_tma, plain = forward_by_tma_and_not(q, k, v, cu_seqlens, config, **options)
            assert torch.equal(by_tma, plain), (config, options)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert blocks, "no TMA descriptor was built on a Hopper card"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_dropout_matches_reference_with_same_mask(triton_backend, dtype, causal):
    """Long sequences starting at every offset mod 4 and short ones packed into tiles."""
    lengths = [0, 1, 129, 257, 65] + [3, 5, 2, 7, 1] * 20
    dropout_p, seed = 0.1, 99
    keep = dropout_keep_mask(4, sum(lengths), dropout_p, seed, "cuda")
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.01
    check_dropout_against_masked_reference(
        lengths, 4, 2, 128, dtype, "cuda", causal=causal, dropout_p=dropout_p, seed=seed
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
def test_gpu_16k_token_batch(triton_backend, causal):
    lengths = [
        4096,
        3000,
        2048,
        1500,
        1024,
        1024,
        1000,
        777,
        513,
        511,
        300,
        200,
        129,
        47,
        1,
        0,
        214,
    ]  # 16384 tokens
    check_against_reference(
        lengths, 8, 2, 128, torch.bfloat16, "cuda", causal=causal, exact_dtype=torch.float32
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
def test_gpu_32k_single_sequence(triton_backend, causal):
    check_against_reference(
        [32768], 2, 1, 128, torch.bfloat16, "cuda", causal=causal, exact_dtype=torch.float32
    )


@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_atomic_dq_matches_reference(triton_backend, dtype, causal):
    check_against_reference(
        GPU_LENGTHS, 4, 1, 128, dtype, "cuda", causal=causal, deterministic=False
    )
    lengths = [
        4096,
        3000,
        2048,
        1500,
        1024,
        1024,
        1000,
        777,
        513,
        511,
        300,
        200,
        129,
        47,
        1,
        0,
        214,
    ]  # 16384 tokens
    check_against_reference(
        lengths,
        8,
        2,
        128,
        dtype,
        "cuda",
        causal=causal,
        exact_dtype=torch.float32,
        deterministic=False,
    )
    check_dropout_against_masked_reference(
        [0, 1, 129, 257, 65],
        4,
        2,
        128,
        dtype,
        "cuda",
        causal=causal,
        dropout_p=0.1,
        seed=99,
        deterministic=False,
    )


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(triton_backend):
    check_backward_is_deterministic(
        [4096, 1000, 1], 8, 2, 128, torch.bfloat16, "cuda", causal=False
    )


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements(triton_backend):
    """T x Hq x D > 2^31: only int64 addressing reaches the last sequences (about 25 GB in all)."""
    num_q_heads, num_kv_heads, head_dim = 16, 2, 128
    seq_len = 1025
    batch = 2**31 // (num_q_heads * head_dim * seq_len) + 2
    lengths = [seq_len] * batch
    total = seq_len * batch
    assert total * num_q_heads * head_dim > 2**31
    cu_seqlens = cu_seqlens_of(lengths, "cuda")
    q, k, v, grad_out = (
        torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        for heads in (num_q_heads, num_kv_heads, num_kv_heads, num_q_heads)
    )
    mine = forward_backward(
        lambda *x: varlen_attention(*x, cu_seqlens, seq_len, causal=True), q, k, v, grad_out
    )
    one = cu_seqlens_of([seq_len], "cuda")
    for start in (0, total - seq_len):  # the first sequence and the last one, past 2^31 elements
        window = slice(start, start + seq_len)
        parts = [x[window] for x in (q, k, v, grad_out)]

        def ref(q_, k_, v_):
            return reference.varlen_attention(q_, k_, v_, one, seq_len, causal=True)

        exact = forward_backward(ref, *(x.float() for x in parts))
        in_dtype = forward_backward(ref, *parts)
        assert_within_tolerance(
            [x[window] for x in mine], exact, in_dtype, torch.bfloat16, label=f"start={start}"
        )
