"""Ingest throughput with 1 and 2 Ray workers on the same synthetic dataset; prints one JSON object.

    .venv/bin/python benchmarks/ingest.py [--subjects 8] [--size 128] [--store-size 256] [--workers 1 2] [--nodes]

Each worker count gets a fresh local Ray cluster and a fresh store. With ``--nodes`` that cluster
has one node per worker (``ray.cluster_utils.Cluster``: a head without CPUs plus one 1-CPU node per
worker, each its own raylet), so the writers run on separate nodes sharing the store's filesystem. Ray start-up and the workers'
first imports (torch) are excluded: one warm-up task per worker runs before the clock starts.
The clock covers planning, every subject's read + preprocess and write (in Ray tasks), the
driver's allocations and commits, and the final compaction: what ``sspctl ingest`` does after
Ray is up.

Besides wall time it reports the cost of each stage per subject (``IngestResult.stages``):
``process`` and ``write`` run in the workers, ``allocate`` and ``commit`` in the driver (serial).
With ``w`` = worker seconds and ``d`` = driver seconds per subject, ``k`` workers on ``k`` free
cores ingest about ``min(k / w, 1 / d)`` subjects/s, a speed-up over one worker of about
``min(k, w / d)``: ``projection`` evaluates that for 16 and 64 workers from the stage costs of
each run (they differ with the load on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _warm_up() -> int:
    import datastore.preprocess  # noqa: F401 - imports torch, nibabel, zarr in the worker

    return os.getpid()


def run(workers: int, raw: Path, store: Path, store_size: int, nodes: bool = False) -> dict[str, object]:
    import ray

    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest

    cluster = None
    if nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=workers, include_dashboard=False, configure_logging=False)
    try:
        warm = ray.remote(num_cpus=1)(_warm_up)
        pids: set[int] = set()
        while len(pids) < workers:  # make sure every worker process has imported torch
            pids.update(ray.get([warm.remote() for _ in range(4 * workers)]))
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        plan = plan_ingest({"mnms": raw}, store, IngestConfig(size=store_size))
        result = execute_ingest(plan, executor="ray", max_in_flight=2 * workers, progress=False)
        seconds = time.perf_counter() - start
        n_nodes = len([n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")])
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    n = max(len(result.ingested), 1)
    return {
        "seconds": round(seconds, 2),
        "nodes_with_cpus": n_nodes,
        "subjects": len(result.ingested),
        "slices": result.n_slices,
        "subjects_per_s": round(len(result.ingested) / seconds, 3),
        "slices_per_s": round(result.n_slices / seconds, 1),
        "stage_s_per_subject": {k: round(v / n, 4) for k, v in result.stages.items() if k != "finalize"},
        "finalize_s": round(result.stages["finalize"], 4),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "hash": result.hash,
    }


def projection(stages: dict[str, float], workers: tuple[int, ...] = (2, 16, 64)) -> dict[str, object]:
    """Speed-up over one worker for ``workers``, from per-subject stage costs (see the module doc)."""
    worker_s = stages["process"] + stages["write"]
    driver_s = stages["allocate"] + stages["commit"]
    return {
        "worker_s_per_subject": round(worker_s, 4),
        "driver_s_per_subject": round(driver_s, 4),
        "driver_bound_speedup": round(worker_s / driver_s, 1) if driver_s else None,
        "speedup": {str(k): round(min(k, worker_s / driver_s if driver_s else k), 1) for k in workers},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8, help="synthetic M&Ms subjects")
    parser.add_argument("--size", type=int, default=128, help="synthetic matrix size (pixels)")
    parser.add_argument("--store-size", type=int, default=256, help="stored slice size (pixels)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (the first is the baseline)")
    parser.add_argument("--nodes", action="store_true", help="one Ray node per worker (a multi-node cluster on this machine)")
    args = parser.parse_args()
    if min(args.workers) < 1:
        parser.error(f"--workers: every count must be >= 1, got {args.workers}")

    from datastore.synth import write_dataset

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sspctl-bench-ingest-"))
    raw = workdir / "mnms"
    if not raw.exists():
        write_dataset(raw, "mnms", args.subjects, seed=0, size=args.size)
    results = {}
    for workers in args.workers:
        store = workdir / f"store-{workers}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        results[str(workers)] = run(workers, raw, store, args.store_size, args.nodes)
    base = str(args.workers[0])
    same = len({r["hash"] for r in results.values()}) == 1
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "dataset": {"layout": "mnms", "subjects": args.subjects, "size": args.size, "store_size": args.store_size},
                "cpus": os.cpu_count(),
                "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                "workers": results,
                "nodes": args.nodes,
                "speedup_vs_first": {k: round(r["subjects_per_s"] / results[base]["subjects_per_s"], 2) for k, r in results.items()},
                "projection": {k: projection(r["stage_s_per_subject"]) for k, r in results.items()},
                "same_hash": same,
            },
            indent=2,
        )
    )
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
