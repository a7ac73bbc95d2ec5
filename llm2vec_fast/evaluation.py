"""STS evaluation: Spearman correlation (x100) between cosine similarity and gold scores.

Reads the STS Benchmark's original format (tab-separated, no header: genre, file, year, id,
score, sentence1, sentence2, sometimes more columns after them; no CSV quoting, since some
sentences hold a bare ``"``). The data file is a path given by the caller: nothing is
downloaded and nothing outside the package is assumed to exist.

``llm2vec-fast eval sts --model PATH [--adapter PATH ...] --data sts-test.csv
[--pooling-mode mean] [--causal]``; ``llm2vec-fast eval mteb`` runs MTEB tasks
(``llm2vec_fast.mteb``); ``llm2vec-fast eval probe`` fits the LLM2Vec paper's word-level linear
probes (POS, chunking, NER) on CoNLL files (``llm2vec_fast.probe``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .settings import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_LENGTH, DEFAULT_POOLING_MODE

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
                    f"{path}:{number}: expected at least 7 tab-separated fields (genre, file, "
                    f"year, id, score, sentence1, sentence2), got {len(fields)}"
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
                f"spearman: the {name} array holds {len(bad)} NaN/inf values"
                f" (first at index {bad[0]})"
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
    encoder: Any,
    data: STSData,
    *,
    batch_size: int = 32,
    show_progress_bar: bool = False,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> dict[str, Any]:
    """Spearman x100 of cosine similarity against the gold scores, for an ``LLM2Vec``-like
    encoder; ``prompt`` / ``prompt_name`` go to its ``encode`` (both sentences get it)."""
    unique = sorted(set(data.sentences1) | set(data.sentences2))
    index = {sentence: i for i, sentence in enumerate(unique)}
    prompts = {
        key: value
        for key, value in (("prompt", prompt), ("prompt_name", prompt_name))
        if value is not None
    }
    embeddings = np.asarray(
        encoder.encode(
            unique,
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            convert_to_numpy=True,
            **prompts,
        )
    )
    first = embeddings[[index[s] for s in data.sentences1]]
    second = embeddings[[index[s] for s in data.sentences2]]
    if not np.isfinite(embeddings).all():
        bad = sorted({unique[i] for i in np.flatnonzero(~np.isfinite(embeddings).all(axis=1))})
        raise ValueError(
            f"the encoder gave NaN/inf embeddings for {len(bad)} sentences"
            f" (first: {bad[0][:80]!r}); a 16-bit dtype may overflow: try --dtype float32"
        )
    similarity = cosine_rows(first, second)
    return {"spearman": 100.0 * spearman(similarity, data.scores), "pairs": len(data.scores)}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate an encoder (STS Spearman, MTEB)")
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    sts = tasks.add_parser(
        "sts", help="STS-B style file: Spearman x100 of cosine similarity vs gold scores"
    )
    _add_encoder_arguments(sts)
    sts.add_argument(
        "--data",
        required=True,
        help="STS file (tab-separated: genre, file, year, id, score, sentence1, sentence2)",
    )
    sts.add_argument("--output", help="also write the result as JSON here")
    prompt = sts.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt-name",
        default=None,
        help="the model's prompt of this name (config_sentence_transformers.json) before every"
        " sentence (default: the model's default prompt, if any)",
    )
    prompt.add_argument(
        "--prompt",
        default=None,
        help="this prompt before every sentence (an llm2vec model takes it as the instruction)",
    )
    sts.set_defaults(run=_run_sts)

    mteb = tasks.add_parser(
        "mteb", help="MTEB tasks through mteb.evaluate (needs the [mteb] extra)"
    )
    _add_encoder_arguments(mteb)
    mteb.add_argument(
        "--tasks",
        required=True,
        help="comma-separated MTEB task names, benchmarks such as 'MTEB(eng, v2)', or local"
        " task definitions (.json files; see llm2vec_fast/mteb.py)",
    )
    mteb.add_argument("--output", required=True, help="mteb's results folder goes here")
    mteb.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"tokens per packed batch, no padding (default: {DEFAULT_MAX_BATCH_TOKENS})",
    )
    mteb.add_argument(
        "--overwrite",
        action="store_true",
        help="run every task again (default: only what --output lacks)",
    )
    mteb.set_defaults(run=_run_mteb)

    probe = tasks.add_parser(
        "probe",
        help="word-level linear probe (POS accuracy, chunk/NER span F1) on CoNLL files",
    )
    _add_encoder_arguments(probe)
    probe.add_argument("--train", required=True, help="CoNLL file the probe is fitted on")
    probe.add_argument("--test", required=True, help="CoNLL file the probe is scored on")
    probe.add_argument(
        "--task",
        required=True,
        metavar="pos|ner|chunk",
        help="the tags to probe, from 'word tag', CoNLL-2000 'word POS chunk' or CoNLL-2003"
        " 'word POS chunk NER' files (see llm2vec_fast/probe.py); several, comma-separated,"
        " share one encoding of the files",
    )
    probe.add_argument(
        "--output",
        help="also write the result as JSON here (one object; a list of them for several tasks)",
    )
    probe.add_argument(
        "--max-train-sentences",
        type=int,
        default=None,
        help="fit on the first N training sentences only (default: all)",
    )
    probe.add_argument(
        "--seed", type=int, default=0, help="the logistic regression's seed (default: 0)"
    )
    probe.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        help=f"tokens per packed batch, no padding (default: {DEFAULT_MAX_BATCH_TOKENS})",
    )
    probe.set_defaults(run=_run_probe)


def _add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that load the encoder, shared by the evaluations."""
    parser.add_argument(
        "--model", required=True, help="model folder, .gguf file, or LLM2Vec MNTP adapter folder"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="LoRA adapter merged on top (repeatable, in order)",
    )
    parser.add_argument(
        "--pooling-mode",
        default=None,
        help="mean, weighted_mean, eos_token, last_token or bos_token (default: the adapter's"
        f" llm2vec_config.json, else {DEFAULT_POOLING_MODE})",
    )
    parser.add_argument(
        "--causal",
        action="store_true",
        help="causal attention (the untouched decoder) instead of"
        " bidirectional (or what the adapter was trained with)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per sentence (default: the adapter's llm2vec_config.json, else"
        f" {DEFAULT_MAX_LENGTH}; without this option llm2vec's rules apply, its word cut at"
        " doc_max_length included)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, ... (default: bf16 on a GPU, fp32 on a CPU)",
    )


def _run_mteb(args: argparse.Namespace) -> int:
    try:
        from .mteb import run_eval_mteb
    except ModuleNotFoundError as error:
        if error.name != "mteb":
            raise
        raise SystemExit(
            'llm2vec-fast eval mteb: error: mteb is not installed; pip install "llm2vec-fast[mteb]"'
        ) from None
    return run_eval_mteb(
        args, lambda: encoder_from_args(args, max_batch_tokens=args.max_batch_tokens)
    )


def encoder_from_args(args: argparse.Namespace, **options):
    """The encoder the shared model options of ``eval`` name. ``enable_bidirectional`` None: as
    the adapter was trained (else True); a given ``--max-length`` alone decides the cut (no
    llm2vec word cut at doc_max_length)."""
    from .encoder import LLM2Vec

    return LLM2Vec.from_pretrained(
        args.model,
        adapters=args.adapter,
        enable_bidirectional=False if args.causal else None,
        pooling_mode=args.pooling_mode,
        max_length=args.max_length,
        doc_max_length=args.max_length,
        dtype=args.dtype,
        **options,
    )


def _run_sts(args: argparse.Namespace) -> int:
    data = read_sts(args.data)
    encoder = encoder_from_args(args)
    result = evaluate_sts(
        encoder,
        data,
        show_progress_bar=True,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
    )
    result.update(
        model=str(args.model),
        adapters=list(args.adapter),
        data=str(args.data),
        pooling_mode=encoder.pooling_mode,
        max_length=encoder.max_length,
        causal=encoder.causal,
    )
    line = json.dumps(result)
    print(line)
    if args.output:
        Path(args.output).write_text(line + "\n")
    return 0


def _run_probe(args: argparse.Namespace) -> int:
    from . import probe

    tasks = list(dict.fromkeys(task.strip() for task in args.task.split(",")))
    unknown = [task for task in tasks if task not in probe.TASKS]
    if unknown:
        raise ValueError(
            f"--task {args.task!r}: unknown task {unknown[0]!r}; expected pos, ner or chunk"
        )
    if args.max_train_sentences is not None and args.max_train_sentences < 1:
        raise ValueError(
            f"--max-train-sentences must be at least 1, got {args.max_train_sentences}"
        )
    train = {t: probe.read_conll(args.train, t)[: args.max_train_sentences] for t in tasks}
    test = {task: probe.read_conll(args.test, task) for task in tasks}
    for task in tasks:
        probe.training_labels(task, train[task])
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit(
            "llm2vec-fast eval probe: error: the probe needs scikit-learn:"
            ' pip install "llm2vec-fast[probe]"'
        )
    encoder = encoder_from_args(args, max_batch_tokens=args.max_batch_tokens)
    # the files' words are the same for every task: one encoding serves them all
    train_x = probe.word_features(encoder, train[tasks[0]], show_progress_bar=True)
    test_x = probe.word_features(encoder, test[tasks[0]], show_progress_bar=True)
    results = []
    for task in tasks:
        result = probe.fit_probe(task, train[task], test[task], train_x, test_x, seed=args.seed)
        results.append(
            {
                "model": str(args.model),
                "adapters": list(args.adapter),
                "causal": encoder.causal,
                "pooling_mode": encoder.pooling_mode,
                "max_length": encoder.max_length,
                "dtype": str(encoder.dtype).removeprefix("torch."),
                "train": str(args.train),
                "test": str(args.test),
                **result,
            }
        )
        key = "f1" if task in probe.SPAN_TASKS else "accuracy"
        print(
            f"{task}: {key} {result[key]:.2f} on {result['test_words']} test words"
            f" (majority baseline {result['baselines']['majority']:.2f},"
            f" per-word majority {result['baselines']['word_majority']:.2f})"
        )
    line = json.dumps(results[0] if len(results) == 1 else results)
    print(line)
    if args.output:
        Path(args.output).write_text(line + "\n")
    return 0
