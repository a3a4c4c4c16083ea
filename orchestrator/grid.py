"""The fine-tuning grid: arms x label budgets x subset seeds x training seeds as a Ray Tune experiment.

An arm is an initialisation (scratch, an SSP method, or a control: ``orchestrator/arms.py``). The
subset seed chooses which subjects a budget labels (shared by every arm, as published); the
training seed drives initialisation, data order and augmentation, so several training seeds give
the replicate runs that the report's statistics need (``orchestrator/stats.py``).

Each grid cell is one Tune trial whose function builds a ``TorchTrainer`` (so a cell can use K DDP
workers and a fraction of a GPU) running ``trainers.finetune.finetune_worker``. Tune is FIFO with no
early stopping: every cell runs to its last epoch, because the grid is a controlled comparison.

Resume (see docs/finetuning.md): a cell is complete when its completion marker
``<workspace>/finetune/<study>/<cell>/complete.json`` exists *and* its MLflow child run is FINISHED
with ``test_dice_mean``. Complete cells are skipped before Tune starts; the remaining cells run in a
fresh ``Tuner`` (the pending set differs from run to run, which ``Tuner.restore`` cannot express),
and each cell's Train run, named deterministically ``ft-{arm}-b{budget}-s{seed}-t{train_seed}-{hash8}`` on the
workspace's storage path, resumes from its own last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.arms import ARMS, INIT_KINDS, SCRATCH, SUPERVISED, Arm, arm_order, unknown_arms
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

log = logging.getLogger("sspctl.grid")

#: Arms the grid knows (``orchestrator/arms.py``): scratch, the four SSP methods, mim-encdec, the controls.
KNOWN_METHODS = tuple(ARMS)
MARKER_NAME = "complete.json"
#: Logical CPUs the Tune driver function of a trial holds (it only waits on its TorchTrainer).
DRIVER_CPUS = 0.01

Budget = int | Literal["all"]


class GridError(ValueError):
    """A grid argument or input file is wrong; the message is one line naming it."""


class GridSpec(BaseModel):
    """What to run: the axes of the grid and the resources of one trial."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: tuple[str, ...] = Field(description="arms (orchestrator/arms.py); 'scratch' is always included")
    budgets: tuple[Budget, ...] = Field(description="labelled training subjects per cell, or 'all'")
    seeds: tuple[int, ...] = Field(description="subset seeds: which subjects a budget labels (shared by all arms)")
    train_seeds: tuple[int, ...] = Field(
        (0,), description="training seeds: replicate runs per arm, budget and subset seed (init, order, augmentation)"
    )
    replicated_budgets: tuple[Budget, ...] | None = Field(
        None, description="budgets that get every training seed; the others get the first only (None: all budgets)"
    )
    workers_per_trial: int = Field(1, ge=1, description="Ray Train (DDP) workers per cell")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per cell, fractional packs cells onto one GPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs per Train worker")
    max_failures: int = Field(1, ge=0, description="worker-group restarts per cell (resume from checkpoint)")
    system_metrics: bool = Field(False, description="log MLflow system/* metrics from rank 0 of each cell")

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = unknown_arms(value)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(KNOWN_METHODS)})")
        return tuple(sorted(dict.fromkeys([SCRATCH, *value]), key=arm_order))

    @field_validator("budgets", "seeds", "train_seeds")
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("has duplicates")
        return value

    def train_seeds_for(self, budget: Budget) -> tuple[int, ...]:
        """The training seeds of ``budget``: all of them, or the first only outside ``replicated_budgets``."""
        if self.replicated_budgets is None or budget in self.replicated_budgets:
            return self.train_seeds
        return self.train_seeds[:1]


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


# -- parsing -------------------------------------------------------------------------------------


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``"10,15,all"`` -> ``(10, 15, "all")``; raises ``GridError`` naming ``--budgets``."""
    budgets: list[Budget] = []
    for item in _split_list(text):
        if item.lower() == "all":
            budgets.append("all")
            continue
        try:
            value = int(item)
        except ValueError:
            raise GridError(f"--budgets: {item!r} is neither a number of subjects nor 'all'") from None
        if value < 1:
            raise GridError(f"--budgets: {value} must be a positive number of subjects")
        budgets.append(value)
    if not budgets:
        raise GridError("--budgets: empty list")
    return tuple(budgets)


def parse_seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; raises ``GridError`` naming ``flag``."""
    try:
        seeds = tuple(int(item) for item in _split_list(text))
    except ValueError:
        raise GridError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise GridError(f"{flag}: empty list")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{flag}: {text!r} has duplicates")
    return seeds


def parse_pretrained(text: str | None) -> dict[str, str]:
    """``"simclr=RUN,pcl=RUN"`` -> ``{"simclr": "RUN", "pcl": "RUN"}``; raises ``GridError``."""
    mapping: dict[str, str] = {}
    for item in _split_list(text or ""):
        method, sep, run = item.partition("=")
        method, run = method.strip(), run.strip()
        if not sep or not method or not run:
            raise GridError(f"--pretrained: {item!r} is not METHOD=RUN")
        if method not in INIT_KINDS:
            raise GridError(f"--pretrained: unknown SSP method {method!r} (known: {', '.join(INIT_KINDS)})")
        if method in mapping:
            raise GridError(f"--pretrained: method {method!r} given twice")
        mapping[method] = run
    return mapping


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


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

    from trainers.finetune_config import FinetuneConfig

    cells = []
    for method in spec.methods:
        arm = ARMS[method]
        run = pretrained.get(arm.init) if arm.pretrained else None
        if arm.pretrained and run is None:
            raise GridError(f"--methods: {method!r} needs --pretrained {arm.init}=RUN")
        part = arm.part or base_config.get("part", "encoder")
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
    cpu_need = spec.workers_per_trial * spec.cpus_per_worker + DRIVER_CPUS
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


# -- per-cell results ----------------------------------------------------------------------------


def dice_metrics(rows: Any) -> dict[str, float]:
    """Test Dice metrics of one cell from its per-subject table.

    ``rows``: a DataFrame or list of dicts with ``subject_id, phase, class, dice`` (phase ``ED``/``ES``,
    class ``LV``/``MYO``/``RV``; integer codes are mapped with ``datastore.conventions``).
    Returns ``test_dice_{class}_{phase}``, ``test_dice_{class}``, ``test_dice_{phase}`` and
    ``test_dice_mean`` (means over subject-phase rows; the overall mean is over all rows).
    """
    frame = normalise_dice_table(rows)
    metrics: dict[str, float] = {}
    for (cls, phase), group in frame.groupby(["class", "phase"]):
        metrics[f"test_dice_{cls}_{phase}"] = float(group["dice"].mean())
    for cls, group in frame.groupby("class"):
        metrics[f"test_dice_{cls}"] = float(group["dice"].mean())
    for phase, group in frame.groupby("phase"):
        metrics[f"test_dice_{phase}"] = float(group["dice"].mean())
    metrics[COMPLETION_METRIC] = float(frame["dice"].mean())
    return metrics


def normalise_dice_table(rows: Any) -> Any:
    """The per-subject table as a DataFrame with string ``phase``/``class`` and float ``dice``.

    Raises:
        GridError: columns are missing or the table is empty.
    """
    import pandas as pd

    from datastore.conventions import LABEL_NAMES, PHASE_NAMES

    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows or []))
    missing = {"subject_id", "phase", "class", "dice"} - set(frame.columns)
    if frame.empty or missing:
        raise GridError(f"per-subject Dice table is empty or lacks columns {sorted(missing)}")
    frame["subject_id"] = frame["subject_id"].astype(str)
    frame["phase"] = frame["phase"].map(lambda p: PHASE_NAMES.get(p, p) if not isinstance(p, str) else p)
    frame["class"] = frame["class"].map(lambda c: LABEL_NAMES.get(c, c) if not isinstance(c, str) else c)
    frame["dice"] = frame["dice"].astype(float)
    return frame


# -- the Tune trial ------------------------------------------------------------------------------


def _cell_trainable(config: dict[str, Any], worker_fn: Callable[[dict], Any]) -> None:
    """Tune function trainable of one cell: under the cell's run lock, fit it and record the results.

    ``config["cell"]`` is a plain dict (see ``_trial_config``). Runs in a Ray actor. A cell another
    grid is running fails with the holder's pid and host, and its MLflow run is left alone.
    """
    from orchestrator.run_lock import RUN_LOCK_NAME

    cell = config["cell"]
    with run_lock(Path(cell["loop_config"]["output"]) / RUN_LOCK_NAME, f"grid cell {cell['name']}"):
        _run_cell(cell, worker_fn)


def _run_cell(cell: dict[str, Any], worker_fn: Callable[[dict], Any]) -> None:
    """Fit one cell's ``TorchTrainer``, then record the results."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.tracking import SPOOL_NAME, MlflowTracker

    output = Path(cell["loop_config"]["output"])
    cell = dict(cell)
    cell["run_id"] = start_cell_run(cell)  # the cell's run starts when its training does
    tracker = MlflowTracker(cell["tracking_uri"], cell["run_id"], spool=output / SPOOL_NAME)
    use_gpu = cell["gpus_per_trial"] > 0
    per_worker: dict[str, float] = {"CPU": cell["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = cell["gpus_per_trial"] / cell["workers"]
    loop_config = {**cell["loop_config"], "tracker": tracker}
    trainer = TorchTrainer(
        monitored(worker_fn, settings_for(cell.get("system_metrics_interval_s"), cell["tracking_uri"], cell["run_id"])),
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cell["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=cell["name"],
            storage_path=cell["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=cell["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        result = trainer.fit()
        returned = result.return_value
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


def _record_cell(cell: dict[str, Any], rows: Any, tracker: Any) -> dict[str, float]:
    """Write the per-subject CSV and completion marker, log metrics and artifacts, finish the run."""
    output = Path(cell["loop_config"]["output"])
    output.mkdir(parents=True, exist_ok=True)
    frame = normalise_dice_table(rows)
    csv_path = output / PER_SUBJECT_ARTIFACT
    frame.to_csv(csv_path, index=False)
    metrics = dice_metrics(frame)
    tracker.log_metrics(metrics, step=int(cell["loop_config"]["config"]["epochs"]))
    tracker.log_artifact(csv_path)
    # The fine-tuned weights and figures the worker left in its directory; the worker logs its
    # evaluation files under "evaluation/" itself, and logging the same path again only overwrites.
    for path in sorted(output.glob("*.png")):
        tracker.log_artifact(path, "evaluation")
    for name in ("model.pt", "model.json"):
        if (output / name).is_file():
            tracker.log_artifact(output / name, "model")
    if cell["run_id"] and (output / "model.json").is_file():
        from orchestrator.mlflow_models import log_cell_model

        log_cell_model(cell["tracking_uri"], cell["run_id"], output)
    tracker.set_status("FINISHED")  # queued behind anything an outage holds back (docs/failures.md)
    marker = {"cell": cell["name"], "run_id": cell["run_id"], "metrics": metrics, "finished_at": time.time()}
    (output / MARKER_NAME).write_text(json.dumps(marker, indent=2))
    return metrics


def _set_status_quietly(cell: dict[str, Any], status: str, only_if_running: bool = False) -> None:
    from orchestrator.study_tracking import client_for

    try:
        run_id = cell_run_id(cell)
        if not run_id:
            return  # the cell never started: it has no run
        client = client_for(cell["tracking_uri"])
        if only_if_running and client.get_run(run_id).info.status != "RUNNING":
            return  # the cell finished (or failed) on its own before the grid stopped
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the cell
        log.warning("could not set MLflow run %s to %s (%s)", cell["run_id"], status, exc)


def _trial_config(
    cell: Cell,
    run_id: str,
    tracking: StudyTracking,
    parent_run_id: str,
    tags: dict[str, str],
    spec: GridSpec,
    store: str,
    split: str,
    output: Path,
    tracking_uri: str,
    storage_path: str,
) -> dict[str, Any]:
    """The plain-dict description of a cell a Tune trial receives (its ``param_space`` entry)."""
    loop_config = {
        "store": store,
        "split": split,
        "config": cell.config,
        "output": str(output),
    }
    return {
        "name": cell.name,
        "method": cell.method,
        "budget": cell.budget,
        "seed": cell.seed,
        "train_seed": cell.train_seed,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "study": tracking.study,
        "experiment_id": tracking.experiment_id,
        "parent_run_id": parent_run_id,
        "tags": tags,
        "planned_at": time.time(),
        "storage_path": storage_path,
        "workers": spec.workers_per_trial,
        "gpus_per_trial": spec.gpus_per_trial,
        "cpus_per_worker": spec.cpus_per_worker,
        "max_failures": spec.max_failures,
        "system_metrics_interval_s": sampling_interval() if spec.system_metrics else None,
        "loop_config": loop_config,
    }


# -- the grid ------------------------------------------------------------------------------------


def _default_worker() -> Callable[[dict], Any]:
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
    pending: list[dict[str, Any]]


def plan_grid(
    store: str | Path,
    split: str | Path,
    budgets: Sequence[Budget],
    seeds: Sequence[int],
    pretrained: Mapping[str, str | Path] | None = None,
    methods: Sequence[str] | None = None,
    workers_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    cpus_per_worker: float = 1.0,
    config: Mapping[str, Any] | None = None,
    study: str | None = None,
    workspace: Workspace | None = None,
    max_failures: int = 1,
    train_seeds: Sequence[int] = (0,),
    replicated_budgets: Sequence[Budget] | None = None,
    system_metrics: bool = False,
) -> GridPlan:
    """Validate the inputs, build the cells, find-or-create their MLflow runs, find what is complete.

    Arguments as for ``run_grid``. Creates the study's experiment, the grid's parent run and one
    child run per cell (idempotent), but starts no training.

    Raises:
        GridError: bad arguments or inputs (one line naming the flag or file).
    """
    from pydantic import ValidationError

    from orchestrator.configio import format_validation_error

    workspace = workspace or Workspace.resolve()
    pretrained = dict(pretrained or {})
    chosen = list(methods) if methods else [SCRATCH, *pretrained]
    try:
        spec = GridSpec(
            methods=tuple(dict.fromkeys([SCRATCH, *chosen])), budgets=tuple(budgets), seeds=tuple(seeds),
            train_seeds=tuple(train_seeds),
            replicated_budgets=None if replicated_budgets is None else tuple(replicated_budgets),
            workers_per_trial=workers_per_trial, gpus_per_trial=gpus_per_trial,
            cpus_per_worker=cpus_per_worker, max_failures=max_failures, system_metrics=system_metrics,
        )
    except ValidationError as exc:
        raise GridError(format_validation_error(exc, "grid")) from None
    store_path, split_path, dataset_hash, image_size, split_digest = _inputs(store, split)
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
    base = {"image_size": image_size, **dict(config or {})}
    cells = build_cells(spec, base, runs, dataset_hash, split_digest)

    study_name = study or default_study_name(dataset_hash)
    tracking = open_study(workspace.tracking_uri, study_name, workspace.artifact_root)
    grid_id = short_hash({"cells": [c.name for c in cells]})
    parent = grid_parent_run(
        tracking, grid_id,
        tags={"dataset_hash": dataset_hash, "split": split_path, "store": store_path},
        params={"methods": ",".join(spec.methods), "budgets": ",".join(map(str, spec.budgets)),
                "seeds": ",".join(map(str, spec.seeds)), "train_seeds": ",".join(map(str, spec.train_seeds)),
                "replicated_budgets": "all" if spec.replicated_budgets is None else ",".join(map(str, spec.replicated_budgets)),
                "base_config": dict(base)},
    )
    skipped: dict[str, CellOutcome] = {}
    pending: list[dict[str, Any]] = []
    for cell in cells:
        run_id = existing_cell_run(tracking, cell.name) or ""  # a new cell's run is created when it starts
        output = cell_output_dir(workspace, study_name, cell)
        replay_left_over(output)  # what a tracking outage kept back, the final status included
        if run_id and is_complete(output, tracking, run_id):
            marker = json.loads((output / MARKER_NAME).read_text())
            skipped[cell.name] = CellOutcome(cell, "skipped", run_id, marker.get("metrics", {}))
            continue
        pending.append(_trial_config(cell, run_id, tracking, parent, {**cell.tags, "dataset_hash": dataset_hash},
                                     spec, store_path, split_path, output,
                                     workspace.tracking_uri, workspace.storage_path))
    return GridPlan(spec, study_name, grid_id, parent, tracking, workspace, cells, skipped, pending)


def run_grid(
    store: str | Path,
    split: str | Path,
    budgets: Sequence[Budget],
    seeds: Sequence[int],
    pretrained: Mapping[str, str | Path] | None = None,
    methods: Sequence[str] | None = None,
    workers_per_trial: int = 1,
    gpus_per_trial: float = 0.0,
    cpus_per_worker: float = 1.0,
    config: Mapping[str, Any] | None = None,
    study: str | None = None,
    workspace: Workspace | None = None,
    worker_fn: Callable[[dict], Any] | None = None,
    num_cpus: int | None = None,
    max_failures: int = 1,
    progress: bool = True,
    train_seeds: Sequence[int] = (0,),
    replicated_budgets: Sequence[Budget] | None = None,
    system_metrics: bool = False,
) -> GridOutcome:
    """Run (or resume) the fine-tuning grid and return every cell's outcome.

    Args:
        store: the Zarr slice store.
        split: the split YAML (``datastore/splits.py``).
        budgets: labelled subjects per cell (or ``"all"``); seeds: subset seeds (which subjects a
            budget labels); train_seeds: training seeds, the replicate runs of every arm x budget x
            subset seed (``scratch-b`` adds its offset to each); replicated_budgets: the budgets
            that get every training seed (default all; the others get the first only).
        pretrained: run kind (SSP method or ``supervised``) -> pretraining run directory or run
            name under ``<workspace>/pretrain/``. When the ``supervised`` arm is asked for without a
            run, the positive-control model is trained first (``orchestrator/controls.py``).
        methods: arms to run (default: scratch + every pretrained method); scratch is always included.
        workers_per_trial / gpus_per_trial / cpus_per_worker: resources of one cell.
        config: base ``FinetuneConfig`` keys (from ``--config`` and flags such as ``epochs``);
            ``image_size`` defaults to the store's. ``part`` applies to MIM only.
        study: MLflow experiment name (default ``sspctl-{dataset hash8}``).
        workspace: where MLflow, Ray storage and outputs live (default ``Workspace.resolve()``).
        worker_fn: the per-worker Train function (default ``trainers.finetune.finetune_worker``).
        num_cpus: logical CPUs of a local Ray started here (ignored when joining ``RAY_ADDRESS``
            or when Ray is already initialised).
        max_failures: worker-group restarts per cell before it is marked failed.
        progress: show a progress bar over cells.
        system_metrics: log MLflow ``system/*`` metrics from rank 0 of each cell (``orchestrator/system_metrics.py``).

    Raises:
        GridError: bad arguments or inputs (one line naming the flag or file).
    """
    pretrained = dict(pretrained or {})
    if methods and SUPERVISED in methods and SUPERVISED not in pretrained:
        from orchestrator.controls import ensure_supervised_init

        workspace = workspace or Workspace.resolve()
        store_path, split_path, _, image_size, _ = _inputs(store, split)
        pretrained[SUPERVISED] = ensure_supervised_init(
            store_path, split_path, {"image_size": image_size, **dict(config or {})}, workspace, progress=progress
        )
    plan = plan_grid(
        store, split, budgets, seeds, pretrained=pretrained, methods=methods,
        workers_per_trial=workers_per_trial, gpus_per_trial=gpus_per_trial, cpus_per_worker=cpus_per_worker,
        config=config, study=study, workspace=workspace, max_failures=max_failures, train_seeds=train_seeds,
        replicated_budgets=replicated_budgets, system_metrics=system_metrics,
    )
    with run_lock(grid_lock_path(plan.workspace.root, plan.study, plan.grid_id), f"grid {plan.grid_id} of study {plan.study}"):
        return execute_plan(plan, worker_fn=worker_fn, num_cpus=num_cpus, progress=progress)


def execute_plan(
    plan: GridPlan,
    worker_fn: Callable[[dict], Any] | None = None,
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
            metrics, error = results.get(trial["name"], ({}, "trial did not report"))
            status = "done" if error is None else "failed"
            run_id = cell_run_id(trial) or ""
            outcomes[trial["name"]] = CellOutcome(by_name[trial["name"]], status, run_id, metrics, error)
            if error is not None:  # errored, or stopped by Ctrl-C before it finished
                _set_status_quietly(trial, "FAILED" if "did not report" not in error else "KILLED")
    ordered = [outcomes[c.name] for c in plan.cells]
    outcome = GridOutcome(plan.study, plan.grid_id, plan.parent_run_id, tracking.tracking_uri, ordered)
    set_status(tracking, plan.parent_run_id, "FINISHED" if outcome.ok else "FAILED")
    return outcome


def _fit_tuner(
    pending: list[dict[str, Any]],
    spec: GridSpec,
    grid_id: str,
    workspace: Workspace,
    worker_fn: Callable[[dict], Any],
    progress: bool,
) -> dict[str, tuple[dict[str, float], str | None]]:
    """Run the pending cells as one FIFO Tune experiment; return ``name -> (metrics, error)``."""
    import ray
    from ray import tune

    remote = bool(os.environ.get("RAY_ADDRESS"))
    concurrent = max_concurrent_trials(spec, ray.cluster_resources(), len(pending), strict=not remote)
    log.info("running %d cells, at most %d at once", len(pending), concurrent)
    trainable = tune.with_resources(tune.with_parameters(_cell_trainable, worker_fn=worker_fn), {"CPU": DRIVER_CPUS})
    callbacks = [_progress_callback(len(pending))] if progress else []
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda trial: trial.config["cell"]["name"],
            trial_dirname_creator=lambda trial: trial.config["cell"]["name"],
        ),
        run_config=tune.RunConfig(
            name=f"ftgrid-{grid_id}",
            storage_path=workspace.storage_path,
            failure_config=tune.FailureConfig(max_failures=0),
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
