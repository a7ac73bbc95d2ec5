"""SwiGLU activation on the fused gate/up projection."""

from __future__ import annotations

from . import reference
from ._dispatch import use_triton


def swiglu(gate_up):
    """gate_up ``(T, 2I)`` -> ``silu(gate) * up`` ``(T, I)``."""
    if use_triton(gate_up):
        raise NotImplementedError("Triton swiglu is not written yet")
    return reference.swiglu(gate_up)
