"""The varlen attention kernels' work list (``attention_schedule``) and the kernels run over it:
many short sequences packed into one tile, empty ones, one long one, more sequences than a
launch grid axis holds."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
from fusion_checks import FORWARD_FACTOR, assert_close_to_oracle
from test_attention import (  # noqa: F401 - triton_backend is a fixture
    check_against_reference,
    check_dropout_against_masked_reference,
    cu_seqlens_of,
    make_inputs,
    triton_backend,
)

from llm2vec_fast.kernels import attention, reference
from llm2vec_fast.kernels.attention import varlen_attention
from llm2vec_fast.kernels.attention_schedule import schedule_for, tile_schedule
from llm2vec_fast.packed import Packed

# every test here runs the Triton path (the interpreter on a CPU), outputs filled with NaN first
pytestmark = pytest.mark.usefixtures("triton_backend")


def real_items(lengths: list[int], tile: int, **options) -> list[tuple[int, int, int, int]]:
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    schedule = tile_schedule(cu_seqlens, sum(lengths), tile, **options)
    count = int(schedule.count)
    assert schedule.capacity >= count
    assert (schedule.items[count:, 1] == 0).all(), "spare items must be empty"
    expected_segments = [seq for seq, length in enumerate(lengths) for _ in range(length)]
    assert schedule.segments.tolist() == expected_segments
    return [tuple(item) for item in schedule.items[:count].tolist()]


LENGTH_MIXES = {
    "tiny-and-empty": [0, 1, 3, 0, 2, 0, 0, 5, 1] * 7,
    "tile-edges": [63, 64, 65, 1, 0, 127, 128, 129, 2],
    "one-long-among-short": [1, 2, 3, 500, 4, 0, 5, 6, 64, 1],
    "random": random.Random(0).choices(range(0, 200), k=60),
}


@pytest.mark.parametrize("lengths", LENGTH_MIXES.values(), ids=LENGTH_MIXES.keys())
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_items_cover_every_token_once_in_groups_of_whole_sequences(lengths, causal):
    tile = 64
    items = real_items(lengths, tile, causal=causal, window=None)
    starts = list(itertools.accumulate([0, *lengths]))
    sequence_bounds = set(starts)
    covered = []
    groups = {}
    for first, length, tile_start, packed in items:
        assert 0 <= tile_start < length and tile_start % tile == 0
        # a group begins and ends on sequence boundaries
        assert first in sequence_bounds and first + length in sequence_bounds
        groups.setdefault((first, length), set()).add(tile_start)
        inside = [n for s, n in zip(starts, lengths) if first <= s < first + length and n]
        if packed:  # several sequences in one tile
            assert length <= tile and len(inside) > 1
        else:  # one sequence (and maybe empty ones)
            assert len(inside) == 1
        covered.extend(range(first + tile_start, first + min(tile_start + tile, length)))
    assert sorted(covered) == list(range(sum(lengths))), "each token in exactly one tile"
    for (_, length), tile_starts in groups.items():
        assert tile_starts == set(range(0, length, tile)), "every tile of a group, once"
    for seq, length in enumerate(lengths):  # a long sequence is a group alone, not packed
        if length > tile:
            assert (starts[seq], length, 0, 0) in items
    # fewer tiles than one per non-empty sequence when sequences are short
    if all(n <= 5 for n in lengths):
        assert len(items) < sum(1 for n in lengths if n)


def test_a_sequence_across_a_window_end_joins_the_next_window_when_they_fit():
    """Tile 8: [0, 6) lies in window 0; [6, 10) runs into window 1, where [10, 12) lies: 6 and
    10 share a group (6 tokens); then [12, 19) runs into window 2, where [19, 24) leaves no
    room for it (12 tokens): alone."""
    items = real_items([6, 4, 2, 7, 5], 8, causal=False, window=None)
    assert sorted(items) == [(0, 6, 0, 0), (6, 6, 0, 1), (12, 7, 0, 0), (19, 5, 0, 0)]


def test_items_run_longest_first():
    lengths = [3, 300, 0, 2, 129, 7, 64]
    for causal in (False, True):
        items = real_items(lengths, 64, causal=causal, window=None)
        work = [min(start + 64, length) if causal else length for _, length, start, _ in items]
        assert work == sorted(work, reverse=True)
    key_items = real_items(lengths, 64, causal=True, window=None, key_tiles=True)
    assert [length - start for _, length, start, _ in key_items] == sorted(
        (length - start for _, length, start, _ in key_items), reverse=True
    )


def test_a_schedules_dict_builds_each_work_list_once():
    cu_seqlens = cu_seqlens_of([3, 4, 0, 9], "cpu")
    schedules = {}
    options = dict(causal=False, window=None, schedules=schedules)
    first = schedule_for(cu_seqlens, 16, 64, **options)
    assert schedule_for(cu_seqlens, 16, 64, **options) is first
    assert schedule_for(cu_seqlens, 16, 32, **options) is not first
    assert len(schedules) == 2
    assert schedule_for(cu_seqlens, 16, 64, causal=False, window=None) is not first


def test_packed_batches_keep_their_schedules_and_drop_them_when_refilled():
    """The model passes ``Packed.attention_schedules``: filled by the first layer, emptied when
    a CUDA graph's static batch is refilled, never shared by a copy on another device."""
    packed = Packed.from_sequences([[1, 2, 3], [4], []])
    hidden = torch.randn(packed.num_tokens, 2, 16)
    varlen_attention(
        hidden,
        hidden,
        hidden,
        packed.cu_seqlens,
        packed.max_seqlen,
        schedules=packed.attention_schedules,
    )
    assert len(packed.attention_schedules) == 1
    assert packed.to("cpu").attention_schedules == {}
    packed.copy_from(Packed.from_sequences([[5], [6, 7, 8], []]))
    assert packed.attention_schedules == {}


def test_attention_under_inference_mode():
    """The encoder builds its batches under torch.inference_mode (tensors without a version
    counter)."""
    lengths = [3, 0, 40, 1]
    with torch.inference_mode():
        cu_seqlens = cu_seqlens_of(lengths, "cpu")
        q, k, v, _ = make_inputs(lengths, 2, 1, 16, torch.float32, "cpu")
        out = varlen_attention(q, k, v, cu_seqlens, 40, schedules={})
    expected = reference.varlen_attention(q, k, v, cu_seqlens, 40)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_an_unchecked_cu_seqlens_not_ending_at_t_stays_in_bounds():
    """Unchecked input (``check_cu_seqlens=False``): tokens past a cu_seqlens that ends early
    get sequence index B and no tile, tokens before one that starts late get a segment no query
    has; one that ends past T is cut at T, never an item past it."""
    early = tile_schedule(cu_seqlens_of([2, 3], "cpu"), 7, 64, causal=False, window=None)
    assert early.segments.tolist() == [0, 0, 1, 1, 1, 2, 2]
    starting_late = torch.tensor([3, 5, 7], dtype=torch.int32)
    late_start = tile_schedule(starting_late, 7, 64, causal=False, window=None)
    assert late_start.segments.tolist() == [-1, -1, -1, 0, 0, 1, 1]
    late = tile_schedule(cu_seqlens_of([2, 30, 5], "cpu"), 7, 4, causal=False, window=None)
    for first, length, tile_start, _ in late.items[: int(late.count)].tolist():
        assert first + length <= 7 and tile_start < length


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_thousands_of_tiny_sequences_with_empty_ones_and_a_long_one(causal):
    """Forward and backward against the reference on one batch of 1,500 sequences of 0 to 6
    tokens (a quarter empty) around one of 300."""
    pick = random.Random(1)
    lengths = [pick.choice([0, 0, 1, 2, 3, 4, 5, 6]) for _ in range(1500)]
    lengths.insert(1234, 300)
    check_against_reference(lengths, 2, 1, 16, torch.float32, "cpu", causal=causal)


def test_sliding_window_over_packed_tiles():
    lengths = [5, 0, 17, 9, 30, 1, 90, 12, 40]
    for causal in (False, True):
        check_against_reference(lengths, 3, 1, 32, torch.float16, "cpu", causal=causal, window=7)


def test_atomic_dq_over_packed_tiles():
    lengths = [3, 0, 7, 1, 20, 11, 2, 100, 6]
    check_against_reference(
        lengths, 4, 2, 32, torch.float32, "cpu", causal=False, deterministic=False
    )


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-pass", "atomic-dq"])
def test_dropout_over_packed_tiles(deterministic):
    """Dropout over packed tiles and sequences starting anywhere (the forward and dQ kernels read
    from the group's start rounded down to a multiple of 4), against the reference with the
    kernels' mask, forward and backward. In fp16: in fp32 a one-token sequence's dQ (exactly 0)
    comes out near 2e-6 from the cancellation in ``p * (dp - delta)`` once dropout rescales, past
    a bound set by the reference's own fp32 error, which is 0 there."""
    pick = random.Random(2)
    lengths = [pick.choice([0, 1, 2, 3, 5, 7, 11]) for _ in range(60)]
    lengths[20:20] = [90, 3, 64]
    for causal, window in ((False, None), (True, None), (False, 9)):
        check_dropout_against_masked_reference(
            lengths,
            2,
            1,
            16,
            torch.float16,
            "cpu",
            causal=causal,
            window=window,
            dropout_p=0.3,
            seed=5,
            deterministic=deterministic,
        )


def test_more_sequences_than_a_grid_axis_holds():
    """70,000 sequences (the old grid's third axis held 65,535): one-token ones, whose output is
    their own value row, empty ones, and a few longer ones checked against the reference."""
    lengths = [1, 0, 1, 1] * 17_500
    longer = {10: 37, 30_000: 70, 69_999: 5}
    for index, length in longer.items():
        lengths[index] = length
    cu_seqlens = cu_seqlens_of(lengths, "cpu")
    q, k, v, _ = make_inputs(lengths, 1, 1, 16, torch.float32, "cpu")
    out = varlen_attention(q, k, v, cu_seqlens, max(lengths))
    starts = cu_seqlens[:-1].tolist()
    singles = torch.tensor([start for start, n in zip(starts, lengths) if n == 1])
    torch.testing.assert_close(out[singles], v[singles], rtol=0, atol=1e-6)
    for index, length in longer.items():
        rows = slice(starts[index], starts[index] + length)
        expected = reference.varlen_attention(
            q[rows], k[rows], v[rows], cu_seqlens_of([length], "cpu"), length
        )
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)


def test_programs_past_the_real_items_write_nothing(monkeypatch):
    """On a GPU the grid covers the schedule's capacity (the real count lives on the device);
    the interpreter launches the real items only. Here the capacity, as on a GPU."""
    monkeypatch.setattr(attention, "_grid", lambda schedule, heads: (schedule.capacity * heads,))
    check_against_reference(
        [5, 0, 70, 1, 33, 2, 2, 130], 4, 2, 32, torch.float32, "cpu", causal=True
    )


# ---------------------------------------------------------------------------------------------
# GPU (pytest -m gpu): the GPU tiles (64 to 128 rows), bf16 and fp16, the capacity-wide grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-pass", "atomic-dq"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gpu_thousands_of_short_sequences_around_long_ones(causal, deterministic):
    """1,500 sequences of 0 to 40 tokens (several per 128-row tile) with a 1,000- and a
    3,000-token one, bf16, GQA 4:1 at head dim 128, forward and backward against the reference
    (which walks the sequences one by one: kept to 1,500)."""
    pick = random.Random(3)
    lengths = [pick.choice([0, 1, 2, 5, 9, 17, 20, 33, 40]) for _ in range(1500)]
    lengths[100], lengths[900] = 1000, 3000
    check_against_reference(
        lengths, 8, 2, 128, torch.bfloat16, "cuda", causal=causal, deterministic=deterministic
    )


@pytest.mark.gpu
def test_gpu_more_sequences_than_a_grid_axis_holds():
    """80,000 sequences in one call, forward: one-token ones give their own value row; the
    700-token one matches the reference."""
    lengths = [1, 0, 1, 1] * 20_000
    lengths[5] = 700
    cu_seqlens = cu_seqlens_of(lengths, "cuda")
    q, k, v, _ = make_inputs(lengths, 4, 1, 64, torch.bfloat16, "cuda")
    out = varlen_attention(q, k, v, cu_seqlens, 700)
    starts = cu_seqlens[:-1].tolist()
    singles = torch.tensor([start for start, n in zip(starts, lengths) if n == 1], device="cuda")
    torch.testing.assert_close(out[singles], v[singles].expand(-1, 4, -1), rtol=0, atol=0)
    rows = slice(starts[5], starts[5] + 700)
    one = cu_seqlens_of([700], "cuda")
    exact = reference.varlen_attention(
        q[rows].double(), k[rows].double(), v[rows].double(), one, 700
    )
    in_dtype = reference.varlen_attention(q[rows], k[rows], v[rows], one, 700)
    assert_close_to_oracle(
        "700-token sequence",
        out[rows],
        in_dtype,
        exact,
        factor=FORWARD_FACTOR,
        atol=torch.finfo(torch.bfloat16).eps,
    )


def test_short_texts_take_fewer_tile_steps_than_one_tile_per_sequence():
    """The short-text mix of bench_attention.py (log-normal around 28 tokens, 16k tokens),
    128-row tiles and 64-key blocks: the groups run 1.35x fewer (tile x key block) steps than one
    tile per sequence (FlashAttention's varlen layout), and within 5% of a sequential next-fit
    packing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from workloads import lengths_for_tokens

    tile, keys = 128, 64
    lengths = lengths_for_tokens(16384, median=28, max_tokens=512, seed=2)
    ours = sum(
        -(-length // keys)
        for _, length, _, _ in real_items(lengths, tile, causal=False, window=None)
    )
    per_sequence = sum(-(-n // tile) * -(-n // keys) for n in lengths)
    next_fit, room = [], 0
    for n in lengths:  # group lengths of a sequential next-fit (long sequences alone)
        if n > tile or not next_fit or room + n > tile:
            next_fit.append(0)
            room = 0 if n <= tile else tile
        next_fit[-1] += n
        room += n
    packed = sum(-(-n // tile) * -(-n // keys) for n in next_fit)
    assert per_sequence / ours >= 1.35, (per_sequence, ours)
    assert ours <= 1.05 * packed, (ours, packed)
