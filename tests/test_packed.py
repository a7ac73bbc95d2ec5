"""Packed batches: the C++ packer and the Python twin agree, the batches are right, and a Packed
is validated, padded and moved as it says."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llm2vec_fast._ext import extension_status
from llm2vec_fast.packed import (
    GraphShape,
    Packed,
    _pack_batches_python,
    pack_batches,
    plan_batches,
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


def sequences_of(lengths: list[int]) -> list[list[int]]:
    """Token lists of these lengths whose ids say which sequence they belong to."""
    return [[index] * length for index, length in enumerate(lengths)]


def packed_batches(
    lengths: list[int], max_batch_tokens: int, size_cap: int, sort: bool, *, extension: bool
) -> list[Packed]:
    """``pack_batches`` on sequences of these lengths, with the C++ packer or the Python twin."""
    with pytest.MonkeyPatch.context() as patch:
        if not extension:
            patch.setattr("llm2vec_fast.packed.extension_loaded", lambda: False)
        return list(
            pack_batches(
                sequences_of(lengths), max_batch_tokens, max_batch_size=size_cap or None, sort=sort
            )
        )


def check_plan(
    lengths: list[int], plans: list[Packed], max_batch_tokens: int, size_cap: int, sort: bool
):
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
        assert plan.input_ids.tolist() == [
            i for i in plan.indices.tolist() for _ in range(lengths[i])
        ]
        assert plan.num_tokens == sum(members)
        assert plan.max_seqlen == max(members)
        assert plan.batch_size == len(members) >= 1
        if len(members) > 1:
            assert plan.num_tokens <= max_batch_tokens
        if size_cap:
            assert len(members) <= size_cap
        if b + 1 < len(plans):  # greedy: the next batch's first sequence did not fit here
            first_next = lengths[int(plans[b + 1].indices[0])]
            too_many = size_cap and len(members) >= size_cap
            assert too_many or plan.num_tokens + first_next > max_batch_tokens


@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "input-order"])
@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_edge_cases_cpp_matches_python(case, sort):
    cpp_packer = require_extension()
    lengths, max_batch_tokens, size_cap = EDGE_CASES[case]
    lengths_tensor = torch.tensor(lengths, dtype=torch.int64)
    expected = _pack_batches_python(lengths_tensor, max_batch_tokens, size_cap, sort)
    flat_equal(cpp_packer(lengths_tensor, max_batch_tokens, size_cap, sort), expected)
    for extension in (True, False):
        batches = packed_batches(lengths, max_batch_tokens, size_cap, sort, extension=extension)
        check_plan(lengths, batches, max_batch_tokens, size_cap, sort)


@pytest.mark.parametrize("seed", range(6))
def test_random_lengths_cpp_matches_python(seed):
    cpp_packer = require_extension()
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 400, (1,), generator=generator))
    max_len = int(torch.randint(1, 300, (1,), generator=generator))
    lengths = torch.randint(0, max_len, (count,), generator=generator)
    max_batch_tokens = int(torch.randint(1, 1024, (1,), generator=generator))
    size_cap = int(torch.randint(0, 20, (1,), generator=generator))
    for sort in (True, False):
        expected = _pack_batches_python(lengths, max_batch_tokens, size_cap, sort)
        flat_equal(cpp_packer(lengths, max_batch_tokens, size_cap, sort), expected)
        for extension in (True, False):
            batches = packed_batches(
                lengths.tolist(), max_batch_tokens, size_cap, sort, extension=extension
            )
            check_plan(lengths.tolist(), batches, max_batch_tokens, size_cap, sort)


def test_known_plan():
    plans = list(pack_batches(sequences_of([3, 0, 5, 2, 7]), max_batch_tokens=8))
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
    plan = plan_batches(lengths, max_batch_tokens=5, max_batch_size=None)
    bounds = plan.batch_offsets.tolist()
    assert [plan.order[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])] == [[0], [2, 1]]


@pytest.mark.parametrize(
    "sequences",
    [
        [[5, 6, 7, 8], [9], [10, 11, 12]],
        [
            torch.tensor([5, 6, 7, 8], dtype=torch.int32),
            torch.tensor([9]),
            torch.tensor([10, 11, 12]),
        ],
        [np.array([5, 6, 7, 8]), np.array([9]), np.array([10, 11, 12])],
    ],
    ids=["lists", "tensors", "numpy"],
)
def test_pack_batches_accepts_token_sequences_as(sequences):
    masks = [[True, False, True, True], [False], [True, True, False]]
    batches = list(pack_batches(sequences, max_batch_tokens=5, pool_masks=masks))
    assert [p.indices.tolist() for p in batches] == [[0], [2, 1]]
    assert [p.input_ids.tolist() for p in batches] == [[5, 6, 7, 8], [10, 11, 12, 9]]
    assert batches[1].input_ids.dtype == torch.int64
    assert batches[1].pool_mask.tolist() == [True, True, False, False]


def test_plan_batches_without_extension_matches(monkeypatch):
    sequences = sequences_of([7, 0, 3, 3, 12, 1, 5])
    with_default = list(pack_batches(sequences, 8, max_batch_size=2))
    monkeypatch.setattr("llm2vec_fast.packed.extension_loaded", lambda: False)
    python_only = list(pack_batches(sequences, 8, max_batch_size=2))
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
    cpp_packer = require_extension()
    with pytest.raises(ValueError, match="lengths must be >= 0, got -1 at index 0"):
        cpp_packer(torch.tensor([-1, 2]), 4, 0, True)
    with pytest.raises(TypeError, match="lengths must be int64"):
        cpp_packer(torch.tensor([1, 2], dtype=torch.int32), 4, 0, True)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        cpp_packer(torch.tensor([1, 2]), 0, 0, True)


def test_both_packers_refuse_a_batch_past_int32_with_the_same_error():
    cpp_packer = require_extension()
    lengths = torch.tensor([2**30, 2**30, 5])  # the first two would share a batch of 2^31 tokens
    for packer in (cpp_packer, _pack_batches_python):
        with pytest.raises(
            ValueError, match="a batch of 2147483648 tokens does not fit the int32 cu_seqlens"
        ):
            packer(lengths, 2**32, 0, True)


def test_from_sequences_packs_one_batch_in_order():
    batch = Packed.from_sequences([[5, 6, 7], [], [8]])
    assert batch.input_ids.tolist() == [5, 6, 7, 8]
    assert batch.cu_seqlens.tolist() == [0, 3, 3, 4] and batch.cu_seqlens.dtype == torch.int32
    assert batch.position_ids.tolist() == [0, 1, 2, 0] and batch.max_seqlen == 3
    assert batch.pool_mask is None
    masked = Packed.from_sequences([[5, 6], [7]], [[False, True], [True]])
    assert masked.pool_mask.tolist() == [False, True, True]
    assert Packed.from_sequences([[], []]).cu_seqlens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="at least one sequence"):
        Packed.from_sequences([])


def test_packed_checks_its_layout_and_values():
    ids, positions = torch.tensor([3, 4, 5]), torch.arange(3)
    good = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        Packed(ids, torch.tensor([0, 3]), positions, 3)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        Packed(ids[:0], torch.zeros(1, dtype=torch.int32), positions[:0], 0)
    with pytest.raises(ValueError, match="input_ids must be a 1-D integer"):
        Packed(ids[None], good, positions, 3)
    with pytest.raises(ValueError, match="input_ids must be a 1-D integer"):
        Packed(ids.float(), good, positions, 3)
    with pytest.raises(ValueError, match="start at 0, got 1"):
        Packed(ids, torch.tensor([1, 3], dtype=torch.int32), positions, 3)
    with pytest.raises(ValueError, match="end at T=3"):
        Packed(ids, torch.tensor([0, 2], dtype=torch.int32), positions, 3)
    with pytest.raises(ValueError, match="non-decreasing, got 2 then 1"):
        Packed(ids, torch.tensor([0, 2, 1, 3], dtype=torch.int32), positions, 3)
    with pytest.raises(ValueError, match="max_seqlen=2 is smaller than the longest sequence"):
        Packed(ids, good, positions, 2)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        Packed(ids, good, positions, 3.0)
    with pytest.raises(ValueError, match="position_ids shape"):
        Packed(ids, good, torch.arange(4), 3)
    with pytest.raises(ValueError, match="pool_mask must be a bool tensor"):
        Packed(ids, good, positions, 3, pool_mask=torch.ones(3))
    with pytest.raises(ValueError, match="indices must have one entry per sequence"):
        Packed(ids, good, positions, 3, indices=torch.tensor([0, 1]))
    assert Packed(ids, good, positions, 3).batch_size == 1


def test_moved_batches_keep_their_values():
    batch = Packed.from_sequences([[5, 6, 7], [8]], [[True, False, True], [True]])
    moved = batch.to("cpu")
    for name in ("input_ids", "cu_seqlens", "position_ids", "pool_mask", "indices"):
        assert torch.equal(getattr(moved, name), getattr(batch, name)), name
    assert moved.max_seqlen == batch.max_seqlen


def test_copy_from_fills_a_batch_of_the_same_shape():
    target = Packed.from_sequences([[5, 6, 7], [8]], [[True, False, True], [True]])
    source = Packed.from_sequences([[9, 10], [11, 12]], [[False, True], [True, True]])
    target.copy_from(source)
    assert target.input_ids.tolist() == [9, 10, 11, 12]
    assert target.cu_seqlens.tolist() == [0, 2, 4]
    assert target.pool_mask.tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="does not match"):
        target.copy_from(Packed.from_sequences([[1, 2, 3]]))


def test_padding_without_a_pool_mask_pools_the_real_tokens_only():
    batch = Packed.from_sequences([[5, 6, 7], [8]])
    padded = batch.padded_to(GraphShape(tokens=64, slots=8, max_seqlen=16))
    assert padded.pool_mask.tolist() == [True] * 4 + [False] * 60
    assert padded.indices is None and padded.max_seqlen == 16
