"""varlen_metadata: the C++ CPU op, the CUDA op and the torch fallback agree with a plain loop."""

from __future__ import annotations

import os

import pytest
import torch

from llm2vec_fast._ext import extension_status
from llm2vec_fast.varlen import _varlen_metadata_torch, varlen_metadata


def expected_metadata(cu_seqlens: list[int], total: int) -> tuple[list[int], list[int]]:
    seq_index, positions = [-1] * total, [-1] * total
    for b in range(len(cu_seqlens) - 1):
        for t in range(cu_seqlens[b], min(cu_seqlens[b + 1], total)):
            seq_index[t], positions[t] = b, t - cu_seqlens[b]
    return seq_index, positions


def require_extension():
    status = extension_status()
    if not status.loaded and os.environ.get("LLM2VEC_FAST_NO_EXTENSION") == "1":
        pytest.skip("extension disabled by LLM2VEC_FAST_NO_EXTENSION=1")
    assert status.loaded, f"llm2vec_fast._C is not loaded: {status.reason}"
    return torch.ops.llm2vec_fast.varlen_metadata


def random_cu_seqlens(seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 60, (1,), generator=generator))
    lengths = torch.randint(0, 130, (count,), generator=generator)
    lengths[torch.rand(count, generator=generator) < 0.2] = 0  # empty sequences are legal
    return [0] + torch.cumsum(lengths, 0).tolist()


# (cu_seqlens, total): total past cu_seqlens[-1] gives padding tokens (-1)
CASES = {
    "no-sequences": ([0], 0),
    "no-sequences-padding": ([0], 3),
    "one": ([0, 5], 5),
    "empty-sequences": ([0, 0, 3, 3, 3, 4, 4], 4),
    "padding": ([0, 2, 5], 8),
    "truncated": ([0, 2, 5], 3),
    "ones": ([0, 1, 2, 3, 4], 4),
}
CASES.update(
    {f"random-{seed}": (cu, cu[-1] + seed) for seed in range(4) for cu in [random_cu_seqlens(seed)]}
)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cpu_op_and_fallback_match_loop(case):
    op = require_extension()
    cu_list, total = CASES[case]
    cu_seqlens = torch.tensor(cu_list, dtype=torch.int32)
    expected = expected_metadata(cu_list, total)
    for seq_index, positions in (op(cu_seqlens, total), _varlen_metadata_torch(cu_seqlens, total)):
        assert seq_index.dtype == positions.dtype == torch.int32
        assert seq_index.shape == positions.shape == (total,)
        assert (seq_index.tolist(), positions.tolist()) == expected


def test_public_function_without_extension(monkeypatch):
    monkeypatch.setattr("llm2vec_fast.varlen.extension_loaded", lambda: False)
    cu_list = random_cu_seqlens(7)
    seq_index, positions = varlen_metadata(torch.tensor(cu_list, dtype=torch.int32), cu_list[-1])
    assert (seq_index.tolist(), positions.tolist()) == expected_metadata(cu_list, cu_list[-1])


@pytest.mark.parametrize("use_extension", [True, False], ids=["cpp", "python"])
@pytest.mark.parametrize(
    "cu_seqlens, total, error, match",
    [
        (torch.tensor([0, 3], dtype=torch.int64), 3, TypeError, "must be int32"),
        (torch.tensor([[0, 3]], dtype=torch.int32), 3, ValueError, "must be 1-D"),
        (torch.tensor([], dtype=torch.int32), 0, ValueError, "at least one entry"),
        (torch.tensor([0, 3], dtype=torch.int32), -1, ValueError, r"total must be in \[0"),
        (torch.tensor([1, 3], dtype=torch.int32), 3, ValueError, "must start at 0, got 1"),
        (torch.tensor([0, 3, 2], dtype=torch.int32), 3, ValueError, "non-decreasing, got 3 then 2"),
    ],
    ids=["int64", "2-d", "empty", "negative-total", "not-from-0", "decreasing"],
)
def test_bad_input_is_reported(monkeypatch, use_extension, cu_seqlens, total, error, match):
    if use_extension:
        op = require_extension()
        with pytest.raises(RuntimeError, match=match):
            op(cu_seqlens, total)
    else:
        monkeypatch.setattr("llm2vec_fast.varlen.extension_loaded", lambda: False)
    with pytest.raises(error, match=match):
        varlen_metadata(cu_seqlens, total)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES) + ["large"], ids=list(CASES) + ["large"])
def test_cuda_op_matches_fallback(case):
    assert extension_status().has_cuda_ops, extension_status().reason
    if case == "large":
        lengths = torch.randint(0, 4097, (3000,), generator=torch.Generator().manual_seed(0))
        cu_list = [0] + torch.cumsum(lengths, 0).tolist()
        total = cu_list[-1] + 100
    else:
        cu_list, total = CASES[case]
    cu_seqlens = torch.tensor(cu_list, dtype=torch.int32, device="cuda")
    seq_index, positions = torch.ops.llm2vec_fast.varlen_metadata(cu_seqlens, total)
    assert seq_index.is_cuda and positions.is_cuda
    expected_index, expected_positions = _varlen_metadata_torch(cu_seqlens.cpu(), total)
    assert torch.equal(seq_index.cpu(), expected_index)
    assert torch.equal(positions.cpu(), expected_positions)
    public_index, public_positions = varlen_metadata(cu_seqlens, total)
    assert torch.equal(public_index.cpu(), expected_index)
    assert torch.equal(public_positions.cpu(), expected_positions)
