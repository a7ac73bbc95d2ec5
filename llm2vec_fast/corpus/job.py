"""The offline embedding job: inputs -> Parquet shards + manifest + errors, resumable.

Work order is fixed by the inputs alone: files sorted by path, rows in file order, every row
(good or bad) numbered globally, shard k = rows [k * shard_rows, (k + 1) * shard_rows). So a
resumed job, or N processes (shard k belongs to rank k % N), know exactly which rows are done,
and each shard's content does not depend on who computed it or when.

One run, top to bottom: check the settings (``job_settings``), fingerprint the inputs and decide
whether to continue the job in the folder (``job_folder``), load the engine, join the other
ranks (``ranks``), embed the missing shards (``pipeline``), merge them into the final manifest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from llm2vec_fast.corpus.calibration import record_quantization
from llm2vec_fast.corpus.engine import Engine, load_engine
from llm2vec_fast.corpus.index import index_state
from llm2vec_fast.corpus.inputs import discover_inputs, fingerprint
from llm2vec_fast.corpus.job_folder import check_identity, finalize, prepare_folder, starts_afresh
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.manifest import MANIFEST, load_manifest, recorded_shards
from llm2vec_fast.corpus.pipeline import Pipeline, PipelineResult
from llm2vec_fast.corpus.ranks import join_ranks
from llm2vec_fast.corpus.summary import JobSummary, StageTimer, engine_line
from llm2vec_fast.corpus.writer import ShardWriter


def embed_corpus(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    engine: Engine | None = None,
    **options,
) -> JobSummary:
    """Embed every row of ``inputs`` into ``output`` (see ``llm2vec-fast embed --help``).

    ``options`` are the fields of :class:`JobSettings` (``id_field=``, ``pooling_mode=``,
    ``max_batch_tokens=``, ``shard_rows=``, ...). Resumes when ``output`` holds the same job;
    ``resume=True`` insists that it does. Under ``torchrun`` each rank takes the shards k with
    k % world_size == rank. ``engine`` replaces the model options with a ready engine (anything
    with tokenize / embed / describe).
    """
    settings = JobSettings(**options)
    started = time.perf_counter()
    timer = StageTimer()
    folder = Path(output)
    files = discover_inputs(inputs, output=folder)
    identity = {"settings": settings.recorded(), "inputs": [fingerprint(f) for f in files]}
    has_job = (folder / MANIFEST).is_file()
    overwrite = starts_afresh(
        folder, identity, resume=settings.resume, overwrite=settings.overwrite
    )
    continues = has_job and not overwrite
    ranks = join_ranks()
    try:
        if engine is None:
            load_start = time.perf_counter()
            recorded = load_manifest(folder).get("engine", {}) if continues else {}
            engine = _load_engine(settings, recorded)
            timer.add("load model", time.perf_counter() - load_start)
        identity["engine"] = engine.describe()
        if settings.progress and ranks.rank == 0:
            print(engine_line(identity["engine"]), file=sys.stderr)
        if continues:
            check_identity(folder, identity, ("engine",))

        def prepare() -> None:
            prepare_folder(folder, identity, overwrite)
            record_quantization(folder, settings, files, engine)

        ranks.on_first(prepare, "prepare the output folder")
        manifest = load_manifest(folder)
        result = PipelineResult()  # stays empty for a job already complete
        if manifest.get("status") != "complete":
            header = {k: v for k, v in manifest.items() if k not in ("shards", "counts")}
            done = recorded_shards(folder)
            writer = ShardWriter(
                folder, folder / ranks.manifest_name, header, settings.output_dtype, dict(done)
            )
            result = Pipeline(
                files,
                settings,
                engine,
                identity["engine"],
                writer,
                ranks=ranks,
                done=set(done),
                timer=timer,
            ).run()
            ranks.barrier()
            if ranks.rank == 0:
                manifest = finalize(folder, header, result.total_rows, settings.shard_rows)
            if ranks.world > 1:
                ranks.barrier()
                manifest = load_manifest(folder)
    finally:
        ranks.close()
    timer.add("wall", time.perf_counter() - started)
    counts = manifest["counts"]
    index = index_state(folder) if manifest.get("status") == "complete" else None
    return JobSummary(
        folder,
        rows_in=counts["rows_in"],
        embedded=counts["embedded"],
        errors=counts["errors"],
        truncated=counts["truncated"],
        shards_written=result.shards_written,
        shards_total=counts["shards"],
        complete=manifest.get("status") == "complete",
        seconds=dict(timer.seconds),
        tokens=result.tokens,
        rank=ranks.rank,
        docs=result.docs,
        engine=manifest.get("engine", {}),
        index=None if index == "fresh" else index,
        busy=result.busy,
        bound=result.bound,
    )


def _load_engine(settings: JobSettings, recorded: dict) -> Engine:
    """The engine of ``settings``. A continued job keeps what it recorded (``recorded``, the
    manifest's engine) where this run does not say: its pooling and max length may have come
    from an adapter's llm2vec_config.json, and its doc_max_length (llm2vec's word cut) decides
    its truncation."""
    return load_engine(
        settings.model,
        settings.adapters,
        pooling_mode=settings.pooling_mode or recorded.get("pooling"),
        max_length=settings.max_length or recorded.get("max_length"),
        device=settings.device,
        dtype=settings.dtype,
        max_batch_tokens=settings.max_batch_tokens,
        normalize=settings.normalize,
        causal=settings.causal,
        cuda_graphs=settings.cuda_graphs,
        doc_max_length=recorded.get("doc_max_length"),
        dim=settings.dim,
        prompt=settings.prompt,
        prompt_name=settings.prompt_name,
    )
