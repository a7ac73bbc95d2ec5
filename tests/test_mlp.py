"""swiglu: the Triton kernel (interpreter on CPU) against the PyTorch reference, forward and
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

from llm2vec_fast.kernels import reference, swiglu
from llm2vec_fast.kernels.mlp import SwiGLUFunction

# (T, I): tiles hold 2048 elements, so with I = 24 (block 32) a tile is 64 rows: 63/65 straddle it;
# I = 2049 needs two column blocks of 2048.
SHAPES = [
    pytest.param(0, 80, id="T0-I80"),
    pytest.param(1, 80, id="T1-I80"),
    pytest.param(63, 24, id="T63-I24"),
    pytest.param(65, 24, id="T65-I24"),
    pytest.param(113, 80, id="T113-I80"),
    pytest.param(3, 2049, id="T3-I2049"),
    pytest.param(1023, 8, id="T1023-I8"),
]


def check_swiglu(tokens: int, intermediate: int, dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(tokens * 7 + intermediate)
    gate_up = (torch.randn(tokens, 2 * intermediate, device=device) * 3).to(dtype)
    grad_out = torch.randn(tokens, intermediate, device=device).to(dtype)

    kernel_in = gate_up.clone().requires_grad_(True)
    with nan_allocations():
        kernel_out = SwiGLUFunction.apply(kernel_in)
        kernel_out.backward(grad_out)

    baseline_in = gate_up.clone().requires_grad_(True)
    baseline_out = reference.swiglu(baseline_in)
    baseline_out.backward(grad_out)

    oracle_in = gate_up.double().requires_grad_(True)
    oracle_out = reference.swiglu(oracle_in)
    oracle_out.backward(grad_out.double())

    # ulp_atol covers an exp/sigmoid that differs from PyTorch's by an ulp
    atol = ulp_atol(oracle_out, dtype)
    assert_close_to_oracle(
        "out", kernel_out, baseline_out, oracle_out, factor=FORWARD_FACTOR, atol=atol
    )
    grad_atol = ulp_atol(oracle_in.grad, dtype)
    assert_close_to_oracle(
        "grad",
        kernel_in.grad,
        baseline_in.grad,
        oracle_in.grad,
        factor=GRADIENT_FACTOR,
        atol=grad_atol,
    )


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("tokens, intermediate", SHAPES)
def test_swiglu_matches_reference(tokens, intermediate, dtype):
    check_swiglu(tokens, intermediate, dtype, "cpu")


def test_public_function_dispatches_to_triton(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    gate_up = torch.randn(5, 2 * 24, requires_grad=True)
    out = swiglu(gate_up)
    assert out.grad_fn is not None and "SwiGLUFunction" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, reference.swiglu(gate_up))


def test_non_contiguous_rows():
    wide = torch.randn(9, 2 * 40 + 6)
    gate_up = wide[:, : 2 * 40]  # row stride 86, last dim contiguous
    torch.testing.assert_close(
        SwiGLUFunction.apply(gate_up), reference.swiglu(gate_up.contiguous())
    )


@pytest.mark.parametrize(
    "gate_up, error, message",
    [
        pytest.param(torch.randn(4, 6, 2), ValueError, "2-D", id="3d"),
        pytest.param(torch.randn(4, 7), ValueError, "even", id="odd-width"),
        pytest.param(torch.ones(4, 6, dtype=torch.int32), TypeError, "floating", id="int"),
    ],
)
def test_input_validation(gate_up, error, message):
    with pytest.raises(error, match=message):
        swiglu(gate_up)


def test_triton_rejects_fp64(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    with pytest.raises(TypeError, match="fp16, bf16 and fp32"):
        swiglu(torch.randn(3, 8, dtype=torch.float64))


GPU_SHAPES = SHAPES + [
    pytest.param(8192, 14336, id="T8192-I14336"),
    pytest.param(4097, 1536, id="T4097-I1536"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("tokens, intermediate", GPU_SHAPES)
def test_swiglu_matches_reference_gpu(tokens, intermediate, dtype):
    check_swiglu(tokens, intermediate, dtype, "cuda")
