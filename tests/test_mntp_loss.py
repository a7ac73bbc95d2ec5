"""mntp_loss: the fused LM head + cross-entropy (interpreter on CPU) against the PyTorch
reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from fusion_checks import (
    FORWARD_FACTOR,
    GRADIENT_FACTOR,
    assert_close_to_oracle,
    fresh_tensor_shapes,
    nan_allocations,
)

from llm2vec_fast.kernels import mntp_loss, reference

IGNORE = -100
# Two units in the last place of fp32 at the value's scale: the loss and gradients are sums over
# hundreds of terms whose rounding order differs from PyTorch's; in fp32 PyTorch's own error can
# be smaller than that by luck. Negligible for fp16/bf16, whose reference error is far larger.
ATOL_ULPS = 2 * 2.0**-23

# the package exports the function under the module's name, so fetch the module itself
mntp_module = importlib.import_module("llm2vec_fast.kernels.mntp_loss")


def make_labels(rows: int, vocab: int, ignored: str, device: str) -> torch.Tensor:
    labels = torch.randint(0, vocab, (rows,), device=device)
    if ignored == "some":
        labels[::3] = IGNORE
    elif ignored == "all":
        labels[:] = IGNORE
    return labels


def check_mntp(
    rows: int,
    vocab: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: str,
    *,
    with_bias: bool,
    trainable: bool,
    ignored: str = "none",
) -> None:
    torch.manual_seed(rows * 13 + vocab + hidden_size)
    hidden = torch.randn(rows, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.25).to(dtype)
    bias = torch.randn(vocab, device=device).to(dtype) if with_bias else None
    labels = make_labels(rows, vocab, ignored, device)
    grad_loss = 0.75

    def run(fn, cast):
        h = cast(hidden).requires_grad_(True)
        w = cast(weight).requires_grad_(trainable)
        b = cast(bias).requires_grad_(True) if with_bias else None
        loss = fn(h, w, labels, bias=b, ignore_index=IGNORE)
        (loss * grad_loss).backward()
        grads = [h.grad, w.grad, None if b is None else b.grad]
        return loss, grads

    with nan_allocations():
        kernel_loss, kernel_grads = run(mntp_loss, lambda t: t.clone())
    baseline_loss, baseline_grads = run(reference.mntp_loss, lambda t: t.clone())
    oracle_loss, oracle_grads = run(reference.mntp_loss, lambda t: t.double())

    assert kernel_loss.dtype == torch.float32
    atol = ATOL_ULPS * max(oracle_loss.abs().item(), 1.0)
    assert_close_to_oracle(
        "loss", kernel_loss, baseline_loss, oracle_loss, factor=FORWARD_FACTOR, atol=atol
    )
    if ignored == "all":
        assert kernel_loss.item() == 0.0
    if not trainable:
        assert kernel_grads[1] is None, "a frozen weight must not receive a gradient"
    names = ["grad_hidden", "grad_weight", "grad_bias"]
    for name, got, base, want in zip(names, kernel_grads, baseline_grads, oracle_grads):
        if want is None:
            assert got is None, f"{name} was produced but not expected"
            continue
        atol = ATOL_ULPS * want.abs().max().item()
        assert_close_to_oracle(name, got, base, want, factor=GRADIENT_FACTOR, atol=atol)
    if ignored != "none":
        ignored_rows = labels == IGNORE
        assert bool((kernel_grads[0][ignored_rows] == 0).all()), (
            "ignored rows must get a zero gradient"
        )


# (N, V, H, bias, trainable, ignored): row tiles are up to 128 rows (16 minimum), vocabulary tiles
# 128 columns, hidden tiles 64 (fp16) / 32 (fp32) columns.
CASES = [
    pytest.param(1, 1000, 64, False, True, "none", id="N1-V1000"),
    pytest.param(17, 1031, 48, True, True, "none", id="N17-V1031-H48-bias"),
    pytest.param(113, 1031, 64, True, False, "some", id="N113-V1031-bias-frozen-some-ignored"),
    pytest.param(113, 1000, 40, False, True, "some", id="N113-V1000-H40-some-ignored"),
    pytest.param(127, 127, 32, False, True, "none", id="N127-V127"),
    pytest.param(129, 129, 32, True, True, "none", id="N129-V129-bias"),
    pytest.param(17, 1000, 32, True, True, "all", id="N17-all-ignored"),
]


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("rows, vocab, hidden_size, with_bias, trainable, ignored", CASES)
def test_mntp_loss_matches_reference(
    monkeypatch, rows, vocab, hidden_size, with_bias, trainable, ignored, dtype
):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    check_mntp(
        rows,
        vocab,
        hidden_size,
        dtype,
        "cpu",
        with_bias=with_bias,
        trainable=trainable,
        ignored=ignored,
    )


# A block budget of 128 x 128 logits with 128-column vocab chunks: 420 rows with every third
# ignored keep 280, so the backward runs 3 row chunks (128 + 128 + 24) x 9 vocab chunks
# (8 x 128 + 7). One 128-column chunk of all 280 rows would be 2.2x the budget.
SMALL_PLAN = {"_GRAD_CHUNK_ELEMENTS": 128 * 128, "_MIN_VOCAB_CHUNK": 128}


def use_small_plan(monkeypatch) -> None:
    for name, value in SMALL_PLAN.items():
        monkeypatch.setattr(mntp_module, name, value)


@pytest.mark.parametrize(
    "rows, vocab",
    [
        pytest.param(1, 128256, id="N1-V128k"),
        pytest.param(8192, 128256, id="N8k-V128k"),
        pytest.param(16384, 128256, id="N16k-V128k-rows-whole"),
        pytest.param(16385, 128256, id="N16k+1-V128k-rows-split"),
        pytest.param(1 << 20, 128256, id="N1M-V128k"),
        pytest.param(3_000_000, 49152, id="N3M-V49k"),
        pytest.param(100_000, 1000, id="N100k-V1000"),
        pytest.param(5, 3, id="N5-V3"),
    ],
)
def test_backward_blocks_are_bounded_whatever_the_rows(rows, vocab):
    """The backward's logits-gradient block (the one temporary that grows with N and V) stays
    within the budget for any N (one 128-column chunk of a million rows exceeded it 2x), keeps
    all rows together while a block of them can still span _MIN_VOCAB_CHUNK columns, and its
    chunks tile the rows and the vocabulary."""
    budget = mntp_module._GRAD_CHUNK_ELEMENTS
    row_chunk, vocab_chunk = mntp_module.grad_chunk_plan(rows, vocab)
    assert 1 <= row_chunk <= rows and 1 <= vocab_chunk <= vocab
    assert row_chunk * vocab_chunk <= budget
    assert vocab_chunk == vocab or vocab_chunk % mntp_module._BLOCK_V == 0
    assert row_chunk == rows or row_chunk % mntp_module._ROW_ALIGN == 0
    if rows * min(vocab, mntp_module._MIN_VOCAB_CHUNK) <= budget:
        assert row_chunk == rows
    else:
        assert vocab_chunk == min(vocab, mntp_module._MIN_VOCAB_CHUNK)
        assert row_chunk * vocab_chunk > budget // 2, "rows split more than needed"


def test_small_plan_splits_rows_and_vocabulary(monkeypatch):
    use_small_plan(monkeypatch)
    assert mntp_module.grad_chunk_plan(280, 1031) == (128, 128)
    assert mntp_module.grad_chunk_plan(128, 1031) == (128, 128)  # all rows: no split needed
    assert mntp_module.grad_chunk_plan(40, 1031) == (40, 384)


@pytest.mark.parametrize(
    "trainable", [pytest.param(True, id="trainable"), pytest.param(False, id="frozen")]
)
def test_backward_in_row_and_vocabulary_chunks(monkeypatch, trainable):
    """Rows not a multiple of the row chunk, vocab not a multiple of the vocab chunk, ignored
    rows: fp32 accumulation of grad_hidden across vocab chunks and of grad_weight across row
    chunks, against the reference."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    use_small_plan(monkeypatch)
    check_mntp(
        420, 1031, 32, torch.float16, "cpu", with_bias=True, trainable=trainable, ignored="some"
    )


def test_backward_in_vocabulary_chunks_all_rows(monkeypatch):
    """40 rows take 384-column chunks (3 chunks of 1031 columns), no row split, fp32 inputs."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    use_small_plan(monkeypatch)
    check_mntp(40, 1031, 32, torch.float32, "cpu", with_bias=False, trainable=True)


def test_backward_temporaries_stay_within_the_block_budget(monkeypatch):
    """Every tensor the backward allocates holds at most the block budget or is a gradient-sized
    buffer; the (N, V) logits (2.3x the budget here) and one 128-column chunk of all rows (2.2x)
    never exist, and the planned blocks do."""
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    use_small_plan(monkeypatch)
    rows, vocab, hidden_size = 280, 135, 16  # 3 row chunks x 2 vocab chunks
    hidden = torch.randn(rows, hidden_size, dtype=torch.float16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float16, requires_grad=True)
    loss = mntp_loss(hidden, weight, torch.randint(0, vocab, (rows,)))
    with fresh_tensor_shapes() as recorder:
        loss.backward()
    gradient_sized = {(rows, hidden_size), (vocab, hidden_size)}
    budget = SMALL_PLAN["_GRAD_CHUNK_ELEMENTS"]
    assert rows * mntp_module._BLOCK_V > 2 * budget
    oversized = [
        shape
        for shape in recorder.shapes
        if shape not in gradient_sized and torch.Size(shape).numel() > budget
    ]
    assert not oversized, f"temporaries over the {budget}-element budget: {oversized}"
    assert (128, 128) in recorder.shapes and (24, 7) in recorder.shapes


@pytest.mark.parametrize(
    "trainable", [pytest.param(True, id="trainable"), pytest.param(False, id="frozen")]
)
def test_frozen_weight_allocates_no_weight_gradient(monkeypatch, trainable):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    rows, vocab, hidden_size = 20, 300, 32
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=trainable)
    loss = mntp_loss(hidden, weight, torch.randint(0, vocab, (rows,)))
    with fresh_tensor_shapes() as recorder:
        loss.backward()
    built_weight_sized = (vocab, hidden_size) in recorder.shapes
    assert built_weight_sized == trainable, (
        f"trainable={trainable} but (V, H) buffer built: {built_weight_sized}"
    )
    assert (weight.grad is not None) == trainable
    assert hidden.grad is not None


def test_ignore_index_is_configurable(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    hidden, weight = torch.randn(6, 32), torch.randn(200, 32)
    labels = torch.tensor([5, -1, 7, -1, 199, 0])
    got = mntp_loss(hidden, weight, labels, ignore_index=-1)
    torch.testing.assert_close(got, reference.mntp_loss(hidden, weight, labels, ignore_index=-1))


def test_label_outside_vocabulary_is_an_error(monkeypatch):
    monkeypatch.setenv("LLM2VEC_FAST_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"label 200 is outside the vocabulary \[0, 200\)"):
        mntp_loss(torch.randn(3, 32), torch.randn(200, 32), torch.tensor([1, 200, IGNORE]))


def _loss_inputs(
    hidden_shape=(3, 8), weight_shape=(10, 8), labels=None, bias=None, weight_dtype=torch.float32
):
    hidden = torch.randn(*hidden_shape)
    weight = torch.randn(*weight_shape).to(weight_dtype)
    labels = torch.zeros(hidden_shape[0], dtype=torch.long) if labels is None else labels
    return hidden, weight, labels, bias


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        pytest.param(_loss_inputs(hidden_shape=(3, 2, 8)), ValueError, "2-D", id="3d-hidden"),
        pytest.param(
            _loss_inputs(weight_shape=(10, 7)), ValueError, "weight must be", id="weight-width"
        ),
        pytest.param(
            _loss_inputs(weight_shape=(0, 8)), ValueError, "empty vocabulary", id="empty-vocab"
        ),
        pytest.param(
            _loss_inputs(labels=torch.zeros(4).long()),
            ValueError,
            "labels must have",
            id="labels-shape",
        ),
        pytest.param(_loss_inputs(labels=torch.zeros(3)), TypeError, "integer", id="float-labels"),
        pytest.param(
            _loss_inputs(weight_dtype=torch.float16), TypeError, "share one", id="dtype-mismatch"
        ),
        pytest.param(
            _loss_inputs(bias=torch.randn(9)), ValueError, "bias must have", id="bias-shape"
        ),
    ],
)
def test_input_validation(inputs, error, message):
    hidden, weight, labels, bias = inputs
    with pytest.raises(error, match=message):
        mntp_loss(hidden, weight, labels, bias=bias)


GPU_CASES = CASES + [
    pytest.param(4096, 49152, 576, False, False, "none", id="N4096-V49152-H576-frozen"),
    pytest.param(
        2049, 128256, 1024, True, True, "some", id="N2049-V128256-H1024-bias-some-ignored"
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("rows, vocab, hidden_size, with_bias, trainable, ignored", GPU_CASES)
def test_mntp_loss_matches_reference_gpu(
    rows, vocab, hidden_size, with_bias, trainable, ignored, dtype
):
    check_mntp(
        rows,
        vocab,
        hidden_size,
        dtype,
        "cuda",
        with_bias=with_bias,
        trainable=trainable,
        ignored=ignored,
    )


@pytest.mark.gpu
@pytest.mark.parametrize(
    "trainable", [pytest.param(True, id="trainable"), pytest.param(False, id="frozen")]
)
def test_backward_in_row_and_vocabulary_chunks_gpu(monkeypatch, trainable):
    """The row-chunked backward in bf16 on a GPU: a 1024 x 1024 block budget splits 2049 rows
    into 3 row chunks and a 32,000-word vocabulary into 32 chunks."""
    monkeypatch.setattr(mntp_module, "_GRAD_CHUNK_ELEMENTS", 1024 * 1024)
    monkeypatch.setattr(mntp_module, "_MIN_VOCAB_CHUNK", 1024)
    assert mntp_module.grad_chunk_plan(2049, 32000) == (1024, 1024)
    check_mntp(2049, 32000, 512, torch.bfloat16, "cuda", with_bias=True, trainable=trainable)
