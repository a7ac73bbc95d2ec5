"""The offline corpus embedding job (``llm2vec-fast embed``) and search over its output.

One file per job, in the order a run uses them:

- ``cli``: the ``embed`` and ``search`` subcommands; ``job``: ``embed_corpus``, one run top to
  bottom; ``job_settings``: its options (``JobSettings``), checked in one place.
- ``inputs``: find and fingerprint input files, stream their rows; ``rows``: number them in work
  order, with the job-level checks (empty text, duplicate ids).
- ``job_folder``: continue, refuse or start afresh, prepare the folder, merge the final manifest;
  ``manifest``: the manifest file and atomic writes; ``ranks``: who does which shard under
  torchrun.
- ``engine``: what embeds (the model, or a hash engine for tests); ``pipeline``: the reader,
  embedder and writer stages; ``workers``: reading and tokenization in worker processes
  (``--workers``); ``writer``: one shard to Parquet; ``summary``: what the user sees, and which
  stage bounds the job.
- ``ray_embed``: the same embedding as a Ray Data ``map_batches`` class, for clusters.
- ``quantize``: int8/uint8/binary codes (``--quantize``), sentence-transformers' way;
  ``calibration``: the manifest's record of them, int8 ranges calibrated on the job's first rows.
- ``output``: read a job's embeddings (floats or codes) and errors back; ``index``: the faiss
  index kept in the job folder (``index_cli``: ``llm2vec-fast index``); ``nearest``: top-k
  search, through the index when there is one, else an exact scan.

Attributes are imported on first use, so that ``llm2vec-fast --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "embed_corpus": "llm2vec_fast.corpus.job",
    "JobSettings": "llm2vec_fast.corpus.job_settings",
    "JobSummary": "llm2vec_fast.corpus.summary",
    "read_embeddings": "llm2vec_fast.corpus.output",
    "iter_embeddings": "llm2vec_fast.corpus.output",
    "read_errors": "llm2vec_fast.corpus.output",
    "verify": "llm2vec_fast.corpus.output",
    "search": "llm2vec_fast.corpus.nearest",
    "search_many": "llm2vec_fast.corpus.nearest",
    "build_index": "llm2vec_fast.corpus.index",
    "IndexSettings": "llm2vec_fast.corpus.index",
    "Item": "llm2vec_fast.corpus.engine",
    "HashEngine": "llm2vec_fast.corpus.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
