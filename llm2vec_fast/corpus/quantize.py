"""Compact embeddings, as sentence-transformers' ``quantize_embeddings`` makes them.

- ``int8`` / ``uint8``: each dimension's calibrated range [min, max] cut into 255 equal steps;
  a value becomes the floor of its step, clipped to 0..255 (minus 128 for int8). The ranges come
  from a sample of the job's own rows and are recorded in the manifest, so that a query or a
  later reader quantizes and dequantizes the same way.
- ``binary`` / ``ubinary``: one sign bit per dimension (value > 0), packed 8 to a byte, big-end
  first (``np.packbits``); ``binary`` stores each byte minus 128 as int8.
"""

from __future__ import annotations

import numpy as np

from llm2vec_fast.corpus.job_settings import QUANTIZE

SCALAR = ("int8", "uint8")


def check_precision(precision: str) -> None:
    if precision not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {precision!r}")


def calibration_ranges(embeddings: np.ndarray) -> np.ndarray:
    """(2, dim) float32: the per-dimension min and max of ``embeddings`` (n, dim)."""
    if len(embeddings) == 0:
        raise ValueError("int8/uint8 calibration needs at least one embedded row")
    return np.vstack((embeddings.min(axis=0), embeddings.max(axis=0))).astype(np.float32)


def code_width(precision: str, dim: int) -> int:
    """Values per row of the stored codes: dim for int8/uint8, bytes of packed bits for binary."""
    return dim if precision in SCALAR else (dim + 7) // 8


def code_dtype(precision: str) -> np.dtype:
    return np.dtype(np.int8 if precision in ("int8", "binary") else np.uint8)


def _steps(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranges = np.asarray(ranges, dtype=np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    return ranges[0], np.where(steps == 0, 1, steps)


def quantize(
    embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None
) -> np.ndarray:
    """(n, code_width) codes of ``embeddings`` (n, dim); ``ranges`` (2, dim) for int8/uint8."""
    check_precision(precision)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if precision in SCALAR:
        if ranges is None:
            raise ValueError(f"{precision} quantization needs the calibrated ranges")
        starts, steps = _steps(ranges)
        buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return (buckets - 128).astype(np.int8) if precision == "int8" else buckets.astype(np.uint8)
    bits = np.packbits(embeddings > 0, axis=-1)
    return (bits - 128).astype(np.int8) if precision == "binary" else bits


def packed_bits(codes: np.ndarray, precision: str) -> np.ndarray:
    """Binary codes as the uint8 bytes of the sign bits (what faiss' binary indexes take)."""
    if precision == "binary":
        return (codes.astype(np.int16) + 128).astype(np.uint8)
    return np.asarray(codes, dtype=np.uint8)


def dequantize(
    codes: np.ndarray, precision: str, dim: int, ranges: np.ndarray | None = None
) -> np.ndarray:
    """(n, dim) float32 approximations of the embeddings behind ``codes``.

    int8/uint8: the start of each value's step (sentence-transformers' rescoring does the same).
    binary/ubinary: +1 where the value was > 0, else -1 (the direction a sign code keeps).
    """
    check_precision(precision)
    if precision in SCALAR:
        if ranges is None:
            raise ValueError(f"{precision} dequantization needs the calibrated ranges")
        starts, steps = _steps(ranges)
        buckets = codes.astype(np.float32) + (128 if precision == "int8" else 0)
        return (buckets * steps + starts).astype(np.float32)
    bits = np.unpackbits(packed_bits(codes, precision), axis=-1)[:, :dim]  # (n, dim) 0/1
    return bits.astype(np.float32) * 2 - 1
