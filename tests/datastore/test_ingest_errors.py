"""Bad input: one-line reasons naming the file, the rest still ingested, non-zero exits.

These run the ingest in-process (``executor="serial"``); the Ray path is covered in test_ingest.py.
"""

from __future__ import annotations

import csv
import gzip
import os
import socket
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from datastore.config import IngestConfig
from datastore.formats import MNMS2_CSV, MNMS_CSV
from datastore.ingest import IngestError, execute_ingest, plan_ingest
from datastore.store import LOCK_NAME, validate_store
from orchestrator.cli import app

CONFIG = IngestConfig(size=32)
GOOD, BAD = "GOOD01", "BAD001"


def save(array: np.ndarray, path: Path, spacing=(1.5, 1.5, 8.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return path


def cine_and_gt(frames: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    cine = (rng.random((20, 18, 3, frames)) * 200).astype(np.float32)
    gt = np.zeros(cine.shape, np.uint8)
    gt[5:14, 5:12, :, 0] = 1
    gt[7:11, 6:10, :, 2] = 2
    return cine, gt


def write_mnms(root: Path, ids: list[str], csv_ids: list[str] | None = None) -> Path:
    cine, gt = cine_and_gt()
    for sid in ids:
        save(cine, root / sid / f"{sid}_sa.nii.gz")
        save(gt, root / sid / f"{sid}_sa_gt.nii.gz")
    with open(root / MNMS_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex", "Height", "Weight"])
        for i, sid in enumerate(csv_ids if csv_ids is not None else ids):
            writer.writerow([i, sid, "Siemens", "A", 1, 0, 2, 50, "NOR", "M", 170, 70])
    return root


def cine_path(root: Path) -> Path:
    return root / BAD / f"{BAD}_sa.nii.gz"


def gt_path(root: Path) -> Path:
    return root / BAD / f"{BAD}_sa_gt.nii.gz"


def truncate(root: Path) -> Path:
    data = cine_path(root).read_bytes()
    cine_path(root).write_bytes(data[: len(data) // 2])
    return cine_path(root)


def not_nifti(root: Path) -> Path:
    cine_path(root).write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    return cine_path(root)


def not_gzip(root: Path) -> Path:
    cine_path(root).write_text("plain text")
    return cine_path(root)


def three_d(root: Path) -> Path:
    return save(cine_and_gt()[0][..., 0], cine_path(root))


def label_shape(root: Path) -> Path:
    return save(cine_and_gt()[1][:, :10], gt_path(root))


def label_affine(root: Path) -> Path:
    """A label file of the right shape whose grid is shifted 2 mm against the cine."""
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    affine[0, 3] = 2.0
    path = gt_path(root)
    nib.save(nib.Nifti1Image(cine_and_gt()[1], affine), path)
    return path


def label_values(root: Path) -> Path:
    gt = cine_and_gt()[1]
    gt[0, 0, 0, 0] = 5
    return save(gt, gt_path(root))


def no_labelled_frame(root: Path) -> Path:
    return save(np.zeros_like(cine_and_gt()[1]), gt_path(root))


def nan_intensity(root: Path) -> Path:
    cine = cine_and_gt()[0]
    cine[3, 3, 1, 2] = np.nan
    cine[4, 3, 1, 2] = np.inf
    return save(cine, cine_path(root))


def save_with_pixdim(root: Path, axis: int, value: float) -> Path:
    """Write the cine with a raw header pixdim that nibabel's writer would otherwise 'fix'."""
    raw = bytearray(nib.Nifti1Image(cine_and_gt()[0], np.diag([1.5, 1.5, 8.0, 1.0])).to_bytes())
    offset = 76 + 4 * axis  # pixdim is float32[8] at byte 76 of the NIfTI-1 header
    raw[offset : offset + 4] = np.float32(value).tobytes()
    cine_path(root).write_bytes(gzip.compress(bytes(raw)))
    return cine_path(root)


def zero_spacing(root: Path) -> Path:
    return save_with_pixdim(root, 2, 0.0)


def negative_spacing(root: Path) -> Path:
    return save_with_pixdim(root, 3, -8.0)


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated gzip": (truncate, "truncated or corrupt gzip"),
    "not a NIfTI": (not_nifti, "not a NIfTI file"),
    "not gzip": (not_gzip, "not a gzip file"),
    "3D cine": (three_d, "expected a 4D cine"),
    "label shape": (label_shape, "label shape (20, 10, 3, 4) != cine shape (20, 18, 3, 4)"),
    "label affine": (label_affine, "label affine differs from the cine affine by up to 2 mm"),
    "label values": (label_values, "label values [5] outside {0, 1, 2, 3}"),
    "no labelled frame": (no_labelled_frame, "no labelled frame"),
    "NaN/inf": (nan_intensity, "2 non-finite (NaN/inf) intensities"),
    "zero spacing": (zero_spacing, "invalid voxel spacing"),
    "negative spacing": (negative_spacing, "invalid voxel spacing"),
}


def ingest(sources: dict[str, Path], store: Path):  # noqa: ANN201
    plan = plan_ingest(sources, store, CONFIG)
    return execute_ingest(plan, executor="serial", progress=False)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_skipped_with_a_one_line_reason(tmp_path: Path, case: str) -> None:
    root = write_mnms(tmp_path / "mnms", [GOOD, BAD])
    damage, expected = CASES[case]
    bad_file = damage(root)
    result = ingest({"mnms": root}, tmp_path / "store")
    assert result.ingested == [("mnms", GOOD)]
    assert len(result.skipped) == 1 and not result.ok
    reason = result.skipped[0].reason
    assert reason.startswith(f"{bad_file}: ") and expected in reason and "\n" not in reason
    assert validate_store(tmp_path / "store", progress=False) == []


def test_csv_problems_skip_only_the_affected_subjects(tmp_path: Path) -> None:
    ids = [GOOD, "NOROW1", "DUP001", "BADAGE"]
    root = write_mnms(tmp_path / "mnms", ids, csv_ids=[GOOD, "DUP001", "DUP001", "BADAGE", "../x"])
    rows = (root / MNMS_CSV).read_text().splitlines()
    rows[4] = rows[4].replace(",50,", ",fifty,")  # BADAGE: malformed Age
    (root / MNMS_CSV).write_text("\n".join(rows) + "\n")
    result = ingest({"mnms": root}, tmp_path / "store")
    assert result.ingested == [("mnms", GOOD)]
    reasons = {s.subject_id: s.reason for s in result.skipped}
    csv_path = root / MNMS_CSV
    assert reasons["NOROW1"].startswith(f"{csv_path}: no row for subject 'NOROW1'")
    assert reasons["DUP001"] == f"{csv_path}: duplicate subject id 'DUP001' (lines 3 and 4)"
    assert reasons["BADAGE"] == f"{csv_path}: line 5: column 'Age' is not a number ('fifty')"
    assert reasons["../x"].startswith(f"{csv_path}: line 6: subject id '../x' is not allowed")
    assert not (tmp_path / "x").exists()


def write_mnms2(root: Path, es_offset: float = 5.0, ed_spacing: tuple[float, float, float] = (1.5, 1.5, 8.0)) -> Path:
    """Two M&Ms-2 subjects; 002's ES volume is offset by ``es_offset`` and its ED volume saved with
    ``ed_spacing`` (both equal to the cine by default apart from the offset)."""
    cine, gt = cine_and_gt()
    for sid in ("001", "002"):
        bad = sid == "002"
        save(cine, root / sid / f"{sid}_SA_CINE.nii.gz")
        save(cine[..., 0], root / sid / f"{sid}_SA_ED.nii.gz", spacing=ed_spacing if bad else (1.5, 1.5, 8.0))
        save(cine[..., 2] + (es_offset if bad else 0), root / sid / f"{sid}_SA_ES.nii.gz")
        save(gt[..., 0], root / sid / f"{sid}_SA_ED_gt.nii.gz")
        save(gt[..., 2], root / sid / f"{sid}_SA_ES_gt.nii.gz")
    (root / MNMS2_CSV).write_text("SUBJECT_CODE,DISEASE,SEX,AGE,SCANNER,FIELD,VENDOR\n1,NOR,M,40,X,1.5,GE\n2,NOR,M,40,X,1.5,GE\n")
    return root


def test_mnms2_volume_not_in_the_cine_is_skipped(tmp_path: Path) -> None:
    root = write_mnms2(tmp_path / "mnms2")
    result = ingest({"mnms2": root}, tmp_path / "store")
    assert result.ingested == [("mnms2", "001")]
    assert result.skipped[0].reason.startswith(f"{root / '002' / '002_SA_ES.nii.gz'}: no cine frame equals")


def test_mnms2_volume_on_another_grid_is_skipped(tmp_path: Path) -> None:
    root = write_mnms2(tmp_path / "mnms2", es_offset=0.0, ed_spacing=(1.5, 1.5, 8.01))
    result = ingest({"mnms2": root}, tmp_path / "store")
    assert result.ingested == [("mnms2", "001")]
    assert result.skipped[0].reason == (
        f"{root / '002' / '002_SA_ED.nii.gz'}: _SA_ED affine differs from the cine affine by up to 0.01 mm "
        "(tolerance 0.001 mm): not on the cine's voxel grid"
    )


def test_cli_fatal_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["ingest", "--mnms", str(tmp_path / "empty"), "--store", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'empty' / MNMS_CSV}: mnms metadata CSV not found" in result.output
    result = runner.invoke(app, ["ingest", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--mnms" in result.output
    config = tmp_path / "c.yaml"
    config.write_text("spacing: -1\nbogus: 2\n")
    result = runner.invoke(app, ["ingest", "--mnms", str(tmp_path), "--store", str(tmp_path / "s"), "--config", str(config)])
    assert result.exit_code == 2 and "spacing" in result.output and "bogus: unknown key" in result.output


def test_missing_csv_is_an_ingest_error(tmp_path: Path) -> None:
    (tmp_path / "mnms").mkdir()
    with pytest.raises(IngestError, match="metadata CSV not found"):
        plan_ingest({"mnms": tmp_path / "mnms"}, tmp_path / "store", CONFIG)


def test_cli_refuses_to_resume_with_another_config(tmp_path: Path) -> None:
    root = write_mnms(tmp_path / "mnms", [GOOD])
    ingest({"mnms": root}, tmp_path / "store")  # size 32
    config = tmp_path / "c.yaml"
    config.write_text("size: 32\nchunk_slices: 8\n")
    result = CliRunner().invoke(
        app, ["ingest", "--mnms", str(root), "--store", str(tmp_path / "store"), "--config", str(config)]
    )
    assert result.exit_code == 2
    assert "was ingested with another config (chunk_slices: 32 -> 8); use a new --store path" in result.output


def test_resume_refuses_changed_sources(tmp_path: Path) -> None:
    root = write_mnms(tmp_path / "mnms", [GOOD, "GOOD02"])
    store = tmp_path / "store"
    ingest({"mnms": root}, store)
    recorded = zarr.open_group(str(store), mode="r").attrs["csv_checksums"]
    csv_file, csv_bytes = root / MNMS_CSV, (root / MNMS_CSV).read_bytes()
    csv_file.write_bytes(csv_bytes.replace(b",50,", b",51,", 1))  # one Age edited after the ingest
    with pytest.raises(IngestError, match=f"{csv_file}: changed since subjects were ingested into {store} .*use a new --store path"):
        plan_ingest({"mnms": root}, store, CONFIG)
    assert zarr.open_group(str(store), mode="r").attrs["csv_checksums"] == recorded  # nothing merged
    csv_file.write_bytes(csv_bytes)
    cine = root / GOOD / f"{GOOD}_sa.nii.gz"
    original = cine.read_bytes()
    save(cine_and_gt()[0] + 1, cine)  # a committed subject's image replaced
    with pytest.raises(IngestError, match=f"{cine}: changed since it was ingested into {store}; .*use a new --store path"):
        plan_ingest({"mnms": root}, store, CONFIG)
    cine.write_bytes(original)
    assert plan_ingest({"mnms": root}, store, CONFIG).noop  # the refusals released the lock
    assert not (store / LOCK_NAME).exists()  # ... and so does a plan with nothing to do


def test_skips_of_earlier_runs_are_kept_until_the_subject_is_ingested(tmp_path: Path) -> None:
    mnms = write_mnms(tmp_path / "mnms", [GOOD, BAD])
    original = cine_path(mnms).read_bytes()
    truncate(mnms)
    mnms2 = write_mnms2(tmp_path / "mnms2")
    store = tmp_path / "store"

    def stored_skips() -> list[tuple[str, str]]:
        return [(e["dataset"], e["subject_id"]) for e in zarr.open_group(str(store), mode="r").attrs["skipped"]]

    assert ingest({"mnms": mnms}, store).skipped[0].subject_id == BAD
    assert [s.subject_id for s in ingest({"mnms2": mnms2}, store).skipped] == ["002"]
    assert stored_skips() == [("mnms", BAD), ("mnms2", "002")]
    cine_path(mnms).write_bytes(original)  # the bad file fixed: the rerun ingests it
    assert ingest({"mnms": mnms}, store).ingested == [("mnms", BAD)]
    assert stored_skips() == [("mnms2", "002")]


def test_cli_refuses_a_second_ingest_into_a_store_being_written(tmp_path: Path) -> None:
    root = write_mnms(tmp_path / "mnms", [GOOD])
    plan = plan_ingest({"mnms": root}, tmp_path / "store", CONFIG)  # holds the writer lock
    result = CliRunner().invoke(app, ["ingest", "--mnms", str(root), "--store", str(tmp_path / "store"), "--size", "32"])
    assert result.exit_code == 2
    assert f"store {tmp_path / 'store'} is being written by pid {os.getpid()} on {socket.gethostname()}" in result.output
    execute_ingest(plan, executor="serial", progress=False)
    assert not (tmp_path / "store" / LOCK_NAME).exists()


def test_a_path_like_subject_id_is_one_skipped_subject(tmp_path: Path) -> None:
    """``..evil`` is refused by both its CSV row and its folder: one subject, one reason."""
    root = write_mnms(tmp_path / "mnms", [GOOD, "..evil"])
    plan = plan_ingest({"mnms": root}, tmp_path / "store", CONFIG)
    plan.writer.close()
    assert [(s.subject_id, "not allowed" in s.reason) for s in plan.skipped] == [("..evil", True)]


def test_a_stale_lock_is_reported_once(tmp_path: Path) -> None:
    """The take-over warning was printed twice (by the store's logger and by the command)."""
    import json
    import subprocess
    import sys

    root = write_mnms(tmp_path / "mnms", [GOOD])
    store = tmp_path / "store"
    execute_ingest(plan_ingest({"mnms": root}, store, CONFIG), executor="serial", progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (store / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    sspctl = Path(sys.executable).with_name("sspctl")
    result = subprocess.run([str(sspctl), "ingest", "--mnms", str(root), "--store", str(store), "--size", "32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"taking over the writer lock left by pid {int(dead.stdout)}") == 1, result.stderr
    assert "up to date" in result.stdout
