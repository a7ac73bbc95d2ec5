"""The decoder runtime over packed tokens: Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 as one module.

Every sequence of a batch is packed into one ``(T, hidden)`` stream described by ``cu_seqlens``;
no pad token is ever computed. Each op goes through ``llm2vec_fast.kernels``, so the same code
runs the Triton kernels on a GPU and the PyTorch reference on a CPU.

Parameter names follow transformers except for two fusions: ``qkv_proj`` holds q, k and v
(``qkv_split`` gives the row counts) and ``gate_up_proj`` holds gate and up (``gate_up_split``).
Gemma 3's norms keep transformers' zero-centred weights (the kernel scales by ``1 + weight``) and
its four per-layer norms their transformers names: ``post_attention_layernorm`` there is the norm
on the attention output and ``pre_feedforward_layernorm`` the one before the MLP.

Dropout, for SimCSE (both off by default, both only active in train mode):
- attention dropout on the attention probabilities: where transformers applies
  ``config.attention_dropout`` in these models, the only dropout they have;
- hidden dropout on the output of each attention block and each MLP block just before it joins
  the residual stream (the residual-dropout position of GPT-2 and BERT).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import ModelConfig
from .packed import Packed


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False) -> None:
        """``unit_offset``: Gemma's form, scaled by ``1 + weight`` (the weight starts at 0)."""
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size)
        )
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(norm(x + residual), x + residual)``."""
        return kernels.rms_norm(x, self.weight, self.eps, residual, unit_offset=self.unit_offset)


def config_norm(config: ModelConfig, size: int) -> RMSNorm:
    """An RMSNorm over ``size`` features in the family's form."""
    return RMSNorm(size, config.rms_norm_eps, config.norm_unit_offset)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        """Layer ``layer``'s attention; its windows are ``config.layer_window``'s: causal passes
        use ``sliding_window``, bidirectional ones ``bidirectional_window`` (None: the whole
        sequence, as LLM2Vec attends; Gemma 3 keeps a band on its sliding layers)."""
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.layer_window(layer)
        self.bidirectional_window = config.layer_window(layer, causal=False)
        # Gemma 3: query_pre_attn_scalar ** -0.5; None: the kernel's head_dim ** -0.5
        self.softmax_scale = (
            config.query_pre_attn_scalar**-0.5 if config.query_pre_attn_scalar else None
        )
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.qkv_split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_split), bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = config_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = config_norm(config, config.head_dim) if config.qk_norm else None
        self.dropout_p = 0.0
        # None: the atomic-dQ backward where the card's tuning table measured it faster
        # (bitwise reproducible gradients otherwise); True/False force one (set_deterministic)
        self.deterministic = None

    def forward(
        self, x: torch.Tensor, packed: Packed, inv_freq: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        total = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        if self.q_norm is not None:
            # The per-head RMSNorm (Qwen3, Gemma 3) is the model's rms_norm kernel over
            # (T * H, D) rows, one row per head: its forward, backward and rounding already are
            # Qwen3RMSNorm's / Gemma3RMSNorm's, so no kernel of its own. A fusion with RoPE
            # would save one pass over q and k, small beside the projections.
            q = self.q_norm(q.reshape(total * self.num_heads, self.head_dim))[0]
            k = self.k_norm(k.reshape(total * self.num_kv_heads, self.head_dim))[0]
        q = q.view(total, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(total, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(total, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = kernels.apply_rotary(q, k, packed.position_ids, inv_freq)
        out = kernels.varlen_attention(
            q,
            k,
            v,
            packed.cu_seqlens,
            packed.max_seqlen,
            causal=causal,
            window=self.sliding_window if causal else self.bidirectional_window,
            softmax_scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            check_cu_seqlens=False,  # checked once for all layers, where the batch was built
            schedules=packed.attention_schedules,  # built by the first layer, read by the rest
            deterministic=self.deterministic,
        )  # (T, Hq, D)
        return self.o_proj(out.reshape(total, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gelu_tanh_gate = config.hidden_act == "gelu_pytorch_tanh"  # GeGLU (Gemma 3)
        self.gate_up_split = (config.intermediate_size, config.intermediate_size)
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        if not self.gelu_tanh_gate:
            return self.down_proj(kernels.swiglu(gate_up))
        # GeGLU stays two PyTorch ops, the ops and roundings of transformers' Gemma3MLP: on a GPU
        # one (T, I) intermediate more than a fused kernel would write, elementwise work small
        # beside the three projections around it; backward is autograd's.
        gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        """Llama's pre-norm layer; with ``config.sandwich_norms`` Gemma 3's, which also norms
        the attention output (``post_attention_layernorm``) and the MLP output
        (``post_feedforward_layernorm``) and norms the MLP input with
        ``pre_feedforward_layernorm``."""
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = config_norm(config, hidden)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = config_norm(config, hidden)
        sandwich = config.sandwich_norms
        self.pre_feedforward_layernorm = config_norm(config, hidden) if sandwich else None
        self.post_feedforward_layernorm = config_norm(config, hidden) if sandwich else None
        self.mlp = MLP(config)
        self.hidden_dropout_p = 0.0
        self.rope_row = 1 if config.layer_has_local_rope(layer) else 0  # of DecoderModel's RoPE

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        packed: Packed,
        inv_freq: torch.Tensor,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns the residual stream split as ``(block output, residual)``; their sum
        is the hidden state, added inside the next norm."""
        normed, residual = self.input_layernorm(hidden, residual)
        attn = self.self_attn(normed, packed, inv_freq, causal)
        if self.pre_feedforward_layernorm is None:
            mlp_norm = self.post_attention_layernorm
        else:
            attn = self.post_attention_layernorm(attn)[0]
            mlp_norm = self.pre_feedforward_layernorm
        attn = F.dropout(attn, self.hidden_dropout_p, self.training)
        normed, residual = mlp_norm(attn, residual)
        out = self.mlp(normed)
        if self.post_feedforward_layernorm is not None:
            out = self.post_feedforward_layernorm(out)[0]
        out = F.dropout(out, self.hidden_dropout_p, self.training)
        return out, residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and final norm over packed tokens."""

    def __init__(self, config: ModelConfig, *, lm_head: bool = True) -> None:
        """``lm_head=False``: a bare decoder checkpoint (llm2vec's ``save()`` writes one), enough to
        encode; only MNTP training needs the output embedding."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = config_norm(config, config.hidden_size)
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if lm_head and not config.tie_word_embeddings
            else None
        )
        self.gradient_checkpointing = False
        # (R, D / 2): row 0 the global RoPE, row 1 the sliding layers' own where the config has
        # one (DecoderLayer.rope_row). Kept out of the parameters and buffers so that casting the
        # model to bf16 never rounds it.
        ropes = [config.rope_inv_freq()]
        if config.local_rope_theta is not None:
            ropes.append(config.rope_inv_freq(local=True))
        self._inv_freq = torch.stack(ropes)
        self.set_dropout(attention=config.attention_dropout, hidden=0.0)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``(vocab, hidden)``: the output embedding (the input embedding when tied)."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if not self.config.tie_word_embeddings:
            raise ValueError(
                "this checkpoint has no lm_head.weight (a bare decoder, as llm2vec's save()"
                " writes): it encodes, but MNTP training needs the model's output embedding"
            )
        return self.embed_tokens.weight

    def set_dropout(self, *, attention: float, hidden: float) -> None:
        """Dropout probabilities used in train mode (see the module docstring for where)."""
        for name, p in (("attention", attention), ("hidden", hidden)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} dropout must be in [0, 1), got {p}")
        for layer in self.layers:
            layer.self_attn.dropout_p = attention
            layer.hidden_dropout_p = hidden

    def set_deterministic(self, enabled: bool | None = True) -> None:
        """Bitwise reproducible attention gradients (True), the atomic-dQ backward (False), or
        the faster of the two where the card's tuning table measured it (None, the default)."""
        for layer in self.layers:
            layer.self_attn.deterministic = enabled

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations."""
        self.gradient_checkpointing = enabled

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        """The RoPE inverse frequencies ``(R, D // 2)`` fp32, one row per RoPE of the model, on the
        device of the last forward."""
        return self._inv_freq

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The RoPE inverse frequencies ``(R, D // 2)`` fp32 on ``device`` (moved there once)."""
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def forward(self, packed: Packed, *, causal: bool = False) -> torch.Tensor:
        """A packed batch -> last hidden states ``(T, hidden)`` after the final norm. Attention is
        bidirectional within each sequence unless ``causal``. ``packed`` was validated when it
        was built; this adds the model's own rules (``check_inputs``)."""
        self.check_inputs(packed)
        return self.forward_unchecked(packed, causal=causal)

    def forward_unchecked(self, packed: Packed, *, causal: bool = False) -> torch.Tensor:
        """``forward`` without ``check_inputs``, which reads token ids back to the host: for a
        batch whose host copy was checked, and for CUDA graph capture, where a sync is illegal."""
        inv_freq = self.inv_freq_on(packed.device)  # (R, D / 2)
        hidden = self.embed_tokens(packed.input_ids)  # (T, hidden)
        if self.config.scale_embeddings:
            hidden = hidden * embedding_scale(self.config.hidden_size, hidden.dtype)
        residual = None
        for layer in self.layers:
            args = (hidden, residual, packed, inv_freq[layer.rope_row], causal)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden, residual = layer(*args)
        normed, _ = self.norm(hidden, residual)
        return normed

    def check_inputs(self, packed: Packed) -> None:
        """The model's rules for a packed batch (Packed checked its own layout): token ids
        inside the vocabulary. One device sync when the batch is on a GPU; none on the host."""
        if not packed.num_tokens:
            return
        lowest, highest = torch.stack(torch.aminmax(packed.input_ids)).tolist()
        vocab = self.config.vocab_size
        for token in (lowest, highest):
            if not 0 <= token < vocab:
                raise ValueError(
                    f"token id {token} is outside the model's vocabulary [0, {vocab}): does the"
                    " tokenizer belong to this model?"
                )


def embedding_scale(hidden_size: int, dtype: torch.dtype) -> float:
    """Gemma's embedding multiplier ``sqrt(hidden_size)`` rounded to fp32 and then to ``dtype``,
    as transformers' ``Gemma3TextScaledWordEmbedding`` casts it (55.4256 becomes 55.5 in bf16)."""
    return torch.tensor(math.sqrt(hidden_size), dtype=torch.float32).to(dtype).item()


def forward_and_pool(
    forward: Callable[..., torch.Tensor],
    packed: Packed,
    pooling_mode: str,
    *,
    causal: bool,
    normalize: bool = False,
) -> torch.Tensor:
    """One vector per sequence: ``forward(packed, causal=causal)`` (a ``DecoderModel``, its DDP
    wrapper or its ``forward_unchecked``), then each sequence pooled over ``packed.pool_mask``.
    Returns ``(B, hidden)``, L2-normalised when ``normalize``; cu_seqlens were validated where
    ``packed`` was built."""
    hidden = forward(packed, causal=causal)  # (T, hidden)
    return kernels.masked_pool(
        hidden, packed.cu_seqlens, pooling_mode, packed.pool_mask, normalize, check_cu_seqlens=False
    )  # (B, hidden)
