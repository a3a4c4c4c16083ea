"""``sspctl synth``: write a synthetic cine CMR dataset in the raw M&Ms, M&Ms-2 or ACDC layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from orchestrator.commands._common import fail


def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create (must be empty or missing unless --force)."),
    layout: str = typer.Option("mnms", "--layout", help="On-disk layout: 'mnms' (M&Ms: <ID>/<ID>_sa.nii.gz + CSV), 'mnms2' (M&Ms-2: <NNN>/<NNN>_SA_CINE.nii.gz ...) or 'acdc' (ACDC: training|testing/patientNNN/patientNNN_4d.nii.gz + Info.cfg, labels 1 RV 2 MYO 3 LV)."),
    subjects: int = typer.Option(20, "--subjects", "-n", help="Number of subjects to write."),
    seed: int = typer.Option(0, "--seed", help="Root seed; the same arguments write identical images and CSV."),
    size: int = typer.Option(128, "--size", help="Stored matrix columns in pixels (rows are 80-100% of it, by vendor); in-plane spacing stays within 0.7-1.9 mm."),
    frames: tuple[int, int] = typer.Option((20, 30), "--frames", help="MIN MAX number of cine frames per subject (inclusive)."),
    slices: tuple[int, int] = typer.Option((8, 12), "--slices", help="MIN MAX number of short-axis slices per subject (inclusive)."),
    first_id: int = typer.Option(1, "--first-id", help="M&Ms-2 and ACDC: number of the first subject folder (1 -> 001, patient001)."),
    unlabelled: int = typer.Option(0, "--unlabelled", help="ACDC only: write the last N subjects without label files (pretraining-only data)."),
    vendor: list[str] = typer.Option([], "--vendor", help="Restrict to this vendor letter (A Siemens, B Philips, C GE, D Canon; D is M&Ms only). Repeatable."),
    trivial: bool = typer.Option(False, "--trivial", help="Clean images for smoke tests: no confounders, noise, coil shading or texture."),
    force: bool = typer.Option(False, "--force", help="Delete the contents of --out first if it is not empty."),
) -> None:
    """Write a synthetic cine CMR dataset (beating-heart phantom, NIfTI + CSV) in a real raw layout.

    The phantom is procedural, not real anatomy: results on it are not the paper's
    (see docs/phantom.md).
    """
    from pydantic import ValidationError
    from tqdm import tqdm

    from datastore.synth import LAYOUTS, SynthConfig, write_dataset

    if layout not in LAYOUTS:
        fail(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if unlabelled and layout != "acdc":
        fail("--unlabelled: only the acdc layout writes subjects without labels")
    try:
        config = SynthConfig(
            layout=layout, n_subjects=subjects, seed=seed, size=size, frames=frames, slices=slices,
            trivial=trivial, first_id=first_id, vendors=tuple(vendor) or None, unlabelled=unlabelled,
        )
    except ValidationError as exc:
        from orchestrator.configio import format_validation_error

        fail(format_validation_error(exc, "command-line flags"))
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            fail(f"{out}: directory exists and is not empty (use --force to overwrite it)")
        if not _looks_like_dataset(out):
            fail(f"{out}: --force refuses to delete a directory that holds more than a synthetic dataset")
        shutil.rmtree(out)
    with tqdm(total=config.n_subjects, desc=f"synth {config.layout}", unit="subject") as bar:
        ids = write_dataset(
            out, config.layout, config.n_subjects, config.seed, size=config.size, frames=config.frames,
            slices=config.slices, trivial=config.trivial, first_id=config.first_id, vendors=config.vendors,
            progress=bar.update, unlabelled=config.unlabelled,
        )
    shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    typer.echo(f"wrote {len(ids)} {config.layout} subjects to {out} ({shown})")


def _looks_like_dataset(folder: Path) -> bool:
    """True when ``folder`` holds only subject folders of NIfTI files (ACDC: plus Info.cfg, inside
    training/ and testing/) and the layout CSVs."""
    from datastore.synth import MNMS2_CSV, MNMS_CSV

    def subject_folder(entry: Path) -> bool:
        return entry.is_dir() and all(f.name.endswith(".nii.gz") or f.name == "Info.cfg" for f in entry.iterdir())

    for entry in folder.iterdir():
        if entry.is_file() and entry.name in (MNMS_CSV, MNMS2_CSV):
            continue
        if subject_folder(entry):
            continue
        if entry.is_dir() and entry.name in ("training", "testing") and all(subject_folder(e) for e in entry.iterdir()):
            continue
        return False
    return True


def register(app: typer.Typer) -> None:
    """Add ``synth`` to the root app."""
    app.command("synth")(synth)
