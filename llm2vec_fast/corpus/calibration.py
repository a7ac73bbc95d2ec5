"""The manifest's ``quantization`` record of a ``--quantize`` job, made once before any shard.

int8/uint8 ranges are calibrated on the first ``CALIBRATION_ROWS`` rows of the job that can be
embedded, in work order, so that every rank, a resumed run and every later query use the same
ranges, and the sample does not depend on who embeds which shard.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from llm2vec_fast.corpus.engine import Engine
from llm2vec_fast.corpus.inputs import InputFile
from llm2vec_fast.corpus.job_settings import CALIBRATION_ROWS, JobSettings
from llm2vec_fast.corpus.manifest import MANIFEST, atomic_write_json, load_manifest
from llm2vec_fast.corpus.quantize import SCALAR, calibration_ranges
from llm2vec_fast.corpus.rows import job_rows


def quantization_record(settings: JobSettings, files: list[InputFile], engine: Engine) -> dict:
    """What a reader needs to read the codes back: precision, column, ranges (int8/uint8)."""
    precision = settings.quantize
    record = {
        "precision": precision,
        "column": f"embedding_{precision}",
        "keep_float": settings.keep_float,
    }
    if precision not in SCALAR:
        return record
    rows = job_rows(files, settings.fields, settings.instruction, settings.limit)
    good = (row.text for row in rows if row.error is None)
    items = [
        item
        for item in engine.tokenize(list(itertools.islice(good, CALIBRATION_ROWS)))
        if any(item.pool_mask)
    ]
    if not items:
        raise ValueError(
            f"--quantize {precision}: the input has no row to embed, so there is nothing to"
            " calibrate its ranges on"
        )
    ranges = calibration_ranges(engine.embed(items))  # (2, dim)
    record["ranges"] = ranges.tolist()
    record["calibration"] = f"min and max per dimension of the job's first {len(items)} rows"
    return record


def record_quantization(
    folder: Path, settings: JobSettings, files: list[InputFile], engine: Engine
) -> None:
    """Rank 0: add the ``quantization`` record to a quantized job's manifest that lacks it."""
    manifest = load_manifest(folder)
    if settings.quantize is None or "quantization" in manifest:
        return
    manifest["quantization"] = quantization_record(settings, files, engine)
    atomic_write_json(folder / MANIFEST, manifest)
