"""Top-k search over a job's embeddings, through its index when it has one, else an exact scan;
the queries are embedded by the job's own model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from llm2vec_fast.corpus.engine import Engine, Text, load_engine
from llm2vec_fast.corpus.index import load_index
from llm2vec_fast.corpus.manifest import identity_differences, load_manifest
from llm2vec_fast.corpus.output import iter_embeddings
from llm2vec_fast.default_encoder import default_adapter_paths
from llm2vec_fast.default_model import default_model_path
from llm2vec_fast.files import sha256_of_path
from llm2vec_fast.settings import DEFAULT_MAX_BATCH_TOKENS

CHUNK_ROWS = 65536
CHUNK_SCORES = 2**22  # (queries, rows) scores of one step of an exact scan


def engine_for_job(
    folder: str | Path,
    device: str | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> Engine:
    """Load the engine described by the job's manifest, and check it still describes the same."""
    manifest = load_manifest(Path(folder))
    described = manifest["engine"]
    adapters = [shipped_if_moved(a) for a in described.get("adapters", [])]
    model = described["model"]
    if model != "fake" and adapters and not Path(model).exists():
        if [Path(a) for a in adapters] == list(default_adapter_paths()):
            model = str(default_model_path())  # the default encoder's base, in this cache
            described = dict(described, model=model)  # its files still compared by sha256
    engine = load_engine(
        model if model != "fake" else f"fake:dim={described['dim']}",
        adapters,
        pooling_mode=described["pooling"],
        max_length=described["max_length"],
        device=device,
        dtype=described.get("dtype"),
        max_batch_tokens=max_batch_tokens,
        normalize=described["normalize"],
        causal=not described.get("bidirectional", True),
        doc_max_length=described.get("doc_max_length"),
        dim=manifest["settings"].get("dim"),
        prompt=described.get("prompt"),
    )
    differences = identity_differences({"engine": described}, {"engine": engine.describe()})
    if differences:
        raise ValueError(
            f"the model of {folder} changed since the job ran: {'; '.join(differences[:5])}"
        )
    return engine


def shipped_if_moved(adapter: dict) -> str:
    """A recorded adapter's path, or the shipped adapter folder with the same weights when the
    recorded folder is gone (a job of the default encoder from another install or checkout);
    the identity check that follows still compares the files by sha256."""
    path = adapter["path"]
    if Path(path).exists():
        return path
    for shipped in default_adapter_paths():
        if shipped.name == Path(path).name and sha256_of_path(shipped) == adapter.get("sha256"):
            return str(shipped)
    raise FileNotFoundError(
        f"the job's adapter {path} is gone (moved or deleted): embed again with --overwrite, or"
        " put it back"
    )


def top_k(matrix_chunks, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """(row, cosine) of the k rows most similar to each query (q, dim), best first, over (n, dim)
    chunks of rows."""
    queries = queries.astype(np.float32)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    best_rows = np.empty((len(queries), 0), dtype=np.int64)
    best_scores = np.empty((len(queries), 0), dtype=np.float32)
    step = max(256, min(CHUNK_ROWS, CHUNK_SCORES // len(queries)))
    offset = 0
    for chunk in matrix_chunks:
        for start in range(0, len(chunk), step):
            block = np.asarray(chunk[start : start + step], dtype=np.float32)  # (c, dim)
            norms = np.maximum(np.linalg.norm(block, axis=1), 1e-12)  # (c,)
            scores = (queries @ block.T / norms).astype(np.float32)  # (q, c)
            rows = np.broadcast_to(
                np.arange(offset + start, offset + start + len(block)), scores.shape
            )
            best_rows = np.concatenate([best_rows, rows], axis=1)
            best_scores = np.concatenate([best_scores, scores], axis=1)
            if best_scores.shape[1] > k:
                keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]  # (q, k)
                best_rows = np.take_along_axis(best_rows, keep, axis=1)
                best_scores = np.take_along_axis(best_scores, keep, axis=1)
        offset += len(chunk)
    results = []
    for rows, scores in zip(best_rows, best_scores):
        order = np.lexsort((rows, -scores))
        results.append([(int(rows[i]), float(scores[i])) for i in order])
    return results


def _query_text(query: Text) -> str:
    return query[1] if isinstance(query, tuple) else query


def check_queries(queries: Sequence[Text]) -> None:
    if not queries:
        raise ValueError("no queries to search for")
    for number, query in enumerate(queries, start=1):
        if not _query_text(query).strip():
            where = "" if len(queries) == 1 else f"query {number}: "
            raise ValueError(f"{where}the query is empty: it has no tokens to embed")


def embed_queries(
    folder: str | Path,
    queries: Sequence[Text],
    *,
    instruction: str | None = None,
    engine: Engine | None = None,
    device: str | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> np.ndarray:
    """(q, dim) embeddings of ``queries``, made like the job's rows: same model, pooling, max
    length, dimensions, prompt, and the job's ``--instruction`` unless ``instruction`` is given;
    ``prompt`` / ``prompt_name`` (one of the model's prompts, "query" say) replace the job's
    prompt and instruction. A query given as an (instruction, text) pair keeps its own."""
    check_queries(queries)
    single = len(queries) == 1
    manifest = load_manifest(Path(folder))
    engine = engine or engine_for_job(folder, device)
    if prompt is not None or prompt_name is not None:
        if instruction is not None:
            raise ValueError("give an instruction or a prompt for the queries, not both")
        resolve = getattr(engine, "resolve_prompt", None)
        if resolve is None:
            raise ValueError("this job's model has no prompts")
        instruction = resolve(prompt, prompt_name)  # "": no prompt, not the job's
        texts = [(instruction, q) if isinstance(q, str) else q for q in queries]
    else:
        if instruction is None:
            instruction = manifest["settings"].get("instruction")
        texts = [(instruction, q) if instruction and isinstance(q, str) else q for q in queries]
    items = engine.tokenize(texts)
    for number, (query, item) in enumerate(zip(map(_query_text, queries), items), start=1):
        if not any(item.pool_mask):  # a zero vector would score 0 against every row
            where = "" if single else f"query {number}: "
            raise ValueError(
                f"{where}the query {query[:80]!r} has no tokens to pool"
                " (the tokenizer kept none of it)"
            )
    return engine.embed(items)  # (q, dim)


def search_many(
    folder: str | Path,
    queries: Sequence[Text],
    k: int = 10,
    *,
    instruction: str | None = None,
    engine: Engine | None = None,
    device: str | None = None,
    exact: bool = False,
    prompt: str | None = None,
    prompt_name: str | None = None,
    **index_options,
) -> list[list[tuple[str, float]]]:
    """For each query, the ``k`` (id, cosine similarity) pairs of the nearest rows, best first.

    Uses the job's index (``llm2vec-fast index``) when it has one, unless ``exact``; a stale index
    is refused (:class:`~llm2vec_fast.corpus.index.StaleIndexError`). ``index_options``:
    ``ef_search``, ``nprobe``, ``rescore_multiplier`` for this search. Without an index, scans
    the stored floats (or, for a job that stored codes only, their dequantized values) exactly.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    folder = Path(folder)
    check_queries(queries)
    index = None if exact else load_index(folder)
    embeddings = embed_queries(
        folder,
        queries,
        instruction=instruction,
        engine=engine,
        device=device,
        prompt=prompt,
        prompt_name=prompt_name,
    )
    if index is not None:
        found = index.search(embeddings, k, **index_options)
        return [[(index.ids[row], score) for row, score in hits] for hits in found]
    ids: list[str] = []
    manifest = load_manifest(folder)
    quantization = manifest.get("quantization")
    dequantize = quantization is not None and not quantization["keep_float"]

    def chunks():
        for shard_ids, matrix in iter_embeddings(folder, dequantize=dequantize):
            ids.extend(shard_ids)
            yield matrix

    found = top_k(chunks(), embeddings, k)
    return [[(ids[row], score) for row, score in hits] for hits in found]


def search(
    folder: str | Path,
    query: str,
    k: int = 10,
    *,
    instruction: str | None = None,
    engine: Engine | None = None,
    device: str | None = None,
    exact: bool = False,
    prompt: str | None = None,
    prompt_name: str | None = None,
    **index_options,
) -> list[tuple[str, float]]:
    """The ``k`` ids whose embeddings have the highest cosine similarity with ``query``, as
    :func:`search_many` finds them."""
    return search_many(
        folder,
        [query],
        k,
        instruction=instruction,
        engine=engine,
        device=device,
        exact=exact,
        prompt=prompt,
        prompt_name=prompt_name,
        **index_options,
    )[0]
