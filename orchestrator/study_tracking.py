"""The MLflow layout of a study: who creates which run, with which name and tags.

One experiment per study, tagged ``mlflow.experimentKind=custom_model_development`` so the MLflow 3
UI opens it on its runs table (not the GenAI view). Inside it:

- a pretraining run per pretraining command (``pretrain-{method}-{hash8}``, ``sspctl.kind=pretrain_run``);
- a parent run per fine-tuning grid (``grid-{grid_id}``, ``sspctl.kind=grid``);
- a child run per grid cell (``ft-{method}-b{budget}-s{seed}-{hash8}``, ``sspctl.kind=cell``)
  tagged ``sspctl.method``, ``sspctl.budget``, ``sspctl.seed``, ``sspctl.pretrain_run_id``,
  ``sspctl.dataset_hash`` and ``mlflow.parentRunId``. A cell's run is created when the cell starts
  training (not when the grid is planned), so its duration is its training time.

Every sspctl tag lives in the ``sspctl.`` namespace: callers pass plain names (``method``) and
``namespaced`` prefixes them. Runs written before that (``sspctl_kind``, ``method``, ...) are
migrated when their study is opened (``migrate_legacy_tags``), so resume finds them.

Every run is found by its tags before it is created, so rerunning a command re-attaches to the
same runs instead of creating duplicates (params are logged only at creation: MLflow forbids
changing them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.grid_spec import CellTrial

log = logging.getLogger("sspctl.study")

#: Prefix of every tag sspctl writes (``mlflow.*`` tags are MLflow's own).
TAG_PREFIX = "sspctl."
#: Tag naming what a run is in the study layout.
KIND_TAG = "sspctl.kind"
KIND_GRID, KIND_CELL, KIND_PRETRAIN_RUN = "grid", "cell", "pretrain_run"
#: Tag holding a run's deterministic key (grid id, cell name, pretraining run name).
KEY_TAG = "sspctl.key"
PARENT_TAG = "mlflow.parentRunId"
#: Experiment tag the MLflow 3 UI reads to choose between its model-training and GenAI views.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Query of the MLflow UI that opens an experiment in the model-training view (see ``experiment_page``).
UI_VIEW_QUERY = "workflowType=machine_learning"
#: Tags of runs written before the ``sspctl.`` namespace, and their new names.
LEGACY_TAGS = {
    "sspctl_kind": KIND_TAG, "sspctl_key": KEY_TAG,
    **{name: f"{TAG_PREFIX}{name}" for name in (
        "method", "budget", "seed", "subset_seed", "train_seed", "arm_role", "init_part", "init_weights_sha256",
        "pretrain_run_id", "dataset_hash", "split", "store", "ray_run_name", "ray_storage_path", "run_dir",
    )},
}
#: The metric whose presence (with status FINISHED) marks a cell run complete.
COMPLETION_METRIC = "test_dice_mean"
#: Artifact path of a cell's per-subject Dice table (rows ``subject_id, phase, class, dice``).
PER_SUBJECT_ARTIFACT = "per_subject_dice.csv"

_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def namespaced(tags: dict[str, Any]) -> dict[str, str]:
    """``{"method": "simclr", "mlflow.parentRunId": p}`` -> ``{"sspctl.method": "simclr", "mlflow.parentRunId": p}``.

    Keys already under ``sspctl.`` or ``mlflow.`` are kept; values become strings.
    """
    return {(k if k.startswith((TAG_PREFIX, "mlflow.")) else f"{TAG_PREFIX}{k}"): str(v) for k, v in tags.items()}


def run_tag(run: Any, name: str, default: str = "") -> str:
    """Tag ``sspctl.{name}`` of an MLflow ``Run`` (or its pre-namespace spelling ``{name}``)."""
    tags = run.data.tags
    return str(tags.get(f"{TAG_PREFIX}{name}", tags.get(name, default)))


def short_hash(payload: Any, length: int = 8) -> str:
    """First ``length`` hex digits of the SHA-256 of ``payload`` as canonical JSON."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def default_study_name(dataset_hash: str) -> str:
    """Study (experiment) name used when ``--study`` is not given: ``sspctl-{hash8}`` of the store."""
    return f"sspctl-{dataset_hash[:8]}"


def client_for(tracking_uri: str) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` (fails fast instead of retrying for minutes)."""
    for key, value in _FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


@dataclass(frozen=True)
class StudyTracking:
    """Handle on one study's experiment: the tracking URI, experiment name and id."""

    tracking_uri: str
    study: str
    experiment_id: str

    @property
    def client(self) -> Any:
        return client_for(self.tracking_uri)


def open_study(tracking_uri: str, study: str, artifact_root: str | None = None, create: bool = True) -> StudyTracking:
    """Find (or create) the experiment named ``study``.

    Args:
        tracking_uri: MLflow backend (``sqlite:////abs/mlflow.db`` or a server URL).
        study: experiment name.
        artifact_root: base artifact URI for a new experiment on a local backend
            (``{artifact_root}/{study}``); ignored for a tracking server, which decides itself.
        create: if False and the experiment is missing, raise ``LookupError``.
    """
    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        if not create:
            raise LookupError(f"study {study!r} not found in MLflow at {tracking_uri}")
        location = None
        if artifact_root and not tracking_uri.startswith(("http://", "https://", "databricks")):
            from orchestrator.paths import check_name

            location = f"{artifact_root.rstrip('/')}/{check_name(study, 'study')}"  # stays under the root
        experiment_id = client.create_experiment(
            study, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
        return StudyTracking(tracking_uri, study, experiment_id)
    if experiment.lifecycle_stage == "deleted":
        raise LookupError(f"study {study!r} is deleted in MLflow at {tracking_uri}; restore it or pick another --study")
    handle = StudyTracking(tracking_uri, study, experiment.experiment_id)
    # a study made by an older sspctl: bring it to today's layout (idempotent, one search when done)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    migrate_legacy_tags(handle)
    repair_arm_tags(handle)
    return handle


def migrate_legacy_tags(study: StudyTracking) -> int:
    """Rename the pre-namespace tags (``LEGACY_TAGS``) of the study's runs; returns the runs migrated.

    Each run gets its new tags first and loses ``sspctl_kind`` last, so an interrupted migration is
    finished by the next call and a run is always found under one of the two spellings.
    """
    client = study.client
    runs = client.search_runs([study.experiment_id], filter_string="tags.sspctl_kind LIKE '%'", max_results=5000)
    for run in runs:
        tags = run.data.tags
        for old, new in LEGACY_TAGS.items():
            if old in tags and new not in tags:
                client.set_tag(run.info.run_id, new, tags[old])
        for old in [k for k in LEGACY_TAGS if k in tags and k != "sspctl_kind"] + ["sspctl_kind"]:
            client.delete_tag(run.info.run_id, old)
    if runs:
        log.info("study %s: moved the tags of %d runs into the sspctl. namespace", study.study, len(runs))
    return len(runs)


#: A cell's name: ``ft-{arm}-b{budget}-s{subset seed}-t{training seed}-{hash8}`` (``orchestrator.grid``).
_CELL_NAME = re.compile(r"^ft-(?P<arm>.+)-b[^-]+-s\d+(-t\d+)?-[0-9a-f]{8}$")


def repair_arm_tags(study: StudyTracking) -> int:
    """Give back their arm (``sspctl.method``) to cells whose worker overwrote it with the model's
    initialisation (sspctl built 2026-12-06 to 12-07: ``scratch-b`` read as ``scratch``, ``mim-encdec``
    as ``mim``, so the report merged the A/A arm into the reference). The arm is in the cell's name
    (``sspctl.key``). Returns the runs repaired; idempotent (one search once repaired).
    """
    repaired = 0
    for run in find_runs(study, {KIND_TAG: "cell"}):
        tags = run.data.tags
        match = _CELL_NAME.match(tags.get(KEY_TAG, ""))
        if match and tags.get(f"{TAG_PREFIX}method") != match["arm"]:
            study.client.set_tag(run.info.run_id, f"{TAG_PREFIX}method", match["arm"])
            repaired += 1
    if repaired:
        log.info("study %s: gave %d cells back their arm as sspctl.method", study.study, repaired)
    return repaired


def find_runs(study: StudyTracking, tags: dict[str, str]) -> list[Any]:
    """Runs of the study whose tags equal ``tags`` (oldest first)."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    runs: list[Any] = []
    token = None
    while True:
        page = study.client.search_runs(
            [study.experiment_id], filter_string=" and ".join(clauses), max_results=1000,
            order_by=["attributes.start_time ASC"], page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_or_create_run(
    study: StudyTracking,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, Any] | None = None,
    key_tags: tuple[str, ...] = (KIND_TAG, KEY_TAG),
) -> tuple[str, bool]:
    """Return ``(run_id, created)`` of the run whose ``key_tags`` match ``tags``.

    A new run gets ``run_name``, all ``tags`` and ``params`` (flattened). An existing run is left as
    it is (its params cannot change) apart from missing tags, which are added.
    """
    from orchestrator.tracking import flatten_params

    tags = namespaced(tags)
    lookup = {key: tags[key] for key in key_tags}
    existing = find_runs(study, lookup)
    client = study.client
    if existing:
        run = existing[0]
        if len(existing) > 1:
            log.warning("%d MLflow runs match %s; using the oldest (%s)", len(existing), lookup, run.info.run_id)
        for key, value in tags.items():
            if run.data.tags.get(key) != value:
                client.set_tag(run.info.run_id, key, value)
        return run.info.run_id, False
    run = client.create_run(study.experiment_id, run_name=run_name, tags=tags)
    if params:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id, True


def grid_parent_run(study: StudyTracking, grid_id: str, tags: dict[str, str], params: dict[str, Any] | None = None) -> str:
    """Find-or-create the parent run ``grid-{grid_id}`` of a fine-tuning grid; returns its id."""
    all_tags = {KIND_TAG: KIND_GRID, KEY_TAG: grid_id, **tags}
    run_id, _ = find_or_create_run(study, f"grid-{grid_id}", all_tags, params)
    return run_id


def pretrain_run(study: StudyTracking, run_name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """Find-or-create the run of one pretraining command (key ``run_name``); returns ``(run_id, created)``.

    A top-level run of the study: it starts when the pretraining starts and ends with it.
    """
    return find_or_create_run(study, run_name, {KIND_TAG: KIND_PRETRAIN_RUN, KEY_TAG: run_name, **tags})


def cell_run(
    study: StudyTracking,
    cell_name: str,
    parent_run_id: str,
    tags: dict[str, str],
    params: dict[str, Any] | None = None,
) -> str:
    """Find-or-create the child run of one grid cell (by its deterministic ``cell_name``).

    Call it when the cell starts training: a new run's start time is its creation time.
    """
    all_tags = {KIND_TAG: KIND_CELL, KEY_TAG: cell_name, PARENT_TAG: parent_run_id, **tags}
    run_id, _ = find_or_create_run(study, cell_name, all_tags, params)
    return run_id


def existing_cell_run(study: StudyTracking, cell_name: str) -> str | None:
    """The id of the cell's run if an earlier invocation created it, else ``None`` (creates nothing)."""
    runs = find_runs(study, {KIND_TAG: KIND_CELL, KEY_TAG: cell_name})
    return runs[0].info.run_id if runs else None


def run_is_complete(study: StudyTracking, run_id: str) -> bool:
    """True when the run finished (status FINISHED) and logged ``COMPLETION_METRIC``."""
    run = study.client.get_run(run_id)
    return run.info.status == "FINISHED" and COMPLETION_METRIC in run.data.metrics


def cell_runs(study: StudyTracking) -> list[Any]:
    """All grid-cell runs of the study (any grid), oldest first."""
    return find_runs(study, {KIND_TAG: KIND_CELL})


def grid_runs(study: StudyTracking) -> list[Any]:
    """All grid parent runs of the study, oldest first."""
    return find_runs(study, {KIND_TAG: KIND_GRID})


def set_status(study: StudyTracking, run_id: str, status: str) -> None:
    """End a run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``)."""
    study.client.set_terminated(run_id, status=status)


# -- a grid cell's run, from inside its Tune trial ------------------------------------------------
#
# ``cell`` below is the trial's ``orchestrator.grid_spec.CellTrial``: it carries ``tracking_uri``,
# ``study``, ``experiment_id``, ``parent_run_id``, ``name``, ``tags``, ``planned_at`` (epoch
# seconds), ``run_id`` ("" until the cell has a run) and the cell's ``job``.


def _cell_study(cell: CellTrial) -> StudyTracking:
    return StudyTracking(cell.tracking_uri, cell.study, cell.experiment_id)


def cell_run_id(cell: CellTrial) -> str | None:
    """The cell's run id: the one it carries, else the run found by its name (``None`` if it has none)."""
    return cell.run_id or existing_cell_run(_cell_study(cell), cell.name)


def start_cell_run(cell: CellTrial) -> str:
    """Create (or re-attach to) the cell's run now that its training starts; returns its id ("" if MLflow is down).

    Sets the run RUNNING, logs ``queue_time_s`` (seconds from grid planning to this start) and the
    store as dataset inputs (the cell's training subset, context ``training``; the test set, context
    ``test``) with the split file.
    """
    import time

    from orchestrator.mlflow_data import cell_inputs, log_store_inputs

    started = time.time()
    try:
        study = _cell_study(cell)
        run_id = cell_run(study, cell.name, cell.parent_run_id, cell.tags, params=cell.job.config)
        client = study.client
        client.update_run(run_id, status="RUNNING")
        client.log_metric(run_id, "queue_time_s", max(0.0, started - cell.planned_at))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        log.warning("cell %s: MLflow run not started (%s); training continues untracked", cell.name,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return ""
    job = cell.job
    try:
        inputs = cell_inputs(cell.study, job.split, job.config["budget"], job.config["seed"])
    except Exception as exc:  # noqa: BLE001 - the worker reports a bad split itself
        log.warning("cell %s: no dataset inputs (%s)", cell.name, str(exc).splitlines()[0][:200])
    else:
        log_store_inputs(cell.tracking_uri, run_id, job.store, inputs, split=job.split)
    return run_id


def experiment_page(base_url: str, experiment_id: str) -> str:
    """URL of an experiment's runs page in the MLflow UI's model-training view.

    The MLflow 3.17 UI starts in its GenAI view whatever the experiment's kind tag says (it remembers
    the last view per browser); ``workflowType=machine_learning`` is what its own view switch sets.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}?{UI_VIEW_QUERY}"


def study_pages(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """``(study, experiment_page)`` for every active experiment but MLflow's ``Default``."""
    client = client_for(tracking_uri)
    experiments = client.search_experiments(view_type=1, max_results=1000)  # 1 = ACTIVE_ONLY
    return [(e.name, experiment_page(base_url, e.experiment_id))
            for e in sorted(experiments, key=lambda e: e.name) if e.name != "Default"]
