"""The overlapping stages that embed one process's missing shards: read, tokenize, compute,
write.

With ``workers`` > 0, a reader process and that many tokenizer processes (``workers``) read and
tokenize, and a collector thread puts their chunks back together into shards. With 0, all of it
runs in this process: a reader thread hands the texts of each shard to a tokenizer thread pool
(fast tokenizers release the GIL). Either way chunks of rows arrive tokenized in flat arrays
(``tokens.TokenizedRows``), the calling thread hands each shard's items (views of those arrays)
to the engine, which packs its own token-budget batches, and a writer thread turns finished shards
into Arrow tables and Parquet files.
Bounded queues between them keep at most PREFETCH_SHARDS shards waiting on each side; an error
in any stage stops the others and is raised in the calling thread. Each stage's busy time is
measured, and the summary names the stage that bounds the job.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from llm2vec_fast.corpus.engine import Engine, HashEngine, LLM2VecEngine
from llm2vec_fast.corpus.inputs import InputFile, estimate_rows
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.ranks import Ranks
from llm2vec_fast.corpus.rows import Row, job_rows
from llm2vec_fast.corpus.summary import StageTimer, bounding_stage, progress_bar, stage_busy
from llm2vec_fast.corpus.tokens import TokenizedRows, tokenize_rows
from llm2vec_fast.corpus.workers import (
    TOKENIZE_CHUNK,
    Failure,
    ReadEnd,
    WorkerPool,
    default_workers,
    worker_tokenizer,
)
from llm2vec_fast.corpus.writer import ShardResult, ShardWriter, warm_up

PREFETCH_SHARDS = 2
# rows per engine call: its packed batches run back to back on a GPU (no wait for each result),
# and its (rows, dim) fp32 results stay on the device until the call returns
EMBED_CALL_ROWS = 8192
QUEUE_POLL_SECONDS = 0.1


@dataclass
class ShardWork:
    index: int
    start: int
    stop: int
    chunks: Callable[[], list[TokenizedRows]]  # the shard's rows in order, once tokenized


@dataclass
class InputEnd:
    """The reader's last message: every row is read."""

    total_rows: int


@dataclass
class PipelineResult:
    shards_written: int = 0
    total_rows: int = 0  # rows in the input (all ranks' shards)
    tokens: int = 0  # embedded by this process
    docs: int = 0  # embedded by this process
    busy: dict[str, float] = field(default_factory=dict)  # per stage: share of the run
    bound: str | None = None  # the busiest stage (summary.bounding_stage)


class Pipeline:
    """Embeds the shards of ``ranks.rank`` that are not in ``done``, through ``writer``."""

    def __init__(
        self,
        files: list[InputFile],
        settings: JobSettings,
        engine: Engine,
        description: dict,
        writer: ShardWriter,
        *,
        ranks: Ranks,
        done: set[int],
        timer: StageTimer,
    ) -> None:
        self.files = files
        self.settings = settings
        self.engine = engine
        self.dim = description["dim"]
        self.too_long = (
            f"max_length={description['max_length']} tokens"
            if "max_length" in description
            else "the engine's max length"
        )
        self.writer = writer
        self.ranks = ranks
        self.done = done
        self.timer = timer
        self.stop = threading.Event()
        self.prepared: queue.Queue = queue.Queue(maxsize=PREFETCH_SHARDS)  # reader -> embedder
        self.finished: queue.Queue = queue.Queue(maxsize=PREFETCH_SHARDS)  # embedder -> writer
        self.writer_error: list[BaseException] = []

    def _todo(self, shard: int) -> bool:
        return self.ranks.owns(shard) and shard not in self.done

    def run(self) -> PipelineResult:
        """Embed and write every shard to do; returns once the last one is written."""
        workers = self.settings.workers
        if workers is None:  # a custom engine may not pickle: it tokenizes in this process
            known = isinstance(self.engine, (LLM2VecEngine, HashEngine))
            workers = default_workers() if known else 0
        started = time.perf_counter()
        if workers:
            pool = WorkerPool.start(
                workers,
                worker_tokenizer(self.engine),
                self.files,
                self.settings,
                self.ranks.rank,
                self.ranks.world,
                self.done,
                self.too_long,
            )
            reader = threading.Thread(
                target=self._collect_shards, args=(pool,), daemon=True, name="corpus-collector"
            )
            tokenizers = workers
        else:
            tokenizers = max(1, default_workers())
            threads = ThreadPoolExecutor(tokenizers, thread_name_prefix="tokenize")
            reader = threading.Thread(
                target=self._read_shards, args=(threads,), daemon=True, name="corpus-reader"
            )
        finished = False
        try:
            reader.start()
            result = self._embed_shards()
            finished = True
        finally:
            self.stop.set()
            if workers:
                reader.join()
                pool.close(finished)
            else:
                threads.shutdown(wait=False, cancel_futures=True)
        # the stages' shares of the time they ran: starting worker processes is none of them
        elapsed = time.perf_counter() - started - self.timer.seconds.get("start workers", 0.0)
        result.busy = stage_busy(self.timer.seconds, elapsed, {"tokenize": tokenizers})
        result.bound = bounding_stage(result.busy)
        return result

    def _embed_shards(self) -> PipelineResult:
        """The calling thread: embed each prepared shard and hand it to the writer thread."""
        writer = threading.Thread(target=self._write_shards, daemon=True, name="corpus-writer")
        writer.start()
        bar = progress_bar() if self.settings.progress and self.ranks.rank == 0 else None
        counted: list[int] = []  # the input's row count, once known: the bar's total and ETA
        if bar is not None:
            threading.Thread(
                target=lambda: counted.append(sum(estimate_rows(f) for f in self.files)),
                daemon=True,
            ).start()
        result = PipelineResult()
        compute_start = time.perf_counter()
        try:
            while True:
                wait_start = time.perf_counter()
                work = self._get(self.prepared)
                self.timer.add("wait for input", time.perf_counter() - wait_start)
                if isinstance(work, BaseException):
                    raise work
                if isinstance(work, InputEnd):
                    result.total_rows = work.total_rows
                    break
                shard = self._embed(work, bar)
                result.tokens += shard.tokens
                if bar is not None:
                    elapsed = time.perf_counter() - compute_start
                    bar.set_postfix_str(
                        f"{result.tokens / max(elapsed, 1e-9):,.0f} tok/s", refresh=False
                    )
                    bar.update(len(shard.errors))
                    if counted and bar.total is None:
                        limit = self.settings.limit
                        total = min(counted[0], limit if limit is not None else counted[0])
                        bar.total = self.ranks.rows_to_do(
                            total, self.settings.shard_rows, self.done
                        )
                wait_start = time.perf_counter()
                self._put(self.finished, shard)
                self.timer.add("wait for writer", time.perf_counter() - wait_start)
                result.shards_written += 1
                result.docs += len(shard.ids)
            self.finished.put(None)
            writer.join()
            if self.writer_error:
                raise self.writer_error[0]
            return result
        finally:
            if bar is not None:
                bar.close()

    def _embed(self, work: ShardWork, bar) -> ShardResult:
        """The shard's embeddings and error records."""
        chunks = work.chunks()
        items = [item for chunk in chunks for item in chunk.tokens.items()]
        embeddings = np.empty((len(items), self.dim), dtype=np.float32)  # (n, dim)
        start = time.perf_counter()
        calls = max(1, math.ceil(len(items) / EMBED_CALL_ROWS))
        call_rows = max(1, math.ceil(len(items) / calls))  # even calls
        for first in range(0, len(items), call_rows):
            embeddings[first : first + call_rows] = self.engine.embed(
                items[first : first + call_rows], bar
            )
        self.timer.add("compute", time.perf_counter() - start)
        return ShardResult(
            work.index,
            work.start,
            work.stop,
            [row_id for chunk in chunks for row_id in chunk.ids],
            embeddings,
            [record for chunk in chunks for record in chunk.errors],
            sum(int(chunk.tokens.truncated.sum()) for chunk in chunks),
            sum(chunk.tokens.num_tokens for chunk in chunks),
        )

    def _collect_shards(self, pool: WorkerPool) -> None:
        """Collector thread: the workers' chunks, in work order, put together into shards."""
        try:
            chunks: list[TokenizedRows] = []
            started = 0.0  # the workers' start: the latest any of them reported
            while (message := pool.next(self.stop.is_set)) is not None:
                if isinstance(message, Failure):
                    raise message.error
                self.timer.add("read", message.read_seconds)
                if message.start_seconds > started:
                    self.timer.add("start workers", message.start_seconds - started)
                    started = message.start_seconds
                if isinstance(message, ReadEnd):
                    self._offer(InputEnd(message.total_rows))
                    return
                self.timer.add("tokenize", message.tokenize_seconds)
                self.timer.add("tokenize idle", message.idle_seconds)
                chunks.append(message.rows)
                if message.shard_stop is None:
                    continue
                start = message.shard * self.settings.shard_rows
                work = ShardWork(message.shard, start, message.shard_stop, lambda c=chunks: c)
                if not self._offer(work):
                    return
                chunks = []
        except BaseException as exc:
            self._offer(exc)

    def _read_shards(self, pool: ThreadPoolExecutor) -> None:
        """Reader thread: group rows into shards, start tokenizing the shards this rank must do."""
        shard_rows = self.settings.shard_rows

        on_long, too_long = self.settings.on_long, self.too_long

        def tokenize(rows: list[Row]) -> TokenizedRows:
            start = time.perf_counter()
            chunk = tokenize_rows(self.engine, rows, on_long, too_long)
            self.timer.add("tokenize", time.perf_counter() - start)
            return chunk

        def emit(index: int, rows: list[Row], stop_row: int) -> bool:
            futures = [
                pool.submit(tokenize, rows[i : i + TOKENIZE_CHUNK])
                for i in range(0, len(rows), TOKENIZE_CHUNK)
            ]

            def chunks() -> list[TokenizedRows]:
                return [future.result() for future in futures]

            work = ShardWork(index, index * shard_rows, stop_row, chunks)
            return self._offer(work)

        try:
            current: list[Row] = []
            shard = 0
            index = -1
            for row in self._timed_rows():
                index = row.index
                if index // shard_rows != shard:
                    if self._todo(shard) and not emit(shard, current, index):
                        return
                    shard, current = index // shard_rows, []
                if self._todo(shard):
                    current.append(row)
                if self.stop.is_set():
                    return
            total = index + 1
            if total > shard * shard_rows and self._todo(shard) and not emit(shard, current, total):
                return
            self._offer(InputEnd(total))
        except BaseException as exc:
            self._offer(exc)

    def _timed_rows(self) -> Iterator[Row]:
        settings = self.settings
        rows = job_rows(self.files, settings.fields, settings.instruction, settings.limit)
        while True:
            start = time.perf_counter()
            row = next(rows, None)
            self.timer.add("read", time.perf_counter() - start)
            if row is None:
                return
            yield row

    def _write_shards(self) -> None:
        """Writer thread: write each finished shard; an error stops the pipeline."""
        try:
            warm_up()
            while (shard := self.finished.get()) is not None:
                start = time.perf_counter()
                self.writer.write(shard)
                self.timer.add("write", time.perf_counter() - start)
        except BaseException as exc:
            self.writer_error.append(exc)
            self.stop.set()

    def _offer(self, value) -> bool:
        """Reader side: queue ``value`` for the embedder; False once the pipeline stopped."""
        while not self.stop.is_set():
            try:
                self.prepared.put(value, timeout=QUEUE_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, source: queue.Queue):
        while True:
            if self.writer_error:
                raise self.writer_error[0]
            try:
                return source.get(timeout=QUEUE_POLL_SECONDS)
            except queue.Empty:
                continue

    def _put(self, target: queue.Queue, value) -> None:
        while True:
            if self.writer_error:
                raise self.writer_error[0]
            try:
                target.put(value, timeout=QUEUE_POLL_SECONDS)
                return
            except queue.Full:
                continue
