"""Masked pooling over packed sequences."""

from __future__ import annotations

from . import reference
from ._dispatch import use_triton


def masked_pool(hidden, cu_seqlens, mode, pool_mask=None, normalize=False):
    """hidden ``(T, H)`` -> ``(B, H)``; see ``reference.masked_pool`` for the modes."""
    if use_triton(hidden):
        raise NotImplementedError("Triton masked_pool is not written yet")
    return reference.masked_pool(hidden, cu_seqlens, mode, pool_mask, normalize)
