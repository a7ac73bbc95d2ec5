"""One model configuration for every supported decoder family, read from a HF ``config.json``.

Llama, Mistral, Qwen2 and Qwen3 share one architecture (RMSNorm, RoPE, GQA attention, SwiGLU
MLP); they differ in which projections carry a bias, Qwen3's per-head RMSNorm on q and k, and a
few defaults, all captured here.

Sliding windows are read per layer as transformers reads them: every Mistral layer when
``sliding_window`` is set; the Qwen layers that ``layer_types`` marks ``sliding_attention``
(without it, layers ``i >= max_window_layers``), only with ``use_sliding_window``. Causal passes
apply them; bidirectional encoding attends over the whole sequence, as LLM2Vec does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Defaults of the transformers config classes for keys a config.json may leave out.
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
_MISTRAL_WINDOW_DEFAULT = 4096  # transformers MistralConfig.sliding_window
_QWEN_MAX_WINDOW_LAYERS_DEFAULT = 28  # transformers Qwen2Config / Qwen3Config.max_window_layers
_QWEN3_HEAD_DIM_DEFAULT = 128  # transformers Qwen3Config.head_dim (not hidden / heads)
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE rescaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    # transformers' per-layer kinds (FULL_ATTENTION / SLIDING_ATTENTION); empty: every layer slides
    # when sliding_window is set
    layer_types: tuple[str, ...] = ()
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each head of q and k, before RoPE
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of"
                f" num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_layers}"
            )
        unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise ValueError(
                f"unsupported layer_types {sorted(unknown)}; supported: {FULL_ATTENTION},"
                f" {SLIDING_ATTENTION}"
            )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it attends over the whole sequence)."""
        if self.layer_types and self.layer_types[layer] != SLIDING_ATTENTION:
            return None
        return self.sliding_window

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read the fields this runtime needs from a transformers config dict."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r};"
                f" supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [key for key in _REQUIRED_KEYS if raw.get(key) is None]
        if missing:
            raise ValueError(f"{model_type} config is missing {', '.join(missing)}")
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(
                f"hidden_act {hidden_act!r} is not supported: the MLP is SwiGLU (silu)"
            )
        num_heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or (
            _QWEN3_HEAD_DIM_DEFAULT
            if model_type == "qwen3"
            else int(raw["hidden_size"]) // num_heads
        )
        rope_theta, rope_scaling = _read_rope(raw)

        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            attention_bias = bool(raw.get("attention_bias", False))
            qkv_bias, o_bias = attention_bias, attention_bias
            mlp_bias = bool(raw.get("mlp_bias", False)) and model_type != "qwen3"
        if model_type in ("qwen2", "qwen3"):
            window, layer_types = _qwen_sliding_layers(raw)
        elif model_type == "mistral":
            # transformers' default when the key is absent; an explicit null means no window
            window, layer_types = raw.get("sliding_window", _MISTRAL_WINDOW_DEFAULT), ()
        else:
            window, layer_types = None, ()

        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            max_position_embeddings=int(
                raw.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[model_type]
            ),
            sliding_window=int(window) if window else None,
            layer_types=layer_types,
            qk_norm=model_type == "qwen3",
            attention_dropout=float(raw.get("attention_dropout", 0.0)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` file (or the one inside a model folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies ``(head_dim / 2,)`` in fp32 (computed in fp64)."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)


def _qwen_sliding_layers(raw: dict[str, Any]) -> tuple[int | None, tuple[str, ...]]:
    """Qwen2 / Qwen3's window and layer kinds as transformers reads them: the window only with
    ``use_sliding_window``; the kinds from ``layer_types``, or sliding for the layers
    ``i >= max_window_layers`` (``Qwen2Config.__post_init__``). ``(None, ())`` when no layer
    slides."""
    num_layers = int(raw["num_hidden_layers"])
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    layer_types = raw.get("layer_types")
    if layer_types:
        layer_types = tuple(layer_types)
    else:
        first = int(raw.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS_DEFAULT))
        sliding = window is not None
        layer_types = tuple(
            SLIDING_ATTENTION if sliding and i >= first else FULL_ATTENTION
            for i in range(num_layers)
        )
    if SLIDING_ATTENTION not in layer_types:
        return None, ()
    if not window:
        raise ValueError(
            "layer_types marks sliding_attention layers but the config sets no sliding window"
            " (use_sliding_window is false or sliding_window is null); transformers cannot run"
            " this config either"
        )
    return window, layer_types


def _read_rope(raw: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE base and scaling from either the transformers 5 ``rope_parameters`` dict or the older
    top-level ``rope_theta`` + ``rope_scaling`` keys."""
    parameters, scaling = raw.get("rope_parameters") or {}, raw.get("rope_scaling") or {}
    scaling_keys = {
        ("rope_type" if key == "type" else key): value for key, value in scaling.items()
    }
    if parameters and any(parameters.get(key) != value for key, value in scaling_keys.items()):
        # a model card may say to add rope_scaling to a config saved with rope_parameters:
        # transformers then takes rope_scaling alone and drops rope_parameters' rope_theta
        raise ValueError(
            "the config has both rope_parameters and rope_scaling and they differ; keep one of them"
            f" (rope_parameters={parameters}, rope_scaling={scaling})"
        )
    params = dict(parameters or scaling)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"partial_rotary_factor={partial} is not supported (only full rotary embeddings)"
        )
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return theta, None
    values = dict(params)
    values.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    missing = [key for key in _LLAMA3_KEYS if values.get(key) is None]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {', '.join(missing)}")
    scaling = Llama3RopeScaling(
        factor=float(values["factor"]),
        low_freq_factor=float(values["low_freq_factor"]),
        high_freq_factor=float(values["high_freq_factor"]),
        original_max_position_embeddings=int(values["original_max_position_embeddings"]),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None
) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, rescaled the Llama 3.1 way if asked.

    Llama 3.1 keeps high frequencies (wavelength below ``original / high_freq_factor``), divides low
    frequencies (wavelength above ``original / low_freq_factor``) by ``factor`` and blends the two
    linearly in between, in ``original / wavelength``.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim / 2,)
    if scaling is not None:
        context = scaling.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        blend = (context / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blend = blend.clamp(0.0, 1.0)  # 1 keeps the frequency, 0 divides it by factor
        inv_freq = inv_freq * (blend + (1.0 - blend) / scaling.factor)
    return inv_freq.float()
