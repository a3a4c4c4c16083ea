"""``sspctl study`` (the whole study from one config, resumable) and ``sspctl demo`` (on a phantom)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from orchestrator.study import StudyConfig

from orchestrator.commands._common import fail, interrupted, name_arg, path_arg, root_cause

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
#: Prefix naming a study file key in errors (``study config: store``).
STUDY_FILE_KEY = "study config: "


def _run_study(settings: object, workspace: object, progress: bool, report_dir: Path | None = None) -> object:
    """``run_study`` with every expected failure turned into a one-line error and an exit code."""
    from orchestrator.configio import ConfigError
    from orchestrator.grid import GridError
    from orchestrator.pretrain_launch import LaunchError
    from datastore.splits import SplitError
    from orchestrator.report import ReportError
    from orchestrator.run_lock import RunLockedError
    from orchestrator.study import run_study

    try:
        return run_study(settings, workspace, echo=typer.echo, progress=progress, report_dir=report_dir)  # type: ignore[arg-type]
    except RunLockedError as exc:
        fail(str(exc), code=2)
    except (ConfigError, GridError, LaunchError, ReportError, LookupError, SplitError) as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        interrupted(exc, "rerun the same command to continue where it stopped")
    except Exception as exc:  # noqa: BLE001 - a training failure: one line, non-zero exit
        fail(f"study failed: {root_cause(exc)}; rerun the same command to retry")


def absolute_paths(settings: StudyConfig) -> StudyConfig:
    """The study config with its name checked and every relative path made absolute (exit 2 if unusable).

    Relative paths in a study file mean "from the current directory"; Ray workers have another one.
    """
    name_arg(settings.name, f"{STUDY_FILE_KEY}name")

    def local(value: Path | str | None, key: str, kind: str = "any", must_exist: bool = True) -> Path | None:
        checked = path_arg(value, f"{STUDY_FILE_KEY}{key}", must_exist=must_exist, kind=kind)
        return Path(checked) if checked else None

    updates: dict[str, object] = {"store": path_arg(settings.store, f"{STUDY_FILE_KEY}store", must_exist=False)}
    if settings.ingest is not None:
        ingest = settings.ingest
        updates["ingest"] = ingest.model_copy(update={
            "mnms": local(ingest.mnms, "ingest.mnms", "dir"), "mnms2": local(ingest.mnms2, "ingest.mnms2", "dir"),
            "acdc": local(ingest.acdc, "ingest.acdc", "dir"), "config": local(ingest.config, "ingest.config", "file"),
            "manifests": tuple(local(m, "ingest.manifests", "file") for m in ingest.manifests),
        })
    updates["split"] = settings.split.model_copy(update={"file": local(settings.split.file, "split.file", must_exist=False)})
    updates["pretrain"] = settings.pretrain.model_copy(
        update={"config_dir": local(settings.pretrain.config_dir, "pretrain.config_dir", "dir")})
    updates["finetune"] = settings.finetune.model_copy(
        update={"config": local(settings.finetune.config, "finetune.config", "file")})
    return settings.model_copy(update=updates)


def study(
    config: Path = typer.Option(..., "--config", help="Study YAML (see configs/paper.yaml and configs/demo.yaml)."),
    output: Path | None = typer.Option(None, "--output", help="Workspace root (MLflow db, Ray storage, weights, report). Default: $SSPCTL_HOME or ./runs."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    train_seeds: str | None = typer.Option(
        None, "--train-seeds",
        help="Override finetune.train_seeds (e.g. 3,4,5) to rerun the study's grid with other training seeds: "
        "ingest, split and pretraining are reused, the grid is a new one, and its report goes to "
        "<output>/reports/<name>/train-seeds-3-4-5/ so the first report stays. Compare the two with `sspctl agreement`.",
    ),
) -> None:
    """Ingest (if configured), split, pretrain every method, run the fine-tuning grid, write the report.

    Rerun the same command after an interruption: finished stages and cells are skipped and
    interrupted runs resume from their checkpoints. With the supervised arm (positive control) in
    finetune.extra_arms, its model trains in a Ray task beside the pretraining.
    """
    from orchestrator.commands.finetune import FlagError, parse_seeds, print_report
    from orchestrator.configio import ConfigError, load_config
    from orchestrator.study import StudyConfig
    from orchestrator.workspace import Workspace

    config = Path(path_arg(config, "--config", kind="file"))
    try:
        settings = load_config(StudyConfig, config)
    except ConfigError as exc:
        fail(str(exc), code=2)
    settings = absolute_paths(settings)
    workspace = Workspace.resolve(path_arg(output, "--output", must_exist=False))
    report_dir = None
    if train_seeds is not None:
        try:
            seeds = parse_seeds(train_seeds, "--train-seeds")
        except FlagError as exc:
            fail(str(exc), code=2)
        try:  # validated again: runs_per_budget must fit the new seeds
            section = type(settings.finetune).model_validate({**settings.finetune.model_dump(), "train_seeds": seeds})
        except ValidationError as exc:
            fail(f"--train-seeds {train_seeds}: {exc.errors()[0]['msg']}", code=2)
        settings = settings.model_copy(update={"finetune": section})
        report_dir = workspace.folder("reports", settings.name, "train-seeds-" + "-".join(map(str, seeds)))
    outcome = _run_study(settings, workspace, progress, report_dir)
    print_report(outcome.report, settings.name)  # type: ignore[attr-defined]
    for name, (_, named_report) in outcome.named.items():  # type: ignore[attr-defined]
        print_report(named_report, f"{settings.name} (split {name})")  # type: ignore[attr-defined]
    grids = [outcome.grid, *(g for g, _ in outcome.named.values())]  # type: ignore[attr-defined]
    if not all(g.ok for g in grids):
        fail("some fine-tuning cells failed; rerun the same command to retry them")


def demo(
    output: Path = typer.Option(Path("runs/demo"), "--output", help="Everything the demo writes goes under this folder."),
    subjects: int = typer.Option(20, "--subjects", min=8, help="Synthetic M&Ms subjects (plus half as many M&Ms-2)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """The whole study on a synthetic cine phantom, on this machine (CPU, local Ray, sqlite MLflow).

    Synthesises small M&Ms and M&Ms-2 style datasets, ingests them, pretrains SimCLR, PCL, DINO
    and MIM, trains the positive control (a model trained on the training pool's labels), and runs
    the grid: scratch, the four methods and the two controls (scratch-b: scratch again with other
    training seeds; supervised) with 3 training runs each at 4 labelled subjects, then prints the
    report. Every arm is tested against scratch with training runs as the unit (Holm-corrected).
    This shows that the pipeline runs end to end and how its statistics behave on the controls; the
    numbers are not the paper's result.
    """
    from orchestrator.commands.finetune import print_report
    from orchestrator.configio import load_config, read_yaml
    from orchestrator.study import StudyConfig
    from orchestrator.workspace import Workspace

    started = time.monotonic()
    workspace = Workspace.resolve(path_arg(output, "--output", must_exist=False))
    template = read_yaml(DEMO_CONFIG)
    template["phantom"] = {**template.get("phantom", {}), "mnms_subjects": subjects,
                           "mnms2_subjects": max(4, subjects // 2)}
    template["store"] = str(workspace.root / "demo.zarr")
    settings = load_config(StudyConfig, None, defaults=template)
    outcome = _run_study(settings, workspace, progress)
    print_report(outcome.report, settings.name)  # type: ignore[attr-defined]
    minutes = (time.monotonic() - started) / 60
    typer.echo(f"\ndemo finished in {minutes:.1f} min; everything is under {workspace.root}")
    typer.echo(f"browse the runs:  sspctl ui --output {output}   (then open http://127.0.0.1:5000)")
    typer.echo("these numbers come from a tiny synthetic phantom: they show the pipeline works, not the paper's result")
    if not outcome.grid.ok:  # type: ignore[attr-defined]
        fail("some fine-tuning cells failed; rerun `sspctl demo` to retry them")


def register(app: typer.Typer) -> None:
    """Add ``study`` and ``demo`` to the root app."""
    app.command("study")(study)
    app.command("demo")(demo)
