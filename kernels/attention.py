"""Varlen attention over packed sequences (bidirectional or causal, GQA)."""

from __future__ import annotations

import torch

from . import reference
from ._dispatch import use_triton


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=False, softmax_scale=None, dropout_p=0.0):
    """q ``(T, Hq, D)``, k/v ``(T, Hkv, D)``, cu_seqlens int32 ``(B + 1,)`` -> ``(T, Hq, D)``."""
    if use_triton(q, k, v):
        raise NotImplementedError("Triton varlen_attention is not written yet")
    return reference.varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=softmax_scale, dropout_p=dropout_p
    )
