"""The optional compiled extension ``llm2vec_fast._C``.

Its operators live under ``torch.ops.llm2vec_fast`` once the module is imported. Everything in
the package has a pure-Python path, so a missing or broken extension never fails an import:
``extension_status()`` says what is there and why not. ``LLM2VEC_FAST_NO_EXTENSION=1`` skips
the extension at run time as it does at build time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

import torch

EXTENSION_MODULE = "llm2vec_fast._C"
NO_EXTENSION_ENV = "LLM2VEC_FAST_NO_EXTENSION"


class ExtensionStatus(NamedTuple):
    loaded: bool
    has_cuda_ops: bool
    reason: str | None  # why the extension (or its CUDA part) is missing; None when complete


def extension_disabled() -> bool:
    return os.environ.get(NO_EXTENSION_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def import_extension(name: str = EXTENSION_MODULE) -> tuple[ModuleType | None, str | None]:
    """(module, None) when it imports, else (None, why not)."""
    if importlib.util.find_spec(name) is None:
        return None, "not built (reinstall with torch and a C++ compiler present; see setup.py)"
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError, RuntimeError) as error:
        return None, f"failed to load (built against another torch?): {error}"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    if extension_disabled():
        return None, f"disabled by {NO_EXTENSION_ENV}=1"
    return import_extension()


def extension_status() -> ExtensionStatus:
    module, reason = _load()
    if module is None:
        return ExtensionStatus(loaded=False, has_cuda_ops=False, reason=reason)
    if not module.WITH_CUDA:
        return ExtensionStatus(True, False, "built without its CUDA part (no nvcc or CPU torch)")
    return ExtensionStatus(loaded=True, has_cuda_ops=True, reason=None)


def extension_loaded() -> bool:
    return _load()[0] is not None


def cuda_ops_loaded() -> bool:
    return extension_status().has_cuda_ops


def ops():
    """``torch.ops.llm2vec_fast``; only valid when ``extension_loaded()``."""
    if not extension_loaded():
        raise RuntimeError(f"llm2vec_fast._C is not available: {_load()[1]}")
    return torch.ops.llm2vec_fast
