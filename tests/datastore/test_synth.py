"""On-disk layouts written by ``datastore.synth.write_dataset`` and the ``sspctl synth`` command."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from datastore.conventions import LV
from datastore.synth import MNMS2_CSV, MNMS_CSV, SynthConfig, write_dataset
from orchestrator.cli import app

GRID = {"size": 48, "frames": (6, 9), "slices": (6, 8)}
MNMS_COLUMNS = ["Unnamed: 0", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex", "Height", "Weight"]


@pytest.fixture(scope="module")
def mnms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("mnms")
    return out, write_dataset(out, "mnms", 8, seed=5, **GRID)


@pytest.fixture(scope="module")
def mnms2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("mnms2")
    return out, write_dataset(out, "mnms2", 4, seed=5, first_id=101, **GRID)


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_mnms_layout_and_csv(mnms: tuple[Path, list[str]]) -> None:
    out, ids = mnms
    assert sorted(p.name for p in out.iterdir()) == sorted([*ids, MNMS_CSV])
    assert len(set(ids)) == len(ids)
    for sid in ids:
        assert len(sid) == 6 and sid.isalnum() and sid.isupper()
        assert sorted(p.name for p in (out / sid).iterdir()) == [f"{sid}_sa.nii.gz", f"{sid}_sa_gt.nii.gz"]
    table = pd.read_csv(out / MNMS_CSV)
    assert list(table.columns) == MNMS_COLUMNS
    assert list(table["External code"]) == ids
    assert list(table["Unnamed: 0"]) == list(range(len(ids)))
    assert set(table["Vendor"]) <= {"A", "B", "C", "D"}
    names = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
    assert all(names[v] == n for v, n in zip(table["Vendor"], table["VendorName"], strict=True))
    assert table["Pathology"].isin(["NOR", "DCM", "HCM", "HHD", "ARV", "IHD", "AHS", "Other"]).all()


def test_mnms_gt_labels_only_ed_and_es(mnms: tuple[Path, list[str]]) -> None:
    out, ids = mnms
    table = pd.read_csv(out / MNMS_CSV).set_index("External code")
    for sid in ids:
        cine_img = nib.load(out / sid / f"{sid}_sa.nii.gz")
        cine, gt = _array(out / sid / f"{sid}_sa.nii.gz"), _array(out / sid / f"{sid}_sa_gt.nii.gz")
        assert cine.ndim == 4 and cine.shape == gt.shape
        assert np.issubdtype(cine.dtype, np.integer)
        assert cine.shape[2] >= GRID["slices"][0] and GRID["frames"][0] <= cine.shape[3] <= GRID["frames"][1]
        assert cine.shape[0] == GRID["size"]
        labelled = np.flatnonzero(gt.reshape(-1, gt.shape[3]).any(axis=0))
        ed, es = int(table.loc[sid, "ED"]), int(table.loc[sid, "ES"])
        assert sorted(labelled) == sorted([ed, es]) and ed != es
        # The reformatting rule: ED is the annotated frame with more labelled voxels.
        assert (gt[..., ed] > 0).sum() > (gt[..., es] > 0).sum()
        assert set(np.unique(gt)) <= {0, 1, 2, 3}
        # Header zooms equal the affine's column norms (in-plane 0.7-1.9 mm, thick slices).
        zooms = cine_img.header.get_zooms()[:3]
        np.testing.assert_allclose(zooms, np.linalg.norm(cine_img.affine[:3, :3], axis=0), rtol=1e-5)
        assert 0.7 <= zooms[0] <= 1.9 and zooms[0] == pytest.approx(zooms[1])
        assert 5.0 <= zooms[2] <= 14.0


def test_affines_are_oblique_with_both_slice_orders(mnms: tuple[Path, list[str]]) -> None:
    """The base is the most superior slice; stacks run base->apex in some subjects, apex->base in others."""
    out, ids = mnms
    orders = set()
    for sid in ids:
        img = nib.load(out / sid / f"{sid}_sa_gt.nii.gz")
        rotation = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        assert np.abs(rotation).max(axis=0).max() < 0.95  # no axis is aligned with R, A or S
        gt = np.asarray(img.dataobj)
        ed = int(np.argmax((gt > 0).sum(axis=(0, 1, 2))))
        lv_area = (gt[..., ed] == LV).sum(axis=(0, 1))  # (Z,)
        superior = img.affine[2, 2] > 0  # world S grows with the slice index
        base_first = lv_area[::-1] if superior else lv_area
        rows = np.flatnonzero(base_first)
        # Near the base the LV is wide, at the apex it is small.
        assert base_first[rows[: len(rows) // 2]].mean() > base_first[rows[len(rows) // 2 :]].mean()
        orders.add(bool(superior))
    assert orders == {True, False}


def test_mnms2_layout_csv_and_frame_copies(mnms2: tuple[Path, list[str]]) -> None:
    out, ids = mnms2
    assert ids == ["101", "102", "103", "104"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*ids, MNMS2_CSV])
    table = pd.read_csv(out / MNMS2_CSV)
    assert list(table.columns) == ["SUBJECT_CODE", "DISEASE", "SEX", "AGE", "SCANNER", "FIELD", "VENDOR"]
    assert list(table["SUBJECT_CODE"]) == [101, 102, 103, 104]
    assert set(table["VENDOR"]) <= {"SIEMENS", "Philips Medical Systems", "GE MEDICAL SYSTEMS"}
    for sid in ids:
        names = {f"{sid}_SA_CINE.nii.gz", f"{sid}_SA_ED.nii.gz", f"{sid}_SA_ES.nii.gz", f"{sid}_SA_ED_gt.nii.gz", f"{sid}_SA_ES_gt.nii.gz"}
        assert {p.name for p in (out / sid).iterdir()} == names
        cine = _array(out / sid / f"{sid}_SA_CINE.nii.gz")
        assert cine.ndim == 4
        found = {}
        for phase in ("ED", "ES"):
            volume = _array(out / sid / f"{sid}_SA_{phase}.nii.gz")
            gt = _array(out / sid / f"{sid}_SA_{phase}_gt.nii.gz")
            assert volume.shape == gt.shape == cine.shape[:3]
            matches = [t for t in range(cine.shape[3]) if np.array_equal(cine[..., t], volume)]
            assert len(matches) == 1  # an exact, unique copy of one cine frame
            found[phase] = matches[0]
            assert (gt == LV).any()
        assert found["ED"] != found["ES"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    grid = {"size": 32, "frames": (4, 4), "slices": (4, 4)}
    ids_a = write_dataset(tmp_path / "a", "mnms", 2, seed=1, **grid)
    ids_b = write_dataset(tmp_path / "b", "mnms", 2, seed=1, **grid)
    ids_c = write_dataset(tmp_path / "c", "mnms", 2, seed=2, **grid)
    assert ids_a == ids_b != ids_c
    assert (tmp_path / "a" / MNMS_CSV).read_bytes() == (tmp_path / "b" / MNMS_CSV).read_bytes()
    for sid in ids_a:
        for suffix in ("sa", "sa_gt"):
            a = nib.load(tmp_path / "a" / sid / f"{sid}_{suffix}.nii.gz")
            b = nib.load(tmp_path / "b" / sid / f"{sid}_{suffix}.nii.gz")
            assert np.asarray(a.dataobj).tobytes() == np.asarray(b.dataobj).tobytes()
            np.testing.assert_array_equal(a.affine, b.affine)
    first_a = _array(tmp_path / "a" / ids_a[0] / f"{ids_a[0]}_sa.nii.gz")
    first_c = _array(tmp_path / "c" / ids_c[0] / f"{ids_c[0]}_sa.nii.gz")
    assert first_a.shape != first_c.shape or not np.array_equal(first_a, first_c)


def test_config_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="frames"):
        SynthConfig(frames=(9, 4))
    with pytest.raises(ValueError, match="vendors"):
        SynthConfig(layout="mnms2", vendors=("D",))
    with pytest.raises(ValueError, match="unknown_key|extra"):
        SynthConfig.model_validate({"unknown_key": 1})


def test_cli_writes_and_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ds"
    args = ["synth", "--out", str(out), "--layout", "mnms2", "--subjects", "2", "--seed", "3", "--size", "32", "--frames", "4", "5", "--slices", "4", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 2 mnms2 subjects" in result.output
    assert (out / "001" / "001_SA_CINE.nii.gz").exists() and (out / MNMS2_CSV).exists()

    again = runner.invoke(app, args)
    assert again.exit_code != 0
    assert "not empty" in again.output and "--force" in again.output

    forced = runner.invoke(app, [*args, "--force", "--layout", "mnms"])
    assert forced.exit_code == 0, forced.output
    assert (out / MNMS_CSV).exists() and not (out / MNMS2_CSV).exists()

    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), "--slices", "5", "2"])
    assert bad.exit_code != 0 and "slices" in bad.output


def test_cli_help_explains_options() -> None:
    result = CliRunner().invoke(app, ["synth", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--layout", "--subjects", "--seed", "--size", "--frames", "--slices", "--trivial", "--force"):
        assert option in result.output
