"""Launch one SSP pretraining run on Ray Train and track it in MLflow (driver side of ``sspctl pretrain``).

Run identity: ``pretrain-<method>-<8 hex>`` where the hex digest covers the store's content hash,
the resolved method config, the subject list and the validation subjects (they choose the best
checkpoint), and nothing else (no time, no worker count). So:

* rerunning the same command resumes the same Ray Train run (same ``RunConfig(name, storage_path)``)
  from its last checkpoint, and logs into the same MLflow run (found by its ``sspctl.key`` tag);
* a run whose ``manifest.json`` exists is finished: it is not retrained, the command prints where it is;
* changing the config or the data gives a new run name, so an old checkpoint is never resumed with
  a different recipe.

Outputs: ``<workspace>/pretrain/<run_name>/`` (weights, manifest, progress, events), Ray state and
checkpoints under ``<workspace>/ray/<run_name>/``, the MLflow run in the workspace tracking URI.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datastore.loader_options import ReadOptions
from orchestrator.worker_range import WorkerRange, WorkerRangeError, check_failures, check_global_batch, parse_workers
from orchestrator.workspace import Workspace

if TYPE_CHECKING:
    from trainers.jobs import PretrainJob

log = logging.getLogger("sspctl.pretrain")

class LaunchError(ValueError):
    """The run cannot be launched; the message is one line naming the file/flag and the problem."""


@dataclass(frozen=True)
class PretrainRequest:
    """What ``sspctl pretrain`` asks for (flags already parsed)."""

    method: str
    store: str
    workspace: Workspace
    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    split: Path | None = None
    workers: int | str | WorkerRange = 1  # N or "MIN-MAX" (elastic; orchestrator/worker_range.py)
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    runtime: dict[str, Any] = field(default_factory=dict)
    read: ReadOptions = field(default_factory=ReadOptions)  # the workers' loader options (--cache-gb)
    fault_inject: str | None = None
    study: str | None = None
    system_metrics: bool = False  # MLflow system/* metrics from rank 0 (orchestrator/system_metrics.py)


@dataclass(frozen=True)
class PretrainOutcome:
    """Where a finished (or previously finished) run's products are."""

    run_name: str
    run_dir: Path
    manifest: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str
    skipped: bool
    resumed_from: int | None = None


# ----------------------------------------------------------------------------------------------
# Config, data and run identity
# ----------------------------------------------------------------------------------------------


def resolve_config(method: str, config_file: Path | None, overrides: dict[str, Any], image_size: int) -> Any:
    """``PretrainConfig`` from paper defaults <- YAML file <- flags; the store fixes ``image_size``.

    Raises:
        LaunchError: invalid file/flag (one line naming the key), a method that disagrees with the
            file, or an ``image_size`` different from the store's.
    """
    from orchestrator.configio import ConfigError, load_config, read_yaml
    from trainers.methods.config import PretrainConfig

    file_data = read_yaml(config_file) if config_file is not None else {}
    file_method = file_data.get("method")
    file_name = file_method.get("name") if isinstance(file_method, dict) else file_method
    if file_name is not None and file_name != method:
        raise LaunchError(f"{config_file}: method.name is {file_name!r} but --method is {method!r}")
    defaults = {"method": {"name": method}, "image_size": image_size}
    try:
        config = load_config(PretrainConfig, config_file, overrides=overrides, defaults=defaults)
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    if config.image_size != image_size:
        raise LaunchError(
            f"{config_file or 'config'}: image_size {config.image_size} differs from the store's {image_size} px"
        )
    return config


@dataclass(frozen=True)
class PretrainSubjects:
    """Whom a run pretrains on (``train``; ``None`` = every subject) and validates on (``valid``; ``None`` = none).

    Ids are in the loader's form (plain, or ``"<dataset>/<id>"`` where two datasets share an id).
    """

    train: list[str] | None
    valid: list[str] | None


def pretrain_subjects(store: Any, split: Path | None) -> PretrainSubjects:
    """Without a split: every subject, no validation. With one: the validation loss is computed on the
    split's ``valid`` part, and pretraining uses every other store subject outside its ``test`` part
    (train, unlabelled and unlisted subjects, ``datastore.splits.pretrain_pool``). The validation
    subjects are held out of pretraining, as published, so their loss measures generalisation.

    Raises:
        LaunchError: unreadable split, split subjects the store does not hold (or holds unlabelled),
            or nothing left to pretrain on.
    """
    if split is None:
        return PretrainSubjects(train=None, valid=None)
    from datastore.splits import SplitError, dataset_key, load_split, pretrain_pool

    try:
        parsed = load_split(split)
        parsed.check_against(store.subjects, store_name=str(store.path))
    except (SplitError, OSError) as exc:
        raise LaunchError(str(exc).splitlines()[0]) from None
    table = store.subjects
    held_out = {(key, sid) for key, ids in parsed.parts["valid"].items() for sid in ids}
    loader_ids = pretrain_pool(table, None)  # one id per store row, qualified where ambiguous
    valid = [q for d, s, q in zip(table["dataset"], table["subject_id"], loader_ids)
             if (dataset_key(str(d)), str(s)) in held_out]
    excluded = set(valid)
    train = [q for q in pretrain_pool(table, parsed) if q not in excluded]
    if not train:
        raise LaunchError(f"{split}: every subject of the store is in the test or valid part; nothing to pretrain on")
    return PretrainSubjects(train=train, valid=valid or None)


def run_name_for(
    method: str, config: dict[str, Any], dataset_hash: str, subjects: list[str] | None,
    valid_subjects: list[str] | None = None,
) -> str:
    """Deterministic run name ``pretrain-<method>-<8 hex>`` (see the module docstring)."""
    identity: dict[str, Any] = {"config": config, "data": dataset_hash, "subjects": subjects}
    if valid_subjects:
        identity["valid_subjects"] = valid_subjects
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"pretrain-{method}-{digest}"


def run_dir_for(workspace: Workspace, run_name: str) -> Path:
    """``<workspace>/pretrain/<run_name>`` (created)."""
    path = workspace.folder("pretrain", run_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# MLflow run: create once, find again by tag
# ----------------------------------------------------------------------------------------------


def ensure_mlflow_run(
    workspace: Workspace, study: str, run_name: str, method: str, dataset_hash: str, tags: dict[str, str]
) -> str | None:
    """The id of this run's MLflow run, found by its deterministic name tag or created.

    Layout (``orchestrator.study_tracking``): experiment ``study``; a top-level run named
    ``run_name`` with tags ``sspctl.kind=pretrain_run``, ``sspctl.key=<run_name>``, ``sspctl.method``,
    ``sspctl.dataset_hash``. A run left FAILED/KILLED by an earlier attempt is set back to RUNNING.
    Returns ``None`` (and warns) when the tracking server cannot be reached: training then runs
    untracked rather than not at all.
    """
    from orchestrator import study_tracking as st

    uri = workspace.tracking_uri
    try:
        handle = st.open_study(uri, study, artifact_root=workspace.artifact_root)
        run_id, created = st.pretrain_run(handle, run_name, {"method": method, "dataset_hash": dataset_hash, **tags})
        if not created:
            handle.client.update_run(run_id, status="RUNNING")
        return run_id
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        log.warning("MLflow at %s unreachable (%s); training runs without tracking", uri, str(exc).splitlines()[0][:200])
        return None


# ----------------------------------------------------------------------------------------------
# Live progress in the driver
# ----------------------------------------------------------------------------------------------


class ProgressMonitor:
    """Polls rank 0's ``progress.json`` and shows a tqdm bar: epoch, loss, slices/s, ETA.

    With ``echo`` it also prints, once, the ``loader:`` line of rank 0's start (or resume) event:
    whether the workers cache or stream their share, and why (the workers' own output stays in Ray's logs).
    """

    def __init__(
        self, run_dir: Path, interval_s: float = 0.5, enabled: bool = True, echo: Callable[[str], None] | None = None
    ) -> None:
        from trainers.pretrain_outputs import PROGRESS_FILE

        self.path = run_dir / PROGRESS_FILE
        self.run_dir = run_dir
        self.interval_s = interval_s
        self.enabled = enabled
        self.echo = echo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sspctl-progress", daemon=True)
        self._started_at = time.time()

    def __enter__(self) -> ProgressMonitor:
        if self.enabled or self.echo is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("time", 0) >= self._started_at - 1 else None  # ignore an earlier attempt's file

    def _loader_line(self) -> str | None:
        """The ``loader:`` line of this attempt's latest start/resume event, if rank 0 wrote it yet."""
        from trainers.pretrain_outputs import read_events

        try:
            events = read_events(self.run_dir)
        except (OSError, ValueError):
            return None
        for event in reversed(events):
            if event.get("loader") and event.get("time", 0) >= self._started_at - 1:
                return str(event["loader"]["line"])
        return None

    def _announce(self, bar: Any) -> bool:
        """Echo the loader line once it exists (above the bar); True once done."""
        line = self._loader_line() if self.echo is not None else None
        if line is None:
            return self.echo is None
        if bar is not None:
            bar.write(line)
        else:
            self.echo(line)  # type: ignore[misc]
        return True

    def _run(self) -> None:
        from tqdm.auto import tqdm

        bar = None
        last_loss: float | None = None
        last_time = None
        announced = False
        while not self._stop.wait(self.interval_s):
            announced = announced or self._announce(bar)
            data = self._read() if self.enabled else None
            if data is None:
                continue
            if bar is None:
                bar = tqdm(total=data["total_steps"], unit="step", dynamic_ncols=True,
                           bar_format="pretrain {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}] {desc}")
            if data["time"] == last_time:
                continue
            last_time = data["time"]
            bar.n = min(data["done_steps"], data["total_steps"])
            if data.get("loss") is not None:
                last_loss = data["loss"]
            bar.set_description_str(format_progress(data, last_loss), refresh=True)
        if not announced:
            self._announce(bar)
        if bar is not None:
            data = self._read()
            if data is not None and data["time"] != last_time:
                bar.n = min(data["done_steps"], data["total_steps"])
                bar.set_description_str(format_progress(data, data.get("loss") or last_loss), refresh=True)
            bar.close()


def format_progress(data: dict[str, Any], loss: float | None) -> str:
    """``epoch 3/100 loss 4.1234 412 slices/s ETA 1:02:03`` from a progress record."""
    epoch = min(data["epoch"] + 1, data["epochs"]) if data.get("state") != "done" else data["epochs"]
    parts = [f"epoch {epoch}/{data['epochs']}"]
    if loss is not None and math.isfinite(loss):
        parts.append(f"loss {loss:.4f}")
    if data.get("slices_per_s"):
        parts.append(f"{data['slices_per_s']:.0f} slices/s")
    if data.get("eta_s") is not None:
        seconds = int(data["eta_s"])
        parts.append(f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# The launch
# ----------------------------------------------------------------------------------------------


#: Seconds between Ray Train's checks whether an elastic run can grow (Ray's default is 60).
RESIZE_INTERVAL_ENV = "SSPCTL_RESIZE_INTERVAL_S"


def _scaling(request: PretrainRequest) -> Any:
    """``ScalingConfig``: GPUs if asked for (or, by default, if the cluster has any); elastic for a range."""
    import ray
    from ray.train import ScalingConfig

    workers = parse_workers(request.workers, "--workers")
    gpus = request.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= workers.min else 0.0
    resources: dict[str, float] = {"CPU": request.cpus_per_worker}
    if gpus > 0:
        resources["GPU"] = gpus
    elastic: dict[str, Any] = {}
    if workers.elastic and os.environ.get(RESIZE_INTERVAL_ENV):
        elastic["elastic_resize_monitor_interval_s"] = float(os.environ[RESIZE_INTERVAL_ENV])
    return ScalingConfig(num_workers=workers.num_workers, use_gpu=gpus > 0, resources_per_worker=resources, **elastic)


def local_cluster_cpus(request: PretrainRequest) -> int:
    """Logical CPUs for a private local Ray: the machine's cores, at least the workers' plus one for the controller."""
    workers = parse_workers(request.workers, "--workers")
    return max(os.cpu_count() or 1, math.ceil(workers.max * request.cpus_per_worker) + 1)


def launch_pretrain(request: PretrainRequest, echo: Callable[[str], None] = print, progress: bool = True) -> PretrainOutcome:
    """Run (or resume, or skip) one pretraining run; see the module docstring.

    Raises:
        LaunchError: bad store/config/split/flags (before Ray starts).
        orchestrator.run_lock.RunLockedError: the same run is running in another process.
        ray.train.WorkerGroupError / ray.train.ControllerError: training failed after ``max_failures``.
    """
    from datastore.store import SliceStore, StoreError
    from trainers.runtime import RuntimeOptions

    try:
        workers = parse_workers(request.workers, "--workers")
        check_failures(workers, request.max_failures, "--workers")
    except WorkerRangeError as exc:
        raise LaunchError(str(exc)) from None
    try:
        store = SliceStore.open(request.store)
        image_size, dataset_hash = store.image_size, store.hash
    except StoreError as exc:
        raise LaunchError(str(exc)) from None
    if not dataset_hash:
        raise LaunchError(f"{request.store}: the store has no content hash (ingest did not finish)")
    config = resolve_config(request.method, request.config_file, request.overrides, image_size)
    parts = pretrain_subjects(store, request.split)
    subjects = parts.train
    valid = parts.valid if config.validates else None
    try:
        check_global_batch(workers, config.batch_size, "--workers")
        if valid:
            check_global_batch(workers, config.valid_batch_size, "--workers", key="valid_batch_size")
    except WorkerRangeError as exc:
        raise LaunchError(str(exc)) from None
    runtime = RuntimeOptions.model_validate(request.runtime).model_dump(mode="json")
    resolved = config.model_dump(mode="json")
    run_name = run_name_for(request.method, resolved, dataset_hash, subjects, valid)
    run_dir = run_dir_for(request.workspace, run_name)
    from orchestrator.run_lock import RUN_LOCK_NAME, run_lock

    with run_lock(run_dir / RUN_LOCK_NAME, f"pretraining run {run_name}", warn=lambda note: echo(f"warning: {note}")):
        plan = _RunPlan(request, config, resolved, runtime, subjects, valid, store, dataset_hash, run_name, run_dir)
        return _run_or_skip(plan, echo, progress)


@dataclass(frozen=True)
class _RunPlan:
    """A validated pretraining request with its resolved config and run identity."""

    request: PretrainRequest
    config: Any
    resolved: dict[str, Any]
    runtime: dict[str, Any]
    subjects: list[str] | None
    valid: list[str] | None
    store: Any
    dataset_hash: str
    run_name: str
    run_dir: Path


def _finish(uri: str, run_id: str | None, status: str, run_dir: Path, echo: Callable[[str], None]) -> None:
    """Flush what the run could not log and set its status; say in one line what is left if MLflow is down."""
    from orchestrator.tracking import SPOOL_NAME, finish_run

    result = finish_run(uri, run_id, status, run_dir / SPOOL_NAME)
    if not result.ok:
        echo(result.line(run_id or "?", uri))


def _run_or_skip(plan: _RunPlan, echo: Callable[[str], None], progress: bool) -> PretrainOutcome:
    """With the run lock held: report a finished run (logging what it could not), else train it."""
    from orchestrator.tracking import replay_left_over
    from trainers.weights import MANIFEST_FILE, WeightsError, read_manifest

    request, config, run_name, run_dir = plan.request, plan.config, plan.run_name, plan.run_dir
    uri = request.workspace.tracking_uri
    if (run_dir / MANIFEST_FILE).is_file():
        try:
            manifest = read_manifest(run_dir).model_dump(mode="json")
        except WeightsError as exc:
            raise LaunchError(str(exc)) from None
        replay_left_over(run_dir, echo)
        echo(f"{run_name} is already finished: weights in {run_dir} (delete that directory to retrain)")
        if manifest.get("mlflow_run_id"):  # registers the parts of a run finished before the registry was used
            from orchestrator.mlflow_models import register_pretrained

            register_pretrained(uri, manifest["mlflow_run_id"], run_dir)
        return PretrainOutcome(run_name, run_dir, manifest, manifest.get("mlflow_run_id"), uri, skipped=True)

    n_subjects = len(plan.store.subjects) if plan.subjects is None else len(plan.subjects)
    echo(f"{run_name}: {request.method} on {n_subjects} subjects of {request.store} "
         f"({config.epochs} epochs, {describe_workers(parse_workers(request.workers, '--workers'), config.batch_size)})")
    from trainers.pretrain_validation import skip_reason

    skipped = skip_reason(config, plan.valid)
    echo(f"validation: {skipped}" if skipped else f"validation: {len(plan.valid or [])} subjects, best checkpoint = lowest valid_loss")
    from orchestrator.study_tracking import default_study_name

    study = request.study or default_study_name(plan.dataset_hash)
    replay_left_over(run_dir, echo)
    run_id = ensure_mlflow_run(request.workspace, study, run_name, request.method, plan.dataset_hash, {
        "ray_run_name": run_name, "ray_storage_path": request.workspace.storage_path, "run_dir": str(run_dir),
    })
    from orchestrator.tracking import SPOOL_NAME, MlflowTracker

    tracker = None
    if run_id is not None:
        from orchestrator.mlflow_data import CONTEXT_PRETRAINING, log_store_inputs

        log_store_inputs(uri, run_id, str(request.store), [(study if plan.subjects is None else f"{study}/train", CONTEXT_PRETRAINING, plan.subjects)], split=request.split)
        tracker = MlflowTracker(uri, run_id, spool=run_dir / SPOOL_NAME)
    from trainers.jobs import PretrainJob

    job = PretrainJob(
        store=str(request.store), subjects=plan.subjects, valid_subjects=plan.valid, config=plan.resolved,
        runtime=plan.runtime, read=request.read, run_name=run_name, output=run_dir, dataset_hash=plan.dataset_hash, tracker=tracker,
        mlflow_run_id=run_id, fault_inject=request.fault_inject or os.environ.get("SSPCTL_FAULT_INJECT"),
    )
    from orchestrator.ray_session import ray_session

    status = "FAILED"
    try:
        with ray_session(num_cpus=local_cluster_cpus(request)):
            result = _fit(request, run_name, job, run_dir, progress, echo)
        if run_id is not None:  # the weights as registered MLflow models, before the run ends
            from orchestrator.mlflow_models import register_pretrained

            for part, model_uri in register_pretrained(uri, run_id, run_dir).items():
                echo(f"registered {part}: {model_uri}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _finish(uri, run_id, status, run_dir, echo)
    returned = result.return_value or {}
    manifest = read_manifest(run_dir).model_dump(mode="json")
    echo(f"done: final loss {manifest['final_loss']:.4f}; weights {', '.join(manifest['files'].values())} in {run_dir}")
    echo(describe_best(manifest, returned.get("validation_skipped") if isinstance(returned, dict) else None))
    if run_id is not None:
        echo(f"MLflow run {run_id} at {uri}")
    return PretrainOutcome(run_name, run_dir, manifest, run_id, uri, skipped=False,
                           resumed_from=returned.get("resumed_from") if isinstance(returned, dict) else None)


def describe_workers(workers: WorkerRange, global_batch: int) -> str:
    """``global batch 64 = 2 x 32`` (fixed) or ``global batch 64 = 1 x 64 ... 2 x 32 (elastic 1-2 workers)``."""
    if not workers.elastic:
        return f"global batch {global_batch} = {workers.min} x {global_batch // workers.min}"
    return (f"global batch {global_batch} = {workers.min} x {global_batch // workers.min} ... "
            f"{workers.max} x {global_batch // workers.max} (elastic {workers} workers)")


def describe_best(manifest: dict[str, Any], skipped: str | None) -> str:
    """One line on the run's best checkpoint (or why it has none)."""
    best = manifest.get("best")
    if not best:
        return f"best checkpoint: none ({skipped or 'no epoch was scored'})"
    return (f"best checkpoint: epoch {best['epoch'] + 1} ({best['metric']} {best['loss']:.4f}): "
            f"{', '.join(best['files'].values())}")


def _fit(
    request: PretrainRequest, run_name: str, job: PretrainJob, run_dir: Path, progress: bool, echo: Callable[[str], None]
) -> Any:
    """Build the ``TorchTrainer`` and fit it while the progress monitor runs (it echoes the loader's line)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from trainers.pretrain import pretrain_worker

    from orchestrator.system_metrics import monitored, sampling_interval, settings_for

    interval = sampling_interval() if request.system_metrics else None
    settings = settings_for(interval, request.workspace.tracking_uri, job.mlflow_run_id)
    trainer = TorchTrainer(
        monitored(functools.partial(pretrain_worker, job), settings),  # the typed ``PretrainJob`` crosses as is
        scaling_config=_scaling(request),
        run_config=RunConfig(
            name=run_name,
            storage_path=request.workspace.storage_path,
            failure_config=FailureConfig(max_failures=request.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with ProgressMonitor(run_dir, enabled=progress, echo=echo):
        return trainer.fit()
