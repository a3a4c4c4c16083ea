"""The MLflow layout of a study: who creates which run, with which name and tags.

One experiment per study. Inside it:

- a parent run per fine-tuning grid (``grid-{grid_id}``, tag ``sspctl_kind=grid``);
- a parent run per pretraining method (``pretrain-{method}``, tag ``sspctl_kind=pretrain``) under
  which the pretraining engineer's runs nest (``pretrain_parent_run``);
- a child run per grid cell (``ft-{method}-b{budget}-s{seed}-{hash8}``, tag ``sspctl_kind=cell``)
  tagged ``method``, ``budget``, ``seed``, ``pretrain_run_id``, ``dataset_hash`` and
  ``mlflow.parentRunId``.

Every run is found by its tags before it is created, so rerunning a command re-attaches to the
same runs instead of creating duplicates (params are logged only at creation: MLflow forbids
changing them). Tag keys use underscores so filters need no back-quoting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sspctl.study")

#: Tag naming what a run is in the study layout.
KIND_TAG = "sspctl_kind"
KIND_GRID, KIND_CELL, KIND_PRETRAIN = "grid", "cell", "pretrain"
#: Tag holding a run's deterministic key (grid id, cell name, pretraining method).
KEY_TAG = "sspctl_key"
PARENT_TAG = "mlflow.parentRunId"
#: The metric whose presence (with status FINISHED) marks a cell run complete.
COMPLETION_METRIC = "test_dice_mean"
#: Artifact path of a cell's per-subject Dice table (rows ``subject_id, phase, class, dice``).
PER_SUBJECT_ARTIFACT = "per_subject_dice.csv"

_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
        experiment_id = client.create_experiment(study, artifact_location=location)
    else:
        if experiment.lifecycle_stage == "deleted":
            raise LookupError(f"study {study!r} is deleted in MLflow at {tracking_uri}; restore it or pick another --study")
        experiment_id = experiment.experiment_id
    return StudyTracking(tracking_uri, study, experiment_id)


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

    lookup = {key: tags[key] for key in key_tags}
    existing = find_runs(study, lookup)
    client = study.client
    if existing:
        run = existing[0]
        if len(existing) > 1:
            log.warning("%d MLflow runs match %s; using the oldest (%s)", len(existing), lookup, run.info.run_id)
        for key, value in tags.items():
            if run.data.tags.get(key) != str(value):
                client.set_tag(run.info.run_id, key, str(value))
        return run.info.run_id, False
    run = client.create_run(study.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
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


def pretrain_parent_run(study: StudyTracking, method: str, dataset_hash: str) -> str:
    """Find-or-create the parent run ``pretrain-{method}`` of one pretraining method; returns its id.

    For the pretraining command: create the pretraining run itself with the tag
    ``mlflow.parentRunId`` set to this id (and ``method``, ``dataset_hash``) so the UI nests it.
    """
    tags = {KIND_TAG: KIND_PRETRAIN, KEY_TAG: f"{method}-{dataset_hash[:8]}", "method": method, "dataset_hash": dataset_hash}
    run_id, created = find_or_create_run(study, f"pretrain-{method}", tags)
    if created:  # a container for the method's runs, with no work of its own: never left RUNNING
        study.client.set_terminated(run_id, "FINISHED")
    return run_id


def cell_run(
    study: StudyTracking,
    cell_name: str,
    parent_run_id: str,
    tags: dict[str, str],
    params: dict[str, Any] | None = None,
) -> str:
    """Find-or-create the child run of one grid cell (by its deterministic ``cell_name``)."""
    all_tags = {KIND_TAG: KIND_CELL, KEY_TAG: cell_name, PARENT_TAG: parent_run_id, **tags}
    run_id, _ = find_or_create_run(study, cell_name, all_tags, params)
    return run_id


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
