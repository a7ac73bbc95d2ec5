"""Rotary position embedding on packed position ids."""

from __future__ import annotations

from . import reference
from ._dispatch import use_triton


def apply_rotary(q, k, position_ids, inv_freq, attention_scaling=1.0):
    """q ``(T, Hq, D)``, k ``(T, Hkv, D)``, position_ids ``(T,)`` -> rotated (q, k)."""
    if use_triton(q, k):
        raise NotImplementedError("Triton apply_rotary is not written yet")
    return reference.apply_rotary(q, k, position_ids, inv_freq, attention_scaling)
