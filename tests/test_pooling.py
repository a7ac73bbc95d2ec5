"""masked_pool: the Triton kernels (interpreter on CPU) against the fp64 reference.

Tolerance (DESIGN.md): the kernel's max error against the fp64 oracle is at most 2x (forward) /
3x (gradient) the error of the PyTorch reference run in the input dtype, plus an atol of a few
fp32 ulps of the output's scale: both compute in fp32 but sum in different orders, and the
reference can be exact by luck (e.g. a single token), which must not fail a correct kernel.
"""

from __future__ import annotations

import pytest
import torch
from fusion_checks import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_close_to_oracle,
    fp32_ulps_atol,
    nan_allocations,
)

from llm2vec_fast.kernels import masked_pool, pooling, reference

BLOCK = pooling.BLOCK_TOKENS
# empty first and last, 1, block-1, block+1, 113, and a sequence whose mask pools nothing
LENGTHS = [0, 1, BLOCK - 1, BLOCK + 1, 113, 7, 0]
NOTHING_POOLED = 5  # index in LENGTHS of the sequence with an all-False pool_mask


def _cu_seqlens(lengths, device="cpu"):
    return torch.tensor(
        [0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device
    )


def _pool_mask(lengths, generator, device="cpu"):
    mask = torch.rand(sum(lengths), generator=generator) < 0.6
    cu = _cu_seqlens(lengths)
    if len(lengths) > NOTHING_POOLED:
        mask[cu[NOTHING_POOLED] : cu[NOTHING_POOLED + 1]] = False
    return mask.to(device)


def _run(hidden, cu, pooling_mode, mask, normalize, grad_out):
    """Output and gradient of masked_pool on a fresh leaf copy of hidden."""
    leaf = hidden.detach().clone().requires_grad_()
    out = masked_pool(leaf, cu, pooling_mode, mask, normalize)
    (grad,) = torch.autograd.grad(out, leaf, grad_out.to(out.dtype))
    return out.detach(), grad


def _reference_run(hidden, cu, pooling_mode, mask, normalize, grad_out):
    leaf = hidden.detach().clone().requires_grad_()
    out = reference.masked_pool(leaf, cu, pooling_mode, mask, normalize)
    (grad,) = torch.autograd.grad(out, leaf, grad_out.to(out.dtype))
    return out.detach(), grad


def _check_against_oracle(hidden, cu, pooling_mode, mask, normalize, generator):
    batch = cu.numel() - 1
    grad_out = torch.randn(batch, hidden.shape[1], generator=generator, dtype=torch.float64).to(
        hidden.device
    )
    with nan_allocations():
        out, grad = _run(hidden, cu, pooling_mode, mask, normalize, grad_out)
    ref_out, ref_grad = _reference_run(hidden, cu, pooling_mode, mask, normalize, grad_out)
    oracle_out, oracle_grad = _reference_run(
        hidden.double(), cu, pooling_mode, mask, normalize, grad_out
    )

    assert out.dtype == hidden.dtype and out.shape == (batch, hidden.shape[1])
    assert_close_to_oracle(
        "out", out, ref_out, oracle_out, factor=FORWARD_FACTOR, atol=fp32_ulps_atol(oracle_out)
    )
    assert_close_to_oracle(
        "grad",
        grad,
        ref_grad,
        oracle_grad,
        factor=GRADIENT_FACTOR,
        atol=fp32_ulps_atol(oracle_grad),
    )
    return out, grad


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["all-tokens", "pool-mask"])
@pytest.mark.parametrize("pooling_mode", reference.POOLING_MODES)
@pytest.mark.parametrize(
    "dtype, width",
    [
        pytest.param(torch.float32, 200, id="fp32-H200"),
        pytest.param(torch.float16, 80, id="fp16-H80"),
    ],
)
def test_triton_matches_reference(monkeypatch, pooling_mode, with_mask, normalize, dtype, width):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    generator = torch.Generator().manual_seed(
        width + 10 * reference.POOLING_MODES.index(pooling_mode) + 2 * with_mask + normalize
    )
    cu = _cu_seqlens(LENGTHS)
    hidden = torch.randn(sum(LENGTHS), width, generator=generator).to(dtype)
    mask = _pool_mask(LENGTHS, generator) if with_mask else None
    out, grad = _check_against_oracle(hidden, cu, pooling_mode, mask, normalize, generator)

    empty = [i for i, n in enumerate(LENGTHS) if n == 0]
    assert (out[empty] == 0).all(), "an empty sequence must pool to zeros"
    if with_mask and pooling_mode in ("mean", "weighted_mean"):
        assert (out[NOTHING_POOLED] == 0).all(), "a sequence with nothing to pool must give zeros"
        start, end = cu[NOTHING_POOLED].item(), cu[NOTHING_POOLED + 1].item()
        assert (grad[start:end] == 0).all()


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean"])
def test_long_sequence(monkeypatch, pooling_mode):
    """1023 tokens: many token blocks, and weighted_mean ranks carried across them."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    generator = torch.Generator().manual_seed(3)
    lengths = [1023, 2]
    cu = _cu_seqlens(lengths)
    hidden = torch.randn(sum(lengths), 24, generator=generator)
    _check_against_oracle(
        hidden, cu, pooling_mode, _pool_mask(lengths, generator), False, generator
    )


def test_no_sequences(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    hidden = torch.randn(0, 16, requires_grad=True)
    out = masked_pool(hidden, torch.zeros(1, dtype=torch.int32), "mean")
    assert out.shape == (0, 16)
    out.sum().backward()
    assert hidden.grad.shape == (0, 16)


def test_eos_and_last_token_pick_the_last_token(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    hidden = torch.randn(10, 32)
    cu = _cu_seqlens([4, 6])
    for pooling_mode in ("eos_token", "last_token"):
        assert torch.equal(masked_pool(hidden, cu, pooling_mode), hidden[[3, 9]])
    assert torch.equal(masked_pool(hidden, cu, "bos_token"), hidden[[0, 4]])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(
            {"pooling_mode": "max"}, ValueError, "unknown pooling mode", id="pooling-mode"
        ),
        pytest.param({"hidden": torch.randn(10)}, ValueError, "2-D", id="hidden-1d"),
        pytest.param(
            {"hidden": torch.ones(10, 4, dtype=torch.int64)}, TypeError, "floating", id="hidden-int"
        ),
        pytest.param({"cu_seqlens": torch.tensor([0, 4, 10])}, TypeError, "int32", id="cu-int64"),
        pytest.param(
            {"cu_seqlens": torch.tensor([[0, 10]], dtype=torch.int32)},
            ValueError,
            "1-D",
            id="cu-2d",
        ),
        pytest.param(
            {"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int32)},
            ValueError,
            "end at T=10",
            id="cu-end",
        ),
        pytest.param(
            {"cu_seqlens": torch.tensor([1, 4, 10], dtype=torch.int32)},
            ValueError,
            "start at 0",
            id="cu-start",
        ),
        pytest.param(
            {"cu_seqlens": torch.tensor([0, 6, 4, 10], dtype=torch.int32)},
            ValueError,
            "decreas",
            id="cu-order",
        ),
        pytest.param(
            {"pool_mask": torch.ones(9, dtype=torch.bool)},
            ValueError,
            "pool_mask must have shape",
            id="mask-shape",
        ),
        pytest.param({"pool_mask": torch.ones(10)}, TypeError, "bool", id="mask-dtype"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_input_validation(monkeypatch, backend, kwargs, error, match):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", backend)
    args = {
        "hidden": torch.randn(10, 4),
        "cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32),
        "pooling_mode": "mean",
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        masked_pool(**args)


def test_triton_path_refuses_float64(monkeypatch):
    """The kernels compute in fp32: fp64 input would lose its precision without a word."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    with pytest.raises(TypeError, match="float16, bfloat16 and float32, got torch.float64"):
        masked_pool(
            torch.randn(10, 4, dtype=torch.float64),
            torch.tensor([0, 4, 10], dtype=torch.int32),
            "mean",
        )


# ---------------------------------------------------------------- GPU (pytest -m gpu)

GPU_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["all-tokens", "pool-mask"])
@pytest.mark.parametrize("pooling_mode", reference.POOLING_MODES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", [80, 200, 4096])
def test_gpu_matches_reference(pooling_mode, with_mask, normalize, dtype, width):
    generator = torch.Generator().manual_seed(11)
    lengths = LENGTHS + [1023, 2048, 3]
    cu = _cu_seqlens(lengths, "cuda")
    hidden = torch.randn(sum(lengths), width, generator=generator).to(dtype).cuda()
    mask = _pool_mask(lengths, generator, "cuda") if with_mask else None
    _check_against_oracle(hidden, cu, pooling_mode, mask, normalize, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("pooling_mode", ["weighted_mean", "last_token"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_large_batch(pooling_mode, dtype):
    generator = torch.Generator().manual_seed(12)
    lengths = torch.randint(0, 600, (256,), generator=generator).tolist()
    cu = _cu_seqlens(lengths, "cuda")
    hidden = torch.randn(sum(lengths), 2048, generator=generator).to(dtype).cuda()
    _check_against_oracle(
        hidden, cu, pooling_mode, _pool_mask(lengths, generator, "cuda"), True, generator
    )
