"""A whole study in one resumable call: ingest -> split -> pretrain each method -> grid -> report.

Every stage is idempotent on its own (ingest skips committed subjects, a pretraining run with a
manifest is not retrained, finished grid cells are skipped), so rerunning ``sspctl study`` after an
interruption continues where it stopped. ``sspctl demo`` is a study on a synthetic phantom.

Relative paths in a study config are resolved against the current working directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.workspace import Workspace

Budget = int | Literal["all"]
SSP_METHODS = ("simclr", "pcl", "dino", "mim")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSection(_Section):
    """Raw NIfTI sources; omit the section when the store already exists."""

    mnms: Path | None = Field(None, description="M&Ms root (CSV + <ID>/ folders)")
    mnms2: Path | None = Field(None, description="M&Ms-2 root (dataset_information.csv + <NNN>/ folders)")
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


class PretrainSection(_Section):
    methods: tuple[str, ...] = Field(SSP_METHODS, description="SSP methods to pretrain")
    config_dir: Path | None = Field(None, description="folder with <method>.yaml (default: paper defaults)")
    workers: int = Field(1, ge=1, description="Ray Train workers per method")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker (default: 1 if GPUs exist)")
    epochs: int | None = Field(None, ge=1, description="override every method's epochs")

    @field_validator("methods")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(SSP_METHODS))
        if unknown:
            raise ValueError(f"unknown SSP method(s) {unknown}; choose from {list(SSP_METHODS)}")
        return value


class FinetuneSection(_Section):
    budgets: tuple[Budget, ...] = Field((10, 15, 25, 50, "all"), description="labelled subjects per cell")
    seeds: tuple[int, ...] = Field((0, 1, 2), description="label-subset and training seeds")
    config: Path | None = Field(None, description="FinetuneConfig YAML")
    epochs: int | None = Field(None, ge=1, description="override the fine-tuning epochs")
    workers_per_trial: int = Field(1, ge=1)
    gpus_per_trial: float = Field(0.0, ge=0)


class StudyConfig(_Section):
    """One study: what data, which methods, which grid. See ``configs/paper.yaml``."""

    name: str = Field(..., min_length=1, description="MLflow experiment name")
    store: str = Field(..., description="Zarr slice store (path or fsspec URL)")
    ingest: IngestSection | None = None
    split: SplitSection = SplitSection()
    pretrain: PretrainSection = PretrainSection()
    finetune: FinetuneSection = FinetuneSection()
    ray_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (ignored with RAY_ADDRESS)")


@dataclass(frozen=True)
class StudyOutcome:
    """Where a study's products are."""

    split: Path
    pretrained: dict[str, Path]
    grid: Any
    report: Any


def ensure_store(config: StudyConfig, echo: Callable[[str], None]) -> None:
    """Ingest the configured sources into the store (a no-op when it is complete)."""
    if config.ingest is None:
        return
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from orchestrator.configio import load_config

    section = config.ingest
    settings = load_config(IngestConfig, section.config, {"spacing": section.spacing, "size": section.size})
    plan = plan_ingest({"mnms": section.mnms, "mnms2": section.mnms2}, config.store, settings)
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
            gpus_per_worker=section.gpus_per_worker, study=config.name,
        )
        runs[method] = launch_pretrain(request, echo=echo, progress=progress).run_dir
    return runs


def finetune_config(config: StudyConfig) -> dict[str, Any]:
    """Base fine-tuning keys of the grid: the YAML file's, then the study's overrides."""
    from orchestrator.configio import read_yaml

    section = config.finetune
    base = read_yaml(section.config) if section.config else {}
    if section.epochs is not None:
        base["epochs"] = section.epochs
    return base


def run_study(
    config: StudyConfig, workspace: Workspace, echo: Callable[[str], None] = print, progress: bool = True
) -> StudyOutcome:
    """Run or resume the whole study; see the module docstring."""
    from orchestrator.grid import run_grid
    from orchestrator.ray_session import ray_session
    from orchestrator.report import build_report

    with ray_session(num_cpus=config.ray_cpus):
        ensure_store(config, echo)
        split = ensure_split(config, workspace, echo)
        pretrained = pretrain_all(config, workspace, split, echo, progress)
        echo(f"fine-tuning grid: scratch + {', '.join(pretrained)} x budgets "
             f"{list(config.finetune.budgets)} x seeds {list(config.finetune.seeds)}")
        grid = run_grid(
            config.store, split, config.finetune.budgets, config.finetune.seeds,
            pretrained=pretrained, methods=["scratch", *pretrained],
            workers_per_trial=config.finetune.workers_per_trial,
            gpus_per_trial=config.finetune.gpus_per_trial, config=finetune_config(config),
            study=config.name, workspace=workspace, progress=progress,
        )
    report = build_report(
        config.name, workspace.tracking_uri, workspace.root / "reports" / config.name, grid=grid.parent_run_id
    )
    return StudyOutcome(split=split, pretrained=pretrained, grid=grid, report=report)
