"""Reading and tokenization in worker processes, so that the embedding process only embeds.

One reader process numbers the job's rows (``rows.job_rows``: the global order and the duplicate
check need one reader), groups those of the shards to do into chunks of at most TOKENIZE_CHUNK
rows and queues them; N tokenizer processes each build their own tokenizer from a picklable
description (:func:`worker_tokenizer`) and turn chunks into what the embedder needs
(``tokens.tokenize_rows``: row ids, error records and flat token arrays). Every message
carries its place in the work order, so the embedding process puts the chunks back in order
whatever worker finished first. Both queues are bounded: a slow embedder stops the tokenizers,
which stop the reader.

Workers start from a ``forkserver`` (``spawn`` where there is none): never a fork of a process
that may hold CUDA state or tokenizer threads. The server preloads this module, but each worker
still imports the program's main module, as spawn does: a script that imports torch at its top
costs each job a second or two of worker start. A worker whose parent died (SIGKILL) exits on
its own within QUEUE_POLL_SECONDS.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from llm2vec_fast.corpus.engine import Engine, LLM2VecEngine
from llm2vec_fast.corpus.inputs import InputFile
from llm2vec_fast.corpus.job_settings import JobSettings
from llm2vec_fast.corpus.ranks import Ranks
from llm2vec_fast.corpus.rows import Row, job_rows
from llm2vec_fast.corpus.tokens import TokenizedRows, tokenize_rows

TOKENIZE_CHUNK = 256  # rows per tokenizer call
QUEUE_POLL_SECONDS = 0.1
CHUNKS_PER_WORKER = 4  # bound of each queue, per tokenizer process
STOP_SECONDS = 5.0  # how long a closing pool waits for a worker before terminating it


def default_workers() -> int:
    """Tokenizer processes when ``--workers`` is not given: one core stays for the embedder."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def start_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["llm2vec_fast.corpus.workers"])
    return context


def worker_tokenizer(engine: Engine):
    """What a worker needs to tokenize as ``engine`` does: the model's tokenization without its
    weights (prompt and sentence-transformers rules included) for the real engine, the engine
    itself for any other (the hash engine holds no model)."""
    if isinstance(engine, LLM2VecEngine):
        return engine.tokenization()
    return engine


@dataclass
class Chunk:
    """Reader -> tokenizer: consecutive rows of one shard (error rows included)."""

    order: int  # place in the work order
    shard: int
    rows: list[Row]
    shard_stop: int | None  # the shard's end row, on its last chunk
    read_seconds: float  # reading these rows took
    start_seconds: float  # on the first message: from the pool's start to the reader's start


@dataclass
class TokenizedChunk:
    """Tokenizer -> embedder: the chunk's rows, tokenized (texts dropped)."""

    order: int
    shard: int
    rows: TokenizedRows
    shard_stop: int | None
    read_seconds: float
    start_seconds: float
    tokenize_seconds: float
    idle_seconds: float  # the worker waited this long for the chunk


@dataclass
class ReadEnd:
    """The reader's last message: every row is read."""

    order: int
    total_rows: int
    read_seconds: float
    start_seconds: float


@dataclass
class Failure:
    """An exception in a worker, in the work order so that it surfaces where it happened."""

    order: int
    error: BaseException


def _sendable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:  # an exception that does not pickle still has its message
        return RuntimeError(f"{type(error).__name__}: {error}")


def _put(target, value) -> bool:
    """Queue ``value``; False once the parent process is gone (then this process exits without
    waiting to flush what it queued)."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            target.put(value, timeout=QUEUE_POLL_SECONDS)
            return True
        except queue.Full:
            if parent is not None and not parent.is_alive():
                target.cancel_join_thread()
                return False


def read_chunks(
    tasks,
    workers: int,
    files: list[InputFile],
    settings: JobSettings,
    rank: int,
    world: int,
    done: set[int],
    launched: float,
) -> None:
    """Reader process: the rows of the shards to do, in chunks, then ReadEnd and a stop per
    tokenizer. ``launched``: ``time.monotonic()`` (one clock for all processes) when the pool
    started, so that the first message says how long starting the workers took."""
    start_seconds = time.monotonic() - launched
    shard_rows = settings.shard_rows
    order = 0
    read_seconds = 0.0

    ranks = Ranks(rank, world)  # without the process group: it only says which shards are ours

    def todo(shard: int) -> bool:
        return ranks.owns(shard) and shard not in done

    def send(shard: int, rows: list[Row], shard_stop: int | None) -> bool:
        nonlocal order, read_seconds, start_seconds
        chunk = Chunk(order, shard, rows, shard_stop, read_seconds, start_seconds)
        order, read_seconds, start_seconds = order + 1, 0.0, 0.0
        return _put(tasks, chunk)

    try:
        rows = job_rows(files, settings.fields, settings.instruction, settings.limit)
        current: list[Row] = []
        shard, index = 0, -1
        while True:
            start = time.perf_counter()
            row = next(rows, None)
            read_seconds += time.perf_counter() - start
            if row is None:
                break
            index = row.index
            if index // shard_rows != shard:
                if todo(shard) and not send(shard, current, index):
                    return
                shard, current = index // shard_rows, []
            if todo(shard):
                current.append(row)
                if len(current) == TOKENIZE_CHUNK:
                    if not send(shard, current, None):
                        return
                    current = []
        total = index + 1
        if total > shard * shard_rows and todo(shard) and not send(shard, current, total):
            return
        message = ReadEnd(order, total, read_seconds, start_seconds)
    except BaseException as error:
        message = Failure(order, _sendable(error))
    if _put(tasks, message):
        for _ in range(workers):
            _put(tasks, None)


def tokenize_chunks(
    tokenizer, on_long: str, too_long: str, launched: float, tasks, results
) -> None:
    """Tokenizer process: chunks in, tokenized rows out (see ``tokens.tokenize_rows`` for
    ``on_long`` and ``too_long``); the reader's last messages pass through. Its first chunk
    says when it started (``launched``: see ``read_chunks``), or when the reader did if later."""
    start_seconds = time.monotonic() - launched
    parent = multiprocessing.parent_process()
    while True:
        wait_start = time.perf_counter()
        try:
            task = tasks.get(timeout=QUEUE_POLL_SECONDS)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                results.cancel_join_thread()
                return
            continue
        idle = time.perf_counter() - wait_start
        if task is None:
            return
        if isinstance(task, Chunk):
            try:
                start = time.perf_counter()
                rows = tokenize_rows(tokenizer, task.rows, on_long, too_long)
                task = TokenizedChunk(
                    task.order,
                    task.shard,
                    rows,
                    task.shard_stop,
                    task.read_seconds,
                    max(task.start_seconds, start_seconds),
                    time.perf_counter() - start,
                    idle,
                )
                start_seconds = 0.0
            except BaseException as error:
                task = Failure(task.order, _sendable(error))
        if not _put(results, task):
            return


@dataclass
class WorkerPool:
    """The reader and tokenizer processes of one job, and their results in work order."""

    workers: int
    context: Any
    tasks: Any
    results: Any
    processes: list = field(default_factory=list)
    waiting: dict[int, object] = field(default_factory=dict)  # finished ahead of their turn
    next_order: int = 0

    @classmethod
    def start(
        cls,
        workers: int,
        tokenizer,
        files: list[InputFile],
        settings: JobSettings,
        rank: int,
        world: int,
        done: set[int],
        too_long: str,
    ) -> "WorkerPool":
        """Start the reader and ``workers`` tokenizer processes; ``too_long`` names the engine's
        limit in the --on-long error."""
        context = start_context()
        launched = time.monotonic()
        bound = CHUNKS_PER_WORKER * workers
        pool = cls(workers, context, context.Queue(bound), context.Queue(bound))
        reader = context.Process(
            target=read_chunks,
            args=(pool.tasks, workers, files, settings, rank, world, done, launched),
            name="corpus-reader",
            daemon=True,
        )
        pool.processes.append(reader)
        for number in range(workers):
            pool.processes.append(
                context.Process(
                    target=tokenize_chunks,
                    args=(
                        tokenizer,
                        settings.on_long,
                        too_long,
                        launched,
                        pool.tasks,
                        pool.results,
                    ),
                    name=f"corpus-tokenizer-{number}",
                    daemon=True,
                )
            )
        try:
            for process in pool.processes:
                process.start()
        except BaseException:
            pool.close(finished=False)
            raise
        return pool

    def next(self, stopped) -> TokenizedChunk | ReadEnd | Failure | None:
        """The next message in work order; None once ``stopped()`` is true."""
        while self.next_order not in self.waiting:
            if stopped():
                return None
            try:
                message = self.results.get(timeout=QUEUE_POLL_SECONDS)
            except queue.Empty:
                self._check_alive()
                continue
            self.waiting[message.order] = message
        self.next_order += 1
        return self.waiting.pop(self.next_order - 1)

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.exitcode not in (None, 0):
                raise RuntimeError(f"{process.name} died (exit code {process.exitcode})")

    def close(self, finished: bool) -> None:
        """Stop every worker: after the last chunk (``finished``) each exits by itself, else it
        is terminated."""
        deadline = time.monotonic() + (STOP_SECONDS if finished else 0.0)
        for process in self.processes:
            if process.pid is None:
                continue
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()
        for channel in (self.tasks, self.results):
            channel.cancel_join_thread()
            channel.close()
