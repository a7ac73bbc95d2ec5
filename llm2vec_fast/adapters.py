"""PEFT LoRA adapters: peft's file format, reading an adapter folder, merging it into weights.

The format names here (target modules, key prefixes, the LoRA key pattern) are the ones training
writes (``train/lora.py``) and loading reads, so that both sides agree on one definition.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .files import read_json_object
from .settings import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from .weights import Checkpoint, few_names, open_safetensors

# The projections of every supported architecture, by their transformers module names.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_KEY_PREFIX = "base_model.model."
# llm2vec's adapters wrap the bare decoder (LlamaModel: ``base_model.model.layers.N...``); peft on
# a causal LM (LlamaForCausalLM) has one more ``model.`` (``base_model.model.model.layers.N...``).
ADAPTER_KEY_PREFIXES = {"llm2vec": PEFT_KEY_PREFIX, "causal_lm": PEFT_KEY_PREFIX + "model."}
# ``<module>.lora_A.weight``, or with peft's adapter name: ``<module>.lora_A.default.weight``
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# Adapter options that change what merging means; each must hold its neutral value.
UNSUPPORTED_ADAPTER_OPTIONS: dict[str, Callable[[Any], bool]] = {
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


def lora_key(prefix: str, module: str, which: str) -> str:
    """peft's name of a LoRA matrix: ``{prefix}{module}.lora_{A|B}.weight``."""
    return f"{prefix}{module}.lora_{which}.weight"


def strip_key_prefix(key: str) -> str:
    """A peft key of either layout without its prefix: ``layers.0.self_attn.q_proj...``."""
    return key.removeprefix(PEFT_KEY_PREFIX).removeprefix("model.")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a plain LoRA adapter; anything merging cannot honour raises."""
    config_path = folder / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"missing {ADAPTER_CONFIG_FILE} in adapter folder {folder}")
    config = read_json_object(config_path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: peft_type {peft_type!r} is not supported (only LORA)")
    unsupported = [
        name for name, is_set in UNSUPPORTED_ADAPTER_OPTIONS.items() if is_set(config.get(name))
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


def adapter_base_path(folder: Path) -> Path:
    """The base model an adapter folder names (``base_model_name_or_path``), which must exist."""
    config_path = folder / ADAPTER_CONFIG_FILE
    base_name = read_adapter_config(folder).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{config_path} has no base_model_name_or_path: the base model is unknown")
    base = Path(base_name).expanduser()
    if not base.is_absolute():
        base = folder / base
    if not base.exists():
        raise FileNotFoundError(
            f"base model {base_name!r} (base_model_name_or_path in {config_path}) not found at "
            f"{base}; it must be an absolute path or one relative to the adapter folder"
        )
    return base


def merge_lora_adapter(checkpoint: Checkpoint, folder: Path) -> None:
    """Merge a PEFT LoRA adapter into the checkpoint's weights: ``W += scale * B @ A``.

    ``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` read
    from each module's matrices so that ``rank_pattern`` is honoured. ``fan_in_fan_out`` only says
    that the base stores a weight transposed (GPT-2's Conv1D); these models store every projection
    as ``(out, in)``, where the delta is ``B @ A`` either way, as peft itself falls back to.
    """
    config = read_adapter_config(folder)
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
    pairs = read_lora_pairs(weights_path)
    check_target_modules(config, checkpoint.tensors, folder)
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
                f"adapter {folder} does not fit its base at {module}: lora_A "
                f"{tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}, base weight "
                f"{tuple(weight.shape)}"
            )
        if not has_rank_pattern and rank != config["r"]:
            raise ValueError(f"adapter {folder}: {module} has rank {rank} but r={config['r']}")
        alpha = float(config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        delta = lora_b.float() @ lora_a.float()  # (out, in)
        checkpoint.tensors[base_key] = (weight.float() + scale * delta).to(weight.dtype)
    checkpoint.files.extend([folder / ADAPTER_CONFIG_FILE, weights_path])
    checkpoint.adapters.append(folder)


def read_lora_pairs(weights_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{canonical module name: (lora_A (r, in), lora_B (out, r))}`` from an adapter file."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    with open_safetensors(weights_path) as handle:
        for key in handle.keys():
            name = strip_key_prefix(key)
            match = LORA_KEY.match(name)
            if match is None:
                kind = (
                    "LoRA on embeddings"
                    if "lora_embedding" in name
                    else "a tensor that is not a LoRA matrix"
                )
                raise ValueError(f"{weights_path}: {key} is {kind}, which cannot be merged")
            found.setdefault(match["module"], {})[match["which"]] = handle.get_tensor(key)
    incomplete = [module for module, parts in found.items() if len(parts) != 2]
    if incomplete:
        raise ValueError(
            f"{weights_path}: modules without both lora_A and lora_B: {few_names(incomplete)}"
        )
    if not found:
        raise ValueError(f"{weights_path} holds no LoRA weights")
    return {module: (parts["A"], parts["B"]) for module, parts in found.items()}


def check_target_modules(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path
) -> None:
    """Every module named in ``target_modules`` must exist (a list; a regex is not checked)."""
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return
    modules = {
        key.removesuffix(".weight").rsplit(".", 1)[-1] for key in tensors if key.endswith(".weight")
    }
    missing = sorted(set(targets) - modules)
    if missing:
        raise ValueError(
            f"adapter {folder} targets module(s) missing from the base model: "
            f"{', '.join(missing)} (the base has {', '.join(sorted(modules))})"
        )
