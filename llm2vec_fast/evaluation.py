"""STS evaluation: Spearman correlation (x100) between cosine similarity and gold scores.

Reads the STS Benchmark's original format (tab-separated, no header: genre, file, year, id,
score, sentence1, sentence2, sometimes more columns after them; no CSV quoting, since some
sentences hold a bare ``"``). The data file is a path given by the caller: nothing is
downloaded and nothing outside the package is assumed to exist.

``llm2vec-fast eval sts --model PATH [--adapter PATH ...] --data sts-test.csv [--pooling mean] [--causal]``
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STSB_SCORE_COLUMN = 4  # 0-based: genre, file, year, id, score, sentence1, sentence2


@dataclass(frozen=True)
class STSData:
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray  # (n,) gold similarity


def read_sts(path: str | Path) -> STSData:
    """Pairs and gold scores of an STS-B file; a malformed line raises with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STS data file not found: {path}")
    first, second, scores = [], [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < STSB_SCORE_COLUMN + 3:
                raise ValueError(
                    f"{path}:{number}: expected at least 7 tab-separated fields (genre, file, year, id, score, sentence1, sentence2), got {len(fields)}"
                )
            try:
                score = float(fields[STSB_SCORE_COLUMN])
            except ValueError as error:
                raise ValueError(
                    f"{path}:{number}: score {fields[STSB_SCORE_COLUMN]!r} is not a number"
                ) from error
            if not math.isfinite(score):
                raise ValueError(
                    f"{path}:{number}: score {fields[STSB_SCORE_COLUMN]!r} is not a finite number"
                )
            scores.append(score)
            first.append(fields[STSB_SCORE_COLUMN + 1])
            second.append(fields[STSB_SCORE_COLUMN + 2])
    if len(scores) < 2:
        raise ValueError(f"{path}: need at least 2 sentence pairs, found {len(scores)}")
    return STSData(first, second, np.asarray(scores, dtype=np.float64))


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}"
        )
    for name, values in (("first", a), ("second", b)):
        if not np.isfinite(values).all():
            bad = np.flatnonzero(~np.isfinite(values))
            raise ValueError(
                f"spearman: the {name} array holds {len(bad)} NaN/inf values (first at index {bad[0]})"
            )
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denominator == 0:
        raise ValueError("spearman is undefined when one side is constant")
    return float((ra * rb).sum() / denominator)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows ``(n, D) x (n, D) -> (n,)``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


def evaluate_sts(
    encoder: Any, data: STSData, *, batch_size: int = 32, show_progress_bar: bool = False
) -> dict[str, Any]:
    """Spearman x100 of cosine similarity against the gold scores, for an ``LLM2Vec``-like encoder."""
    unique = sorted(set(data.sentences1) | set(data.sentences2))
    index = {sentence: i for i, sentence in enumerate(unique)}
    embeddings = np.asarray(
        encoder.encode(
            unique,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            convert_to_numpy=True,
        )
    )
    first = embeddings[[index[s] for s in data.sentences1]]
    second = embeddings[[index[s] for s in data.sentences2]]
    if not np.isfinite(embeddings).all():
        bad = sorted({unique[i] for i in np.flatnonzero(~np.isfinite(embeddings).all(axis=1))})
        raise ValueError(
            f"the encoder gave NaN/inf embeddings for {len(bad)} sentences (first: {bad[0][:80]!r});"
            " a 16-bit dtype may overflow: try --dtype float32"
        )
    similarity = cosine_rows(first, second)
    return {"spearman": 100.0 * spearman(similarity, data.scores), "pairs": len(data.scores)}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate an encoder (STS Spearman)")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    sts = tasks.add_parser(
        "sts", help="STS-B style file: Spearman x100 of cosine similarity vs gold scores"
    )
    sts.add_argument(
        "--model", required=True, help="model folder, .gguf file, or LLM2Vec MNTP adapter folder"
    )
    sts.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="LoRA adapter merged on top (repeatable, in order)",
    )
    sts.add_argument(
        "--data",
        required=True,
        help="STS file (tab-separated: genre, file, year, id, score, sentence1, sentence2)",
    )
    sts.add_argument(
        "--pooling",
        default=None,
        help="pooling mode (mean, weighted_mean, eos_token, last_token,"
        " bos_token; default: the adapter's llm2vec_config.json, else mean)",
    )
    sts.add_argument(
        "--causal",
        action="store_true",
        help="causal attention (the untouched decoder) instead of"
        " bidirectional (or what the adapter was trained with)",
    )
    sts.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per sentence (default: the adapter's"
        " llm2vec_config.json, else 512; without this option llm2vec's rules apply, its word cut at"
        " doc_max_length included)",
    )
    sts.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, ... (default: bf16 on a GPU, fp32 on a CPU)",
    )
    sts.add_argument("--output", help="also write the result as JSON here")
    sts.set_defaults(run=_run_sts)


def _run_sts(args: argparse.Namespace) -> int:
    from .encoder import LLM2Vec

    data = read_sts(args.data)
    encoder = LLM2Vec.from_pretrained(
        args.model,
        adapters=args.adapter,
        enable_bidirectional=False
        if args.causal
        else None,  # None: as the adapter was trained (else True)
        pooling_mode=args.pooling,
        max_length=args.max_length,
        doc_max_length=args.max_length,  # a given --max-length alone decides: no llm2vec word cut at 400
        dtype=args.dtype,
    )
    result = evaluate_sts(encoder, data, show_progress_bar=True)
    result.update(
        model=str(args.model),
        adapters=list(args.adapter),
        data=str(args.data),
        pooling=encoder.pooling_mode,
        max_length=encoder.max_length,
        causal=not encoder.enable_bidirectional,
    )
    line = json.dumps(result)
    print(line)
    if args.output:
        Path(args.output).write_text(line + "\n")
    return 0
