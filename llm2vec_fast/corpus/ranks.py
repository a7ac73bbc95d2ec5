"""The processes of one job under ``torchrun``: who does which shard, and where they meet.

Shard k belongs to rank k % world_size. Ranks talk over a gloo group (CPU only, a week's
timeout: a rank may embed for days before the others wait for it at the end). A single process
needs no ``torch.distributed`` at all.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

from llm2vec_fast.corpus.manifest import MANIFEST, part_name

GLOO_TIMEOUT = dt.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    group: object | None = None  # the gloo group to talk over; None: the default group
    owns_group: bool = False  # the job initialized the process group and destroys it

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    @property
    def manifest_name(self) -> str:
        """The manifest this rank writes its shards to: ``manifest.json`` when it is alone."""
        return MANIFEST if self.world == 1 else part_name(self.rank)

    def rows_to_do(self, total_rows: int, shard_rows: int, done: set[int]) -> int:
        """Rows in the shards this rank still has to do."""
        shards = range(self.rank, math.ceil(total_rows / shard_rows), self.world)
        return sum(min(shard_rows, total_rows - k * shard_rows) for k in shards if k not in done)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def on_first(self, fn: Callable[[], None], task: str) -> None:
        """Run ``fn`` on rank 0; every rank raises if it failed (no rank left waiting). ``task``
        names what ``fn`` does in that error."""
        message = [None]
        if self.rank == 0:
            try:
                fn()
            except Exception as exc:  # re-raised below, on every rank
                message = [f"{type(exc).__name__}: {exc}"]
                if self.world == 1:
                    raise
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(message, src=0, group=self.group)
            if message[0] is not None:
                raise RuntimeError(f"rank 0 could not {task}: {message[0]}")

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def join_ranks() -> Ranks:
    """This process's place: alone, in a process group already set up, or in a new gloo group
    under ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "torch.distributed" not in sys.modules:
        return Ranks()  # no torch import for a single process with the hash engine
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = (
            None
            if dist.get_backend() == "gloo"
            else dist.new_group(backend="gloo", timeout=GLOO_TIMEOUT)
        )
        return Ranks(dist.get_rank(), dist.get_world_size(), group)
    if world <= 1:
        return Ranks()
    dist.init_process_group("gloo", timeout=GLOO_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), None, owns_group=True)
