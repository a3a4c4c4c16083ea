"""``sspctl ingest`` and ``sspctl store info|validate``: raw NIfTI -> Zarr v3 slice store.

Exit codes: 0 success (also a rerun with nothing to do), 1 some subjects were skipped or the
store is invalid, 2 nothing could be done (bad source directory, CSV, config or store path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from orchestrator.commands._common import fail, interrupted, path_arg, warn

store_app = typer.Typer(
    name="store",
    help="Inspect and check a slice store written by `sspctl ingest`.",
    no_args_is_help=True,
)


def ingest(
    store: str = typer.Option(..., "--store", help="Output store: a local path or an fsspec URL (e.g. s3://bucket/mnms.zarr)."),
    mnms: Optional[Path] = typer.Option(None, "--mnms", help="M&Ms root: the folder with the diagnosis CSV and the <ID>/<ID>_sa*.nii.gz subject folders."),
    mnms2: Optional[Path] = typer.Option(None, "--mnms2", help="M&Ms-2 root: the folder with dataset_information.csv and the <NNN>/<NNN>_SA_*.nii.gz subject folders."),
    acdc: Optional[Path] = typer.Option(None, "--acdc", help="ACDC root (its training/ and testing/ folders, or either): patientNNN/ folders with patientNNN_4d.nii.gz, _frameXX[_gt].nii.gz and Info.cfg. Labels 1 RV, 2 MYO, 3 LV become 1 LV, 2 MYO, 3 RV; vendor 'unknown'."),
    manifest: list[Path] = typer.Option([], "--manifest", help="CSV or YAML manifest, one row per subject (subject_id, cine or ed/es, optional ed_label/es_label, ed_frame/es_frame, label_map, vendor, centre, group, dataset); paths relative to it. Rows without labels are pretraining-only. Repeatable."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Target in-plane spacing in mm (default 1.25, or the --config value)."),
    size: Optional[int] = typer.Option(None, "--size", help="Stored slice height and width in pixels (default 256, or the --config value)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Ray tasks (CPUs) that read, preprocess and write subjects in parallel (each subject into its own chunks; the driver only allocates and commits). 1 runs everything in this process, without Ray."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with IngestConfig keys (spacing, size, chunk_slices, center_on_heart, image_interpolation); flags override it."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Read M&Ms / M&Ms-2 / ACDC / manifest subjects, preprocess them in Ray tasks and append them to a Zarr v3 store.

    Several sources may go into one store; each subject records its source dataset. Subjects without labels are kept for pretraining only.

    Resumable: rerunning after a crash or kill finishes the missing subjects; rerunning a finished ingest does nothing. A rerun whose source files changed since they were ingested is refused (use a new --store path), and one ingest at a time may write a local store (a second one exits 2 naming the first).

    Unusable subjects are skipped with a one-line reason; the command ingests the rest and exits 1 (exit 2: nothing could be done). Layout: docs/store.md.
    """
    from datastore.config import IngestConfig
    from datastore.ingest import IngestError, execute_ingest, plan_ingest
    from datastore.store import StoreError
    from orchestrator.configio import ConfigError, load_config

    store = path_arg(store, "--store", must_exist=False)
    mnms = _path_option(mnms, "--mnms")
    mnms2 = _path_option(mnms2, "--mnms2")
    config = _path_option(config, "--config", kind="file")
    try:
        settings = load_config(IngestConfig, config, {"spacing": spacing, "size": size})
    except ConfigError as exc:
        fail(str(exc), code=2)
    try:
        plan = plan_ingest({"mnms": mnms, "mnms2": mnms2, "acdc": acdc, "manifest": manifest}, store, settings)
    except IngestError as exc:
        fail(str(exc), code=2)
    for message in plan.warnings:
        warn(message)
    if plan.noop and not plan.skipped:
        typer.echo(f"{plan.store}: up to date ({plan.already} subjects), nothing to do")
        return
    typer.echo(
        f"ingesting {len(plan.todo)} subjects into {plan.store} "
        f"({plan.already} already there, {len(plan.skipped)} unusable) with {workers} worker(s)"
    )
    try:
        if plan.todo and workers > 1:
            from orchestrator.ray_session import ray_session

            with ray_session(num_cpus=workers):
                result = execute_ingest(plan, executor="ray", max_in_flight=2 * workers, progress=progress)
        else:
            result = execute_ingest(plan, executor="serial", progress=progress and bool(plan.todo))
    except (IngestError, StoreError) as exc:  # e.g. another writer took the store in the meantime
        fail(str(exc), code=2)
    except KeyboardInterrupt as exc:
        interrupted(exc, f"{_committed(plan)}; rerun the same command to resume")
    except OSError as exc:  # e.g. ENOSPC: the commit protocol keeps every committed subject
        fail(f"writing {plan.store} failed ({exc.strerror or exc}); {_committed(plan)}, the store is consistent; "
             "fix the cause and rerun the same command to resume")
    typer.echo(
        f"{result.store}: {result.n_subjects} subjects, {result.n_slices} slices "
        f"({len(result.ingested)} new), hash {result.hash}"
    )
    if result.skipped:
        typer.secho(f"skipped {len(result.skipped)} subject(s):", fg=typer.colors.YELLOW, err=True)
        for item in result.skipped:
            typer.echo(f"  {item.dataset}/{item.subject_id}: {item.reason}", err=True)
        raise typer.Exit(1)


def _path_option(value: Optional[Path], flag: str, kind: str = "dir") -> Optional[Path]:
    """An optional existing path option made absolute (exit 2 when missing)."""
    checked = path_arg(value, flag, kind=kind)
    return Path(checked) if checked else None


def _committed(plan: object) -> str:
    """``N subjects committed to STORE (M in this run)`` from an ingest plan's writer."""
    total = len(plan.writer.commit["subjects"])  # type: ignore[attr-defined]
    return f"{total} subjects committed to {plan.store} ({total - plan.already} in this run)"  # type: ignore[attr-defined]


@store_app.command("info")
def info(
    path: str = typer.Argument(..., help="Store path or fsspec URL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Counts (subjects, slices, labelled slices, per dataset and vendor), hash and size on disk."""
    from datastore.store import StoreError, store_info

    path = path_arg(path, "PATH", must_exist=False)  # the store module names a missing store
    try:
        summary = store_info(path)
    except StoreError as exc:
        fail(str(exc), code=2)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"store      {summary['path']}")
    typer.echo(f"hash       {summary['hash']} ({'complete' if summary['complete'] else 'INCOMPLETE'})")
    typer.echo(
        f"subjects   {summary['subjects']} ({summary['labelled_subjects']} labelled)   slices {summary['slices']}   "
        f"labelled {summary['labelled_slices']}   {summary['image_size']}^2 px at {summary['spacing_mm']} mm"
    )
    for name, table in (("dataset", summary["by_dataset"]), ("vendor", summary["by_vendor"])):
        for key, counts in table.items():
            typer.echo(f"{name:<10} {key:<12} {counts['subjects']:>5} subjects {counts['slices']:>8} slices")
    typer.echo(f"size       {summary['size_bytes'] / 1e6:.1f} MB")


@store_app.command("validate")
def validate(
    path: str = typer.Argument(..., help="Store path or fsspec URL."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Check the store's invariants, read every chunk and recompute its hash; exits 1 on any violation.

    Each problem is one line (a damaged chunk: the array and the chunk index).
    """
    from datastore.store import validate_store

    path = path_arg(path, "PATH", must_exist=False)  # the store module names a missing store
    problems = validate_store(path, progress=progress)
    if problems:
        for line in problems:
            typer.secho(f"invalid: {line}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: valid")


def register(app: typer.Typer) -> None:
    """Add ``ingest`` and the ``store`` sub-app to the root app."""
    app.command("ingest")(ingest)
    app.add_typer(store_app, name="store")
