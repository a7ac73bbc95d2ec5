"""Weight files into the packed runtime: HF safetensors folders (single or sharded) and GGUF files.

Only safetensors and GGUF are read: never a pickle (``torch.load``) and never remote code.

Weights travel as a dict of transformers names with the ``model.`` prefix removed
(``layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), the canonical names;
``runtime_state_dict`` fuses q/k/v and gate/up into the runtime's projections. A multimodal Gemma 3
checkpoint (``gemma3``) gives its language model's weights under the same names; its vision tower
and projector are left out.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, gemma3_text_dict
from .files import read_json_object
from .model import DecoderModel
from .settings import CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE

PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
GGUF_MAGIC = b"GGUF"
# Buffers a checkpoint may hold that the runtime recomputes.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)
# Gemma3ForConditionalGeneration's key prefixes: the language model's as transformers >= 4.52 saves
# it, then as Google's checkpoints name it (``language_model.lm_head.weight`` included); the
# vision parts, both ways.
_GEMMA3_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_GEMMA3_VISION_PREFIXES = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "vision_tower.",
    "multi_modal_projector.",
)


@dataclass
class Checkpoint:
    """Weights (canonical names), the config dict, the files read and how to load the tokenizer."""

    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: list[Path] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    load_tokenizer: Callable[[], Any] | None = None


def is_gguf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def auto_tokenizer(folder: Path, **kwargs: Any) -> Any:
    """transformers' tokenizer of a local folder, never with remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)


def read_hf_folder(folder: Path, dtype: torch.dtype) -> Checkpoint:
    """A transformers folder: ``config.json``, safetensors weights and a tokenizer."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {CONFIG_FILE} in model folder {folder}")
    hf_config = read_json_object(config_path)
    ModelConfig.from_hf_dict(hf_config)  # unsupported architectures fail before any weight is read
    weight_files, index = safetensors_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for weight_file in weight_files:
        with open_safetensors(weight_file) as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key).to(dtype)
    if not has_tokenizer(folder):
        raise FileNotFoundError(
            f"no tokenizer in {folder} (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    return Checkpoint(
        hf_config=hf_config,
        tensors=canonical_tensors(tensors, hf_config),
        files=[config_path, *([index] if index else []), *weight_files],
        load_tokenizer=lambda: auto_tokenizer(folder),
    )


def safetensors_files(folder: Path) -> tuple[list[Path], Path | None]:
    """The weight files of a folder and the shard index (``None`` for a single file)."""
    single = folder / SAFETENSORS_FILE
    index = folder / SAFETENSORS_INDEX_FILE
    if single.is_file():
        return [single], None
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name} listed in {index} is missing")
        return shards, index
    pickles = [name for name in PICKLE_WEIGHT_FILES if (folder / name).is_file()]
    if pickles:
        raise ValueError(
            f"{folder} has only PyTorch pickle weights ({', '.join(pickles)}); they are never "
            "loaded (unpickling can run code). Convert them to safetensors first."
        )
    raise FileNotFoundError(
        f"missing {SAFETENSORS_FILE} (or {SAFETENSORS_INDEX_FILE}) in model folder {folder}"
    )


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` whose header errors name the file (a truncated download, a damaged disk)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise ValueError(
            f"{path}: not a readable safetensors file ({exc}); it may be truncated or damaged"
        ) from None
    with handle:
        yield handle


def read_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Dequantize a GGUF file through transformers' GGUF support (needs the ``gguf`` package)."""
    try:
        hf_model = load_gguf_as_transformers(path)
    except (ValueError, KeyError, IndexError, OSError, EOFError, struct.error) as exc:
        raise ValueError(
            f"{path}: cannot read this GGUF file ({type(exc).__name__}: {exc})"
        ) from exc
    hf_config = _plain_config_dict(hf_model.config)
    ModelConfig.from_hf_dict(hf_config)
    tensors = {key: value.to(dtype) for key, value in hf_model.state_dict().items()}
    return Checkpoint(
        hf_config=hf_config,
        tensors=canonical_tensors(tensors, hf_config),
        files=[path],
        load_tokenizer=lambda: auto_tokenizer(path.parent, gguf_file=path.name),
    )


def load_gguf_as_transformers(path: Path) -> Any:
    """The transformers causal-LM model of a GGUF file, dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # The weights are plain fp32 after dequantization: drop the GGUF quantizer so that
    # save_pretrained writes an ordinary model (it refuses to serialize a GGUF-"quantized" one).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model


def _plain_config_dict(config: Any) -> dict[str, Any]:
    raw = config.to_dict()
    raw.pop("quantization_config", None)
    return raw


def canonical_tensors(
    tensors: dict[str, torch.Tensor], hf_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Drop the ``model.`` prefix (a multimodal Gemma 3's language-model prefixes, and its vision
    weights), buffers that are recomputed, and a tied ``lm_head``."""
    multimodal_gemma3 = hf_config.get("model_type") == "gemma3"
    if hf_config.get("model_type") in ("gemma3", "gemma3_text"):
        tied = bool(gemma3_text_dict(hf_config)["tie_word_embeddings"])
    else:
        tied = bool(hf_config.get("tie_word_embeddings", False))
    canonical = {}
    for key, value in tensors.items():
        if key.endswith(RECOMPUTED_SUFFIXES):
            continue
        name = _gemma3_text_name(key) if multimodal_gemma3 else key.removeprefix("model.")
        if name is None or (tied and name == "lm_head.weight"):
            continue
        canonical[name] = value
    return canonical


def _gemma3_text_name(key: str) -> str | None:
    """The canonical name of a multimodal Gemma 3 checkpoint's key; None for a vision weight."""
    if key.startswith(_GEMMA3_VISION_PREFIXES):
        return None
    for prefix in _GEMMA3_TEXT_PREFIXES:
        if key.startswith(prefix):
            return key.removeprefix(prefix)
    return key.removeprefix("model.")


def runtime_state_dict(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map canonical transformers weights onto ``DecoderModel``'s, fusing q/k/v and gate/up.

    Raises with the names of missing, unexpected or wrongly shaped weights. An untied ``lm_head``
    may be missing (a bare decoder): encoding never uses it.
    """
    hidden, inner = config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    # runtime name -> [(transformers name, shape)], concatenated along rows when fused
    sources: dict[str, list[tuple[str, tuple[int, ...]]]] = {
        "embed_tokens.weight": [("embed_tokens.weight", (config.vocab_size, hidden))],
        "norm.weight": [("norm.weight", (hidden,))],
    }
    if not config.tie_word_embeddings and "lm_head.weight" in tensors:
        sources["lm_head.weight"] = [("lm_head.weight", (config.vocab_size, hidden))]

    def linear(target: str, parts: list[tuple[str, int]], fan_in: int, bias: bool) -> None:
        sources[f"{target}.weight"] = [(f"{name}.weight", (rows, fan_in)) for name, rows in parts]
        if bias:
            sources[f"{target}.bias"] = [(f"{name}.bias", (rows,)) for name, rows in parts]

    for i in range(config.num_layers):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            sources[f"layers.{i}.{norm}.weight"] = [(f"layers.{i}.{norm}.weight", (hidden,))]
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                sources[f"{attn}.{norm}.weight"] = [(f"{attn}.{norm}.weight", (config.head_dim,))]
        qkv = [(f"{attn}.q_proj", q_rows), (f"{attn}.k_proj", kv_rows), (f"{attn}.v_proj", kv_rows)]
        linear(f"{attn}.qkv_proj", qkv, hidden, config.qkv_bias)
        linear(f"{attn}.o_proj", [(f"{attn}.o_proj", hidden)], q_rows, config.o_bias)
        linear(
            f"{mlp}.gate_up_proj",
            [(f"{mlp}.gate_proj", inner), (f"{mlp}.up_proj", inner)],
            hidden,
            config.mlp_bias,
        )
        linear(f"{mlp}.down_proj", [(f"{mlp}.down_proj", hidden)], inner, config.mlp_bias)

    needed = [name for parts in sources.values() for name, _ in parts]
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} weight(s) the {config.model_type} config needs: "
            f"{few_names(missing)}"
        )
    unexpected = sorted(set(tensors) - set(needed))
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} weight(s) the {config.model_type} config does not "
            f"use: {few_names(unexpected)}"
        )
    wrong = [
        f"{name} {tuple(tensors[name].shape)} (config needs {shape})"
        for parts in sources.values()
        for name, shape in parts
        if tuple(tensors[name].shape) != shape
    ]
    if wrong:
        raise ValueError(f"weights do not fit the {config.model_type} config: {few_names(wrong)}")
    return {
        target: torch.cat([tensors[name] for name, _ in parts]) for target, parts in sources.items()
    }


def build_model(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DecoderModel:
    """A ``DecoderModel`` holding these transformers weights (canonical names), in eval mode."""
    state = runtime_state_dict(config, tensors)
    with torch.device("meta"):
        model = DecoderModel(config, lm_head="lm_head.weight" in state)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def few_names(names: list[str], shown: int = 6) -> str:
    """The first ``shown`` names, and how many more there are."""
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
