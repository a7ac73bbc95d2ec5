"""The offline embedding job: inputs -> Parquet shards + manifest + errors, resumable.

Work order is fixed by the inputs alone: files sorted by path, rows in file order, every row
(good or bad) numbered globally, shard k = rows [k * shard_rows, (k + 1) * shard_rows). So a
resumed job, or N processes (shard k belongs to rank k % N), know exactly which rows are done,
and each shard's content does not depend on who computed it or when.

Three stages overlap: a reader thread parses rows and hands texts to a tokenizer thread pool
(fast tokenizers release the GIL); the main thread hands each shard's items to the engine, which
packs its own token-budget batches; a writer thread writes finished shards.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llm2vec_fast.corpus.duplicates import FirstOccurrences, pack_location, unpack_location
from llm2vec_fast.corpus.engine import Engine, Item, Text, load_engine
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
    part_name,
    recorded_shards,
    with_shards,
)
from llm2vec_fast.corpus.read import MATRIX_CACHE
from llm2vec_fast.corpus.readers import (
    Fields,
    InputError,
    InputFile,
    discover_inputs,
    estimate_rows,
    fingerprint,
    is_job_folder,
    read_rows,
)
from llm2vec_fast.corpus.writer import ShardResult, ShardWriter

TOKENIZE_CHUNK = 256
DUPLICATE_CHECK_ROWS = 4096  # ids checked for duplicates at once
PREFETCH_SHARDS = 2
# rows per engine call: its packed batches run back to back on a GPU (no wait for each result),
# and its (rows, dim) fp32 results stay on the device until the call returns
EMBED_CALL_ROWS = 8192
ON_LONG = ("truncate", "error")
OUTPUT_DTYPES = ("float32", "float16")


@dataclass
class Row:
    index: int  # global row number, from 0
    file: str
    line: int
    id: str | None
    text: Text | None
    error: str | None


@dataclass
class ShardWork:
    index: int
    start: int
    stop: int
    rows: list[Row]  # rows to embed
    errors: list[Row]  # rows with an error
    tokenized: list[Future]  # one future per chunk of TOKENIZE_CHUNK texts, each -> list[Item]


@dataclass
class _End:
    total_rows: int


@dataclass
class JobSummary:
    output: Path
    rows_in: int
    embedded: int
    errors: int
    truncated: int
    shards_written: int
    shards_total: int
    complete: bool
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # embedded by this process in this run
    rank: int = 0  # under torchrun: the process that returned this summary (timings are its own)
    docs: int = 0  # embedded by this process in this run
    engine: dict = field(
        default_factory=dict
    )  # the engine's description, as the manifest records it

    def __str__(self) -> str:
        lines = [engine_line(self.engine)] if self.engine else []
        lines += [
            f"{self.output}: rows in {self.rows_in} = embedded {self.embedded} + errors {self.errors}"
            f" ({ERRORS}); truncated {self.truncated}; shards written now {self.shards_written}, total {self.shards_total}"
            + ("" if self.complete else " (incomplete)")
        ]
        if self.seconds:
            wall = self.seconds.get("wall", 0.0)
            split = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items() if k != "wall")
            lines.append(f"time: wall {wall:.2f}s ({split}; stages overlap)")
            embedding = wall - self.seconds.get(
                "load model", 0.0
            )  # the rates leave model loading out
            if embedding > 0 and self.docs:
                lines.append(
                    f"rate: {self.docs / embedding:,.1f} docs/s, {self.tokens / embedding:,.0f} tokens/s"
                    + (f" (rank {self.rank})" if self.rank else "")
                )
        return "\n".join(lines)


class _Timer:
    """Seconds spent per stage, summed across threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _rows(
    files: list[InputFile],
    fields: Fields,
    instruction: str | None,
    check_duplicates: bool,
    limit: int | None,
) -> Iterator[Row]:
    """Every input row in work order, with the job-level checks (empty text, duplicate ids)."""
    rows = _checked_rows(files, fields, instruction, limit)
    if not check_duplicates:
        yield from rows
        return
    seen = FirstOccurrences()
    file_numbers = {file.name: number for number, file in enumerate(files)}
    while chunk := list(itertools.islice(rows, DUPLICATE_CHECK_ROWS)):
        candidates = [row for row in chunk if row.error is None]
        earlier = seen.check(
            [row.id for row in candidates],
            [pack_location(file_numbers[row.file], row.line) for row in candidates],
        )
        for row, where in zip(candidates, earlier):
            if where is not None:
                file_number, line = unpack_location(where)
                row.error, row.text = (
                    f"duplicate id (first at {files[file_number].name}:{line})",
                    None,
                )
        yield from chunk


def _checked_rows(
    files: list[InputFile], fields: Fields, instruction: str | None, limit: int | None
) -> Iterator[Row]:
    """Every input row in work order, with the row-level checks (empty text, empty id)."""
    index = 0
    for file in files:
        for raw in read_rows(file, fields):
            if limit is not None and index >= limit:
                return
            error = raw.error
            if error is None and not raw.text.strip():
                error = "empty or whitespace-only text"
            if error is None and raw.id is not None and not raw.id.strip():
                error = "empty id"
            row_id = raw.id if fields.id is not None else f"{file.name}:{raw.line}"
            row_instruction = raw.instruction if fields.instruction is not None else instruction
            text = (row_instruction, raw.text) if error is None and row_instruction else raw.text
            yield Row(index, file.name, raw.line, row_id, text if error is None else None, error)
            index += 1


def _error_record(row: Row) -> dict:
    return {"id": row.id, "file": row.file, "line": row.line, "reason": row.error}


def _distributed() -> tuple[int, int, object | None, bool]:
    """(rank, world_size, gloo group or None, whether we initialized the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "torch.distributed" not in sys.modules:
        return 0, 1, None, False  # no torch import for a single process with the fake engine
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = (
            None
            if dist.get_backend() == "gloo"
            else dist.new_group(backend="gloo", timeout=dt.timedelta(days=7))
        )
        return dist.get_rank(), dist.get_world_size(), group, False
    if world <= 1:
        return 0, 1, None, False
    dist.init_process_group("gloo", timeout=dt.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), None, True


def _own_files(path: Path) -> bool:
    names = (MANIFEST, ERRORS, SHARDS_DIR, MATRIX_CACHE, MATRIX_CACHE + ".source")
    return path.name in names or path.name.startswith("manifest.") or is_temporary(path)


def _prepare_folder(folder: Path, identity: dict, overwrite: bool) -> None:
    """Rank 0 only: clear (--overwrite) or check the folder, drop temporary leftovers, write the
    manifest if there is none."""
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in folder.iterdir():
            if _own_files(path):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not (folder / MANIFEST).is_file():
        foreign = [p.name for p in folder.iterdir() if not _own_files(p)]
        if foreign:
            raise JobMismatchError(
                f"{folder} is not empty and holds no embedding job ({', '.join(sorted(foreign)[:3])} ...):"
                " choose an empty or new folder"
            )
        atomic_write_json(folder / MANIFEST, new_manifest(identity))
    for path in list(folder.glob("*")) + list(folder.glob(f"{SHARDS_DIR}/*")):
        if is_temporary(path):
            path.unlink()


def _check_identity(folder: Path, identity: dict, keys: Sequence[str]) -> None:
    old = load_manifest(folder)
    differences = identity_differences(
        {k: old.get(k) for k in keys}, {k: identity[k] for k in keys}
    )
    if differences:
        raise JobMismatchError(
            f"{folder} holds a job with other settings or inputs: {'; '.join(differences[:5])}."
            " Use --overwrite to start over, or another output folder."
        )


def _finalize(folder: Path, header: dict, total_rows: int, shard_rows: int) -> dict:
    """Merge the shards of all ranks into ``manifest.json`` and ``errors.jsonl``."""
    shards = recorded_shards(folder)
    expected = math.ceil(total_rows / shard_rows)
    missing = sorted(set(range(expected)) - set(shards))
    if missing:
        raise RuntimeError(
            f"{folder}: shards {missing[:10]} are not done; run the same command again to finish them"
        )
    for k in range(expected):
        start, stop = shards[k]["rows"]
        if (start, stop) != (k * shard_rows, min((k + 1) * shard_rows, total_rows)) or shards[k][
            "embedded"
        ] + shards[k]["errors"] != stop - start:
            raise RuntimeError(
                f"{folder}: shard {k} covers rows {start}-{stop} with {shards[k]['embedded']} embedded"
                f" and {shards[k]['errors']} errors, which does not account for every row read"
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


def engine_line(description: dict) -> str:
    """One line saying what embeds the rows: model, pooling, max length (which may have come from an
    adapter's llm2vec_config.json), dtype, attention."""
    attention = "causal" if description.get("bidirectional") is False else "bidirectional"
    return (
        f"model {description.get('model')}: {description.get('pooling')} pooling, max length"
        f" {description.get('max_length')}, {description.get('dtype')}, {attention} attention"
        + (", normalized" if description.get("normalize") else "")
    )


def _progress(enabled: bool, rank: int):
    if not enabled or rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        unit="doc",
        unit_scale=True,
        dynamic_ncols=True,
        smoothing=0.05,
        file=sys.stderr,
        desc="embed",
    )


def embed_corpus(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    model: str | None = None,
    adapters: Sequence[str] = (),
    engine: Engine | None = None,
    id_field: str | None = None,
    text_field: str = "text",
    instruction: str | None = None,
    instruction_field: str | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    batch_tokens: int = 16384,
    normalize: bool = False,
    causal: bool = False,
    cuda_graphs: bool = False,
    dtype: str | None = None,
    output_dtype: str = "float32",
    device: str | None = None,
    limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_long: str = "truncate",
    shard_rows: int = 10000,
    tokenize_workers: int | None = None,
    progress: bool = True,
) -> JobSummary:
    """Embed every row of ``inputs`` into ``output`` (see ``llm2vec-fast embed --help``).

    Resumes when ``output`` holds the same job; ``resume=True`` insists that it does. Under
    ``torchrun`` each rank takes the shards k with k % world_size == rank. ``engine`` replaces
    the model options with a ready engine (anything with tokenize / embed / describe).
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {ON_LONG}, got {on_long!r}")
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {output_dtype!r}")
    if instruction is not None and instruction_field is not None:
        raise ValueError("give --instruction or --instruction-field, not both")
    for name, value in (
        ("shard_rows", shard_rows),
        ("batch_tokens", batch_tokens),
        ("max_length", max_length),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if resume and overwrite:  # before hashing the inputs: a refusal should not wait for that
        raise ValueError(
            "--resume continues the job in the output folder and --overwrite deletes it: give one"
        )
    started = time.perf_counter()
    timer = _Timer()
    folder = Path(output)
    files = discover_inputs(inputs, output=folder)
    fields = Fields(text=text_field, id=id_field, instruction=instruction_field)
    identity = {
        "settings": {
            "id_field": id_field,
            "text_field": text_field,
            "instruction": instruction,
            "instruction_field": instruction_field,
            "on_long": on_long,
            "shard_rows": shard_rows,
            "output_dtype": output_dtype,
            "limit": limit,
        },
        "inputs": [fingerprint(f) for f in files],
    }
    has_job = (folder / MANIFEST).is_file()
    if resume and not has_job:
        raise FileNotFoundError(f"--resume: {folder} holds no embedding job to resume")
    if has_job and not resume and is_job_folder(folder) and not recorded_shards(folder):
        overwrite = True  # a job that stopped before its first shard (a setting or an input to fix): start afresh
    if has_job and not overwrite:
        _check_identity(folder, identity, ("settings", "inputs"))
    rank, world, group, owns_group = _distributed()
    try:
        if engine is None:
            load_start = time.perf_counter()
            # a job continues with what it started with where this run does not say (pooling and length
            # may have come from an adapter's llm2vec_config.json; older versions recorded a 400 word cut)
            recorded = load_manifest(folder).get("engine", {}) if has_job and not overwrite else {}
            engine = load_engine(
                model,
                adapters,
                pooling=pooling or recorded.get("pooling"),
                max_length=max_length or recorded.get("max_length"),
                device=device,
                dtype=dtype,
                max_batch_tokens=batch_tokens,
                normalize=normalize,
                causal=causal,
                cuda_graphs=cuda_graphs,
                doc_max_length=recorded.get("doc_max_length"),
            )
            timer.add("load model", time.perf_counter() - load_start)
        identity["engine"] = engine.describe()
        if progress and rank == 0:
            print(engine_line(identity["engine"]), file=sys.stderr)
        if has_job and not overwrite:
            _check_identity(folder, identity, ("engine",))
        _collective_call(rank, group, world, lambda: _prepare_folder(folder, identity, overwrite))
        manifest = load_manifest(folder)
        header = {k: v for k, v in manifest.items() if k not in ("shards", "counts")}
        done = recorded_shards(folder)
        written = tokens = docs = 0
        total_rows = manifest.get("total_rows")
        if manifest.get("status") != "complete":
            writer = ShardWriter(
                folder,
                folder / (MANIFEST if world == 1 else part_name(rank)),
                header,
                output_dtype,
                dict(done),
            )
            written, total_rows, tokens, docs = _run(
                files,
                fields,
                instruction,
                limit,
                shard_rows,
                rank,
                world,
                set(done),
                engine,
                on_long,
                writer,
                timer,
                tokenize_workers,
                progress,
                identity["engine"],
            )
            if world > 1:
                _barrier(group)
            if rank == 0:
                manifest = _finalize(folder, header, total_rows, shard_rows)
            if world > 1:
                _barrier(group)
                manifest = load_manifest(folder)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    timer.add("wall", time.perf_counter() - started)
    counts = manifest["counts"]
    return JobSummary(
        folder,
        counts["rows_in"],
        counts["embedded"],
        counts["errors"],
        counts["truncated"],
        written,
        counts["shards"],
        manifest.get("status") == "complete",
        dict(timer.seconds),
        tokens,
        rank,
        docs,
        manifest.get("engine", {}),
    )


def _barrier(group) -> None:
    import torch.distributed as dist

    dist.barrier(group=group)


def _collective_call(rank: int, group, world: int, fn) -> None:
    """Run ``fn`` on rank 0; every rank raises if it failed (no rank left waiting)."""
    message = [None]
    if rank == 0:
        try:
            fn()
        except Exception as exc:  # re-raised below, on every rank
            message = [f"{type(exc).__name__}: {exc}"]
            if world == 1:
                raise
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(message, src=0, group=group)
        if message[0] is not None:
            raise RuntimeError(f"rank 0 could not prepare the output folder: {message[0]}")


def _read_shards(
    files,
    fields,
    instruction,
    limit,
    shard_rows,
    rank,
    world,
    done,
    pool,
    engine,
    timer,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Reader thread: group rows into shards, start tokenizing the shards this rank must do."""

    def tokenize(texts: list[Text]) -> list[Item]:
        start = time.perf_counter()
        items = engine.tokenize(texts)
        timer.add("tokenize", time.perf_counter() - start)
        return items

    def put(value) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def emit(index: int, rows: list[Row], stop_row: int) -> bool:
        good = [r for r in rows if r.error is None]
        futures = [
            pool.submit(tokenize, [r.text for r in good[i : i + TOKENIZE_CHUNK]])
            for i in range(0, len(good), TOKENIZE_CHUNK)
        ]
        work = ShardWork(
            index, index * shard_rows, stop_row, good, [r for r in rows if r.error], futures
        )
        return put(work)

    def timed(rows: Iterator[Row]) -> Iterator[Row]:
        while True:
            start = time.perf_counter()
            row = next(rows, None)
            timer.add("read", time.perf_counter() - start)
            if row is None:
                return
            yield row

    try:
        current: list[Row] = []
        shard = 0
        index = -1
        for row in timed(_rows(files, fields, instruction, fields.id is not None, limit)):
            index = row.index
            if index // shard_rows != shard:
                if shard % world == rank and shard not in done and not emit(shard, current, index):
                    return
                shard, current = index // shard_rows, []
            if shard % world == rank and shard not in done:
                current.append(row)
            if stop.is_set():
                return
        total = index + 1
        if (
            total > shard * shard_rows
            and shard % world == rank
            and shard not in done
            and not emit(shard, current, total)
        ):
            return
        put(_End(total))
    except BaseException as exc:
        put(exc)


def _run(
    files,
    fields,
    instruction,
    limit,
    shard_rows,
    rank,
    world,
    done,
    engine,
    on_long,
    writer: ShardWriter,
    timer: _Timer,
    tokenize_workers,
    progress,
    description: dict,
) -> tuple[int, int, int, int]:
    """Embed this rank's missing shards; returns (shards written, total input rows, tokens and rows embedded)."""
    dim = description["dim"]
    too_long = (
        f"max_length={description['max_length']} tokens"
        if "max_length" in description
        else "the engine's max length"
    )
    stop = threading.Event()
    prepared: queue.Queue = queue.Queue(maxsize=PREFETCH_SHARDS)
    finished: queue.Queue = queue.Queue(maxsize=PREFETCH_SHARDS)
    writer_error: list[BaseException] = []
    workers = tokenize_workers or max(1, min(4, (os.cpu_count() or 2) - 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    def write_loop() -> None:
        while True:
            shard = finished.get()
            if shard is None:
                return
            try:
                start = time.perf_counter()
                writer.write(shard)
                timer.add("write", time.perf_counter() - start)
            except BaseException as exc:
                writer_error.append(exc)
                stop.set()
                return

    reader = threading.Thread(
        target=_read_shards,
        daemon=True,
        name="corpus-reader",
        args=(
            files,
            fields,
            instruction,
            limit,
            shard_rows,
            rank,
            world,
            done,
            pool,
            engine,
            timer,
            prepared,
            stop,
        ),
    )
    writer_thread = threading.Thread(target=write_loop, daemon=True, name="corpus-writer")
    reader.start()
    writer_thread.start()
    bar = _progress(progress, rank)
    counted: list[
        int
    ] = []  # the input's row count, for the progress bar's total and ETA, once known
    if bar is not None:
        threading.Thread(
            target=lambda: counted.append(sum(estimate_rows(f) for f in files)), daemon=True
        ).start()
    written = tokens_done = docs_done = 0
    compute_start = time.perf_counter()
    try:
        while True:
            wait_start = time.perf_counter()
            work = _get(prepared, writer_error)
            timer.add("wait for input", time.perf_counter() - wait_start)
            if isinstance(work, BaseException):
                raise work
            if isinstance(work, _End):
                total_rows = work.total_rows
                break
            items: list[Item] = [item for future in work.tokenized for item in future.result()]
            for row, item in zip(work.rows, items):
                if item.truncated and on_long == "error":
                    raise InputError(
                        f"{row.file}:{row.line}: text is longer than {too_long}"
                        " (--on-long error; use --on-long truncate to embed its first tokens)"
                    )
                if not any(item.pool_mask):  # pooling nothing would give a zero vector
                    row.error = "the text has no tokens to pool (the tokenizer kept none of it)"
            error_rows = sorted(
                work.errors + [row for row in work.rows if row.error], key=lambda row: row.index
            )
            items = [item for row, item in zip(work.rows, items) if row.error is None]
            rows = [row for row in work.rows if row.error is None]
            lengths = [len(item.input_ids) for item in items]
            embeddings = np.empty((len(items), dim), dtype=np.float32)  # (n, dim)
            start = time.perf_counter()
            calls = max(1, math.ceil(len(items) / EMBED_CALL_ROWS))
            call_rows = max(1, math.ceil(len(items) / calls))  # even calls
            for first in range(0, len(items), call_rows):
                embeddings[first : first + call_rows] = engine.embed(
                    items[first : first + call_rows], bar
                )
            timer.add("compute", time.perf_counter() - start)
            tokens_done += sum(lengths)
            if bar is not None:
                elapsed = time.perf_counter() - compute_start
                bar.set_postfix_str(f"{tokens_done / max(elapsed, 1e-9):,.0f} tok/s", refresh=False)
                bar.update(len(error_rows))
                if counted and bar.total is None:
                    bar.total = _rank_rows(
                        min(counted[0], limit if limit is not None else counted[0]),
                        shard_rows,
                        rank,
                        world,
                        done,
                    )
            shard = ShardResult(
                work.index,
                work.start,
                work.stop,
                [r.id for r in rows],
                embeddings,
                [_error_record(r) for r in error_rows],
                sum(item.truncated for item in items),
                sum(lengths),
            )
            _put(finished, shard, writer_error)
            written += 1
            docs_done += len(items)
        finished.put(None)
        writer_thread.join()
        if writer_error:
            raise writer_error[0]
        return written, total_rows, tokens_done, docs_done
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()


def _rank_rows(total: int, shard_rows: int, rank: int, world: int, done: set[int]) -> int:
    """Rows in the shards this rank still has to do."""
    shards = range(rank, math.ceil(total / shard_rows), world)
    return sum(min(shard_rows, total - k * shard_rows) for k in shards if k not in done)


def _get(source: queue.Queue, writer_error: list[BaseException]):
    while True:
        if writer_error:
            raise writer_error[0]
        try:
            return source.get(timeout=0.1)
        except queue.Empty:
            continue


def _put(target: queue.Queue, value, writer_error: list[BaseException]) -> None:
    while True:
        if writer_error:
            raise writer_error[0]
        try:
            target.put(value, timeout=0.1)
            return
        except queue.Full:
            continue
