"""The decoder runtime over packed tokens: Llama / Mistral / Qwen2 as one module.

Every sequence of a batch is packed into one ``(T, hidden)`` stream described by ``cu_seqlens``;
no pad token is ever computed. Each op goes through ``llm2vec_fast.kernels``, so the same code
runs the Triton kernels on a GPU and the PyTorch reference on a CPU.

Parameter names follow transformers except for two fusions: ``qkv_proj`` holds q, k and v
(``qkv_split`` gives the row counts) and ``gate_up_proj`` holds gate and up (``gate_up_split``).

Dropout, for SimCSE (both off by default, both only active in train mode):
- attention dropout on the attention probabilities: where transformers applies
  ``config.attention_dropout`` in these models, the only dropout they have;
- hidden dropout on the output of each attention block and each MLP block just before it joins
  the residual stream (the residual-dropout position of GPT-2 and BERT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .config import ModelConfig
from .varlen import varlen_metadata


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(norm(x + residual), x + residual)``."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.qkv_split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_split), bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.dropout_p = 0.0

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        position_ids: torch.Tensor,
        inv_freq: torch.Tensor,
        causal: bool,
    ) -> torch.Tensor:
        total = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        q = q.view(total, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.view(total, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(total, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = kernels.apply_rotary(q, k, position_ids, inv_freq)
        out = kernels.varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0,
            check_cu_seqlens=False,  # DecoderModel.forward checked them once for all layers
        )  # (T, Hq, D)
        return self.o_proj(out.reshape(total, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_split = (config.intermediate_size, config.intermediate_size)
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.hidden_dropout_p = 0.0

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        position_ids: torch.Tensor,
        inv_freq: torch.Tensor,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns the residual stream split as ``(block output, residual)``; their sum
        is the hidden state, added inside the next norm."""
        normed, residual = self.input_layernorm(hidden, residual)
        attn = self.self_attn(normed, cu_seqlens, max_seqlen, position_ids, inv_freq, causal)
        attn = F.dropout(attn, self.hidden_dropout_p, self.training)
        normed, residual = self.post_attention_layernorm(attn, residual)
        out = F.dropout(self.mlp(normed), self.hidden_dropout_p, self.training)
        return out, residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers and final norm over packed tokens."""

    def __init__(self, config: ModelConfig, *, lm_head: bool = True) -> None:
        """``lm_head=False``: a bare decoder checkpoint (llm2vec's ``save()`` writes one), enough to
        encode; only MNTP training needs the output embedding."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if lm_head and not config.tie_word_embeddings
            else None
        )
        self.gradient_checkpointing = False
        # Kept out of the parameters and buffers so that casting the model to bf16 never rounds it.
        self._inv_freq = config.rope_inv_freq()
        self.set_dropout(attention=config.attention_dropout, hidden=0.0)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``(vocab, hidden)``: the output embedding (the input embedding when tied)."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if not self.config.tie_word_embeddings:
            raise ValueError(
                "this checkpoint has no lm_head.weight (a bare decoder, as llm2vec's save() writes):"
                " it encodes, but MNTP training needs the model's output embedding"
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

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations."""
        self.gradient_checkpointing = enabled

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The RoPE inverse frequencies ``(D // 2,)`` fp32 on ``device`` (moved there once)."""
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        position_ids: torch.Tensor | None = None,
        *,
        causal: bool = False,
    ) -> torch.Tensor:
        """input_ids ``(T,)``, cu_seqlens int32 ``(B + 1,)`` -> last hidden states ``(T, hidden)``
        after the final norm. Attention is bidirectional within each sequence unless ``causal``."""
        self.check_inputs(input_ids, cu_seqlens, max_seqlen, position_ids, causal)
        if position_ids is None:
            _, position_ids = varlen_metadata(
                cu_seqlens, input_ids.shape[0]
            )  # (T,) restarting at 0
        return self.forward_unchecked(
            input_ids, cu_seqlens, max_seqlen, position_ids, causal=causal
        )

    def forward_unchecked(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        position_ids: torch.Tensor,
        *,
        causal: bool = False,
    ) -> torch.Tensor:
        """``forward`` without reading cu_seqlens back to the host: for inputs already checked (on
        the host, by ``check_inputs``) and for CUDA graph capture, where a device sync is illegal."""
        inv_freq = self.inv_freq_on(input_ids.device)
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        residual = None
        for layer in self.layers:
            args = (hidden, residual, cu_seqlens, max_seqlen, position_ids, inv_freq, causal)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden, residual = layer(*args)
        normed, _ = self.norm(hidden, residual)
        return normed

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        position_ids: torch.Tensor | None,
        causal: bool,
    ) -> None:
        """Shapes, dtypes, token ids and cu_seqlens values, once per forward; the layers then skip the
        kernels' own checks."""
        if input_ids.ndim != 1 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be a 1-D integer tensor (T,), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D int32 tensor (B + 1,) with B >= 1, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        window = self.config.sliding_window
        if causal and window is not None and max_seqlen > window:
            raise ValueError(
                f"causal pass over {max_seqlen} tokens exceeds the model's sliding window ({window}), "
                "which this runtime does not apply"
            )
        values = [cu_seqlens.to(torch.int64)]
        if input_ids.numel():
            values.append(torch.stack(torch.aminmax(input_ids)).to(torch.int64))
        values = torch.cat(
            values
        ).tolist()  # one device sync per forward on a GPU, instead of one per layer
        bounds = values[: cu_seqlens.numel()]
        vocab = self.config.vocab_size
        outside = [token for token in values[cu_seqlens.numel() :] if not 0 <= token < vocab]
        if outside:
            raise ValueError(
                f"token id {outside[0]} is outside the model's vocabulary [0, {vocab}): does the"
                " tokenizer belong to this model?"
            )
        if bounds[0] != 0 or bounds[-1] != input_ids.shape[0]:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at T={input_ids.shape[0]}, got {bounds[0]}..{bounds[-1]}"
            )
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        if any(length < 0 for length in lengths):
            raise ValueError("cu_seqlens must be non-decreasing")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(
                f"max_seqlen={max_seqlen} is smaller than the longest sequence ({max(lengths)})"
            )
