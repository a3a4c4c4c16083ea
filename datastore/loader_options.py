"""The slice loader's grouped options, and the memory plan it reports.

* ``Shard``: which slices a rank owns and in what order it yields them (rank, world size, seed,
  shuffle, drop_last, global_batches). Two loaders with the same selection, batch size and
  ``Shard`` own the same slices; in the cache mode they also yield the same batches in the same
  order.
* ``ReadOptions``: how a rank reads its share: the memory budget (``cache_gb``) or the mode
  (``cache``), the streaming window, reader threads, read sizes, the cache dtype, prefetch depth and
  the progress bar. They change memory and speed; the streaming mode's order also depends on the
  window (``buffer_slices``), which is why a run records the plan it chose.
* ``MemoryPlan``: what the loader chose for its ``ReadOptions`` and why, as one line and a record.

Both option models are frozen, JSON-able pydantic models (``extra="forbid"``), so they cross into a
Ray worker inside a typed job and reach the loader intact from the command line.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Default number of consecutive slices read in one call when filling the cache (16 MiB of float16
#: at 256x256): long enough to decode at sequential speed; blocks this small are reused by the
#: allocator instead of being mapped (and page-faulted) afresh, which measured faster than 512.
DEFAULT_READ_SLICES = 128

#: Share of the node's physical memory that ``default_cache_gb`` gives the loaders of its ranks.
DEFAULT_MEMORY_FRACTION = 0.5


class Shard(BaseModel):
    """One rank's place in the run: which slices it owns and how each epoch is ordered.

    ``rank`` must be below ``world_size``; the loader checks that (``LoaderError``).

    ``global_batches`` (opt-in): every rank owns the whole selection and the epoch is ordered as for
    one rank with the global batch (``batch_size * world_size``); rank ``r`` yields rows
    ``[r * batch_size, (r + 1) * batch_size)`` of each global batch. The global batches are then the
    same at any world size (elastic training keeps its data when a worker leaves), at ``world_size``
    times the decode and memory of the default per-rank shares. Needs ``drop_last=True``; at
    ``world_size=1`` it yields the same batches as the default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(0, ge=0, description="this rank")
    world_size: int = Field(1, ge=1, description="number of ranks sharing the selection")
    seed: int = Field(0, description="drives ownership (fixed for the run) and, with the epoch, every epoch's order")
    shuffle: bool = Field(True, description="False: each rank gets a contiguous block in store order (validation)")
    drop_last: bool = Field(True, description="drop the slices that do not fill a batch; False: the last batch is partial")
    global_batches: bool = Field(
        False, description="every rank reads the whole selection and yields its rows of each global batch: the "
        "global batches are the same at any world size; costs world_size x the decode and memory of the per-rank "
        "mode (needs drop_last)",
    )


class ReadOptions(BaseModel):
    """How a rank reads its share: memory budget or mode, threads, read sizes, prefetch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_gb: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="memory budget of this rank's loader in GB (1e9 bytes): cache the share when it fits, else "
        "stream in windows sized to the budget; None: `cache` decides (training workers default it from the node)",
    )
    cache: bool = Field(True, description="without a budget: keep the share in memory (True) or stream it (False)")
    buffer_slices: int = Field(4096, ge=1, description="streaming: slices per shuffle window (at least one batch)")
    read_threads: int = Field(
        2, ge=1, description="background threads issuing read calls (the store decodes the chunks of one call "
        "concurrently; a second thread overlaps the copy into fresh memory with the next decode)",
    )
    read_slices: int = Field(
        DEFAULT_READ_SLICES, ge=1, description="slices per read call, in whole chunks: a contiguous run when "
        "filling the cache; when streaming, that many slices of chunks taken in the epoch's shuffled order",
    )
    cache_dtype: Literal["float16", "float32"] | None = Field(
        None, description="dtype kept in memory; None: the stored dtype (float16). float32: twice the memory, faster CPU batches"
    )
    prefetch: int = Field(2, ge=0, description="batches prepared ahead on a background thread (0: none)")
    progress: bool | None = Field(None, description="progress bar while filling the cache (None: on rank 0)")


class MemoryPlan(BaseModel):
    """What a loader chose for its ``ReadOptions`` and why.

    ``share_gb`` (the rank's slices, plus labels, in the stored dtype) and ``budget_gb`` are ``None``
    when no budget was given (the caller chose the mode); ``window_slices`` is the streaming window.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["cache", "stream"]
    slices: int = Field(ge=0, description="slices this rank owns")
    share_gb: float | None = None
    budget_gb: float | None = None
    window_slices: int | None = None

    @property
    def line(self) -> str:
        """One line: the mode and the reason (``cache: ...`` or ``stream: ...``)."""
        if self.budget_gb is None:
            return f"{self.mode} (chosen by the caller)"
        share = f"this rank's {self.slices} slices take {self.share_gb:.2f} GB"
        if self.mode == "cache":
            return f"cache: {share} <= budget {self.budget_gb:g} GB"
        return f"stream: {share} > budget {self.budget_gb:g} GB; shuffle windows of {self.window_slices} slices"


def node_memory_gb() -> float:
    """This node's physical memory in GB (1e9 bytes)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def default_cache_gb(ranks_per_node: int = 1, fraction: float = DEFAULT_MEMORY_FRACTION) -> float:
    """A loader memory budget per rank: ``fraction`` of the node's physical memory over its ranks (GB)."""
    return round(fraction * node_memory_gb() / max(int(ranks_per_node), 1), 2)


__all__ = ["DEFAULT_READ_SLICES", "MemoryPlan", "ReadOptions", "Shard", "default_cache_gb", "node_memory_gb"]
