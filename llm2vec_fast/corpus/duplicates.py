"""Duplicate-id detection over tens of millions of ids in 24 bytes per id.

A Python dict of every id seen costs ~180 bytes per id (the string, a tuple, the entry): 9 GB for
50M ids, in every torchrun rank. Here each id is reduced to a 128-bit hash (two uint64 columns)
plus the packed location of its first occurrence, kept in sorted numpy runs that merge as they
grow (a log-structured set): a batch of ids is checked against every run with a binary search, and
its new ids become a new run. A false duplicate needs two ids with the same 128-bit blake2b
digest (about 1e-23 for 50M ids).
"""

from __future__ import annotations

import hashlib

import numpy as np

LINE_BITS = 40  # a location packs (file number << LINE_BITS) | line


def pack_location(file_number: int, line: int) -> int:
    return (file_number << LINE_BITS) | line


def unpack_location(location: int) -> tuple[int, int]:
    return location >> LINE_BITS, location & ((1 << LINE_BITS) - 1)


def _hashes(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 columns: the halves of each id's 128-bit blake2b digest."""
    digests = b"".join(
        hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids
    )
    pairs = np.frombuffer(digests, dtype=np.uint64).reshape(len(ids), 2)  # (n, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class FirstOccurrences:
    """Remembers ids in the order they are checked and answers where an id was first seen."""

    def __init__(self) -> None:
        # (high, low, location) runs, each sorted by high
        self._runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self._runs)

    def check(self, ids: list[str], locations: list[int]) -> list[int | None]:
        """For each id, the location of an earlier occurrence (in earlier calls or earlier in
        ``ids``), or None for a first occurrence; the first occurrences are then remembered."""
        if not ids:
            return []
        high, low = _hashes(ids)
        location = np.asarray(locations, dtype=np.int64)
        first = np.full(len(ids), -1, dtype=np.int64)  # (n,) earlier location, -1: none
        for run_high, run_low, run_location in self._runs:
            left = np.searchsorted(run_high, high, side="left")
            right = np.searchsorted(run_high, high, side="right")
            for i in np.nonzero(right > left)[0]:  # candidates: the high half matches
                same = np.nonzero(run_low[left[i] : right[i]] == low[i])[0]
                if len(same):
                    first[i] = run_location[left[i] + same[0]]
        # within the batch: the earliest of equal hashes is the first occurrence
        order = np.lexsort((np.arange(len(ids)), low, high))
        same_as_previous = np.zeros(len(ids), dtype=bool)
        same_as_previous[1:] = (high[order][1:] == high[order][:-1]) & (
            low[order][1:] == low[order][:-1]
        )
        group_start = np.maximum.accumulate(np.where(same_as_previous, 0, np.arange(len(ids))))
        earliest = order[group_start]  # (n,) in sorted order: the first index of each one's group
        repeated = order[same_as_previous]
        first[repeated] = np.where(
            first[repeated] >= 0, first[repeated], location[earliest[same_as_previous]]
        )
        new = first < 0
        self._add_run(high[new], low[new], location[new])
        return [None if f < 0 else int(f) for f in first]

    def _add_run(self, high: np.ndarray, low: np.ndarray, location: np.ndarray) -> None:
        order = np.argsort(high, kind="stable")
        self._runs.append((high[order], low[order], location[order]))
        # merge while the newest run is at least half the size of the one before: O(log n) runs
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            newer, older = self._runs.pop(), self._runs.pop()
            merged = [np.concatenate([a, b]) for a, b in zip(older, newer)]
            order = np.argsort(merged[0], kind="stable")
            self._runs.append(tuple(column[order] for column in merged))
