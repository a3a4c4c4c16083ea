"""``sspctl finetune``, ``sspctl report`` and ``sspctl ui``: the fine-tuning grid and its results.

Heavy imports (Ray, MLflow, torch, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from orchestrator.arms import init_kinds
from orchestrator.commands._common import CACHE_GB_HELP, fail, interrupted, name_arg, path_arg, read_options, root_cause
from trainers.methods.names import Budget


class FlagError(ValueError):
    """A grid flag's value is malformed; the message is one line naming the flag."""


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``"10,15,all"`` -> ``(10, 15, "all")``; raises ``FlagError`` naming ``--budgets``."""
    budgets: list[Budget] = []
    for item in _split_list(text):
        if item.lower() == "all":
            budgets.append("all")
            continue
        try:
            value = int(item)
        except ValueError:
            raise FlagError(f"--budgets: {item!r} is neither a number of subjects nor 'all'") from None
        if value < 1:
            raise FlagError(f"--budgets: {value} must be a positive number of subjects")
        budgets.append(value)
    if not budgets:
        raise FlagError("--budgets: empty list")
    return tuple(budgets)


def parse_seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; raises ``FlagError`` naming ``flag``."""
    try:
        seeds = tuple(int(item) for item in _split_list(text))
    except ValueError:
        raise FlagError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise FlagError(f"{flag}: empty list")
    if len(set(seeds)) != len(seeds):
        raise FlagError(f"{flag}: {text!r} has duplicates")
    return seeds


def parse_pretrained(text: str | None) -> dict[str, str]:
    """``"simclr=RUN,pcl=RUN"`` -> ``{"simclr": "RUN", "pcl": "RUN"}``; raises ``FlagError``."""
    mapping: dict[str, str] = {}
    for item in _split_list(text or ""):
        method, sep, run = item.partition("=")
        method, run = method.strip(), run.strip()
        if not sep or not method or not run:
            raise FlagError(f"--pretrained: {item!r} is not METHOD=RUN")
        if method not in init_kinds():
            raise FlagError(f"--pretrained: unknown SSP method {method!r} (known: {', '.join(init_kinds())})")
        if method in mapping:
            raise FlagError(f"--pretrained: method {method!r} given twice")
        mapping[method] = run
    return mapping


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def finetune(
    store: str = typer.Option(..., "--store", help="Slice store (path or fsspec URL) to fine-tune and test on."),
    split: Path = typer.Option(..., "--split", help="Split YAML with test/train/valid and the label-budget subsets."),
    split_name: str | None = typer.Option(
        None, "--split-name",
        help="Run a named split imported next to --split (e.g. vendor-A_B: <split stem>.vendor-A_B.yaml); "
        "the published unseen-vendor splits have no budgets, so pass --budgets all.",
    ),
    pretrained: str = typer.Option(
        "", "--pretrained",
        help="Pretrained encoders as METHOD=RUN,... ; RUN is a pretraining run directory (with manifest.json), "
        "a run name under <output>/pretrain/, or a registered model: models:/sspctl-simclr-encoder/latest, "
        ".../3 or ...@champion (downloaded once, sha256-checked).",
    ),
    budgets: str = typer.Option("10,15,25,50,all", "--budgets", help="Label budgets: labelled training subjects per cell, or 'all'."),
    seeds: str = typer.Option(
        "0,1,2", "--seeds", help="Subset seeds: each selects a nested label subset, shared by every arm (as published)."
    ),
    train_seeds: str = typer.Option(
        "0", "--train-seeds",
        help="Training seeds: replicate runs of every arm x budget x subset seed (initialisation, data order, "
        "augmentation). The report tests an arm against scratch only with 3 or more runs per arm.",
    ),
    methods: str | None = typer.Option(
        None, "--methods",
        help="Arms to run: scratch, simclr, pcl, dino, mim, mim-encdec (MIM encoder+decoder), and the controls "
        "scratch-b (A/A: scratch with other training seeds) and supervised (trained on the training pool's labels; "
        "made automatically). Default: scratch plus every --pretrained method. scratch is always included.",
    ),
    workers_per_trial: str = typer.Option(
        "1", "--workers-per-trial",
        help="Workers per cell: 1 trains in the cell's Tune trial; N > 1 is Ray Train DDP; MIN-MAX is elastic (a cell "
        "goes on with fewer workers after a lost node; every count must divide the batch).",
    ),
    gpus_per_trial: float = typer.Option(
        0.0, "--gpus-per-trial", min=0.0, help="GPUs per cell; a fraction (e.g. 0.25) packs small cells onto one GPU."
    ),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", min=0.01, help="Logical CPUs per Train worker."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML of FinetuneConfig keys applied to every cell (method/budget/seed/weights are set per cell)."
    ),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Override the number of epochs per cell (paper: 1000)."),
    study: str | None = typer.Option(None, "--study", help="MLflow experiment of the study (letters, digits, '.', '_', '-', at most 64). Default: sspctl-<store hash8>."),
    output: Path | None = typer.Option(None, "--output", help="Workspace root (MLflow db, Ray storage, outputs). Default: $SSPCTL_HOME or ./runs."),
    num_cpus: int | None = typer.Option(
        None, "--num-cpus", min=1, help="Logical CPUs of the local Ray cluster (default: all cores); ignored with RAY_ADDRESS."
    ),
    max_failures: int = typer.Option(1, "--max-failures", min=0, help="Restarts per failed cell (of its trial, or of its Train worker group), each from its last checkpoint."),
    cache_gb: float | None = typer.Option(None, "--cache-gb", help=CACHE_GB_HELP),
    system_metrics: bool = typer.Option(
        False, "--system-metrics",
        help="Log MLflow system metrics (system/*: CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py) from "
        "rank 0 of each cell every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10).",
    ),
) -> None:
    """Run the arms x budgets x subset seeds x training seeds fine-tuning grid on Ray Tune (rerun to resume).

    Finished cells are skipped, interrupted cells resume from their last checkpoint.

    Each cell is an MLflow child run of the grid's parent run in the study's experiment.
    """
    from datastore.splits import SplitError, named_split_path
    from orchestrator.configio import ConfigError, read_yaml
    from orchestrator.grid import run_grid
    from orchestrator.grid_spec import GridError, grid_request
    from orchestrator.paths import removed_if_left_empty
    from orchestrator.run_lock import RunLockedError
    from orchestrator.worker_range import WorkerRangeError, parse_workers
    from orchestrator.workspace import Workspace

    read = read_options(cache_gb)
    try:  # flag syntax first, then the paths, then the work
        budget_list, seed_list, runs = parse_budgets(budgets), parse_seeds(seeds), parse_pretrained(pretrained)
        train_seed_list = parse_seeds(train_seeds, "--train-seeds")
        worker_range = parse_workers(workers_per_trial, "--workers-per-trial")
        split = named_split_path(path_arg(split, "--split", must_exist=False), split_name)
    except (FlagError, SplitError) as exc:
        fail(str(exc))
    except WorkerRangeError as exc:
        fail(str(exc), code=2)
    store = path_arg(store, "--store", kind="dir")
    split_file = path_arg(split, "--split", kind="file")
    config_file = path_arg(config, "--config", kind="file")
    study = name_arg(study, "--study")
    runs = {m: _pretrained_path(r) for m, r in runs.items()}
    root = Workspace.resolve(path_arg(output, "--output", must_exist=False), create=False).root
    with removed_if_left_empty(root):
        workspace = Workspace.resolve(root)  # created: MLflow's sqlite file needs its folder
        try:
            base = read_yaml(Path(config_file)) if config_file else {}
            if epochs is not None:
                base["epochs"] = epochs
            method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
            request = grid_request(
                store, split_file, pretrained=runs, config=base, study=study, workspace=workspace,
                methods=method_list, budgets=budget_list, seeds=seed_list, train_seeds=train_seed_list,
                workers_per_trial=worker_range, gpus_per_trial=gpus_per_trial, cpus_per_worker=cpus_per_worker,
                max_failures=max_failures, system_metrics=system_metrics, read=read,
            )
            outcome = run_grid(request, num_cpus=num_cpus)
        except RunLockedError as exc:
            fail(str(exc), code=2)
        except (GridError, ConfigError, LookupError, SplitError) as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            interrupted(exc, "rerun the same command to resume the unfinished cells")
        except Exception as exc:  # noqa: BLE001 - e.g. MLflow unreachable: one line, non-zero exit
            fail(f"fine-tuning grid failed: {root_cause(exc)}")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"grid {outcome.grid_id} (study {outcome.study})")
    for column in ("cell", "status", "test Dice (mean)"):
        table.add_column(column, justify="right" if column.startswith("test") else "left")
    for cell in outcome.cells:
        dice = cell.metrics.get("test_dice_mean")
        table.add_row(cell.cell.name, cell.status, "-" if dice is None else f"{dice:.3f}")
    Console().print(table)
    counts = {s: sum(c.status == s for c in outcome.cells) for s in ("done", "skipped", "failed")}
    typer.echo(
        f"study {outcome.study}, grid {outcome.grid_id}: {counts['done']} cells run, {counts['skipped']} already "
        f"complete, {counts['failed']} failed (MLflow parent run {outcome.parent_run_id})"
    )
    for cell in outcome.cells:
        if cell.status == "failed":
            typer.secho(f"  {cell.cell.name}: {cell.error}", fg=typer.colors.RED, err=True)
    if not outcome.ok:
        fail("some cells failed; rerun the same command to retry them")


def _pretrained_path(run: str) -> str:
    """A ``--pretrained`` RUN that is a path, made absolute; a run name is left for the grid to look up."""
    return path_arg(run, "--pretrained", kind="dir") if Path(run).expanduser().exists() else run


def report(
    study: str = typer.Option(..., "--study", help="MLflow experiment name of the study (as given to finetune; letters, digits, '.', '_', '-')."),
    output: Path | None = typer.Option(None, "--output", help="Workspace root holding the MLflow db. Default: $SSPCTL_HOME or ./runs."),
    report_dir: Path | None = typer.Option(
        None, "--report-dir",
        help="Where to write report.md/.html, CSVs and plots. Default: <output>/reports/<study>/ "
        "(<output>/reports/<study>/<grid>/ with --grid, so reports of other grids do not overwrite it).",
    ),
    grid: str | None = typer.Option(
        None, "--grid",
        help="Grid to report: its parent run name (grid-<id>), grid id or MLflow run id. Default: the study's most "
        "recent grid. Only that grid's cells enter the table.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the table as a JSON list of rows instead of a table."),
    no_log: bool = typer.Option(False, "--no-log", help="Do not log the report to the reported grid's parent run."),
) -> None:
    """Build the report of one grid: Dice per arm x budget with 95% intervals, run-level comparisons with scratch
    (Holm-corrected; "not enough runs" below 3 runs per arm), what can be concluded, plots."""
    from orchestrator.report import ReportError, build_report
    from orchestrator.workspace import Workspace

    study = name_arg(study, "--study")
    grid = name_arg(grid.strip(), "--grid") if grid else None
    chosen_dir = path_arg(report_dir, "--report-dir", must_exist=False)
    workspace = Workspace.resolve(path_arg(output, "--output", must_exist=False))
    target = Path(chosen_dir) if chosen_dir else workspace.folder("reports", study, *([grid] if grid else []))
    try:
        result = build_report(study, workspace.tracking_uri, target, log_to_mlflow=not no_log, grid=grid)
    except ReportError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.rows(), indent=1))
        if len(result.grids) > 1:  # stdout stays pure JSON; say on stderr which grid the rows are
            typer.echo(f"note: {result.grid_line()}", err=True)
        return
    print_report(result, study)


def print_report(result: object, study: str) -> None:
    """Print a built report as a table in the terminal, with its test summary and file paths."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from orchestrator.report import pivot_table

    console = Console()
    pivot = pivot_table(result.summary)  # type: ignore[attr-defined]
    grid = getattr(result, "grid", None)
    where = f", {grid.name} (dataset {grid.dataset_label})" if grid is not None else ""
    table = Table(title=f"3D Dice, study {study}{where} (mean over runs and test subject-phases, 95% CI)")
    for column in pivot.columns:
        table.add_column(str(column), justify="left" if column == "method" else "right")
    for row in pivot.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    console.print(table)
    if grid is not None:
        several = len(result.dataset_hashes) > 1  # type: ignore[attr-defined]
        colour = "yellow" if several else "dim"
        line = escape(result.grid_line())  # type: ignore[attr-defined]
        console.print(f"[{colour}]{line}[/{colour}]", highlight=False, soft_wrap=True)
    conclusions = result.conclusions()  # type: ignore[attr-defined]
    if conclusions:
        console.print("[bold]What this grid shows[/bold] (mean Dice vs scratch; training runs as the unit, Holm-corrected):")
        for line in conclusions:
            console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)
    for note in result.notes[:10]:  # type: ignore[attr-defined]
        console.print(f"[yellow]note:[/yellow] {note}")
    files = result.files  # type: ignore[attr-defined]
    console.print(f"report: {files['html']}  ({files['markdown'].name}, summary.csv, comparisons.csv, runs.csv, wilcoxon.csv)")


def ui(
    output: Path | None = typer.Option(None, "--output", help="Workspace root whose MLflow backend to browse. Default: $SSPCTL_HOME or ./runs."),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="Port on 127.0.0.1."),
) -> None:
    """Start the MLflow UI on 127.0.0.1 for the workspace's studies (Ctrl-C, SIGTERM or SIGHUP stops it and its server processes).

    Once the server answers, it prints the root URL and the experiment page of each study (the runs
    table of its pretraining runs, grids and cells).
    """
    from orchestrator.ui import HOST, UiError, serve
    from orchestrator.workspace import Workspace

    workspace = Workspace.resolve(path_arg(output, "--output", must_exist=False))
    listed: list[bool] = []

    def announce(line: str) -> None:
        typer.echo(line)
        if listed:  # the study pages follow the server's first line only
            return
        listed.append(True)
        from orchestrator.study_tracking import study_pages

        try:
            for name, url in study_pages(workspace.tracking_uri, f"http://{HOST}:{port}"):
                typer.echo(f"  study {name}: {url}")
        except Exception as exc:  # noqa: BLE001 - the UI is up; the list is a convenience
            typer.echo(f"  (could not list the studies: {str(exc).splitlines()[0][:200]})", err=True)

    try:
        code = serve(workspace, port=port, echo=announce)
    except UiError as exc:
        fail(str(exc))
    if code:
        fail(f"mlflow server exited with code {code}")


def register(app: typer.Typer) -> None:
    """Add ``finetune``, ``report`` and ``ui`` to the root app."""
    app.command("finetune")(finetune)
    app.command("report")(report)
    app.command("ui")(ui)
