"""The batch packer: the C++ op and the Python twin agree, and the plans are right."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llm2vec_fast._ext import extension_status
from llm2vec_fast.batching import (
    BatchPlan,
    _pack_batches_python,
    plan_batches,
    split_flat_plan,
)


def require_extension():
    """The C++ op, unless the extension was deliberately left out (LLM2VEC_FAST_NO_EXTENSION=1)."""
    status = extension_status()
    if not status.loaded and os.environ.get("LLM2VEC_FAST_NO_EXTENSION") == "1":
        pytest.skip("extension disabled by LLM2VEC_FAST_NO_EXTENSION=1")
    assert status.loaded, f"llm2vec_fast._C is not loaded: {status.reason}"
    return torch.ops.llm2vec_fast.pack_batches


# (lengths, max_batch_tokens, max_batch_size with 0 = unlimited)
EDGE_CASES = {
    "empty": ([], 8, 0),
    "one": ([5], 8, 0),
    "zeros": ([0, 0, 0, 0], 8, 0),
    "zeros-size-cap": ([0, 0, 0, 0, 0], 1, 2),
    "all-longer-than-budget": ([9, 12, 10], 8, 0),
    "long-then-zeros": ([9, 0, 0, 3], 8, 0),
    "budget-1": ([1, 0, 1, 2, 1, 0], 1, 0),
    "ties": ([3, 5, 3, 5, 3, 5, 3], 8, 0),
    "exact-fit": ([4, 4, 4, 4], 8, 0),
    "size-cap-1": ([1, 2, 3], 100, 1),
    "size-cap-3": ([2] * 10, 100, 3),
}


def flat_equal(a, b) -> None:
    names = ("order", "batch_offsets", "cu_seqlens", "position_ids", "token_offsets")
    for name, x, y in zip(names, a, b):
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), f"{name}: {x} != {y}"


def check_plan(lengths: list[int], plans: list[BatchPlan], budget: int, size_cap: int, sort: bool):
    """Properties any correct plan has, checked from the lengths alone."""
    order = [int(i) for plan in plans for i in plan.indices]
    assert sorted(order) == list(range(len(lengths)))
    expected_order = list(range(len(lengths)))
    if sort:
        expected_order = sorted(expected_order, key=lambda i: -lengths[i])
    assert order == expected_order
    for b, plan in enumerate(plans):
        members = [lengths[i] for i in plan.indices.tolist()]
        assert plan.indices.dtype == torch.int64
        assert plan.cu_seqlens.dtype == torch.int32
        assert plan.position_ids.dtype == torch.int64
        assert plan.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(members)]).tolist()
        assert plan.position_ids.tolist() == [p for n in members for p in range(n)]
        assert plan.num_tokens == sum(members)
        assert plan.max_seqlen == max(members)
        assert plan.batch_size == len(members) >= 1
        if len(members) > 1:
            assert plan.num_tokens <= budget
        if size_cap:
            assert len(members) <= size_cap
        if b + 1 < len(plans):  # greedy: the next batch's first sequence did not fit here
            first_next = lengths[int(plans[b + 1].indices[0])]
            too_many = size_cap and len(members) >= size_cap
            assert too_many or plan.num_tokens + first_next > budget


@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "input-order"])
@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_edge_cases_cpp_matches_python(case, sort):
    pack_batches = require_extension()
    lengths, budget, size_cap = EDGE_CASES[case]
    lengths_tensor = torch.tensor(lengths, dtype=torch.int64)
    expected = _pack_batches_python(lengths_tensor, budget, size_cap, sort)
    flat_equal(pack_batches(lengths_tensor, budget, size_cap, sort), expected)
    check_plan(lengths, split_flat_plan(expected, lengths_tensor), budget, size_cap, sort)


@pytest.mark.parametrize("seed", range(6))
def test_random_lengths_cpp_matches_python(seed):
    pack_batches = require_extension()
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 400, (1,), generator=generator))
    max_len = int(torch.randint(1, 300, (1,), generator=generator))
    lengths = torch.randint(0, max_len, (count,), generator=generator)
    budget = int(torch.randint(1, 1024, (1,), generator=generator))
    size_cap = int(torch.randint(0, 20, (1,), generator=generator))
    for sort in (True, False):
        expected = _pack_batches_python(lengths, budget, size_cap, sort)
        flat_equal(pack_batches(lengths, budget, size_cap, sort), expected)
        check_plan(lengths.tolist(), split_flat_plan(expected, lengths), budget, size_cap, sort)


def test_known_plan():
    plans = plan_batches([3, 0, 5, 2, 7], max_batch_tokens=8)
    assert [p.indices.tolist() for p in plans] == [[4], [2, 0], [3, 1]]
    assert [p.cu_seqlens.tolist() for p in plans] == [[0, 7], [0, 5, 8], [0, 2, 2]]
    assert plans[1].position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert [(p.max_seqlen, p.num_tokens) for p in plans] == [(7, 7), (5, 8), (2, 2)]


@pytest.mark.parametrize(
    "lengths",
    [[4, 1, 3], torch.tensor([4, 1, 3], dtype=torch.int32), np.array([4, 1, 3])],
    ids=["list", "int32-tensor", "numpy"],
)
def test_plan_batches_accepts_lengths_as(lengths):
    plans = plan_batches(lengths, max_batch_tokens=5, max_batch_size=None)
    assert [p.indices.tolist() for p in plans] == [[0], [2, 1]]


def test_plan_batches_without_extension_matches(monkeypatch):
    lengths = [7, 0, 3, 3, 12, 1, 5]
    with_default = plan_batches(lengths, 8, max_batch_size=2)
    monkeypatch.setattr("llm2vec_fast.batching.extension_loaded", lambda: False)
    python_only = plan_batches(lengths, 8, max_batch_size=2)
    assert len(with_default) == len(python_only)
    for a, b in zip(with_default, python_only):
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.cu_seqlens, b.cu_seqlens)
        assert torch.equal(a.position_ids, b.position_ids)
        assert (a.max_seqlen, a.num_tokens) == (b.max_seqlen, b.num_tokens)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(lengths=[1, -2], max_batch_tokens=4),
            ValueError,
            "lengths must be >= 0, got -2 at index 1",
        ),
        (dict(lengths=[[1, 2]], max_batch_tokens=4), ValueError, "lengths must be 1-D"),
        (dict(lengths=[1.5], max_batch_tokens=4), TypeError, "lengths must be integers"),
        (dict(lengths=[1], max_batch_tokens=0), ValueError, "max_batch_tokens must be >= 1"),
        (dict(lengths=[1], max_batch_tokens=4, max_batch_size=0), ValueError, "None for no limit"),
    ],
    ids=["negative", "2-d", "float", "zero-budget", "zero-size"],
)
def test_bad_input_is_reported(kwargs, error, match):
    with pytest.raises(error, match=match):
        plan_batches(**kwargs)


def test_cpp_op_rejects_bad_input():
    pack_batches = require_extension()
    with pytest.raises(ValueError, match="lengths must be >= 0, got -1 at index 0"):
        pack_batches(torch.tensor([-1, 2]), 4, 0, True)
    with pytest.raises(TypeError, match="lengths must be int64"):
        pack_batches(torch.tensor([1, 2], dtype=torch.int32), 4, 0, True)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        pack_batches(torch.tensor([1, 2]), 0, 0, True)


def test_both_packers_refuse_a_batch_past_int32_with_the_same_error():
    pack_batches = require_extension()
    lengths = torch.tensor([2**30, 2**30, 5])  # the first two would share a batch of 2^31 tokens
    for packer in (pack_batches, _pack_batches_python):
        with pytest.raises(
            ValueError, match="a batch of 2147483648 tokens does not fit the int32 cu_seqlens"
        ):
            packer(lengths, 2**32, 0, True)
