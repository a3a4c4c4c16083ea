"""A whole study in one resumable call: ingest -> split -> pretrain each method -> grid -> report.

The positive control's supervised model (``orchestrator.controls``), when the grid has that arm,
trains in a Ray task beside the pretraining, since it needs none of the pretrained weights.

Every stage is idempotent on its own (ingest skips committed subjects, a pretraining run with a
manifest is not retrained, finished grid cells are skipped), so rerunning ``sspctl study`` after an
interruption continues where it stopped. ``sspctl demo`` is a study on a synthetic phantom.

Relative paths in a study config are resolved against the current working directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datastore.loader_options import ReadOptions
from orchestrator.arms import ARMS, SSP_METHODS
from orchestrator.grid_spec import GridAxes
from orchestrator.worker_range import WorkerRange
from orchestrator.workspace import Workspace

#: Arms a study adds besides scratch and its pretrained methods (``orchestrator/arms.py``).
EXTRA_ARMS = tuple(name for name, arm in ARMS.items() if arm.role != "reference" and name not in SSP_METHODS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSection(_Section):
    """Raw NIfTI sources; omit the section when the store already exists."""

    mnms: Path | None = Field(None, description="M&Ms root (CSV + <ID>/ folders)")
    mnms2: Path | None = Field(None, description="M&Ms-2 root (dataset_information.csv + <NNN>/ folders)")
    acdc: Path | None = Field(None, description="ACDC root (training/, testing/ with patientNNN/ folders)")
    manifests: tuple[Path, ...] = Field((), description="CSV/YAML manifests of other subjects (docs/store.md)")
    config: Path | None = Field(None, description="IngestConfig YAML (spacing, size, ...)")
    spacing: float | None = Field(None, gt=0, description="target in-plane spacing, mm")
    size: int | None = Field(None, gt=0, description="stored slice edge, px")
    workers: int = Field(2, ge=1, description="Ray tasks preprocessing subjects")


class SplitSection(_Section):
    """Use ``file`` if it exists, else draw a split from the store and write it there."""

    file: Path | None = Field(None, description="split YAML (default <output>/split.yaml)")
    test_per_vendor: int = Field(15, ge=1, description="test subjects per dataset x vendor group")
    seed: int = Field(1234, description="seed of the test/valid draw")
    budgets_seeds: tuple[int, ...] = Field((0, 1, 2), description="seeds of the nested label-budget subsets")
    named: tuple[str, ...] = Field(
        (), description="named splits next to `file` (e.g. vendor-A_B, vendor-C_D from `sspctl splits import`), "
        "each fine-tuned too with budget all: one more grid and report per name",
    )


class PretrainSection(_Section):
    methods: tuple[str, ...] = Field(SSP_METHODS, description="SSP methods to pretrain")
    config_dir: Path | None = Field(None, description="folder with <method>.yaml (default: paper defaults)")
    workers: WorkerRange = Field(WorkerRange(min=1, max=1), description="Ray Train workers per method: N, or MIN-MAX (elastic)")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker (default: 1 if GPUs exist)")
    epochs: int | None = Field(None, ge=1, description="override every method's epochs")
    read: ReadOptions = Field(
        ReadOptions(), description="how the workers read the store (cache_gb: their loader memory budget, as --cache-gb)"
    )

    @field_validator("methods")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(SSP_METHODS))
        if unknown:
            raise ValueError(f"unknown SSP method(s) {unknown}; choose from {list(SSP_METHODS)}")
        return value


class FinetuneSection(GridAxes):
    """The study's grid: its axes and cell resources are a ``GridAxes`` (the grid's own keys and rules);
    the arms are scratch, the pretrained methods and ``extra_arms``."""

    extra_arms: tuple[str, ...] = Field(
        (), description=f"arms besides scratch and the pretrained methods: {', '.join(EXTRA_ARMS)}"
    )
    config: Path | None = Field(None, description="FinetuneConfig YAML")
    epochs: int | None = Field(None, ge=1, description="override the fine-tuning epochs")

    @field_validator("extra_arms")
    @classmethod
    def _known_arms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(EXTRA_ARMS))
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; choose from {list(EXTRA_ARMS)}")
        return value


class PhantomSection(_Section):
    """Synthesise the raw sources (M&Ms- and M&Ms-2-style phantom NIfTI) under ``<output>/raw/`` first.

    The ingest section's ``mnms``/``mnms2`` then default to those folders. ``datastore/synth.py``.
    """

    mnms_subjects: int = Field(20, ge=4, description="M&Ms-style phantom subjects")
    mnms2_subjects: int = Field(10, ge=4, description="M&Ms-2-style phantom subjects")
    seed: int = Field(7, description="phantom seed")
    size: int = Field(96, ge=32, description="native in-plane matrix, px")


class StudyConfig(_Section):
    """One study: what data, which methods, which grid. See ``configs/paper.yaml``."""

    name: str = Field(..., min_length=1, description="MLflow experiment name")
    store: str | None = Field(
        None, description="Zarr slice store (path or fsspec URL); with a phantom section default <output>/phantom.zarr"
    )
    phantom: PhantomSection | None = None
    ingest: IngestSection | None = None
    split: SplitSection = SplitSection()
    pretrain: PretrainSection = PretrainSection()
    finetune: FinetuneSection = FinetuneSection()
    ray_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (ignored with RAY_ADDRESS)")

    @model_validator(mode="after")
    def _store_given(self) -> "StudyConfig":
        if self.store is None and self.phantom is None:
            raise ValueError("store: required (or a phantom section, which puts it under the output folder)")
        return self


@dataclass(frozen=True)
class StudyOutcome:
    """Where a study's products are."""

    split: Path
    pretrained: dict[str, Path]
    grid: Any
    report: Any
    #: Named split -> (its grid, its report).
    named: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def with_phantom(config: StudyConfig, workspace: Workspace, echo: Callable[[str], None]) -> StudyConfig:
    """Synthesise the phantom sources (once) and point the store and ingest section at them."""
    if config.phantom is None:
        return config
    from datastore.synth import write_dataset

    section = config.phantom
    raw = workspace.root / "raw"
    for layout, count, first in (("mnms", section.mnms_subjects, 1), ("mnms2", section.mnms2_subjects, 101)):
        folder = raw / layout
        if not (folder / ".complete").is_file():
            echo(f"synthesising {count} {layout} phantom subjects into {folder}")
            write_dataset(folder, layout, n_subjects=count, seed=section.seed, size=section.size, first_id=first,
                          frames=(10, 14), slices=(6, 8))
            (folder / ".complete").touch()
    ingest = config.ingest or IngestSection()
    ingest = ingest.model_copy(update={"mnms": ingest.mnms or raw / "mnms", "mnms2": ingest.mnms2 or raw / "mnms2"})
    return config.model_copy(update={"store": config.store or str(workspace.root / "phantom.zarr"), "ingest": ingest})


def ensure_store(config: StudyConfig, echo: Callable[[str], None]) -> None:
    """Ingest the configured sources into the store (a no-op when it is complete)."""
    if config.ingest is None:
        return
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from orchestrator.configio import load_config

    section = config.ingest
    settings = load_config(IngestConfig, section.config, {"spacing": section.spacing, "size": section.size})
    sources = {"mnms": section.mnms, "mnms2": section.mnms2, "acdc": section.acdc, "manifest": list(section.manifests)}
    plan = plan_ingest(sources, config.store, settings)
    for message in plan.warnings:
        echo(f"warning: {message}")
    if plan.noop:
        echo(f"store {config.store}: up to date ({plan.already} subjects)")
        return
    echo(f"ingest: {len(plan.todo)} subjects into {config.store}")
    result = execute_ingest(plan, executor="ray", max_in_flight=2 * section.workers)
    for item in result.skipped:
        echo(f"  skipped {item.dataset}/{item.subject_id}: {item.reason}")
    echo(f"store {config.store}: {result.n_subjects} subjects, {result.n_slices} slices, hash {result.hash}")


def ensure_split(config: StudyConfig, workspace: Workspace, echo: Callable[[str], None]) -> Path:
    """The study's split file: the configured one if it exists, else drawn once and kept."""
    from datastore.splits import make_splits
    from datastore.store import SliceStore

    path = config.split.file or workspace.root / "split.yaml"
    if path.is_file():
        return path
    store = SliceStore.open(config.store)
    budgets = [b for b in config.finetune.budgets if b != "all"]
    split = make_splits(
        store.subjects, test_per_vendor=config.split.test_per_vendor, seed=config.split.seed,
        budgets=budgets, seeds=config.split.budgets_seeds, meta={"store_hash": store.hash},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    split.save(path)
    echo(f"split: {path}")
    return path


def pretrain_all(
    config: StudyConfig, workspace: Workspace, split: Path, echo: Callable[[str], None], progress: bool
) -> dict[str, Path]:
    """Pretrain every configured method (finished runs are skipped); method -> run directory."""
    from orchestrator.pretrain_launch import PretrainRequest, launch_pretrain

    section = config.pretrain
    runs: dict[str, Path] = {}
    for method in section.methods:
        config_file = section.config_dir / f"{method}.yaml" if section.config_dir else None
        request = PretrainRequest(
            method=method, store=config.store, workspace=workspace, config_file=config_file,
            overrides={"epochs": section.epochs}, split=split, workers=section.workers,
            gpus_per_worker=section.gpus_per_worker, read=section.read, study=config.name,
        )
        runs[method] = launch_pretrain(request, echo=echo, progress=progress).run_dir
    return runs


def start_supervised_control(
    config: StudyConfig, workspace: Workspace, split: Path, echo: Callable[[str], None]
) -> Any | None:
    """Start training the positive control's model (``orchestrator.controls``) in a Ray task with the
    resources of one worker of a grid cell, so that it runs beside the pretraining, which it does not
    need; return the task's reference (its result is the run directory), or ``None`` when the study
    has no supervised arm or the model is already trained (the grid then reuses it)."""
    from orchestrator.arms import SUPERVISED

    if SUPERVISED not in config.finetune.extra_arms:
        return None
    import ray

    from orchestrator.controls import ensure_supervised_init, is_trained
    from orchestrator.grid import supervised_inputs

    request = study_grid(config, workspace, split, {})
    inputs = supervised_inputs(request)
    if is_trained(*inputs, workspace):
        return None
    spec = request.spec
    cpus, gpus = spec.cpus_per_worker, spec.gpus_per_trial / spec.workers_per_trial.max
    echo(f"positive control: training the supervised model beside the pretraining (a Ray task of {cpus:g} CPU"
         + (f", {gpus:g} GPU)" if gpus else ")"))
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(ensure_supervised_init)
    return task.remote(*inputs, workspace)


def wait_for_supervised_control(task: Any, echo: Callable[[str], None]) -> Path:
    """The run directory the ``start_supervised_control`` task returns, once it has finished.

    Raises:
        the task's own exception (e.g. a ``WeightsError`` naming the file), not Ray's wrapper of it.
    """
    import ray
    from ray.exceptions import RayTaskError

    echo("positive control: waiting for the supervised model")
    try:
        return ray.get(task)
    except RayTaskError as exc:
        raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None


def finetune_config(config: StudyConfig) -> dict[str, Any]:
    """Base fine-tuning keys of the grid: the YAML file's, then the study's overrides."""
    from orchestrator.configio import read_yaml

    section = config.finetune
    base = read_yaml(section.config) if section.config else {}
    if section.epochs is not None:
        base["epochs"] = section.epochs
    return base


def named_split_files(config: StudyConfig, split: Path) -> dict[str, Path]:
    """The files of ``config.split.named`` next to ``split`` (checked before any training starts).

    Raises:
        datastore.splits.SplitError: a named split file is missing (the message lists those found).
    """
    from datastore.splits import named_split_path

    return {name: named_split_path(split, name) for name in config.split.named}


def study_grid(
    config: StudyConfig, workspace: Workspace, split: Path, pretrained: dict[str, Path], **axes: Any
) -> Any:
    """The study's ``GridRequest`` on ``split``: scratch, the pretrained methods and the extra arms over
    the finetune section's axes (``axes`` override some of them).

    Raises:
        orchestrator.grid_spec.GridError: an axis does not validate.
    """
    from orchestrator.grid_spec import grid_request

    section = config.finetune
    return grid_request(
        config.store, split, pretrained=pretrained, config=finetune_config(config), study=config.name,
        workspace=workspace, methods=["scratch", *pretrained, *section.extra_arms], **{**section.axes(), **axes},
    )


def run_study(
    config: StudyConfig, workspace: Workspace, echo: Callable[[str], None] = print, progress: bool = True,
    report_dir: Path | None = None,
) -> StudyOutcome:
    """Run or resume the whole study; see the module docstring.

    ``report_dir`` is where the grid's report goes (default ``<workspace>/reports/<name>/``).
    """
    from orchestrator.grid import run_grid
    from orchestrator.ray_session import ray_session
    from orchestrator.report import build_report

    config = with_phantom(config, workspace, echo)
    named_grids: dict[str, Any] = {}
    with ray_session(num_cpus=config.ray_cpus):
        ensure_store(config, echo)
        split = ensure_split(config, workspace, echo)
        named = named_split_files(config, split)
        supervised = start_supervised_control(config, workspace, split, echo)
        pretrained = pretrain_all(config, workspace, split, echo, progress)
        if supervised is not None:
            echo(f"positive control: supervised model in {wait_for_supervised_control(supervised, echo)}")
        section = config.finetune
        arms = ["scratch", *pretrained, *section.extra_arms]
        runs = ", ".join(f"{b}: {len(section.train_seeds_for(b))}" for b in section.budgets)
        echo(f"fine-tuning grid: {', '.join(arms)} x budgets {list(section.budgets)} x subset seeds "
             f"{list(section.seeds)} x training seeds {list(section.train_seeds)} (runs per budget {runs})")
        grid = run_grid(study_grid(config, workspace, split, pretrained), progress=progress)
        for name, path in named.items():
            # A named split has no budgets: budget 'all' is the same subjects for every subset seed.
            echo(f"fine-tuning grid on split {name}: {', '.join(arms)} x budget all")
            request = study_grid(config, workspace, path, pretrained, budgets=("all",), seeds=section.seeds[:1])
            named_grids[name] = run_grid(request, progress=progress)
    reports = report_dir or workspace.folder("reports", config.name)
    report = build_report(config.name, workspace.tracking_uri, reports, grid=grid.parent_run_id)
    outcome = StudyOutcome(split=split, pretrained=pretrained, grid=grid, report=report)
    for name, named_grid in named_grids.items():
        outcome.named[name] = (
            named_grid,
            build_report(config.name, workspace.tracking_uri, workspace.folder("reports", config.name, name),
                         grid=named_grid.parent_run_id),
        )
    return outcome
