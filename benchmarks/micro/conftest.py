"""Micro-benchmarks (pytest-benchmark), run apart from the test suite:

    pytest benchmarks/micro --benchmark-only

Kernel ops at small shapes: the Triton kernels on a GPU, the PyTorch reference on a CPU. The
default ``pytest`` run never collects them (``testpaths = ["tests"]`` in pyproject.toml).
"""

import os

import pytest
import torch

ROUNDS = int(os.environ.get("LLM2VEC_FAST_MICRO_ROUNDS", "20"))  # the CPU rehearsal sets 2


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    """bf16 on a GPU (what the encoder runs); fp32 on a CPU (the reference path's dtype)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


@pytest.fixture
def timed(benchmark, device):
    """``timed(fn)`` benchmarks ``fn()`` with the device synchronized after each call, after
    warm-up."""

    def run(fn):
        def call():
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        call()  # compile / warm caches outside the measurement
        return benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=min(2, ROUNDS))

    return run
