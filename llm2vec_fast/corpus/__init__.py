"""The offline corpus embedding job (``llm2vec-fast embed``) and search over its output.

Attributes are imported on first use, so that ``llm2vec-fast --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embed_corpus": "llm2vec_fast.corpus.job",
    "JobSummary": "llm2vec_fast.corpus.job",
    "read_embeddings": "llm2vec_fast.corpus.read",
    "iter_embeddings": "llm2vec_fast.corpus.read",
    "read_errors": "llm2vec_fast.corpus.read",
    "verify": "llm2vec_fast.corpus.read",
    "search": "llm2vec_fast.corpus.nearest",
    "Item": "llm2vec_fast.corpus.engine",
    "HashEngine": "llm2vec_fast.corpus.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
