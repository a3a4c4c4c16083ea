"""What a fine-tuning grid is asked to run, as typed objects built once and passed intact.

- ``GridAxes``: the axes (label budgets, subset seeds, training seeds, runs per budget) and the
  resources of one cell. The study config's ``finetune`` section is a ``GridAxes`` too, so its keys
  are the grid's and are validated by the same rules.
- ``GridSpec``: the axes plus the arms (``orchestrator/arms.py``; ``scratch`` is always included).
- ``GridRequest``: the spec plus the inputs (store, split, pretrained runs, base fine-tuning config,
  study, workspace). ``sspctl finetune`` and ``sspctl study`` build one with ``grid_request`` and
  hand it to ``orchestrator.grid.plan_grid`` / ``run_grid``.
- ``CellTrial``: one pending cell as its Tune trial receives it (``CellJob``: what its workers' job
  is made of, the tracker aside).

Torch-free and light (pydantic only): the CLI and the study config import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, InstanceOf, ValidationError, field_validator, model_validator

from datastore.loader_options import ReadOptions
from orchestrator.arms import ARMS, SCRATCH, arm_order, unknown_arms
from orchestrator.worker_range import WorkerRange
from trainers.runtime_options import RuntimeOptions
from orchestrator.workspace import Workspace
from trainers.methods.names import Budget


class GridError(ValueError):
    """A grid argument or input file is wrong; the message is one line naming it."""


class GridAxes(BaseModel):
    """The axes of a grid and the resources of one cell."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: tuple[Budget, ...] = Field((10, 15, 25, 50, "all"), description="labelled training subjects per cell, or 'all'")
    seeds: tuple[int, ...] = Field((0, 1, 2), description="subset seeds: which subjects a budget labels (shared by all arms)")
    train_seeds: tuple[int, ...] = Field(
        (0,), description="training seeds: replicate runs per arm, budget and subset seed (init, order, augmentation; published: 0 only)"
    )
    runs_per_budget: dict[Budget, int] = Field(
        {}, description="training runs of a budget: its cells take the first N training seeds (a budget not named "
        "takes every training seed), e.g. {1: 6, all: 1}: 6 runs at budget 1, one with all labels",
    )
    workers_per_trial: WorkerRange = Field(
        WorkerRange(min=1, max=1), description="workers per cell: 1 (trained in the cell's Tune trial), N (Ray "
        "Train DDP) or MIN-MAX (elastic)"
    )
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per cell, fractional packs cells onto one GPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs per Train worker")
    max_failures: int = Field(1, ge=0, description="restarts per failed cell: of its Tune trial (one worker) or "
                              "of its Train worker group, each resuming from the cell's last checkpoint")
    system_metrics: bool = Field(False, description="log MLflow system/* metrics from rank 0 of each cell")
    read: ReadOptions = Field(
        ReadOptions(), description="how each cell's workers read the store (cache_gb: their loader memory budget; "
        "default: half of the node's memory over the cell's workers on it)",
    )

    @field_validator("budgets", "seeds", "train_seeds")
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("has duplicates")
        return value

    @model_validator(mode="after")
    def _runs_fit(self) -> GridAxes:
        for budget, runs in self.runs_per_budget.items():
            if budget not in self.budgets:
                raise ValueError(f"runs_per_budget: budget {budget!r} is not one of the budgets {list(self.budgets)}")
            if not 1 <= runs <= len(self.train_seeds):
                raise ValueError(f"runs_per_budget: {runs} run(s) at budget {budget!r}; expected 1 to "
                                 f"{len(self.train_seeds)} (the number of training seeds)")
        return self

    @model_validator(mode="after")
    def _elastic_restarts(self) -> GridAxes:
        if self.workers_per_trial.elastic and self.max_failures == 0:
            raise ValueError(f"workers_per_trial {self.workers_per_trial} (elastic) needs max_failures >= 1")
        return self

    def train_seeds_for(self, budget: Budget) -> tuple[int, ...]:
        """The training seeds of ``budget``: the first ``runs_per_budget[budget]``, or all of them."""
        return self.train_seeds[: self.runs_per_budget.get(budget, len(self.train_seeds))]

    def axes(self) -> dict[str, Any]:
        """The ``GridAxes`` fields of this model (what a ``GridSpec`` takes from a study section)."""
        return self.model_dump(include=set(GridAxes.model_fields))


class GridSpec(GridAxes):
    """What to run: the arms, the axes of the grid and the resources of one cell."""

    methods: tuple[str, ...] = Field(description="arms (orchestrator/arms.py); 'scratch' is always included")

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = unknown_arms(value)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(ARMS)})")
        return tuple(sorted(dict.fromkeys([SCRATCH, *value]), key=arm_order))


class GridRequest(BaseModel):
    """One grid to plan and run: the spec and its inputs.

    ``pretrained`` maps a run kind (an SSP method or ``supervised``) to a pretraining run directory,
    a run name under ``<workspace>/pretrain/`` or a registered model URI; ``config`` holds the base
    ``FinetuneConfig`` keys of every cell; ``study`` the MLflow experiment (``None``: derived from
    the dataset).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: GridSpec
    store: str
    split: str
    pretrained: dict[str, str] = {}
    config: dict[str, Any] = {}
    study: str | None = None
    workspace: InstanceOf[Workspace]


class CellJob(BaseModel):
    """The JSON-able part of a cell's ``trainers.jobs.FinetuneJob`` (the tracker is added in the trial)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str
    split: str
    config: dict[str, Any] = Field(description="the cell's resolved FinetuneConfig")
    output: str = Field(description="the cell's directory")
    read: ReadOptions = ReadOptions()
    runtime: RuntimeOptions = Field(
        RuntimeOptions(), description="how the cell's workers run (global_batches: on for an elastic workers_per_trial)"
    )


class CellTrial(BaseModel):
    """One pending cell as its Tune trial receives it (``param_space`` holds its JSON dump).

    ``run_id`` is empty until the cell's MLflow run is created (when its training starts);
    ``planned_at`` is the wall time the grid planned it (for the queue time).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    method: str
    budget: Budget
    seed: int
    train_seed: int
    run_id: str = ""
    tracking_uri: str
    study: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str] = {}
    planned_at: float = 0.0
    storage_path: str
    workers: WorkerRange = Field(WorkerRange(min=1, max=1))
    gpus_per_trial: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0)
    system_metrics_interval_s: float | None = Field(None, gt=0, description="seconds between system/* samples; None: off")
    job: CellJob


def grid_request(
    store: str | Path, split: str | Path, *, pretrained: Mapping[str, str | Path] | None = None,
    config: Mapping[str, Any] | None = None, study: str | None = None, workspace: Workspace | None = None,
    methods: list[str] | tuple[str, ...] | None = None, **axes: Any,
) -> GridRequest:
    """Build the request once: ``axes`` are ``GridAxes`` fields, ``methods`` the arms (default: scratch
    plus every pretrained kind); the workspace defaults to ``Workspace.resolve()``.

    Raises:
        GridError: an axis or arm does not validate (one line naming the key).
    """
    from orchestrator.configio import format_validation_error

    runs = {kind: str(run) for kind, run in (pretrained or {}).items()}
    chosen = list(methods) if methods else [SCRATCH, *runs]
    try:
        spec = GridSpec(methods=tuple(dict.fromkeys([SCRATCH, *chosen])), **axes)
    except ValidationError as exc:
        raise GridError(format_validation_error(exc, "grid")) from None
    return GridRequest(spec=spec, store=str(store), split=str(split), pretrained=runs, config=dict(config or {}),
                       study=study, workspace=workspace or Workspace.resolve())


__all__ = ["CellJob", "CellTrial", "GridAxes", "GridError", "GridRequest", "GridSpec", "grid_request"]
