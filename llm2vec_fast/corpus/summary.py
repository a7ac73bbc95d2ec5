"""What a job tells its user: the engine line, the progress bar, stage timings, the summary."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from llm2vec_fast.corpus.manifest import ERRORS

STAGES = ("read", "tokenize", "compute", "write")  # the pipeline's stages, in order


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
    engine: dict = field(default_factory=dict)  # the engine's description, as the manifest has it
    index: str | None = None  # why the folder's index is stale, when it is
    busy: dict[str, float] = field(default_factory=dict)  # per stage: its share of the run
    bound: str | None = None  # the busiest stage: the one the others waited for

    def __str__(self) -> str:
        lines = [engine_line(self.engine)] if self.engine else []
        lines.append(
            f"{self.output}: rows in {self.rows_in} = embedded {self.embedded}"
            f" + errors {self.errors} ({ERRORS}); truncated {self.truncated};"
            f" shards written now {self.shards_written}, total {self.shards_total}"
            + ("" if self.complete else " (incomplete)")
        )
        if self.index is not None:
            lines.append(
                f"index: stale ({self.index}); run `llm2vec-fast index {self.output}` to bring"
                " it up to date"
            )
        if self.seconds:
            wall = self.seconds.get("wall", 0.0)
            split = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items() if k != "wall")
            lines.append(f"time: wall {wall:.2f}s ({split}; stages overlap)")
            if self.bound is not None:
                shares = ", ".join(f"{stage} {share:.0%}" for stage, share in self.busy.items())
                lines.append(f"bound by: {self.bound} (busy: {shares})")
            embedding = wall - self.seconds.get("load model", 0.0)  # rates leave loading out
            if embedding > 0 and self.docs:
                lines.append(
                    f"rate: {self.docs / embedding:,.1f} docs/s,"
                    f" {self.tokens / embedding:,.0f} tokens/s"
                    + (f" (rank {self.rank})" if self.rank else "")
                )
        return "\n".join(lines)


def engine_line(description: dict) -> str:
    """One line saying what embeds the rows: model, pooling, max length (which may have come from
    an adapter's llm2vec_config.json), dtype, attention. ``description`` has the manifest's keys.
    """
    attention = "causal" if description.get("bidirectional") is False else "bidirectional"
    adapters = description.get("adapters") or []
    names = ", ".join(Path(a["path"] if isinstance(a, dict) else a).name for a in adapters)
    with_adapters = f" + adapters {names}" if adapters else ""
    return (
        f"model {description.get('model')}{with_adapters}: {description.get('pooling')} pooling,"
        " max length"
        f" {description.get('max_length')}, {description.get('dtype')}, {attention} attention"
        + (", normalized" if description.get("normalize") else "")
    )


def stage_busy(seconds: dict[str, float], elapsed: float, parallel: dict[str, int]) -> dict:
    """Each stage's busy share of ``elapsed``: its seconds over ``elapsed`` times the workers
    it runs on (``parallel``, 1 when absent)."""
    if elapsed <= 0:
        return {}
    return {
        stage: seconds.get(stage, 0.0) / (elapsed * parallel.get(stage, 1))
        for stage in STAGES
        if stage in seconds
    }


def bounding_stage(busy: dict[str, float]) -> str | None:
    """The stage that bounds a pipeline: the busiest one, since every other stage waited on it
    for the rest of the time."""
    return max(busy, key=busy.get) if busy else None


class StageTimer:
    """Seconds spent per stage, summed across threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def progress_bar():
    """A tqdm bar counting documents on stderr; its total is set once the input is counted."""
    from tqdm.auto import tqdm

    return tqdm(
        unit="doc",
        unit_scale=True,
        dynamic_ncols=True,
        smoothing=0.05,
        file=sys.stderr,
        desc="embed",
    )
