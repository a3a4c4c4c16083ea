"""What a one-worker grid cell costs besides its training: trained in its Tune trial vs under a TorchTrainer.

One invocation runs the same small grid three times on one local Ray (``--cells`` cells of scratch, 1 epoch
of 1 step each, so training is a few hundred ms and what is left is the cell's start-up, evaluation
and recording), each time as a new study so that every cell runs:

* ``in_trial``: what ``sspctl finetune`` does now for ``workers_per_trial: 1``; the Tune trial runs
  ``finetune_worker`` in its own process, and the next cell's trial reuses that process;
* ``in_trial_fresh``: the same, but every cell's trial in a new process (Tune's
  ``reuse_actors=False``; what ``sspctl finetune`` did before ``grid.reuses_trial_processes``);
* ``torch_trainer``: the path of a multi-worker cell forced onto the same one-worker cells (the
  trial builds a ``TorchTrainer`` of one worker: a Train controller and a worker actor more).

Figures: the grid's wall time (``execute_plan``) and, per cell, its MLflow run's start to end (which
starts when the trial's function does, so the trial actor's own start is in the wall time only), and
whether every cell's test Dice is the same on every path (``same_dice``). ``--recipe`` trains with a
fine-tuning config instead (e.g. ``configs/demo/finetune.yaml``: 600 steps a cell).
Prints one JSON object. Usage: ``.venv/bin/python benchmarks/grid_cells.py [--cells 4] [--num-cpus 3] [--recipe YAML]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 32
#: The paths compared, slowest first; ratios are each one's wall time over the last one's.
MODES = ("torch_trainer", "in_trial_fresh", "in_trial")


def _forced_torch_trainer(config: dict[str, Any], worker_fn: Any) -> None:
    """A Tune trial that runs a one-worker cell under a ``TorchTrainer`` (pickled by value into the trial)."""
    import orchestrator.grid as grid

    grid.runs_in_trial = lambda workers: False
    grid._cell_trainable(config, worker_fn)


def _dataset(root: Path) -> tuple[Path, Path]:
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.splits import make_splits
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    write_dataset(root / "raw", "mnms", n_subjects=10, seed=0, size=SIZE, frames=(3, 3), slices=(3, 4), trivial=True)
    store = root / "store.zarr"
    execute_ingest(plan_ingest({"mnms": root / "raw"}, store, IngestConfig(size=SIZE, chunk_slices=16)),
                   executor="serial", progress=False)
    make_splits(SliceStore.open(store).subjects, test_per_vendor=1, seed=0, budgets=(2,), seeds=(0,)).save(root / "split.yaml")
    return store, root / "split.yaml"


def _run(mode: str, store: Path, split: Path, workspace: Any, cells: int, config: dict[str, Any]) -> dict[str, Any]:
    import orchestrator.grid as grid
    from orchestrator.grid_spec import grid_request

    request = grid_request(store, split, methods=["scratch"], budgets=[2], seeds=[0], train_seeds=list(range(cells)),
                           config=config, study=f"bench-{mode}", workspace=workspace)
    plan = grid.plan_grid(request)
    original = grid._cell_trainable, grid.trial_resources, grid.reuses_trial_processes
    if mode == "torch_trainer":
        grid._cell_trainable, grid.trial_resources = _forced_torch_trainer, lambda spec: dict(grid.DRIVER_RESOURCES)
    if mode != "in_trial":
        grid.reuses_trial_processes = lambda spec: False
    try:
        started = time.perf_counter()
        outcome = grid.execute_plan(plan, progress=False)
        wall = time.perf_counter() - started
    finally:
        grid._cell_trainable, grid.trial_resources, grid.reuses_trial_processes = original
    if not outcome.ok:
        raise SystemExit(f"{mode}: cells failed: {[c.error for c in outcome.cells if c.error]}")
    client = plan.tracking.client
    spans = [(r.info.end_time - r.info.start_time) / 1000 for r in (client.get_run(c.run_id) for c in outcome.cells)]
    return {"wall_s": round(wall, 1), "cell_run_s_median": round(statistics.median(spans), 1),
            "cell_run_s": [round(s, 1) for s in spans], "test_dice_mean": [c.metrics["test_dice_mean"] for c in outcome.cells]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=4, help="cells per grid (default 4)")
    parser.add_argument("--num-cpus", type=int, default=3, help="logical CPUs of the local Ray (default 3: 2 cells at once)")
    parser.add_argument("--recipe", type=Path, help="fine-tuning config YAML to train with (default: 1 epoch of 1 step)")
    args = parser.parse_args()
    if args.cells < 1 or args.num_cpus < 2:
        parser.error("--cells must be >= 1 and --num-cpus >= 2")

    from orchestrator.configio import read_yaml
    from orchestrator.ray_session import ray_session
    from orchestrator.workspace import Workspace

    config = (read_yaml(args.recipe) if args.recipe else
              {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "valid_batch_size": 8})

    with tempfile.TemporaryDirectory(prefix="sspctl-bench-grid-") as tmp:
        root = Path(tmp)
        store, split = _dataset(root)
        workspace = Workspace.resolve(root / "ws")
        with ray_session(num_cpus=args.num_cpus):
            warm = {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2, "valid_batch_size": 8}
            _run("warmup", store, split, workspace, 1, warm)  # one cell first, so neither side pays Ray's cold start
            results = {mode: _run(mode, store, split, workspace, args.cells, config) for mode in MODES}
    for mode in MODES[:-1]:
        results[f"wall_ratio_{mode}"] = round(results[mode]["wall_s"] / results["in_trial"]["wall_s"], 2)
    results["same_dice"] = all(results[m]["test_dice_mean"] == results["in_trial"]["test_dice_mean"] for m in MODES)
    print(json.dumps({"benchmark": "grid_cells", "cells": args.cells, "num_cpus": args.num_cpus,
                      "recipe": str(args.recipe) if args.recipe else "1 epoch of 1 step",
                      "machine": platform.machine(), **results}, indent=2))


if __name__ == "__main__":
    main()
