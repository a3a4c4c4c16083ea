"""A training worker's slice loaders: this rank's ``Shard`` and the job's ``ReadOptions``.

Both loops build their loaders through here, so the rank layout and the read options a job carries
(``trainers.jobs``: ``job.read``, from ``sspctl pretrain/finetune``) reach ``datastore.loader``
intact.
"""

from __future__ import annotations

from typing import Any

from datastore.loader_options import ReadOptions, Shard


def shard(ctx: Any, seed: int, *, shuffle: bool = True, drop_last: bool = True) -> Shard:
    """This rank's ``Shard`` (``ctx`` is a ``trainers.runtime.WorkerContext``)."""
    return Shard(rank=ctx.rank, world_size=ctx.world_size, seed=seed, shuffle=shuffle, drop_last=drop_last)


def worker_read(read: ReadOptions) -> ReadOptions:
    """The job's read options as a worker uses them: no progress bar (the driver shows progress)."""
    return read.model_copy(update={"progress": False})


__all__ = ["shard", "worker_read"]
