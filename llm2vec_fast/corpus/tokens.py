"""A chunk of rows tokenized for the embedder: the ids of the rows to embed, the error records of
the others and their tokens in flat arrays, so that a chunk crosses from a tokenizer process in a
few buffers and the embedder does no per-token Python work.

Tokenizer processes and the in-process tokenizer threads build chunks with the same function
(:func:`tokenize_rows`), which also makes the row checks that need tokens: a text over the
engine's max length with ``--on-long error``, and a text with no token to pool.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from llm2vec_fast.corpus.engine import Item
from llm2vec_fast.corpus.inputs import InputError
from llm2vec_fast.corpus.rows import Row, error_record

NO_TOKENS = "the text has no tokens to pool (the tokenizer kept none of it)"


@dataclass
class Tokens:
    """The tokens of consecutive texts, flat: text i has ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray  # (tokens,) int32
    pool_mask: np.ndarray  # (tokens,) bool
    offsets: np.ndarray  # (texts + 1,) int64, from 0 to tokens
    truncated: np.ndarray  # (texts,) bool

    @classmethod
    def from_items(cls, items: list[Item]) -> Tokens:
        """The items' lists laid end to end (an id outside int32 raises)."""
        lengths = np.fromiter((len(item.input_ids) for item in items), np.int64, len(items))
        offsets = np.zeros(len(items) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        chain = itertools.chain.from_iterable
        return cls(
            np.fromiter(chain(item.input_ids for item in items), np.int32, total),
            np.fromiter(chain(item.pool_mask for item in items), np.bool_, total),
            offsets,
            np.fromiter((item.truncated for item in items), np.bool_, len(items)),
        )

    def __len__(self) -> int:
        return len(self.truncated)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def pooled_counts(self) -> np.ndarray:
        """(texts,) how many tokens of each text are pooled."""
        pooled = np.zeros(len(self.pool_mask) + 1, np.int64)
        np.cumsum(self.pool_mask, out=pooled[1:])
        return pooled[self.offsets[1:]] - pooled[self.offsets[:-1]]

    def select(self, keep: np.ndarray) -> Tokens:
        """The texts where ``keep`` (texts,) is true, in their order."""
        lengths = np.diff(self.offsets)  # (texts,)
        token_keep = np.repeat(keep, lengths)  # (tokens,)
        offsets = np.zeros(int(keep.sum()) + 1, np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
        return Tokens(
            self.ids[token_keep], self.pool_mask[token_keep], offsets, self.truncated[keep]
        )

    def items(self) -> list[Item]:
        """One item per text, its ids and mask views of the flat arrays (no copy)."""
        ids, mask, bounds = self.ids, self.pool_mask, self.offsets.tolist()
        return [
            Item(ids[start:stop], mask[start:stop], truncated)
            for start, stop, truncated in zip(bounds, bounds[1:], self.truncated.tolist())
        ]


@dataclass
class TokenizedRows:
    """Consecutive rows of a shard, ready to embed: ``ids`` and ``tokens`` of the rows to embed,
    ``errors`` the records of the others, both in row order."""

    ids: list[str]
    errors: list[dict]
    tokens: Tokens


def tokenize_rows(tokenizer, rows: list[Row], on_long: str, too_long: str) -> TokenizedRows:
    """Tokenize the rows without an error; ``too_long`` names the engine's limit in the error
    raised for a truncated text when ``on_long`` is "error". A text with no token to pool would
    embed as a zero vector: it becomes an error record."""
    good = [row for row in rows if row.error is None]
    tokens = Tokens.from_items(tokenizer.tokenize([row.text for row in good]) if good else [])
    if len(tokens) != len(good):
        raise ValueError(f"the tokenizer returned {len(tokens)} items for {len(good)} texts")
    if on_long == "error" and tokens.truncated.any():
        row = good[int(np.argmax(tokens.truncated))]
        raise InputError(
            f"{row.file}:{row.line}: text is longer than {too_long}"
            " (--on-long error; use --on-long truncate to embed its first tokens)"
        )
    empty = tokens.pooled_counts() == 0  # (good rows,)
    if empty.any():
        for row in itertools.compress(good, empty.tolist()):
            row.error = NO_TOKENS
        tokens = tokens.select(~empty)
    return TokenizedRows(
        [row.id for row in rows if row.error is None],
        [error_record(row) for row in rows if row.error is not None],
        tokens,
    )
