"""One micro-benchmark per kernel op, forward (and forward+backward where training uses it), on a
packed batch of mixed lengths with fresh random inputs (never zeros)."""

from __future__ import annotations

import pytest
import torch

from llm2vec_fast.kernels import (
    apply_rotary,
    contrastive_loss,
    masked_pool,
    mntp_loss,
    rms_norm,
    swiglu,
    varlen_attention,
)

LENGTHS = [1, 17, 64, 113, 200, 31]  # T = 426 tokens


def randn(*shape: int, device: str, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


@pytest.fixture
def cu_seqlens(device) -> torch.Tensor:
    return torch.tensor(
        [0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_varlen_attention_forward(timed, device, dtype, cu_seqlens, causal):
    q = randn(sum(LENGTHS), 8, 64, device=device, dtype=dtype)
    k, v = (randn(sum(LENGTHS), 2, 64, device=device, dtype=dtype) for _ in range(2))
    schedules = {}  # the work lists, built once per batch as the model's layers share them
    with torch.no_grad():
        timed(
            lambda: varlen_attention(
                q, k, v, cu_seqlens, max(LENGTHS), causal=causal, schedules=schedules
            )
        )


def test_varlen_attention_forward_backward(timed, device, dtype, cu_seqlens):
    q = randn(sum(LENGTHS), 8, 64, device=device, dtype=dtype, grad=True)
    k, v = (randn(sum(LENGTHS), 2, 64, device=device, dtype=dtype, grad=True) for _ in range(2))
    grad_out = randn(sum(LENGTHS), 8, 64, device=device, dtype=dtype)
    schedules = {}
    timed(
        lambda: torch.autograd.grad(
            varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), schedules=schedules),
            (q, k, v),
            grad_out,
        )
    )


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last_token"])
def test_masked_pool(timed, device, dtype, cu_seqlens, mode):
    hidden = randn(sum(LENGTHS), 512, device=device, dtype=dtype)
    with torch.no_grad():
        timed(lambda: masked_pool(hidden, cu_seqlens, mode, normalize=True))


def test_contrastive_loss_forward_backward(timed, device, dtype):
    queries = randn(256, 512, device=device, dtype=dtype, grad=True)
    docs = randn(512, 512, device=device, dtype=dtype, grad=True)
    timed(lambda: torch.autograd.grad(contrastive_loss(queries, docs), (queries, docs)))


def test_mntp_loss_forward_backward(timed, device, dtype):
    hidden = randn(128, 256, device=device, dtype=dtype, grad=True)
    weight = randn(4096, 256, device=device, dtype=dtype, grad=True)
    labels = torch.randint(0, 4096, (128,), device=device)
    labels[::5] = -100
    timed(lambda: torch.autograd.grad(mntp_loss(hidden, weight, labels), (hidden, weight)))


def test_rms_norm_with_residual(timed, device, dtype):
    x, residual = (randn(sum(LENGTHS), 576, device=device, dtype=dtype) for _ in range(2))
    weight = 1 + 0.1 * randn(576, device=device, dtype=dtype)
    with torch.no_grad():
        timed(lambda: rms_norm(x, weight, 1e-5, residual))


def test_apply_rotary(timed, device, dtype):
    q = randn(sum(LENGTHS), 8, 64, device=device, dtype=dtype)
    k = randn(sum(LENGTHS), 2, 64, device=device, dtype=dtype)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).to(device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, device=device, dtype=torch.float32) / 64)
    with torch.no_grad():
        timed(lambda: apply_rotary(q, k, positions, inv_freq))


def test_swiglu(timed, device, dtype):
    gate_up = randn(sum(LENGTHS), 2 * 1536, device=device, dtype=dtype)
    with torch.no_grad():
        timed(lambda: swiglu(gate_up))
