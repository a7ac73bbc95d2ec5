"""Fused LM head + cross-entropy for masked next-token prediction."""

from __future__ import annotations

from . import reference
from ._dispatch import use_triton


def mntp_loss(hidden, weight, labels, *, bias=None, ignore_index=-100):
    """hidden ``(N, H)``, weight ``(V, H)``, labels ``(N,)`` -> scalar mean cross-entropy."""
    if use_triton(hidden, weight):
        raise NotImplementedError("Triton mntp_loss is not written yet")
    return reference.mntp_loss(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
