"""Realistic text workloads for the end-to-end benchmarks, built from text every machine has.

Documents are cut from the Python standard library's docstrings to token lengths drawn from a
log-normal distribution (mostly short, a long tail up to ``max_tokens``), with a fixed seed.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import numpy as np


def stdlib_text(max_chars: int = 4_000_000) -> str:
    """The standard library's full docstrings joined, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(" ".join(doc.split()))
                    size += len(parts[-1])
        if size >= max_chars:
            break
    return " ".join(parts)


def token_lengths(
    count: int, *, median: int = 48, max_tokens: int = 512, seed: int = 0
) -> np.ndarray:
    """``count`` lengths, log-normal around ``median`` (sigma 0.9), clipped to [4, max_tokens]."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(median), 0.9, size=count))
    return np.clip(lengths.round(), 4, max_tokens).astype(int)


def mixed_length_texts(
    tokenizer, count: int, *, median: int = 48, max_tokens: int = 512, seed: int = 0
) -> list[str]:
    """``count`` documents whose token counts follow ``token_lengths`` under ``tokenizer``."""
    lengths = token_lengths(count, median=median, max_tokens=max_tokens, seed=seed)
    ids = tokenizer(
        stdlib_text(max_chars=max(200_000, 8 * int(lengths.sum()))), add_special_tokens=False
    )["input_ids"]
    texts = []
    start = 0
    for length in lengths:
        if start + length > len(ids):
            start = 0
        texts.append(tokenizer.decode(ids[start : start + length]))
        start += length
    return texts


def lengths_for_tokens(
    total_tokens: int, *, median: int = 48, max_tokens: int = 512, seed: int = 0
) -> list[int]:
    """The shortest prefix of a ``token_lengths`` draw holding at least ``total_tokens`` tokens."""
    lengths = token_lengths(
        max(1, 4 * total_tokens // median), median=median, max_tokens=max_tokens, seed=seed
    )
    needed = int(np.searchsorted(np.cumsum(lengths), total_tokens)) + 1
    return lengths[:needed].tolist()


def write_corpus(path: Path, documents: int, *, seed: int = 0) -> Path:
    """A text file of ``documents`` lines (about 10 to 120 words each) cut from the stdlib text:
    a corpus for the embedding job on machines that lack ../shared/data."""
    words = stdlib_text(max_chars=max(50_000, 200 * documents)).split()
    rng = np.random.default_rng(seed)
    lines, start = [], 0
    for count in rng.integers(10, 120, size=documents):
        if start + count > len(words):
            start = 0
        lines.append(" ".join(words[start : start + count]))
        start += count
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
