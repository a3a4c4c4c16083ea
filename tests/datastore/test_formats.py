"""Discovery and reading of M&Ms / M&Ms-2 subjects (synthetic layouts and hand-made NIfTI)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datastore.formats import MNMS2_CSV, MNMS_CSV, FormatError, discover, read_subject
from datastore.synth import write_dataset


def save(array: np.ndarray, path: Path, spacing=(1.5, 1.5, 8.0)) -> None:
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def mnms_subject(root: Path, sid: str, big: int = 3, small: int = 1, frames: int = 5) -> None:
    """M&Ms subject whose frame ``big`` has more labelled voxels than frame ``small``."""
    rng = np.random.default_rng(0)
    cine = rng.random((16, 14, 3, frames)).astype(np.float32) * 100
    gt = np.zeros(cine.shape, np.uint8)
    gt[4:12, 4:10, :, big] = 1
    gt[6:9, 5:8, :, small] = 3
    save(cine, root / sid / f"{sid}_sa.nii.gz")
    save(gt, root / sid / f"{sid}_sa_gt.nii.gz")


def mnms_csv(root: Path, rows: list[dict[str, str]]) -> None:
    columns = ["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex", "Height", "Weight"]
    with open(root / MNMS_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"": str(i), "Vendor": "A", "VendorName": "Siemens", "Centre": "1", **row})


def test_discover_and_read_synthetic_mnms(tmp_path: Path) -> None:
    write_dataset(tmp_path, "mnms", 3, seed=5, size=40, frames=(4, 5), slices=(3, 4))
    found = discover(tmp_path, "mnms")
    assert len(found.subjects) == 3 and not found.skipped and not found.warnings
    assert str(tmp_path / MNMS_CSV) in found.csv_checksums
    for source in found.subjects:
        assert source.info["vendor"] in "ABCD" and source.info["pathology"]
        raw = read_subject(source)
        assert raw.cine.ndim == 4 and raw.cine.dtype == np.float32
        # ED/ES recomputed from the labels agree with the CSV the generator wrote.
        assert (raw.ed, raw.es) == (source.info["csv_ed"], source.info["csv_es"])
        assert np.count_nonzero(raw.labels[raw.ed]) >= np.count_nonzero(raw.labels[raw.es])
        assert set(raw.checksums) == {p.name for p in source.files.values()}


def test_discover_and_read_synthetic_mnms2(tmp_path: Path) -> None:
    write_dataset(tmp_path, "mnms2", 2, seed=6, size=40, frames=(4, 5), slices=(3, 4), first_id=7)
    found = discover(tmp_path, "mnms2")
    assert [s.subject_id for s in found.subjects] == ["007", "008"]
    for source in found.subjects:
        assert source.info["vendor"] in "ABC" and source.info["vendor_name"]
        raw = read_subject(source)
        ed_volume = nib.load(source.files["ed"]).get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(raw.cine[..., raw.ed], ed_volume)
        assert raw.ed != raw.es and set(raw.labels) == {raw.ed, raw.es}


def test_mnms_ed_is_the_frame_with_more_labelled_voxels(tmp_path: Path) -> None:
    mnms_subject(tmp_path / "Training" / "Labeled", "AB12", big=3, small=1)  # nested layout
    mnms_subject(tmp_path, "CD34", big=0, small=4)
    mnms_csv(tmp_path, [{"External code": "AB12"}, {"External code": "CD34"}, {"External code": "ZZ99"}])
    found = discover(tmp_path, "mnms")
    by_id = {s.subject_id: s for s in found.subjects}
    assert set(by_id) == {"AB12", "CD34"}
    assert any("'ZZ99' has a CSV row but no folder" in w for w in found.warnings)
    assert (read_subject(by_id["AB12"]).ed, read_subject(by_id["AB12"]).es) == (3, 1)
    assert (read_subject(by_id["CD34"]).ed, read_subject(by_id["CD34"]).es) == (0, 4)


def test_mnms2_ids_are_zero_padded_and_vendors_mapped(tmp_path: Path) -> None:
    with open(tmp_path / MNMS2_CSV, "w", newline="") as handle:
        handle.write("SUBJECT_CODE,DISEASE,SEX,AGE,SCANNER,FIELD,VENDOR\n")
        handle.write("7,NOR,M,40,Avanto,1.5,SIEMENS\n12,HCM,F,50,Achieva,3.0,Philips Medical Systems\n")
    for sid in ("007", "012"):
        (tmp_path / sid).mkdir()
        for suffix in ("CINE", "ED", "ES", "ED_gt", "ES_gt"):
            (tmp_path / sid / f"{sid}_SA_{suffix}.nii.gz").write_bytes(b"")
    found = discover(tmp_path, "mnms2")
    info = {s.subject_id: s.info for s in found.subjects}
    assert info["007"]["vendor"] == "A" and info["012"]["vendor"] == "B"
    assert info["012"]["field"] == 3.0 and info["007"]["pathology"] == "NOR"


def test_missing_root_or_csv_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="directory not found"):
        discover(tmp_path / "nope", "mnms")
    with pytest.raises(FormatError, match=f"{MNMS_CSV}: mnms metadata CSV not found"):
        discover(tmp_path, "mnms")
    (tmp_path / MNMS_CSV).write_text("a,b\n1,2\n")
    with pytest.raises(FormatError, match="missing column.*External code"):
        discover(tmp_path, "mnms")
