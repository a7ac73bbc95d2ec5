"""One model configuration for every supported decoder family, read from a HF ``config.json``.

Llama, Mistral, Qwen2 and Qwen3 share one architecture (RMSNorm, RoPE, GQA attention, SwiGLU
MLP); they differ in which projections carry a bias, Qwen3's per-head RMSNorm on q and k, and a
few defaults, all captured here. Gemma 3 (``gemma3_text``, or the ``text_config`` of a ``gemma3``
config) adds the fields of ``_gemma3_config``: scaled embeddings, (1 + w) RMSNorms, four norms per
layer, GeGLU, its own attention scale and a second RoPE for its sliding layers.

Sliding windows are read per layer as transformers reads them: every Mistral layer when
``sliding_window`` is set; the Qwen layers that ``layer_types`` marks ``sliding_attention``
(without it, layers ``i >= max_window_layers``), only with ``use_sliding_window``; the Gemma 3
layers of ``layer_types`` (without it, all but every ``sliding_window_pattern``-th). Causal passes
apply them; bidirectional encoding attends over the whole sequence, as LLM2Vec does, except on
Gemma 3's sliding layers (``ModelConfig.layer_window``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

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
GEMMA3_TEXT = "gemma3_text"
# transformers Gemma3TextConfig's defaults, for the keys a config may leave out (the text_config of
# a released gemma3 config.json sets only the few that differ)
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
_GEMMA3_SLIDING_PATTERN_DEFAULT = 6  # Gemma3TextConfig: every 6th layer is global
_GEMMA3_THETA_DEFAULTS = {FULL_ATTENTION: 1_000_000.0, SLIDING_ATTENTION: 10_000.0}
_GEMMA3_ACTIVATION = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE rescaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LinearRopeScaling:
    """Linear position interpolation: every inverse frequency divided by ``factor``."""

    factor: float


RopeScaling = LinearRopeScaling | Llama3RopeScaling


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
    rope_scaling: RopeScaling | None = None
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
    # Qwen3, Gemma 3: RMSNorm over head_dim on each head of q and k, before RoPE
    qk_norm: bool = False
    attention_dropout: float = 0.0
    # Gemma 3; the defaults are the other families'
    hidden_act: str = "silu"  # the MLP's gate: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    norm_unit_offset: bool = False  # every RMSNorm scales by (1 + weight), multiplied in fp32
    sandwich_norms: bool = False  # norms on the attention and MLP outputs, and one before the MLP
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), in the embedding dtype
    query_pre_attn_scalar: float | None = None  # softmax scale scalar ** -0.5; None: head_dim's
    # the RoPE of the sliding layers when it differs from the global layers' (rope_theta / scaling)
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None
    bidirectional_windows: bool = False  # bidirectional passes keep sliding layers' band

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
        if self.hidden_act not in ("silu", _GEMMA3_ACTIVATION):
            raise ValueError(
                f"unsupported MLP activation {self.hidden_act!r}; supported: silu,"
                f" {_GEMMA3_ACTIVATION}"
            )

    def layer_window(self, layer: int, *, causal: bool = True) -> int | None:
        """The window of layer ``layer`` in ``varlen_attention``'s terms (query i sees key j when
        ``|i - j| < window``); None: it attends over the whole sequence.

        Causal passes use ``sliding_window`` on the sliding layers (transformers' causal sliding
        mask). Bidirectional passes attend over the whole sequence unless ``bidirectional_windows``
        (Gemma 3): then a sliding layer sees ``|i - j| <= sliding_window // 2``, the band of
        transformers' Gemma 3 with ``use_bidirectional_attention``, which halves the window
        (``Gemma3TextConfig``: ``sliding_window // 2 + 1``) and keeps ``|i - j| <`` the result
        (``modeling_gemma3._bidirectional_window_overlay``). That band holds whether or not the
        config sets the flag: a bidirectional pass over any Gemma 3 checkpoint is transformers'
        with the flag set, the attention EmbeddingGemma was trained with from Gemma 3, in which
        a query sees about as many keys as in the causal window the model was pretrained with
        (full attention would show sliding layers distances they never saw). A causal pass uses
        the config's window, flag or not (transformers runs a flagged config bidirectionally
        only).
        """
        if self.layer_types and self.layer_types[layer] != SLIDING_ATTENTION:
            return None
        if causal or self.sliding_window is None:
            return self.sliding_window
        return self.sliding_window // 2 + 1 if self.bidirectional_windows else None

    def layer_has_local_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` rotates with the sliding layers' own RoPE (Gemma 3)."""
        if self.local_rope_theta is None:
            return False
        return not self.layer_types or self.layer_types[layer] == SLIDING_ATTENTION

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read the fields this runtime needs from a transformers config dict."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r};"
                f" supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type in (GEMMA3_TEXT, "gemma3"):
            return _gemma3_config(gemma3_text_dict(raw))
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

    def rope_inv_freq(self, *, local: bool = False) -> torch.Tensor:
        """RoPE inverse frequencies ``(head_dim / 2,)`` in fp32 (computed in fp64); ``local``: the
        sliding layers' own (``local_rope_theta``), for a config that has them."""
        if local:
            if self.local_rope_theta is None:
                raise ValueError(f"this {self.model_type} config has no local RoPE")
            return rope_inv_freq(self.head_dim, self.local_rope_theta, self.local_rope_scaling)
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)


def gemma3_text_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """The Gemma 3 text model's config dict with Gemma3TextConfig's defaults filled in: ``raw``
    itself for ``gemma3_text``, the ``text_config`` of a multimodal ``gemma3`` config (whose
    top-level ``tie_word_embeddings`` transformers follows)."""
    text = raw
    if raw.get("model_type") == "gemma3":
        text = raw.get("text_config") or {}
        if not isinstance(text, dict):
            raise ValueError("the gemma3 config's text_config is not a JSON object")
        if text.get("model_type", GEMMA3_TEXT) != GEMMA3_TEXT:
            raise ValueError(
                f"the gemma3 config's text_config has model_type {text.get('model_type')!r},"
                f" expected {GEMMA3_TEXT!r}"
            )
        text = {**text, "model_type": GEMMA3_TEXT}
        if "tie_word_embeddings" in raw:
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    filled = dict(_GEMMA3_TEXT_DEFAULTS)
    filled.update({key: value for key, value in text.items() if value is not None})
    # keys whose null means something: no window, no soft-capping
    for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
        if key in text:
            filled[key] = text[key]
    return filled


def _gemma3_config(raw: dict[str, Any]) -> ModelConfig:
    """A Gemma 3 text config (``gemma3_text_dict``) as transformers' ``Gemma3TextModel`` runs it.

    ``final_logit_softcapping`` only touches the LM head's logits, which encoding never computes
    (MNTP's loss over the LM head does not apply it either); attention logit soft-capping changes
    every layer and the attention kernels have none, so a config that sets it is refused.
    """
    if raw.get("attn_logit_softcapping") is not None:
        raise ValueError(
            f"attn_logit_softcapping={raw['attn_logit_softcapping']} is not supported: the"
            " attention kernels have no logit soft-capping (Gemma 3 checkpoints leave it null)"
        )
    activation = raw["hidden_activation"]
    if activation != _GEMMA3_ACTIVATION:
        raise ValueError(
            f"hidden_activation {activation!r} is not supported for {GEMMA3_TEXT}: the MLP is"
            f" GeGLU with {_GEMMA3_ACTIVATION}"
        )
    num_layers = int(raw["num_hidden_layers"])
    layer_types = raw.get("layer_types")
    if layer_types:
        layer_types = tuple(layer_types)
    else:
        pattern = int(raw.get("sliding_window_pattern") or _GEMMA3_SLIDING_PATTERN_DEFAULT)
        layer_types = tuple(
            FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION
            for i in range(num_layers)
        )
    window = raw.get("sliding_window")
    if SLIDING_ATTENTION in layer_types and not window:
        raise ValueError(
            "layer_types marks sliding_attention layers but the gemma3 config sets no"
            " sliding_window"
        )
    (theta, scaling), (local_theta, local_scaling) = _gemma3_rope(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        model_type=GEMMA3_TEXT,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        num_layers=num_layers,
        num_heads=int(raw["num_attention_heads"]),
        num_kv_heads=int(raw["num_key_value_heads"]),
        head_dim=int(raw["head_dim"]),
        intermediate_size=int(raw["intermediate_size"]),
        rms_norm_eps=float(raw["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw["tie_word_embeddings"]),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        max_position_embeddings=int(raw["max_position_embeddings"]),
        sliding_window=int(window) if SLIDING_ATTENTION in layer_types else None,
        layer_types=layer_types,
        qk_norm=True,
        attention_dropout=float(raw.get("attention_dropout") or 0.0),
        hidden_act=activation,
        norm_unit_offset=True,
        sandwich_norms=True,
        scale_embeddings=True,
        query_pre_attn_scalar=float(raw["query_pre_attn_scalar"]),
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        bidirectional_windows=True,
    )


def _gemma3_rope(
    raw: dict[str, Any],
) -> tuple[tuple[float, RopeScaling | None], tuple[float, RopeScaling | None]]:
    """(theta, scaling) of the global and of the sliding layers, as ``Gemma3TextConfig`` reads
    them: ``rope_parameters`` keyed by layer type, or the older ``rope_theta`` +
    ``rope_scaling`` (global layers) and ``rope_local_base_freq`` (sliding layers)."""
    parameters = raw.get("rope_parameters") or {}
    if parameters and not set(parameters) <= {FULL_ATTENTION, SLIDING_ATTENTION}:
        raise ValueError(
            f"a gemma3 config's rope_parameters must be keyed by layer type ({FULL_ATTENTION},"
            f" {SLIDING_ATTENTION}), got keys {sorted(parameters)}"
        )
    full = dict(parameters.get(FULL_ATTENTION) or {"rope_type": "default"})
    full.update(raw.get("rope_scaling") or {})  # transformers lets rope_scaling override
    full.setdefault("rope_theta", raw.get("rope_theta") or _GEMMA3_THETA_DEFAULTS[FULL_ATTENTION])
    sliding = dict(parameters.get(SLIDING_ATTENTION) or {"rope_type": "default"})
    sliding.setdefault(
        "rope_theta", raw.get("rope_local_base_freq") or _GEMMA3_THETA_DEFAULTS[SLIDING_ATTENTION]
    )
    return _rope_of(full, raw), _rope_of(sliding, raw)


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


def _read_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
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
    return _rope_of(dict(parameters or scaling), raw)


def _rope_of(params: dict[str, Any], raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling of one transformers rope parameter dict (``rope_type``,
    ``rope_theta``, the scaling's keys); ``raw``, the whole config, for the keys it may hold."""
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
    if rope_type == "linear":
        if params.get("factor") is None:
            raise ValueError("linear rope scaling is missing factor")
        return theta, LinearRopeScaling(factor=float(params["factor"]))
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


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, rescaled linearly or the Llama 3.1 way.

    Linear scaling divides every frequency by ``factor``. Llama 3.1 keeps high frequencies
    (wavelength below ``original / high_freq_factor``), divides low frequencies (wavelength above
    ``original / low_freq_factor``) by ``factor`` and blends the two linearly in between, in
    ``original / wavelength``.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (head_dim / 2,)
    if isinstance(scaling, LinearRopeScaling):
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None:
        context = scaling.original_max_position_embeddings
        wavelength = 2 * math.pi / inv_freq
        blend = (context / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blend = blend.clamp(0.0, 1.0)  # 1 keeps the frequency, 0 divides it by factor
        inv_freq = inv_freq * (blend + (1.0 - blend) / scaling.factor)
    return inv_freq.float()
