"""The fine-tuning grid: arms x label budgets x subset seeds x training seeds as a Ray Tune experiment.

An arm is an initialisation (scratch, an SSP method, or a control: ``orchestrator/arms.py``). The
subset seed chooses which subjects a budget labels (shared by every arm, as published); the
training seed drives initialisation, data order and augmentation, so several training seeds give
the replicate runs that the report's statistics need (``orchestrator/stats.py``).

Each grid cell is one Tune trial running ``trainers.finetune.finetune_worker``: a cell of one fixed
worker (the default) runs it in the trial's own process, holding the worker's CPUs and GPU fraction;
a cell of K DDP workers, or of an elastic range, builds a ``TorchTrainer`` in the trial
(``runs_in_trial``). Tune is FIFO with no early stopping: every cell runs to its last epoch, because
the grid is a controlled comparison.

Resume (see docs/finetuning.md): a cell is complete when its completion marker
``<workspace>/finetune/<study>/<cell>/complete.json`` exists *and* its MLflow child run is FINISHED
with ``test_dice_mean``. Complete cells are skipped before Tune starts; the remaining cells run in a
fresh ``Tuner`` (the pending set differs from run to run, which ``Tuner.restore`` cannot express),
and each cell, named deterministically ``ft-{arm}-b{budget}-s{seed}-t{train_seed}-{hash8}``, resumes from its
own last checkpoint: ``<cell>/checkpoints/`` for a cell run in its trial, else the Train run of that name
on the workspace's storage path.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


from orchestrator.arms import ARMS, SUPERVISED, Arm
from orchestrator.grid_spec import CellJob, CellTrial, GridError, GridRequest, GridSpec
from orchestrator.results import dice_metrics, normalise_dice_table
from orchestrator.study_tracking import (
    COMPLETION_METRIC,
    PER_SUBJECT_ARTIFACT,
    StudyTracking,
    cell_run_id,
    default_study_name,
    existing_cell_run,
    grid_parent_run,
    open_study,
    run_is_complete,
    set_status,
    short_hash,
    start_cell_run,
)
from orchestrator.preflight import check_split_subjects
from orchestrator.run_lock import grid_lock_path, run_lock
from orchestrator.system_metrics import monitored, sampling_interval, settings_for
from orchestrator.tracking import replay_left_over
from orchestrator.workspace import Workspace
from orchestrator.worker_range import WorkerRange
from trainers.methods.names import Budget
from trainers.runtime_options import RuntimeOptions

if TYPE_CHECKING:
    from trainers.jobs import FinetuneJob

log = logging.getLogger("sspctl.grid")

MARKER_NAME = "complete.json"
#: Logical CPUs planned for the Tune driver function of a trial when counting how many cells fit.
DRIVER_CPUS = 0.01
#: What that driver asks Ray for: no CPU, a little memory (it only waits on its TorchTrainer). A
#: fraction of a CPU would break elastic cells: Ray Train counts whole workers per node from the
#: node's CPUs, so a node holding a driver looks like it has room for one more worker than fits, and
#: a cell shrinking after a node loss retried that group forever (tests/orchestrator/test_elastic_e2e.py).
DRIVER_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}

@dataclass(frozen=True)
class PretrainedRun:
    """A pretraining run directory and what its ``manifest.json`` says about it."""

    method: str
    path: Path
    manifest: dict[str, Any]

    @property
    def mlflow_run_id(self) -> str:
        return str(self.manifest.get("mlflow_run_id") or "")

    @property
    def run_name(self) -> str:
        return str(self.manifest.get("run_name") or self.path.name)


@dataclass(frozen=True)
class Cell:
    """One grid cell: an arm, a label budget, a subset seed and a training seed, with its deterministic name.

    ``method`` is the arm's name (the report's row); ``train_seed`` already includes the arm's offset.
    """

    method: str
    budget: Budget
    seed: int
    name: str
    config: dict[str, Any]
    pretrained: PretrainedRun | None = None
    train_seed: int = 0

    @property
    def arm(self) -> Arm:
        return ARMS[self.method]

    @property
    def tags(self) -> dict[str, str]:
        return {
            "method": self.method,
            "budget": str(self.budget),
            "seed": str(self.seed),
            "subset_seed": str(self.seed),
            "train_seed": str(self.train_seed),
            "arm_role": self.arm.role,
            "init_part": str(self.config.get("part", "")) if self.pretrained else "",
            "pretrain_run_id": self.pretrained.mlflow_run_id if self.pretrained else "",
        }


@dataclass
class CellOutcome:
    """What happened to a cell in this invocation: ``skipped`` (already complete), ``done`` or ``failed``."""

    cell: Cell
    status: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class GridOutcome:
    """Result of ``run_grid``: the study, the grid's parent run and every cell's outcome."""

    study: str
    grid_id: str
    parent_run_id: str
    tracking_uri: str
    cells: list[CellOutcome]

    @property
    def ok(self) -> bool:
        return all(c.status in ("done", "skipped") for c in self.cells)


def resolve_pretrained(method: str, run: str | Path, workspace: Workspace) -> PretrainedRun:
    """Find a pretraining run: a directory with ``manifest.json``, a name under ``<workspace>/pretrain/``,
    or a registered model URI (``models:/sspctl-simclr-encoder/latest``, ``.../3``, ``...@champion``).

    Raises:
        GridError: the run or its manifest is missing, unreadable, or of another method.
    """
    if str(run).startswith("models:/"):  # a registered version, downloaded once and sha256-checked
        from orchestrator.mlflow_models import ModelUriError, fetch_model

        try:
            run = fetch_model(str(run), workspace.tracking_uri, workspace.root / "models")
        except ModelUriError as exc:
            raise GridError(f"--pretrained {method}={exc}") from None
    candidates = [Path(run).expanduser(), workspace.root / "pretrain" / str(run)]
    path = next((c.resolve() for c in candidates if (c / "manifest.json").is_file()), None)
    if path is None:
        raise GridError(
            f"--pretrained {method}={run}: no manifest.json in {candidates[0]} or {candidates[1]}"
        )
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GridError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise GridError(f"{manifest_path}: expected a JSON object")
    if manifest.get("method") != method:
        raise GridError(f"{manifest_path}: method is {manifest.get('method')!r}, but it was given for {method!r}")
    return PretrainedRun(method=method, path=path, manifest=manifest)


# -- building the cells --------------------------------------------------------------------------


def cell_name(method: str, budget: Budget, seed: int, digest: str, train_seed: int = 0) -> str:
    """Deterministic name of a cell (Train run name, MLflow run name, output directory)."""
    return f"ft-{method}-b{budget}-s{seed}-t{train_seed}-{digest}"


def arm_part(arm: Arm, run: PretrainedRun | None, wanted: str) -> str:
    """The weight part the cells of ``arm`` load, read from what ``run``'s manifest exports (``files``).

    An arm with its own part (``mim-encdec``: ``encoder_decoder``; the controls: ``encoder``) loads it;
    a method arm loads the fine-tuning config's ``wanted`` part when its run exports it (MIM exports
    two), else the encoder.

    Raises:
        GridError: the run does not export the arm's own part.
    """
    exported = set(run.manifest.get("files") or {}) if run is not None else set()
    if arm.part is None:
        return wanted if wanted in exported else "encoder"
    if run is not None and arm.part not in exported:
        raise GridError(f"{run.path / 'manifest.json'}: the run exports {sorted(exported)}, not the {arm.part!r} "
                        f"part arm {arm.name!r} loads")
    return arm.part


def build_cells(
    spec: GridSpec,
    base_config: Mapping[str, Any],
    pretrained: Mapping[str, PretrainedRun],
    dataset_hash: str,
    split_digest: str,
) -> list[Cell]:
    """Every cell of the grid (arm-major, then budget, subset seed, training seed) with its resolved config.

    ``pretrained`` maps a run kind (an SSP method or ``supervised``) to its run; an arm loads the
    run of its ``init``. The 8-digit hash in a cell's name covers the dataset, the split file, the
    resolved config (seeds included) and the pretraining run, so a changed input makes a new cell
    instead of resuming a stale one.

    Raises:
        GridError: a pretrained arm lacks its run, or a cell's config does not validate.
    """
    from orchestrator.configio import format_validation_error
    from pydantic import ValidationError

    from orchestrator.worker_range import WorkerRangeError, check_global_batch
    from trainers.finetune_config import FinetuneConfig

    cells = []
    for method in spec.methods:
        arm = ARMS[method]
        run = pretrained.get(arm.init) if arm.pretrained else None
        if arm.pretrained and run is None:
            raise GridError(f"--methods: {method!r} needs --pretrained {arm.init}=RUN")
        part = arm_part(arm, run, base_config.get("part", "encoder"))
        for budget in spec.budgets:
            for seed in spec.seeds:
                for train_seed in spec.train_seeds_for(budget):
                    config = dict(base_config)
                    config.update(method=arm.init, budget=budget, seed=seed, part=part,
                                  train_seed=train_seed + arm.train_seed_offset,
                                  weights=str(run.path) if run else None)
                    label = f"cell {method}/b{budget}/s{seed}/t{train_seed}"
                    try:
                        resolved = FinetuneConfig.model_validate(config).model_dump(mode="json")
                    except ValidationError as exc:
                        raise GridError(format_validation_error(exc, label)) from None
                    try:
                        check_global_batch(spec.workers_per_trial, resolved["batch_size"], f"{label}: workers_per_trial")
                    except WorkerRangeError as exc:
                        raise GridError(str(exc)) from None
                    identity = {
                        "dataset": dataset_hash,
                        "split": split_digest,
                        "arm": method,
                        "config": {k: v for k, v in resolved.items() if k != "weights"},
                        "pretrained": run.manifest if run else None,
                    }
                    name = cell_name(method, budget, seed, short_hash(identity), resolved["train_seed"])
                    cells.append(Cell(method, budget, seed, name, resolved, run, resolved["train_seed"]))
    return cells


def max_concurrent_trials(
    spec: GridSpec, resources: Mapping[str, float], n_cells: int, strict: bool = True
) -> int:
    """How many cells fit on the cluster at once (``resources`` as from ``ray.cluster_resources()``).

    A cell needs ``workers x cpus_per_worker`` CPUs plus ``DRIVER_CPUS`` for its Tune driver, and
    ``gpus_per_trial`` GPUs. With ``strict=False`` (a remote cluster that may autoscale) a cell that
    does not fit yet gives 1 and a warning instead of an error.

    Raises:
        GridError: not even one cell fits (``strict`` only).
    """
    cpu_need = spec.workers_per_trial.max * spec.cpus_per_worker + DRIVER_CPUS  # an elastic cell plans for its maximum
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    fit = math.floor(cpus / cpu_need + 1e-9)
    if spec.gpus_per_trial > 0:
        fit = min(fit, math.floor(gpus / spec.gpus_per_trial + 1e-9))
    if fit < 1 and not strict:
        log.warning("one cell needs %g CPUs and %g GPUs, more than the cluster has now; waiting for the autoscaler",
                    cpu_need, spec.gpus_per_trial)
        return 1
    if fit < 1:
        raise GridError(
            f"a cell needs {cpu_need:g} CPUs and {spec.gpus_per_trial:g} GPUs, the cluster has {cpus:g} CPUs "
            f"and {gpus:g} GPUs (lower --workers-per-trial / --gpus-per-trial)"
        )
    return max(1, min(fit, n_cells))


# -- completion markers --------------------------------------------------------------------------


def cell_output_dir(workspace: Workspace, study: str, cell: Cell | str) -> Path:
    """``<workspace>/finetune/<study>/<cell name>/``: the worker's output directory."""
    name = cell if isinstance(cell, str) else cell.name
    return workspace.folder("finetune", study, name)


def is_complete(output_dir: Path, study: StudyTracking, run_id: str) -> bool:
    """A cell is complete when its marker exists and its MLflow run is FINISHED with its metrics."""
    if not (output_dir / MARKER_NAME).is_file():
        return False
    try:
        return run_is_complete(study, run_id)
    except Exception as exc:  # noqa: BLE001 - an unreachable server means "not known complete"
        log.warning("cannot check MLflow run %s (%s); rerunning the cell", run_id, exc)
        return False


def _cell_trainable(config: dict[str, Any], worker_fn: Callable[[FinetuneJob], Any]) -> None:
    """Tune function trainable of one cell: under the cell's run lock, fit it and record the results.

    ``config["cell"]`` is a ``CellTrial`` as JSON (see ``_trial``). Runs in a Ray actor. A cell another
    grid is running fails with the holder's pid and host, and its MLflow run is left alone.
    """
    from orchestrator.run_lock import RUN_LOCK_NAME

    cell = CellTrial.model_validate(config["cell"])
    with run_lock(Path(cell.job.output) / RUN_LOCK_NAME, f"grid cell {cell.name}"):
        _run_cell(cell, worker_fn)


def runs_in_trial(workers: WorkerRange) -> bool:
    """Whether a cell trains in its Tune trial's own process instead of under a ``TorchTrainer``.

    A cell of one fixed worker needs no Train controller or worker actor, each a new Python process:
    on 2 cores they took 14-17 s of every cell's start. Such a cell keeps its own checkpoints in
    ``<cell>/checkpoints/`` (``RuntimeOptions.checkpoint_dir``) and resumes from them.
    """
    return workers.max == 1


def reuses_trial_processes(spec: GridSpec) -> bool:
    """Whether Tune runs the next cell in the process a finished cell's trial leaves (``reuse_actors``).

    Cells that train in their trial do: a fresh trial process first imports torch, MONAI and sspctl
    again, which took 5-10 s of every cell on 2 cores. Every such trial asks for the same resources,
    and a cell leaves no state behind that the next one reads (it seeds its own generators and
    builds its own model, loader and tracker); ``deterministic: true`` stays on in a reused process,
    as it does for the rest of a process's life (``trainers.determinism``), and is one value for the
    whole grid. Cells on a ``TorchTrainer`` keep a fresh driver per trial.
    """
    return runs_in_trial(spec.workers_per_trial)


def _run_cell(cell: CellTrial, worker_fn: Callable[[FinetuneJob], Any]) -> None:
    """Train one cell (in this process, or on a ``TorchTrainer``), then record the results.

    A cell trained here resumes from ``<cell>/checkpoints/`` (its job's ``runtime.checkpoint_dir``); a
    failure fails the trial, and Tune restarts it up to ``max_failures`` times (``_fit_tuner``).
    """
    from ray import tune

    from orchestrator.tracking import SPOOL_NAME, MlflowTracker
    from trainers.jobs import FinetuneJob

    output = Path(cell.job.output)
    cell = cell.model_copy(update={"run_id": start_cell_run(cell)})  # the cell's run starts when its training does
    tracker = MlflowTracker(cell.tracking_uri, cell.run_id, spool=output / SPOOL_NAME)
    job = FinetuneJob.model_validate({**cell.job.model_dump(), "tracker": tracker})
    settings = settings_for(cell.system_metrics_interval_s, cell.tracking_uri, cell.run_id)
    train = monitored(functools.partial(worker_fn, job), settings)  # the typed job crosses into Train workers as is
    try:
        returned = train() if runs_in_trial(cell.workers) else _fit_torch_trainer(cell, train)
        # finetune_worker returns {"dice": rows, "summary": ..., ...}; a bare list of rows also works.
        rows = returned.get("dice") if isinstance(returned, dict) else returned
        if isinstance(returned, dict) and returned.get("init_sha256"):
            # the exact weights file the worker loaded (last or best checkpoint of the run)
            tracker.set_tags({"sspctl.init_weights_sha256": str(returned["init_sha256"])})
        metrics = _record_cell(cell, rows, tracker)
    except BaseException:
        _set_status_quietly(cell, "FAILED")
        raise
    tune.report({**metrics, "cell_done": 1})


def _fit_torch_trainer(cell: CellTrial, train: Callable[[], Any]) -> Any:
    """Fit the cell's ``TorchTrainer`` (K DDP workers, elastic or fixed) running ``train`` on every worker;
    return rank 0's return value."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = cell.gpus_per_trial > 0
    per_worker: dict[str, float] = {"CPU": cell.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = cell.gpus_per_trial / cell.workers.max
    trainer = TorchTrainer(
        train,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cell.workers.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=cell.name,
            storage_path=cell.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cell.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    return trainer.fit().return_value


def _record_cell(cell: CellTrial, rows: Any, tracker: Any) -> dict[str, float]:
    """Write the per-subject CSV and completion marker, log metrics and artifacts, finish the run."""
    output = Path(cell.job.output)
    output.mkdir(parents=True, exist_ok=True)
    frame = normalise_dice_table(rows)
    csv_path = output / PER_SUBJECT_ARTIFACT
    frame.to_csv(csv_path, index=False)
    metrics = dice_metrics(frame)
    tracker.log_metrics(metrics, step=int(cell.job.config["epochs"]))
    tracker.log_artifact(csv_path)
    # The fine-tuned weights and figures the worker left in its directory; the worker logs its
    # evaluation files under "evaluation/" itself, and logging the same path again only overwrites.
    for path in sorted(output.glob("*.png")):
        tracker.log_artifact(path, "evaluation")
    for name in ("model.pt", "model.json"):
        if (output / name).is_file():
            tracker.log_artifact(output / name, "model")
    if cell.run_id and (output / "model.json").is_file():
        from orchestrator.mlflow_models import log_cell_model

        log_cell_model(cell.tracking_uri, cell.run_id, output)
    tracker.set_status("FINISHED")  # queued behind anything an outage holds back (docs/failures.md)
    marker = {"cell": cell.name, "run_id": cell.run_id, "metrics": metrics, "finished_at": time.time()}
    (output / MARKER_NAME).write_text(json.dumps(marker, indent=2))
    return metrics


def _set_status_quietly(cell: CellTrial, status: str, only_if_running: bool = False) -> None:
    from orchestrator.study_tracking import client_for

    try:
        run_id = cell_run_id(cell)
        if not run_id:
            return  # the cell never started: it has no run
        client = client_for(cell.tracking_uri)
        if only_if_running and client.get_run(run_id).info.status != "RUNNING":
            return  # the cell finished (or failed) on its own before the grid stopped
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the cell
        log.warning("could not set MLflow run %s to %s (%s)", cell.run_id, status, exc)


def _trial(
    cell: Cell, run_id: str, tracking: StudyTracking, parent_run_id: str, tags: dict[str, str], spec: GridSpec,
    job: CellJob, storage_path: str,
) -> CellTrial:
    """The description of a cell its Tune trial receives (its ``param_space`` entry, dumped to JSON)."""
    return CellTrial(
        name=cell.name, method=cell.method, budget=cell.budget, seed=cell.seed, train_seed=cell.train_seed,
        run_id=run_id, tracking_uri=tracking.tracking_uri, study=tracking.study,
        experiment_id=tracking.experiment_id, parent_run_id=parent_run_id, tags=tags, planned_at=time.time(),
        storage_path=storage_path, workers=spec.workers_per_trial, gpus_per_trial=spec.gpus_per_trial,
        cpus_per_worker=spec.cpus_per_worker, max_failures=spec.max_failures,
        system_metrics_interval_s=sampling_interval() if spec.system_metrics else None, job=job,
    )


# -- the grid ------------------------------------------------------------------------------------


def _default_worker() -> Callable[[FinetuneJob], Any]:
    from trainers.finetune import finetune_worker

    return finetune_worker


def _inputs(store: str | Path, split: str | Path) -> tuple[str, str, str, int, str]:
    """Absolute store and split paths, dataset hash, image size and split digest (validated)."""
    import hashlib

    from datastore.store import SliceStore, StoreError

    store_path = str(Path(store).expanduser().resolve()) if "://" not in str(store) else str(store)
    try:
        opened = SliceStore.open(store_path)
        dataset_hash, image_size = opened.hash, opened.image_size
    except StoreError as exc:
        raise GridError(str(exc)) from None
    if not dataset_hash:
        raise GridError(f"{store_path}: store is not finalised (no content hash); finish the ingest first")
    split_path = Path(split).expanduser().resolve()
    if not split_path.is_file():
        raise GridError(f"{split_path}: split file not found")
    split_digest = hashlib.sha256(split_path.read_bytes()).hexdigest()[:16]
    return store_path, str(split_path), dataset_hash, image_size, split_digest


def _check_split(split_path: str, spec: GridSpec) -> None:
    """Every (budget, subset seed) of the grid must exist in the split file."""
    from datastore.splits import load_split

    try:
        split = load_split(split_path)
        for budget in spec.budgets:
            for seed in spec.seeds:
                split.budget(budget, seed)
    except Exception as exc:  # noqa: BLE001 - the split module's errors name the problem
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GridError(text if text.startswith(split_path) else f"{split_path}: {text}") from None


@dataclass
class GridPlan:
    """A resolved grid: its cells, the MLflow runs they map to, and which still have to run."""

    spec: GridSpec
    study: str
    grid_id: str
    parent_run_id: str
    tracking: StudyTracking
    workspace: Workspace
    cells: list[Cell]
    skipped: dict[str, CellOutcome]
    pending: list[CellTrial]


def plan_grid(request: GridRequest) -> GridPlan:
    """Validate the inputs, build the cells, find-or-create their MLflow runs, find what is complete.

    Creates the study's experiment and the grid's parent run (idempotent), but starts no training.

    Raises:
        GridError: bad arguments or inputs (one line naming the flag or file).
    """
    spec, workspace, pretrained, study = request.spec, request.workspace, request.pretrained, request.study
    store_path, split_path, dataset_hash, image_size, split_digest = _inputs(request.store, request.split)
    _check_split(split_path, spec)
    check_split_subjects(split_path, store_path)  # every id, before any cell starts
    needed = {ARMS[m].init for m in spec.methods}
    runs = {m: resolve_pretrained(m, r, workspace) for m, r in pretrained.items() if m in needed}
    for run in runs.values():
        size = run.manifest.get("image_size")
        if size is not None and int(size) != image_size:
            raise GridError(f"{run.path / 'manifest.json'}: image_size {size} differs from the store's {image_size}")
        if run.manifest.get("dataset_hash") not in (None, dataset_hash):
            log.warning("%s was pretrained on another dataset (%s)", run.path, run.manifest.get("dataset_hash"))
    base = {"image_size": image_size, **request.config}
    cells = build_cells(spec, base, runs, dataset_hash, split_digest)

    study_name = study or default_study_name(dataset_hash)
    tracking = open_study(workspace.tracking_uri, study_name, workspace.artifact_root)
    grid_id = short_hash({"cells": [c.name for c in cells]})
    parent = grid_parent_run(
        tracking, grid_id,
        tags={"dataset_hash": dataset_hash, "split": split_path, "store": store_path},
        params={"methods": ",".join(spec.methods), "budgets": ",".join(map(str, spec.budgets)),
                "seeds": ",".join(map(str, spec.seeds)), "train_seeds": ",".join(map(str, spec.train_seeds)),
                "runs_per_budget": ",".join(f"{b}={len(spec.train_seeds_for(b))}" for b in spec.budgets),
                "base_config": dict(base)},
    )
    skipped: dict[str, CellOutcome] = {}
    pending: list[CellTrial] = []
    for cell in cells:
        run_id = existing_cell_run(tracking, cell.name) or ""  # a new cell's run is created when it starts
        output = cell_output_dir(workspace, study_name, cell)
        replay_left_over(output)  # what a tracking outage kept back, the final status included
        if run_id and is_complete(output, tracking, run_id):
            marker = json.loads((output / MARKER_NAME).read_text())
            skipped[cell.name] = CellOutcome(cell, "skipped", run_id, marker.get("metrics", {}))
            continue
        in_trial = runs_in_trial(spec.workers_per_trial)
        runtime = RuntimeOptions(global_batches=spec.workers_per_trial.elastic,
                                 checkpoint_dir=str(output / "checkpoints") if in_trial else None)
        job = CellJob(store=store_path, split=split_path, config=cell.config, output=str(output), read=spec.read,
                      runtime=runtime)
        pending.append(_trial(cell, run_id, tracking, parent, {**cell.tags, "dataset_hash": dataset_hash}, spec, job,
                              workspace.storage_path))
    return GridPlan(spec, study_name, grid_id, parent, tracking, workspace, cells, skipped, pending)


def supervised_inputs(request: GridRequest) -> tuple[str, str, dict[str, Any]]:
    """The positive-control model's store, split (absolute) and base recipe for ``request``'s grid
    (``orchestrator.controls.ensure_supervised_init``'s first three arguments)."""
    store_path, split_path, _, image_size, _ = _inputs(request.store, request.split)
    return store_path, split_path, {"image_size": image_size, **request.config}


def run_grid(
    request: GridRequest,
    worker_fn: Callable[[FinetuneJob], Any] | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
) -> GridOutcome:
    """Run (or resume) the fine-tuning grid of ``request`` and return every cell's outcome.

    When the ``supervised`` arm is asked for without a run, the positive-control model is trained
    first (``orchestrator/controls.py``). ``worker_fn`` is the per-worker Train function (default
    ``trainers.finetune.finetune_worker``); ``num_cpus`` the logical CPUs of a local Ray started here
    (ignored when joining ``RAY_ADDRESS`` or when Ray is already initialised); ``progress`` shows a
    progress bar over cells.

    Raises:
        GridError: bad arguments or inputs (one line naming the flag or file).
    """
    if SUPERVISED in request.spec.methods and SUPERVISED not in request.pretrained:
        from orchestrator.controls import ensure_supervised_init

        run = ensure_supervised_init(*supervised_inputs(request), request.workspace)
        request = request.model_copy(update={"pretrained": {**request.pretrained, SUPERVISED: str(run)}})
    plan = plan_grid(request)
    with run_lock(grid_lock_path(plan.workspace.root, plan.study, plan.grid_id), f"grid {plan.grid_id} of study {plan.study}"):
        return execute_plan(plan, worker_fn=worker_fn, num_cpus=num_cpus, progress=progress)


def execute_plan(
    plan: GridPlan,
    worker_fn: Callable[[FinetuneJob], Any] | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
) -> GridOutcome:
    """Run the plan's pending cells on Ray Tune and mark the parent run FINISHED or FAILED."""
    from orchestrator.ray_session import ray_session

    tracking = plan.tracking
    log.info("grid %s: %d cells, %d already complete, %d to run", plan.grid_id, len(plan.cells),
             len(plan.skipped), len(plan.pending))
    outcomes: dict[str, CellOutcome] = dict(plan.skipped)
    if plan.pending:
        tracking.client.update_run(plan.parent_run_id, status="RUNNING")
        by_name = {c.name: c for c in plan.cells}
        try:
            with ray_session(num_cpus=num_cpus):
                results = _fit_tuner(plan.pending, plan.spec, plan.grid_id, plan.workspace,
                                     worker_fn or _default_worker(), progress)
        except BaseException as exc:  # no run may stay RUNNING when the grid itself fails or is stopped
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            for trial in plan.pending:
                _set_status_quietly(trial, status, only_if_running=True)
            set_status(tracking, plan.parent_run_id, status)
            raise
        for trial in plan.pending:
            metrics, error = results.get(trial.name, ({}, "trial did not report"))
            status = "done" if error is None else "failed"
            run_id = cell_run_id(trial) or ""
            outcomes[trial.name] = CellOutcome(by_name[trial.name], status, run_id, metrics, error)
            if error is not None:  # errored, or stopped by Ctrl-C before it finished
                _set_status_quietly(trial, "FAILED" if "did not report" not in error else "KILLED")
    ordered = [outcomes[c.name] for c in plan.cells]
    outcome = GridOutcome(plan.study, plan.grid_id, plan.parent_run_id, tracking.tracking_uri, ordered)
    set_status(tracking, plan.parent_run_id, "FINISHED" if outcome.ok else "FAILED")
    return outcome


def trial_resources(spec: GridSpec) -> dict[str, float]:
    """What one cell's Tune trial asks Ray for: a cell training in the trial's process
    (``runs_in_trial``) asks for its worker's CPUs and GPUs; otherwise the driver's ``DRIVER_RESOURCES``."""
    if not runs_in_trial(spec.workers_per_trial):
        return dict(DRIVER_RESOURCES)
    resources = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_trial > 0:
        resources["GPU"] = spec.gpus_per_trial
    return resources


def _fit_tuner(
    pending: list[CellTrial],
    spec: GridSpec,
    grid_id: str,
    workspace: Workspace,
    worker_fn: Callable[[FinetuneJob], Any],
    progress: bool,
) -> dict[str, tuple[dict[str, float], str | None]]:
    """Run the pending cells as one FIFO Tune experiment; return ``name -> (metrics, error)``."""
    import ray
    from ray import tune

    remote = bool(os.environ.get("RAY_ADDRESS"))
    concurrent = max_concurrent_trials(spec, ray.cluster_resources(), len(pending), strict=not remote)
    log.info("running %d cells, at most %d at once", len(pending), concurrent)
    trainable = tune.with_resources(tune.with_parameters(_cell_trainable, worker_fn=worker_fn), trial_resources(spec))
    callbacks = [_progress_callback(len(pending))] if progress else []
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([trial.model_dump(mode="json") for trial in pending])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            reuse_actors=reuses_trial_processes(spec),
            trial_name_creator=lambda trial: trial.config["cell"]["name"],
            trial_dirname_creator=lambda trial: trial.config["cell"]["name"],
        ),
        run_config=tune.RunConfig(
            name=f"ftgrid-{grid_id}",
            storage_path=workspace.storage_path,
            # a cell trained in its trial is restarted by Tune; a TorchTrainer restarts its own workers
            failure_config=tune.FailureConfig(max_failures=spec.max_failures if runs_in_trial(spec.workers_per_trial) else 0),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    grid = tuner.fit()
    results: dict[str, tuple[dict[str, float], str | None]] = {}
    for result in grid:
        name = result.config["cell"]["name"]
        if result.error is not None:
            results[name] = ({}, str(result.error).strip().splitlines()[-1][:500] if str(result.error) else repr(result.error))
            continue
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if k.startswith("test_dice_")}
        results[name] = (metrics, None if COMPLETION_METRIC in metrics else "cell did not report test Dice")
    return results


def _progress_callback(total: int) -> Any:
    """A Tune callback showing a tqdm bar over finished cells (defined lazily: it subclasses a Ray class).

    The bar is created on first use and dropped when Tune pickles its run config for restore.
    """
    from ray.tune import Callback

    class _ProgressCallback(Callback):
        def __init__(self) -> None:
            self.total = total
            self._bar: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {"total": self.total, "_bar": None}

        def _open(self) -> None:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.total, desc="grid cells", unit="cell")

        def setup(self, **info: Any) -> None:
            self._open()

        def _tick(self, label: str) -> None:
            self._open()
            self._bar.update(1)
            self._bar.set_postfix_str(label)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._tick(trial.config["cell"]["name"])

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._tick(f"{trial.config['cell']['name']} FAILED")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self._bar is not None:
                self._bar.close()

    return _ProgressCallback()
