"""Fused kernels of llm2vec-fast (installed as ``llm2vec_fast.kernels``).

Every function is differentiable and dispatches per call: CUDA tensors go to Triton, CPU tensors
to the plain-PyTorch ``reference`` (see ``_dispatch`` for ``LLM2VEC_FAST_BACKEND``).
"""

from ._dispatch import backend, describe, interpreting, use_triton
from .attention import varlen_attention
from .contrastive import contrastive_loss
from .mlp import swiglu
from .mntp_loss import mntp_loss
from .norm import rms_norm
from .pooling import masked_pool
from .reference import POOLING_MODES
from .rope import apply_rotary
from .varlen_checks import validate_cu_seqlens

__all__ = [
    "POOLING_MODES",
    "apply_rotary",
    "backend",
    "contrastive_loss",
    "describe",
    "interpreting",
    "masked_pool",
    "mntp_loss",
    "rms_norm",
    "swiglu",
    "use_triton",
    "validate_cu_seqlens",
    "varlen_attention",
]
