"""Exact top-k search over a job's embeddings: the query is embedded by the job's own model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llm2vec_fast.corpus.engine import Engine, load_engine
from llm2vec_fast.corpus.manifest import identity_differences, load_manifest
from llm2vec_fast.corpus.read import iter_embeddings

CHUNK_ROWS = 65536


def engine_for_job(
    folder: str | Path, device: str | None = None, batch_tokens: int = 16384
) -> Engine:
    """Load the engine described by the job's manifest, and check it still describes the same."""
    manifest = load_manifest(Path(folder))
    described = manifest["engine"]
    adapters = [a["path"] for a in described.get("adapters", [])]
    engine = load_engine(
        described["model"] if described["model"] != "fake" else f"fake:dim={described['dim']}",
        adapters,
        pooling=described["pooling"],
        max_length=described["max_length"],
        device=device,
        dtype=described.get("dtype"),
        max_batch_tokens=batch_tokens,
        normalize=described["normalize"],
        causal=not described.get("bidirectional", True),
        doc_max_length=described.get("doc_max_length"),
    )
    differences = identity_differences({"engine": described}, {"engine": engine.describe()})
    if differences:
        raise ValueError(
            f"the model of {folder} changed since the job ran: {'; '.join(differences[:5])}"
        )
    return engine


def top_k(matrix_chunks, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, cosine) of the k rows most similar to ``query`` (dim,), over (n, dim) chunks."""
    query = query.astype(np.float32) / max(float(np.linalg.norm(query)), 1e-12)
    best_rows = np.empty(0, dtype=np.int64)
    best_scores = np.empty(0, dtype=np.float32)
    offset = 0
    for chunk in matrix_chunks:
        for start in range(0, len(chunk), CHUNK_ROWS):
            block = np.asarray(chunk[start : start + CHUNK_ROWS], dtype=np.float32)  # (c, dim)
            scores = block @ query / np.maximum(np.linalg.norm(block, axis=1), 1e-12)  # (c,)
            rows = np.arange(offset + start, offset + start + len(block))
            best_rows = np.concatenate([best_rows, rows])
            best_scores = np.concatenate([best_scores, scores.astype(np.float32)])
            if len(best_scores) > k:
                keep = np.argpartition(-best_scores, k - 1)[:k]
                best_rows, best_scores = best_rows[keep], best_scores[keep]
        offset += len(chunk)
    order = np.lexsort((best_rows, -best_scores))
    return [(int(best_rows[i]), float(best_scores[i])) for i in order]


def search(
    folder: str | Path,
    query: str,
    k: int = 10,
    *,
    instruction: str | None = None,
    engine: Engine | None = None,
    device: str | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` ids whose embeddings have the highest cosine similarity with ``query``.

    The query is embedded like the job's rows: same model, pooling, max length, and the job's
    ``--instruction`` unless ``instruction`` is given.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not query.strip():
        raise ValueError("the query is empty: it has no tokens to embed")
    manifest = load_manifest(Path(folder))
    engine = engine or engine_for_job(folder, device)
    if instruction is None:
        instruction = manifest["settings"].get("instruction")
    item = engine.tokenize([(instruction, query) if instruction else query])
    if not any(item[0].pool_mask):  # a zero vector would score 0 against every row
        raise ValueError(
            f"the query {query[:80]!r} has no tokens to pool (the tokenizer kept none of it)"
        )
    query_embedding = engine.embed(item)[0]  # (dim,)
    ids: list[str] = []

    def chunks():
        for shard_ids, matrix in iter_embeddings(folder):
            ids.extend(shard_ids)
            yield matrix

    return [(ids[row], score) for row, score in top_k(chunks(), query_embedding, k)]
