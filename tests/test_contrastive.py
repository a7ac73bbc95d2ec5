"""contrastive_loss: the Triton kernels (interpreter on CPU) against the fp64 reference.

Tolerance (DESIGN.md): the kernel's max error against the fp64 oracle is at most 2x (loss) /
3x (gradients) the error of the PyTorch reference run in the input dtype, plus an atol of a few
fp32 ulps of the value's scale: the reference computes in fp32 too, in another order, and can
be exact by luck (e.g. one query), which must not fail a correct kernel.
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

from llm2vec_fast.kernels import contrastive, contrastive_loss, reference

TILE = contrastive.BLOCK_M
CORRELATION = 0.25  # positives = noise + 0.25 x query: losses 2-6, gradients 1e-5 to 1e-1


def _loss_and_grads(fn, queries, docs, **kwargs):
    q = queries.detach().clone().requires_grad_()
    d = docs.detach().clone().requires_grad_()
    loss = fn(q, d, **kwargs)
    grad_q, grad_d = torch.autograd.grad(loss, (q, d))
    return loss.detach(), grad_q, grad_d


def _check_against_oracle(queries, docs, scale, symmetric):
    """Loss and gradients of ``contrastive_loss`` checked against the oracle; returns them."""
    kwargs = {"scale": scale, "symmetric": symmetric}
    with nan_allocations():
        ours = _loss_and_grads(contrastive_loss, queries, docs, **kwargs)
    ref = _loss_and_grads(reference.contrastive_loss, queries, docs, **kwargs)
    oracle = _loss_and_grads(reference.contrastive_loss, queries.double(), docs.double(), **kwargs)

    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    assert ours[1].dtype == queries.dtype and ours[2].dtype == docs.dtype
    factors = (FORWARD_FACTOR, GRADIENT_FACTOR, GRADIENT_FACTOR)
    for name, value, ref_value, oracle_value, factor in zip(
        ("loss", "grad_q", "grad_d"), ours, ref, oracle, factors
    ):
        assert_close_to_oracle(
            name, value, ref_value, oracle_value, factor=factor, atol=fp32_ulps_atol(oracle_value)
        )
    return ours


CASES = [
    # (B, N, D, scale, symmetric)
    pytest.param(1, 1, 16, 20.0, False, id="one-query-one-doc"),
    pytest.param(1, 5, 16, 20.0, False, id="one-query"),
    pytest.param(1, 3 * TILE + 5, 16, 20.0, True, id="one-query-4-doc-tiles"),
    pytest.param(70, 70, 80, 20.0, False, id="no-negatives"),
    pytest.param(70, 150, 80, 20.0, False, id="hard-negatives-2-chunks"),
    pytest.param(70, 150, 80, 20.0, True, id="symmetric-2-chunks"),
    pytest.param(TILE, TILE + 1, 64, 1.0, True, id="tile-edges-scale1"),
    pytest.param(TILE - 1, 2 * TILE + 3, 48, 50.0, False, id="scale50"),
    pytest.param(5, 9, 200, 5.0, True, id="D200"),
]


@pytest.mark.parametrize("batch, n_docs, dim, scale, symmetric", CASES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
def test_triton_matches_reference(monkeypatch, dtype, batch, n_docs, dim, scale, symmetric):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    # backward chunks of round_up(D, BLOCK_N) docs, so N = 150 takes two chunks
    monkeypatch.setattr(contrastive, "MIN_GRAD_CHUNK_COLS", 1)
    generator = torch.Generator().manual_seed(batch * 1000 + n_docs)
    queries = torch.randn(batch, dim, generator=generator).to(dtype)
    # positives correlated with their queries, as in training, so the losses are not all log(N);
    # weakly, so that they are not ~0 either (gradients below the atol would test nothing)
    docs = torch.randn(n_docs, dim, generator=generator)
    docs[:batch] += CORRELATION * queries.float()
    _check_against_oracle(queries, docs.to(dtype), scale, symmetric)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
def test_a_zero_doc_leaves_every_other_gradient_finite_and_right(monkeypatch, dtype):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    _check_a_zero_doc(dtype, "cpu")


def _check_a_zero_doc(dtype: torch.dtype, device: str) -> None:
    """An empty sequence pools to zeros: its 1 / max(||d||, eps) = 1e12 must not overflow the
    16-bit operands of the backward (it did: inf * 0 = NaN in every query's gradient)."""
    generator = torch.Generator().manual_seed(9)
    queries = torch.randn(6, 32, generator=generator)
    docs = torch.randn(10, 32, generator=generator)
    docs[:6] += CORRELATION * queries
    docs[9] = 0.0  # a zero hard negative
    queries, docs = queries.to(device, dtype), docs.to(device, dtype)
    ours = _loss_and_grads(contrastive_loss, queries, docs)
    ref = _loss_and_grads(reference.contrastive_loss, queries, docs)
    oracle = _loss_and_grads(reference.contrastive_loss, queries.double(), docs.double())
    for name, index in (("loss", 0), ("grad_q", 1)):
        assert_close_to_oracle(
            name,
            ours[index],
            ref[index],
            oracle[index],
            factor=GRADIENT_FACTOR,
            atol=fp32_ulps_atol(oracle[index]),
        )
    assert_close_to_oracle(
        "grad_d",
        ours[2][:9],
        ref[2][:9],
        oracle[2][:9],
        factor=GRADIENT_FACTOR,
        atol=fp32_ulps_atol(oracle[2][:9]),
    )


@pytest.mark.parametrize(
    "row_blocks, col_tiles, programs, splits, tiles_per_split",
    [
        pytest.param(8, 8, 264, 8, 1, id="B512-N512-H100"),
        pytest.param(8, 16, 264, 16, 1, id="B512-N1024-H100"),
        pytest.param(128, 256, 264, 3, 86, id="B8192-N16384-H100"),
        pytest.param(1, 1, 264, 1, 1, id="B1-N1"),
        pytest.param(2, 3, 4, 2, 2, id="uneven-split"),
        pytest.param(300, 600, 264, 1, 600, id="grid-full-without-splits"),
        pytest.param(1, 5, 10**6, 5, 1, id="more-programs-than-tiles"),
    ],
)
def test_forward_splits(row_blocks, col_tiles, programs, splits, tiles_per_split):
    """The forward's grid fills the card (at B = 512 on 132 SMs: 8 x 16 programs, not 8) with
    no split empty and none past the doc tiles."""
    assert contrastive.forward_splits(row_blocks, col_tiles, programs) == (
        splits,
        tiles_per_split,
    )
    assert (splits - 1) * tiles_per_split < col_tiles <= splits * tiles_per_split


@pytest.mark.parametrize(
    "batch, n_docs, symmetric",
    [
        pytest.param(TILE + 7, 4 * TILE - 3, False, id="B71-N253"),
        pytest.param(TILE + 7, 2 * TILE + 9, True, id="B71-N137-symmetric"),
        pytest.param(1, 2 * TILE + 1, False, id="B1-N129"),
    ],
)
@pytest.mark.parametrize(
    "programs", [pytest.param(1, id="one-split"), pytest.param(10**6, id="one-tile-per-split")]
)
def test_forward_split_count_does_not_change_the_result(
    monkeypatch, programs, batch, n_docs, symmetric
):
    """One split (the whole row walks every doc tile) and a split per doc tile (a program count
    far past the doc tiles, clamped) match the oracle (the merged log-sum-exp is exact, the
    backward consumes it), and the default splits to within a few fp32 ulps of each value's
    scale (the merge's order of summation is all that differs)."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    generator = torch.Generator().manual_seed(batch + n_docs)
    queries = torch.randn(batch, 48, generator=generator)
    docs = torch.randn(n_docs, 48, generator=generator)
    docs[:batch] += CORRELATION * queries
    kwargs = {"scale": 20.0, "symmetric": symmetric}
    default = _loss_and_grads(contrastive_loss, queries, docs, **kwargs)
    monkeypatch.setattr(contrastive, "target_programs", lambda device: programs)
    split = _check_against_oracle(queries, docs, 20.0, symmetric)
    for a, b in zip(default, split):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=fp32_ulps_atol(b))


def test_chunking_does_not_change_the_result(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    generator = torch.Generator().manual_seed(5)
    queries, docs = (
        torch.randn(20, 32, generator=generator),
        torch.randn(200, 32, generator=generator),
    )
    one_chunk = _loss_and_grads(contrastive_loss, queries, docs)
    monkeypatch.setattr(contrastive, "MIN_GRAD_CHUNK_COLS", 1)
    assert contrastive.grad_chunk_cols(200, 32) == contrastive.BLOCK_N  # four chunks
    for a, b in zip(one_chunk, _loss_and_grads(contrastive_loss, queries, docs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "queries, docs, error, match",
    [
        pytest.param(
            torch.randn(4, 8), torch.randn(4, 9), ValueError, "same width", id="D-mismatch"
        ),
        pytest.param(
            torch.randn(4, 8), torch.randn(3, 8), ValueError, "at least one doc per query", id="N<B"
        ),
        pytest.param(torch.randn(4, 8, 1), torch.randn(4, 8), ValueError, "2-D", id="queries-3d"),
        pytest.param(torch.randn(4, 8), torch.randn(8), ValueError, "2-D", id="docs-1d"),
        pytest.param(
            torch.randn(0, 8), torch.randn(2, 8), ValueError, "at least one query", id="no-queries"
        ),
        pytest.param(
            torch.randn(4, 8),
            torch.randn(4, 8).half(),
            TypeError,
            "share a dtype",
            id="dtype-mismatch",
        ),
        pytest.param(
            torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8), TypeError, "floating", id="int"
        ),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_input_validation(monkeypatch, backend, queries, docs, error, match):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", backend)
    with pytest.raises(error, match=match):
        contrastive_loss(queries, docs)


# ---------------------------------------------------------------- GPU (pytest -m gpu)

GPU_CASES = CASES + [
    pytest.param(1000, 2000, 1024, 20.0, False, id="B1000-D1024"),
    pytest.param(515, 1030, 4096, 20.0, True, id="B515-D4096-symmetric"),
    pytest.param(3000, 6001, 768, 20.0, False, id="B3000-D768-3-chunks"),
    pytest.param(512, 1024, 1024, 20.0, True, id="B512-D1024-symmetric-split-forward"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch, n_docs, dim, scale, symmetric", GPU_CASES)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_gpu_matches_reference(dtype, batch, n_docs, dim, scale, symmetric):
    generator = torch.Generator().manual_seed(batch * 1000 + n_docs)
    queries = torch.randn(batch, dim, generator=generator)
    docs = torch.randn(n_docs, dim, generator=generator)
    docs[:batch] += CORRELATION * queries
    _check_against_oracle(queries.to(dtype).cuda(), docs.to(dtype).cuda(), scale, symmetric)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_gpu_a_zero_doc_leaves_every_other_gradient_finite_and_right(dtype):
    _check_a_zero_doc(dtype, "cuda")
