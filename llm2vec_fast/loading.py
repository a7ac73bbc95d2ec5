"""Load weights into the packed runtime: HF safetensors folders, GGUF files, PEFT LoRA adapters.

Only safetensors and GGUF are read: never a pickle (``torch.load``) and never remote code.

Weights travel as a dict of transformers names with the ``model.`` prefix removed
(``layers.0.self_attn.q_proj.weight``, ``lm_head.weight``); LoRA adapters are merged into that dict,
then ``runtime_state_dict`` fuses q/k/v and gate/up into the runtime's projections.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .files import read_json_object
from .model import DecoderModel
from .settings import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
)

PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
GGUF_MAGIC = b"GGUF"

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# Adapter options that change what merging means; each must hold its neutral value.
_UNSUPPORTED_ADAPTER_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "use_dora": bool,
    "lora_bias": bool,
    "use_qalora": bool,
    "bias": lambda value: value not in (None, "none"),
    "modules_to_save": bool,
    "layer_replication": bool,
    "target_parameters": bool,
    "trainable_token_indices": bool,
    "alora_invocation_tokens": bool,
    "alpha_pattern": bool,
}


@dataclass(frozen=True)
class LoadedFrom:
    """What a model was built from: recorded on the model as ``model.loaded_from``."""

    source: Path
    config: ModelConfig
    hf_config: dict[str, Any]
    files: tuple[Path, ...]
    adapters: tuple[Path, ...] = ()


@dataclass
class Checkpoint:
    """Weights (transformers names without ``model.``), the config dict and the files read."""

    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    files: list[Path] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    load_tokenizer: Callable[[], Any] | None = None


def load_model(
    path: str | Path,
    *,
    adapters: Iterable[str | Path] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[DecoderModel, Any]:
    """Build a ``DecoderModel`` and its tokenizer from a folder, a GGUF file or a LoRA adapter.

    ``path``: a transformers folder (``config.json`` + ``model.safetensors`` or a sharded index),
    a ``.gguf`` file (dequantized), or a PEFT LoRA folder whose ``base_model_name_or_path`` is
    loaded and merged. ``adapters`` are further LoRA folders merged in order on top. The resolved
    config and every file read are recorded in ``model.loaded_from``.
    """
    checkpoint = read_checkpoint(Path(path), dtype)
    for adapter in adapters:
        merge_lora_adapter(checkpoint, Path(adapter))
    config = ModelConfig.from_hf_dict(checkpoint.hf_config)
    model = build_model(config, checkpoint.tensors, dtype=dtype, device=device)
    model.loaded_from = LoadedFrom(
        source=Path(path).resolve(),
        config=config,
        hf_config=checkpoint.hf_config,
        files=tuple(checkpoint.files),
        adapters=tuple(checkpoint.adapters),
    )
    return model, checkpoint.load_tokenizer()


def read_checkpoint(path: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a folder, GGUF file or LoRA adapter folder into a ``Checkpoint`` (adapters merged)."""
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.is_file():
        if not _is_gguf(path):
            raise ValueError(
                f"{path} is a file but not a GGUF file; give a model folder or a .gguf file"
            )
        return read_gguf(path, dtype)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return _read_adapter_folder(path, dtype)
    return _read_hf_folder(path, dtype)


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def _read_hf_folder(folder: Path, dtype: torch.dtype) -> Checkpoint:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {CONFIG_FILE} in model folder {folder}")
    hf_config = read_json_object(config_path)
    ModelConfig.from_hf_dict(hf_config)  # unsupported architectures fail before any weight is read
    weight_files, index = _safetensors_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for weight_file in weight_files:
        with _open_safetensors(weight_file) as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key).to(dtype)
    if not _has_tokenizer(folder):
        raise FileNotFoundError(
            f"no tokenizer in {folder} (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    return Checkpoint(
        hf_config=hf_config,
        tensors=canonical_tensors(tensors, hf_config),
        files=[config_path, *([index] if index else []), *weight_files],
        load_tokenizer=lambda: _auto_tokenizer(folder),
    )


def _safetensors_files(folder: Path) -> tuple[list[Path], Path | None]:
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
            f"{folder} has only PyTorch pickle weights ({', '.join(pickles)}); they are never loaded "
            "(unpickling can run code). Convert them to safetensors first."
        )
    raise FileNotFoundError(
        f"missing {SAFETENSORS_FILE} (or {SAFETENSORS_INDEX_FILE}) in model folder {folder}"
    )


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` whose header errors name the file (a truncated download, a damaged disk)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise ValueError(
            f"{path}: not a readable safetensors file ({exc}); it may be truncated or damaged"
        ) from None
    with handle:
        yield handle


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _auto_tokenizer(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)


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
        load_tokenizer=lambda: _auto_tokenizer(path.parent, gguf_file=path.name),
    )


def load_gguf_as_transformers(path: Path) -> Any:
    """The transformers causal-LM model of a GGUF file, dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # The weights are plain fp32 now: drop the GGUF quantizer so that save_pretrained writes an
    # ordinary model (it refuses to serialize a GGUF-"quantized" one).
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
    """Drop the ``model.`` prefix, buffers that are recomputed, and a tied ``lm_head``."""
    tied = bool(hf_config.get("tie_word_embeddings", False))
    canonical = {}
    for key, value in tensors.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        name = key.removeprefix("model.")
        if tied and name == "lm_head.weight":
            continue
        canonical[name] = value
    return canonical


def runtime_state_dict(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map transformers weights (canonical names) onto ``DecoderModel``'s, fusing q/k/v and gate/up.

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
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sources[f"layers.{i}.{norm}.weight"] = [(f"layers.{i}.{norm}.weight", (hidden,))]
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
            f"checkpoint lacks {len(missing)} weight(s) the {config.model_type} config needs: {_few(missing)}"
        )
    unexpected = sorted(set(tensors) - set(needed))
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} weight(s) the {config.model_type} config does not use: {_few(unexpected)}"
        )
    wrong = [
        f"{name} {tuple(tensors[name].shape)} (config needs {shape})"
        for parts in sources.values()
        for name, shape in parts
        if tuple(tensors[name].shape) != shape
    ]
    if wrong:
        raise ValueError(f"weights do not fit the {config.model_type} config: {_few(wrong)}")
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


def _read_adapter_folder(folder: Path, dtype: torch.dtype) -> Checkpoint:
    adapter_config = _read_adapter_config(folder)
    base_name = adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(
            f"{folder / ADAPTER_CONFIG_FILE} has no base_model_name_or_path: the base model is unknown"
        )
    base = Path(base_name).expanduser()
    if not base.is_absolute():
        base = folder / base
    if not base.exists():
        raise FileNotFoundError(
            f"base model {base_name!r} (base_model_name_or_path in {folder / ADAPTER_CONFIG_FILE}) not found "
            f"at {base}; it must be an absolute path or one relative to the adapter folder"
        )
    checkpoint = read_checkpoint(base, dtype)
    merge_lora_adapter(checkpoint, folder)
    if _has_tokenizer(folder):
        checkpoint.load_tokenizer = lambda: _auto_tokenizer(folder)
    return checkpoint


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    config_path = folder / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {ADAPTER_CONFIG_FILE} in adapter folder {folder}")
    config = read_json_object(config_path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported (only LORA)")
    unsupported = [
        name for name, is_set in _UNSUPPORTED_ADAPTER_OPTIONS.items() if is_set(config.get(name))
    ]
    if unsupported:
        settings = ", ".join(f"{name}={config[name]!r}" for name in unsupported)
        raise ValueError(
            f"{config_path}: unsupported LoRA option(s) {settings}; only plain LoRA can be merged"
        )
    for key in ("r", "lora_alpha"):
        if not config.get(key):
            raise ValueError(f"{config_path} has no {key}")
    return config


def merge_lora_adapter(checkpoint: Checkpoint, folder: Path) -> None:
    """Merge a PEFT LoRA adapter into the checkpoint's weights: ``W += scale * B @ A``.

    ``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` read
    from each module's matrices so that ``rank_pattern`` is honoured. ``fan_in_fan_out`` only says
    that the base stores a weight transposed (GPT-2's Conv1D); these models store every projection
    as ``(out, in)``, where the delta is ``B @ A`` either way, as peft itself falls back to.
    """
    config = _read_adapter_config(folder)
    weights_path = folder / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = (
            " (it has adapter_model.bin, a pickle, which is never loaded)"
            if (folder / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(
            f"missing {ADAPTER_WEIGHTS_FILE} in adapter folder {folder}{pickles}"
        )
    pairs = _lora_pairs(weights_path)
    _check_target_modules(config, checkpoint.tensors, folder)
    has_rank_pattern = bool(config.get("rank_pattern"))
    for module, (lora_a, lora_b) in sorted(pairs.items()):
        base_key = f"{module}.weight"
        if base_key not in checkpoint.tensors:
            tied = module == "lm_head" and checkpoint.hf_config.get("tie_word_embeddings")
            reason = (
                "lm_head is tied to the input embeddings"
                if tied
                else "the base model has no such weight"
            )
            raise ValueError(f"adapter {folder} targets {module}, but {reason}")
        weight = checkpoint.tensors[base_key]  # (out, in)
        rank = lora_a.shape[0]
        if (
            lora_a.ndim != 2
            or lora_b.ndim != 2
            or lora_b.shape[1] != rank
            or weight.shape != (lora_b.shape[0], lora_a.shape[1])
        ):
            raise ValueError(
                f"adapter {folder} does not fit its base at {module}: lora_A {tuple(lora_a.shape)}, "
                f"lora_B {tuple(lora_b.shape)}, base weight {tuple(weight.shape)}"
            )
        if not has_rank_pattern and rank != config["r"]:
            raise ValueError(f"adapter {folder}: {module} has rank {rank} but r={config['r']}")
        alpha = float(config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        delta = lora_b.float() @ lora_a.float()  # (out, in)
        checkpoint.tensors[base_key] = (weight.float() + scale * delta).to(weight.dtype)
    checkpoint.files.extend([folder / ADAPTER_CONFIG_FILE, weights_path])
    checkpoint.adapters.append(folder)


def _lora_pairs(weights_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{canonical module name: (lora_A (r, in), lora_B (out, r))}`` from an adapter file."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    with _open_safetensors(weights_path) as handle:
        for key in handle.keys():
            name = key.removeprefix("base_model.model.")
            match = _LORA_KEY.match(name)
            if match is None:
                kind = (
                    "LoRA on embeddings"
                    if "lora_embedding" in name
                    else "a tensor that is not a LoRA matrix"
                )
                raise ValueError(f"{weights_path}: {key} is {kind}, which cannot be merged")
            module = match["module"].removeprefix("model.")
            found.setdefault(module, {})[match["which"]] = handle.get_tensor(key)
    incomplete = [module for module, parts in found.items() if len(parts) != 2]
    if incomplete:
        raise ValueError(
            f"{weights_path}: modules without both lora_A and lora_B: {_few(incomplete)}"
        )
    if not found:
        raise ValueError(f"{weights_path} holds no LoRA weights")
    return {module: (parts["A"], parts["B"]) for module, parts in found.items()}


def _check_target_modules(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path
) -> None:
    """Every module named in ``target_modules`` (a list; a regex string is not checked) must exist."""
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return
    modules = {
        key.removesuffix(".weight").rsplit(".", 1)[-1] for key in tensors if key.endswith(".weight")
    }
    missing = sorted(set(targets) - modules)
    if missing:
        raise ValueError(
            f"adapter {folder} targets module(s) missing from the base model: {', '.join(missing)} "
            f"(the base has {', '.join(sorted(modules))})"
        )


def _few(names: list[str], shown: int = 6) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
