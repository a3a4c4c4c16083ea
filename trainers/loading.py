"""A training worker's slice loaders: this rank's ``Shard``, the job's ``ReadOptions`` with a memory
budget for this node, and the one line (and record) saying whether the loader caches or streams.

Both loops build their loaders through here, so the rank layout and the read options a job carries
(``trainers.jobs``: ``job.read``, from ``sspctl pretrain/finetune --cache-gb``) reach
``datastore.loader`` intact. Without ``cache_gb`` a worker budgets half of its node's memory over the
run's ranks on that node (``datastore.loader_options.default_cache_gb``).
"""

from __future__ import annotations

from typing import Any

from datastore.loader_options import DEFAULT_MEMORY_FRACTION, ReadOptions, Shard, default_cache_gb, node_memory_gb


def shard(ctx: Any, seed: int, *, shuffle: bool = True, drop_last: bool = True, global_batches: bool = False) -> Shard:
    """This rank's ``Shard`` (``ctx`` is a ``trainers.runtime.WorkerContext``)."""
    return Shard(rank=ctx.rank, world_size=ctx.world_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                 global_batches=global_batches)


def ranks_on_this_node(in_ray: bool) -> int:
    """The run's ranks on this node: Ray Train's local world size inside a worker, else 1."""
    if not in_ray:
        return 1
    import ray.train

    return int(ray.train.get_context().get_local_world_size())


def worker_read(read: ReadOptions, ranks_per_node: int = 1) -> ReadOptions:
    """The job's read options as a worker uses them: no progress bar (the driver shows progress) and a
    memory budget: the job's ``cache_gb``, else (unless the job asks to stream) the node's default."""
    update: dict[str, Any] = {"progress": False}
    if read.cache_gb is None and read.cache:
        update["cache_gb"] = default_cache_gb(ranks_per_node)
    return read.model_copy(update=update)


def budget_origin(read: ReadOptions, ranks_per_node: int) -> str:
    """Where the budget of ``worker_read(read, ranks_per_node)`` came from, in words."""
    if read.cache_gb is not None:
        return "cache_gb given"
    if not read.cache:
        return "the job asks to stream"
    return (f"default budget: {DEFAULT_MEMORY_FRACTION:.0%} of this node's {node_memory_gb():.1f} GB over "
            f"{ranks_per_node} rank(s) on it")


def for_worker(read: ReadOptions, in_ray: bool) -> tuple[ReadOptions, str]:
    """``(worker_read(read, ranks), budget_origin(read, ranks))`` for the ranks on this node."""
    ranks = ranks_on_this_node(in_ray)
    return worker_read(read, ranks), budget_origin(read, ranks)


def loader_record(loader: Any, origin: str) -> dict[str, Any]:
    """What a run records about its training loader: the plan's fields, where the budget came from, its line.

    ``line`` is what rank 0 prints: ``loader: cache: ... (default budget: ...)``.
    """
    plan = loader.plan
    return {**plan.model_dump(mode="json"), "budget_from": origin, "line": f"loader: {plan.line} ({origin})"}


def loader_tags(record: dict[str, Any]) -> dict[str, str]:
    """The record as MLflow tags ``sspctl.loader.<field>`` (``mode``, ``budget_gb``, ..., ``plan``: the line).

    Tags, not params: a restart on a node with other memory may choose differently, and MLflow refuses
    to change a param (the job's ``read`` options, which do not change, are logged as params).
    """
    keys = ("mode", "budget_gb", "share_gb", "window_slices", "budget_from")
    tags = {f"sspctl.loader.{key}": str(record[key]) for key in keys if record.get(key) is not None}
    return {**tags, "sspctl.loader.plan": record["line"]}


__all__ = ["budget_origin", "for_worker", "loader_tags", "loader_record", "ranks_on_this_node", "shard", "worker_read"]
