"""Build a runtime model from a path: a weight folder or GGUF file (``weights.py``), with PEFT LoRA
adapters merged on top (``adapters.py``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import adapter_base_path, merge_lora_adapter
from .config import ModelConfig
from .model import DecoderModel
from .settings import ADAPTER_CONFIG_FILE
from .weights import (
    Checkpoint,
    auto_tokenizer,
    build_model,
    has_tokenizer,
    is_gguf,
    read_gguf,
    read_hf_folder,
)


@dataclass(frozen=True)
class LoadedFrom:
    """What a model was built from: recorded on the model as ``model.loaded_from``."""

    source: Path
    config: ModelConfig
    hf_config: dict[str, Any]
    files: tuple[Path, ...]
    adapters: tuple[Path, ...] = ()


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
        if not is_gguf(path):
            raise ValueError(
                f"{path} is a file but not a GGUF file; give a model folder or a .gguf file"
            )
        return read_gguf(path, dtype)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return read_adapter_folder(path, dtype)
    return read_hf_folder(path, dtype)


def read_adapter_folder(folder: Path, dtype: torch.dtype) -> Checkpoint:
    """The base an adapter names, read recursively, with the adapter merged; the adapter
    folder's tokenizer wins over the base's."""
    checkpoint = read_checkpoint(adapter_base_path(folder), dtype)
    merge_lora_adapter(checkpoint, folder)
    if has_tokenizer(folder):
        checkpoint.load_tokenizer = lambda: auto_tokenizer(folder)
    return checkpoint
