"""Choose between the Triton kernels and the PyTorch reference for one call.

``LLM2VEC_FAST_BACKEND``: ``auto`` (default: Triton for CUDA tensors, reference otherwise),
``triton`` (always Triton; on a CPU this needs ``TRITON_INTERPRET=1`` set before Triton is
imported) or ``reference`` (always the PyTorch reference).
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "LLM2VEC_FAST_BACKEND"
BACKENDS = ("auto", "triton", "reference")


def backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def interpreting() -> bool:
    """True when Triton runs kernels as numpy on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors goes to Triton."""
    choice = backend()
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def describe() -> str:
    """One line for ``llm2vec-fast info``."""
    choice = backend()
    if choice == "auto":
        return "auto: Triton for CUDA tensors, PyTorch reference for CPU tensors"
    if choice == "triton":
        return "triton" + (" (interpreter on CPU)" if interpreting() else "")
    return "reference: PyTorch everywhere"
