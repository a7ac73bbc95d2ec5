"""Tiny random Gemma 3 text models (transformers' ``Gemma3ForCausalLM``) for the runtime tests.

Unlike ``model_helpers``' bidirectional oracle (an all-zero 4D mask: every token sees every
token), Gemma 3's bidirectional reference is transformers itself with
``use_bidirectional_attention=True``: full attention on the global layers and a symmetric band
on the sliding ones, built from the config's own masks, so the model is called without a mask.

fp64 oracle: ``Gemma3RMSNorm`` computes in fp32 whatever its input (``x.float()``), so an fp64
copy of the model would still round every norm to fp32; ``gemma3_hidden_states`` runs fp64
models with the norm in fp64 (the same formula, ``x * rsqrt(mean(x^2) + eps) * (1 + w)``).
"""

from __future__ import annotations

from unittest import mock

import torch
from model_helpers import VOCAB, randomize_
from transformers import AutoModelForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

SLIDING, FULL = "sliding_attention", "full_attention"
# GQA 2:1, head_dim 24 beside hidden 64 / 4 heads = 16, query_pre_attn_scalar unlike head_dim,
# a window of 8 (bidirectional: |i - j| <= 4) shorter than the test sequences, sliding layers
# around one global layer, and a global RoPE of its own (base and linear scaling).
TINY_GEMMA3 = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    query_pre_attn_scalar=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    sliding_window=8,
    layer_types=[SLIDING, FULL, SLIDING],
    rope_parameters={
        FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 50_000.0},
        SLIDING: {"rope_type": "default", "rope_theta": 100.0},
    },
)


def tiny_gemma3_config(**overrides) -> Gemma3TextConfig:
    values = dict(TINY_GEMMA3, attn_implementation="eager")
    values.update(overrides)
    return Gemma3TextConfig(**values)


def tiny_gemma3(seed: int = 0, **overrides):
    """A random transformers Gemma 3 causal LM, fp32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gemma3_config(**overrides))
    return randomize_(model, seed).eval()


def _norm_in_input_dtype(norm: Gemma3RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm._norm(x) * (1.0 + norm.weight)


def gemma3_norms_in_input_dtype():
    """While active, ``Gemma3RMSNorm`` computes in its input's dtype: fp64 stays fp64; fp32 is
    unchanged (transformers' fp32 upcast is then a no-op). Not for 16-bit runs."""
    return mock.patch.object(Gemma3RMSNorm, "forward", _norm_in_input_dtype)


def gemma3_hidden_states(text_model, ids: list[int]) -> torch.Tensor:
    """A transformers ``Gemma3TextModel``'s last hidden states ``(L, hidden)`` of one sequence,
    with the attention its config gives (causal, or bidirectional with
    ``use_bidirectional_attention``); fp64 models keep their norms in fp64."""
    param = next(text_model.parameters())
    input_ids = torch.tensor([ids], device=param.device)
    with torch.no_grad():
        if param.dtype != torch.float64:
            return text_model(input_ids=input_ids).last_hidden_state[0]
        with gemma3_norms_in_input_dtype():
            return text_model(input_ids=input_ids).last_hidden_state[0]
