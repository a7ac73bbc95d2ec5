"""rms_norm: the Triton kernels (interpreter on CPU) against the PyTorch reference, forward and
backward."""

from __future__ import annotations

import pytest
import torch
from fusion_checks import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_close_to_oracle,
    nan_allocations,
    ulp_atol,
)

from llm2vec_fast.kernels import reference, rms_norm
from llm2vec_fast.kernels.norm import RMSNormFunction

EPS = 1e-6

# (T, H): the forward tile holds 4096 elements, so H = 80 (block 128) takes 32 rows per program:
# T = 31/33 straddle it; the backward walks rows in 4 programs on the CPU.
SHAPES = [
    pytest.param(0, 80, id="T0-H80"),
    pytest.param(1, 80, id="T1-H80"),
    pytest.param(31, 80, id="T31-H80"),
    pytest.param(33, 80, id="T33-H80"),
    pytest.param(113, 576, id="T113-H576"),
    pytest.param(1023, 80, id="T1023-H80"),
]
RESIDUAL = [pytest.param(True, id="residual"), pytest.param(False, id="no-residual")]


def check_rms_norm(
    tokens: int,
    hidden: int,
    with_residual: bool,
    dtype: torch.dtype,
    device: str,
    weight_dtype: torch.dtype | None = None,
    unit_offset: bool = False,
) -> None:
    """``unit_offset``: Gemma's x * (1 + w), with zero-centred weights."""
    weight_dtype = weight_dtype or dtype
    torch.manual_seed(tokens * 3 + hidden)
    x = (torch.randn(tokens, hidden, device=device) * 2).to(dtype)
    residual = torch.randn(tokens, hidden, device=device).to(dtype) if with_residual else None
    centre = 0.0 if unit_offset else 1.0
    weight = (centre + 0.2 * torch.randn(hidden, device=device)).to(weight_dtype)
    out_dtype = torch.promote_types(dtype, weight_dtype)
    grad_normed = torch.randn(tokens, hidden, device=device).to(out_dtype)
    grad_summed = torch.randn(tokens, hidden, device=device).to(dtype)

    def run(fn, cast):
        inputs = [cast(x).requires_grad_(True), cast(weight).requires_grad_(True)]
        inputs.append(cast(residual).requires_grad_(True) if with_residual else None)
        normed, summed = fn(inputs[0], inputs[1], EPS, inputs[2], unit_offset=unit_offset)
        # gradients flow through both outputs
        loss = (normed * cast(grad_normed)).sum() + (summed * cast(grad_summed)).sum()
        loss.backward()
        grads = [t.grad for t in inputs if t is not None]
        return [normed, summed, *grads]

    with nan_allocations():
        kernel = run(rms_norm, lambda t: t.clone())
    baseline = run(reference.rms_norm, lambda t: t.clone())
    oracle = run(reference.rms_norm, lambda t: t.double())

    names = ["normed", "summed", "grad_x", "grad_weight", "grad_residual"]
    for index, (name, got, base, want) in enumerate(zip(names, kernel, baseline, oracle)):
        factor = FORWARD_FACTOR if index < 2 else GRADIENT_FACTOR
        # the kernel's rsqrt and row sums round in a different order than PyTorch's
        assert_close_to_oracle(name, got, base, want, factor=factor, atol=ulp_atol(want, got.dtype))


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("with_residual", RESIDUAL)
@pytest.mark.parametrize("tokens, hidden", SHAPES)
def test_rms_norm_matches_reference(monkeypatch, tokens, hidden, with_residual, dtype):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    check_rms_norm(tokens, hidden, with_residual, dtype, "cpu")


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("tokens", [1, 33, 130])
def test_unit_offset_matches_reference(monkeypatch, tokens, dtype):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    check_rms_norm(tokens, 80, True, dtype, "cpu", unit_offset=True)


def test_fp32_weight_on_fp16_stream(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    check_rms_norm(17, 80, True, torch.float16, "cpu", weight_dtype=torch.float32)


def test_without_residual_the_second_output_is_x(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    x = torch.randn(4, 80)
    normed, summed = rms_norm(x, torch.ones(80), EPS)
    assert summed is x
    assert normed.grad_fn is None or "RMSNormFunction" in type(normed.grad_fn).__name__


def test_gradient_through_the_sum_alone():
    """When only the residual stream is used, normed gets no gradient and the kernel skips it."""
    x = torch.randn(9, 80, requires_grad=True)
    residual = torch.randn(9, 80, requires_grad=True)
    weight = torch.randn(80, requires_grad=True)
    grad = torch.randn(9, 80)
    _, summed = RMSNormFunction.apply(x, weight, EPS, residual)
    (summed * grad).sum().backward()
    torch.testing.assert_close(x.grad, grad)
    torch.testing.assert_close(residual.grad, grad)
    torch.testing.assert_close(weight.grad, torch.zeros(80))


def test_non_contiguous_rows(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    wide = torch.randn(7, 100)
    x, residual = wide[:, :80], wide[:, 10:90]
    weight = torch.randn(80)
    normed, summed = rms_norm(x, weight, EPS, residual)
    expected_normed, expected_summed = reference.rms_norm(x, weight, EPS, residual)
    torch.testing.assert_close(normed, expected_normed)
    torch.testing.assert_close(summed, expected_summed)


def _norm_inputs(x_shape=(2, 8), weight_shape=(8,), residual=None, x_dtype=torch.float32):
    return torch.randn(*x_shape).to(x_dtype), torch.ones(*weight_shape), residual


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        pytest.param(_norm_inputs(x_shape=(2, 3, 8)), ValueError, "2-D", id="3d"),
        pytest.param(
            _norm_inputs(weight_shape=(7,)), ValueError, "weight must have shape", id="weight-shape"
        ),
        pytest.param(
            _norm_inputs(residual=torch.randn(3, 8)),
            ValueError,
            "residual must have",
            id="residual-shape",
        ),
        pytest.param(
            _norm_inputs(residual=torch.randn(2, 8).double()),
            TypeError,
            "dtype",
            id="residual-dtype",
        ),
        pytest.param(_norm_inputs(x_dtype=torch.int64), TypeError, "floating", id="int-x"),
    ],
)
def test_input_validation(inputs, error, message):
    x, weight, residual = inputs
    with pytest.raises(error, match=message):
        rms_norm(x, weight, EPS, residual)


def test_negative_eps_is_rejected():
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(2, 8), torch.ones(8), -1.0)


GPU_SHAPES = SHAPES + [
    pytest.param(16384, 4096, id="T16384-H4096"),
    pytest.param(4097, 8192, id="T4097-H8192"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("with_residual", RESIDUAL)
@pytest.mark.parametrize("tokens, hidden", GPU_SHAPES)
def test_rms_norm_matches_reference_gpu(tokens, hidden, with_residual, dtype):
    check_rms_norm(tokens, hidden, with_residual, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_unit_offset_matches_reference_gpu(dtype):
    check_rms_norm(130, 80, True, dtype, "cuda", unit_offset=True)
