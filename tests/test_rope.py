"""apply_rotary: the Triton kernel (interpreter on CPU) against the PyTorch reference, forward
and backward."""

from __future__ import annotations

import math

import pytest
import torch
from fusion_checks import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_close_to_oracle,
    nan_allocations,
    ulp_atol,
)

from llm2vec_fast.kernels import apply_rotary, reference
from llm2vec_fast.kernels.rope import RotaryFunction


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def llama3_inv_freq(head_dim: int) -> torch.Tensor:
    """Llama 3.1's frequency scaling (factor 8, low/high frequency factors 1 and 4, 8192
    positions)."""
    inv_freq = default_inv_freq(head_dim, theta=500000.0)
    factor, low_factor, high_factor, old_context = 8.0, 1.0, 4.0, 8192
    low_wavelen, high_wavelen = old_context / low_factor, old_context / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def packed_positions(lengths: list[int], offset: int = 0) -> torch.Tensor:
    """Position ids restarting at ``offset`` for each packed sequence."""
    if not lengths:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(length, dtype=torch.int64) + offset for length in lengths])


def check_rotary(
    lengths: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    *,
    inv_freq: torch.Tensor | None = None,
    position_offset: int = 0,
    attention_scaling: float = 1.0,
) -> None:
    tokens = sum(lengths)
    torch.manual_seed(tokens + 31 * head_dim + q_heads)
    q = torch.randn(tokens, q_heads, head_dim, device=device).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=device).to(dtype)
    grad_q = torch.randn(tokens, q_heads, head_dim, device=device).to(dtype)
    grad_k = torch.randn(tokens, kv_heads, head_dim, device=device).to(dtype)
    position_ids = packed_positions(lengths, position_offset).to(device)
    inv_freq = (default_inv_freq(head_dim) if inv_freq is None else inv_freq).to(device)

    def run(fn, cast, freq):
        q_in, k_in = cast(q).requires_grad_(True), cast(k).requires_grad_(True)
        q_out, k_out = fn(q_in, k_in, position_ids, freq, attention_scaling)
        ((q_out * cast(grad_q)).sum() + (k_out * cast(grad_k)).sum()).backward()
        return q_out, k_out, q_in.grad, k_in.grad

    with nan_allocations():
        kernel = run(RotaryFunction.apply, lambda t: t.clone(), inv_freq)
    baseline = run(reference.apply_rotary, lambda t: t.clone(), inv_freq)
    oracle = run(reference.apply_rotary, lambda t: t.double(), inv_freq.double())

    for index, (name, got, base, want) in enumerate(
        zip(["q", "k", "grad_q", "grad_k"], kernel, baseline, oracle)
    ):
        factor = FORWARD_FACTOR if index < 2 else GRADIENT_FACTOR
        # the kernel's cos/sin (libdevice on a GPU, numpy in the interpreter) may differ from
        # PyTorch's
        assert_close_to_oracle(name, got, base, want, factor=factor, atol=ulp_atol(want, dtype))


def check_case(lengths, q_heads, kv_heads, head_dim, options, dtype, device) -> None:
    """``check_rotary`` for one of CASES: ``options["inv_freq"] == "llama3"`` stands for Llama
    3.1's."""
    options = dict(options)
    if options.get("inv_freq") == "llama3":
        options["inv_freq"] = llama3_inv_freq(head_dim)
    check_rotary(lengths, q_heads, kv_heads, head_dim, dtype, device, **options)


# Tiles hold 2048 elements of one half: D = 64 with 8 padded heads takes 8 tokens per program,
# so 7/9 tokens straddle it; lengths lists are packed sequences whose positions restart at 0.
CASES = [
    pytest.param([], 4, 4, 64, {}, id="T0-D64"),
    pytest.param([1], 6, 2, 80, {}, id="T1-D80-gqa3"),
    pytest.param([3, 4], 6, 2, 64, {}, id="T7-D64-gqa3"),
    pytest.param([5, 0, 4], 8, 2, 64, {}, id="T9-D64-gqa4-empty-seq"),
    pytest.param([60, 53], 3, 1, 96, {"attention_scaling": 1.25}, id="T113-D96-gqa3-scaled"),
    pytest.param(
        [113],
        4,
        1,
        128,
        {"inv_freq": "llama3", "position_offset": 30000},
        id="T113-D128-llama3-pos30000",
    ),
]


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("lengths, q_heads, kv_heads, head_dim, options", CASES)
def test_rotary_matches_reference(lengths, q_heads, kv_heads, head_dim, options, dtype):
    check_case(lengths, q_heads, kv_heads, head_dim, options, dtype, "cpu")


def test_views_of_a_fused_qkv_projection(monkeypatch):
    """q and k sliced out of one (T, (Hq + 2 Hkv) * D) projection: token stride != heads * D."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    tokens, q_heads, kv_heads, head_dim = 11, 4, 2, 64
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(
        tokens, kv_heads, head_dim
    )
    position_ids = packed_positions([6, 5])
    inv_freq = default_inv_freq(head_dim)
    q_out, k_out = apply_rotary(q, k, position_ids, inv_freq)
    q_ref, k_ref = reference.apply_rotary(q.contiguous(), k.contiguous(), position_ids, inv_freq)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


def test_backward_is_the_inverse_rotation():
    """Rotating a gradient backward undoes the forward rotation (scaling 1): R^T R = I."""
    x = torch.randn(13, 3, 96, dtype=torch.float64).float()
    position_ids = packed_positions([13], offset=500)
    inv_freq = default_inv_freq(96)
    q = x.clone().requires_grad_(True)
    k = x[:, :1].clone().requires_grad_(True)
    q_out, k_out = RotaryFunction.apply(q, k, position_ids, inv_freq, 1.0)
    q_out.backward(q_out.detach())
    torch.testing.assert_close(q.grad, x, rtol=0, atol=1e-5)
    assert k.grad is None


def test_int32_positions(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    q, k = torch.randn(5, 2, 64), torch.randn(5, 1, 64)
    inv_freq = default_inv_freq(64)
    positions = packed_positions([5])
    got = apply_rotary(q, k, positions.int(), inv_freq)
    want = reference.apply_rotary(q, k, positions, inv_freq)
    torch.testing.assert_close(got, want)


def _rope_inputs(tokens=4, head_dim=64, positions=None, freqs=None, q_shape=None):
    q = torch.randn(*(q_shape or (tokens, 2, head_dim)))
    k = torch.randn(tokens, 1, head_dim)
    position_ids = torch.arange(tokens) if positions is None else positions
    inv_freq = torch.ones(head_dim // 2) if freqs is None else freqs
    return q, k, position_ids, inv_freq


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        pytest.param(_rope_inputs(q_shape=(4, 64)), ValueError, "3-D", id="2d-q"),
        pytest.param(_rope_inputs(q_shape=(5, 2, 64)), ValueError, "agree", id="tokens"),
        pytest.param(_rope_inputs(head_dim=63), ValueError, "even", id="odd-dim"),
        pytest.param(
            _rope_inputs(positions=torch.arange(3)),
            ValueError,
            "position_ids must have",
            id="positions-shape",
        ),
        pytest.param(
            _rope_inputs(positions=torch.arange(4.0)), TypeError, "integer", id="float-positions"
        ),
        pytest.param(
            _rope_inputs(freqs=torch.ones(64)),
            ValueError,
            "inv_freq must have",
            id="inv-freq-shape",
        ),
    ],
)
def test_input_validation(inputs, error, message):
    with pytest.raises(error, match=message):
        apply_rotary(*inputs)


GPU_CASES = CASES + [
    pytest.param(
        [4096, 4096, 1, 2047, 4096], 32, 8, 128, {"inv_freq": "llama3"}, id="T14336-D128-gqa4"
    ),
    pytest.param([16384], 14, 2, 64, {"position_offset": 30000}, id="T16384-D64-gqa7-pos30000"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("lengths, q_heads, kv_heads, head_dim, options", GPU_CASES)
def test_rotary_matches_reference_gpu(lengths, q_heads, kv_heads, head_dim, options, dtype):
    check_case(lengths, q_heads, kv_heads, head_dim, options, dtype, "cuda")
