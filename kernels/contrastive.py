"""In-batch contrastive (InfoNCE) loss."""

from __future__ import annotations

from . import reference
from ._dispatch import use_triton


def contrastive_loss(queries, docs, *, scale=20.0, symmetric=False, gather_across_ranks=False):
    """queries ``(B, D)``, docs ``(N, D)`` -> scalar loss."""
    if gather_across_ranks:
        raise NotImplementedError("gather_across_ranks is not written yet")
    if use_triton(queries, docs):
        raise NotImplementedError("Triton contrastive_loss is not written yet")
    return reference.contrastive_loss(queries, docs, scale=scale, symmetric=symmetric)
