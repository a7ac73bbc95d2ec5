"""The output folder around a run: is there a job to continue, is it this job, prepare it, and
merge every rank's shards into the final manifest once all are done.

A job is named by its identity: the recorded settings, the inputs' fingerprints and the engine's
description. A run continues a job only with an equal identity; anything else is refused with
what differs, unless the run starts the folder afresh.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

from llm2vec_fast.corpus.index import INDEX_FILES
from llm2vec_fast.corpus.inputs import is_job_folder
from llm2vec_fast.corpus.manifest import (
    ERRORS,
    MANIFEST,
    SHARDS_DIR,
    JobMismatchError,
    atomic_write_bytes,
    atomic_write_json,
    identity_differences,
    is_temporary,
    load_manifest,
    new_manifest,
    recorded_shards,
    with_shards,
)
from llm2vec_fast.corpus.output import MATRIX_CACHE


def starts_afresh(folder: Path, identity: dict, *, resume: bool, overwrite: bool) -> bool:
    """Whether this run clears ``folder`` and starts over; else a job there must have the same
    settings and inputs (its engine is checked once loaded, by :func:`check_identity`).

    A job that stopped before its first shard was written (a setting or an input to fix) starts
    afresh without ``overwrite``; ``resume`` insists on a job to continue.
    """
    has_job = (folder / MANIFEST).is_file()
    if resume and not has_job:
        raise FileNotFoundError(f"--resume: {folder} holds no embedding job to resume")
    if has_job and not resume and is_job_folder(folder) and not recorded_shards(folder):
        return True
    if has_job and not overwrite:
        check_identity(folder, identity, ("settings", "inputs"))
    return overwrite


def check_identity(folder: Path, identity: dict, keys: Sequence[str]) -> None:
    """Raise :class:`JobMismatchError` naming what differs from the job in ``folder``."""
    old = load_manifest(folder)
    differences = identity_differences(
        {k: old.get(k) for k in keys}, {k: identity[k] for k in keys}
    )
    if differences:
        raise JobMismatchError(
            f"{folder} holds a job with other settings or inputs: {'; '.join(differences[:5])}."
            " Use --overwrite to start over, or another output folder."
        )


def _is_job_file(path: Path) -> bool:
    """Whether a job writes ``path`` (the only files ``--overwrite`` deletes)."""
    names = (MANIFEST, ERRORS, SHARDS_DIR, MATRIX_CACHE, MATRIX_CACHE + ".source")
    caches = path.name.startswith("embeddings.") and path.name.endswith((".npy", ".npy.source"))
    return path.name in names or path.name.startswith("manifest.") or caches or is_temporary(path)


def _is_index_file(path: Path) -> bool:
    """An index of the job (``llm2vec-fast index``): kept by ``--overwrite``, which is checked
    against the new shards when it is used (an index of the same rows is updated, not rebuilt)."""
    return path.name in INDEX_FILES


def prepare_folder(folder: Path, identity: dict, overwrite: bool) -> None:
    """Rank 0 only: clear the job's files (``overwrite``) or refuse a folder holding other files,
    drop temporary leftovers, write the manifest if there is none."""
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in folder.iterdir():
            if _is_job_file(path):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not (folder / MANIFEST).is_file():
        foreign = [p.name for p in folder.iterdir() if not (_is_job_file(p) or _is_index_file(p))]
        if foreign:
            raise JobMismatchError(
                f"{folder} is not empty and holds no embedding job"
                f" ({', '.join(sorted(foreign)[:3])} ...): choose an empty or new folder"
            )
        atomic_write_json(folder / MANIFEST, new_manifest(identity))
    for path in list(folder.glob("*")) + list(folder.glob(f"{SHARDS_DIR}/*")):
        if is_temporary(path):
            path.unlink()


def finalize(folder: Path, header: dict, total_rows: int, shard_rows: int) -> dict:
    """Merge the shards of all ranks into ``manifest.json`` and ``errors.jsonl``."""
    shards = recorded_shards(folder)
    expected = math.ceil(total_rows / shard_rows)
    missing = sorted(set(range(expected)) - set(shards))
    if missing:
        raise RuntimeError(
            f"{folder}: shards {missing[:10]} are not done;"
            " run the same command again to finish them"
        )
    for k in range(expected):
        start, stop = shards[k]["rows"]
        covered = (start, stop) == (k * shard_rows, min((k + 1) * shard_rows, total_rows))
        if not covered or shards[k]["embedded"] + shards[k]["errors"] != stop - start:
            raise RuntimeError(
                f"{folder}: shard {k} covers rows {start}-{stop} with {shards[k]['embedded']}"
                f" embedded and {shards[k]['errors']} errors, which does not account for every"
                " row read"
            )
    errors = b"".join((folder / shards[k]["errors_file"]).read_bytes() for k in range(expected))
    atomic_write_bytes(folder / ERRORS, errors)
    manifest = with_shards(
        header, {k: shards[k] for k in range(expected)}, status="complete", total_rows=total_rows
    )
    atomic_write_json(folder / MANIFEST, manifest)
    for part in folder.glob("manifest.rank-*.json"):
        part.unlink()
    return manifest
