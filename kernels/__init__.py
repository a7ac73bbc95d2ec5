"""Fused kernels of llm2vec-fast (installed as ``llm2vec_fast.kernels``).

Every function is differentiable and dispatches per call: CUDA tensors go to Triton, CPU tensors
to the plain-PyTorch ``reference`` (see ``_dispatch`` for ``LLM2VEC_FAST_BACKEND``).
"""

from ._dispatch import backend, describe
from .attention import varlen_attention
from .contrastive import contrastive_loss
from .mlp import swiglu
from .mntp_loss import mntp_loss
from .norm import rms_norm
from .pooling import masked_pool
from .reference import POOLING_MODES
from .rope import apply_rotary

__all__ = [
    "POOLING_MODES",
    "apply_rotary",
    "backend",
    "contrastive_loss",
    "describe",
    "masked_pool",
    "mntp_loss",
    "rms_norm",
    "swiglu",
    "varlen_attention",
]
