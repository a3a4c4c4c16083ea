"""ACDC: discovery with Info.cfg, label order conversion, ED/ES checks, unlabelled subjects, synth layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datastore.acdc import ACDC_LABEL_MAP, discover_acdc, read_info
from datastore.config import IngestConfig
from datastore.conventions import LV, MYO, RV
from datastore.formats import FormatError, apply_label_map, parse_label_map, read_subject
from datastore.ingest import execute_ingest, plan_ingest
from datastore.store import SliceStore, validate_store
from datastore.synth import write_dataset

CONFIG = IngestConfig(size=32, chunk_slices=16)


def _patient(root: Path, sid: str = "patient001", ed: int = 1, es: int = 3, labels: bool = True,
             info_ed: int | None = None) -> Path:
    """A hand-made ACDC subject: 4 frames, ACDC labels 1 RV (left block), 2 MYO, 3 LV (right block)."""
    folder = root / "training" / sid
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    cine = (rng.random((24, 20, 4, 4)) * 300).astype(np.float32)
    affine = np.diag([1.5, 1.5, -8.0, 1.0])
    nib.save(nib.Nifti1Image(cine, affine), folder / f"{sid}_4d.nii.gz")
    label = np.zeros((24, 20, 4), np.uint8)
    label[2:8, 4:12] = 1  # ACDC RV
    label[12:20, 4:12] = 2  # ACDC MYO
    label[14:18, 6:10] = 3  # ACDC LV
    for frame, named in ((ed, info_ed or ed), (es, es)):  # named: the frame number Info.cfg gives
        nib.save(nib.Nifti1Image(cine[..., frame - 1], affine), folder / f"{sid}_frame{named:02d}.nii.gz")
        if labels:
            nib.save(nib.Nifti1Image(label, affine), folder / f"{sid}_frame{named:02d}_gt.nii.gz")
    (folder / "Info.cfg").write_text(f"ED: {info_ed or ed}\nES: {es}\nGroup: DCM\nHeight: 180.0\nNbFrame: 4\nWeight: 80.0\n")
    return folder


def test_label_map_converts_acdc_order_to_store_order() -> None:
    mapping = parse_label_map(ACDC_LABEL_MAP, "acdc")
    assert mapping == {0: 0, 1: RV, 2: MYO, 3: LV}
    acdc = np.array([0, 1, 2, 3], np.float32)
    assert apply_label_map(acdc, mapping, Path("x")).tolist() == [0, RV, MYO, LV]
    with pytest.raises(FormatError, match="x: label values \\[4\\] not in the label_map"):
        apply_label_map(np.array([0, 4.0]), mapping, Path("x"))
    for bad, match in (("1:3,2", "not SOURCE:TARGET"), ("1:5", "outside"), ("1:1,2:1", "onto one class"), ("1:1,1:2", "twice")):
        with pytest.raises(FormatError, match=match):
            parse_label_map(bad, "m")


def test_acdc_subject_reads_converted_labels_ed_es_and_group(tmp_path: Path) -> None:
    _patient(tmp_path, ed=1, es=3)
    found = discover_acdc(tmp_path)
    assert [s.subject_id for s in found.subjects] == ["patient001"] and not found.skipped
    raw = read_subject(found.subjects[0])
    assert (raw.ed, raw.es) == (0, 2)
    label = raw.labels[0]
    assert label[4, 6, 0] == RV and label[16, 8, 0] == LV and label[13, 5, 0] == MYO
    assert found.subjects[0].info["vendor"] == "unknown" and found.subjects[0].info["group"] == "DCM"


def test_info_cfg_disagreeing_with_the_frame_files_is_one_line(tmp_path: Path) -> None:
    _patient(tmp_path, ed=1, es=3, info_ed=2)  # Info.cfg says ED: 2, but frame02.nii.gz is cine frame 1
    found = discover_acdc(tmp_path)
    assert not found.skipped
    with pytest.raises(FormatError) as info:
        read_subject(found.subjects[0])
    message = str(info.value)
    assert "\n" not in message and "Info.cfg gives ED = frame 1" in message and "equals cine frame 0" in message
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Info.cfg").write_text("ED 1\n")
    with pytest.raises(FormatError, match="line 1 is not 'Key: value'"):
        read_info(tmp_path / "bad" / "Info.cfg")


def test_unlabelled_and_broken_acdc_subjects(tmp_path: Path) -> None:
    _patient(tmp_path, "patient001")
    _patient(tmp_path, "patient002", labels=False)
    broken = _patient(tmp_path, "patient003")
    (broken / "Info.cfg").unlink()
    store = tmp_path / "store.zarr"
    result = execute_ingest(plan_ingest({"acdc": tmp_path}, store, CONFIG), executor="serial", progress=False)
    assert [s.subject_id for s in result.skipped] == ["patient003"]
    assert "Info.cfg: file not found" in result.skipped[0].reason
    opened = SliceStore.open(store)
    table = opened.subjects.set_index("subject_id")
    assert table.loc["patient001", "labelled"] and not table.loc["patient002", "labelled"]
    assert table.loc["patient001", "dataset"] == "acdc" and table.loc["patient002", "group"] == "DCM"
    assert opened.n_labels == 2 * 4  # only patient001's ED and ES slices
    with pytest.raises(KeyError, match="unlabelled"):
        opened.native("patient002", "ED")
    assert validate_store(store, progress=False) == []


def test_synth_acdc_layout_round_trips_through_ingest(tmp_path: Path) -> None:
    ids = write_dataset(tmp_path / "raw", "acdc", n_subjects=3, seed=0, size=32, frames=(3, 3), slices=(3, 4),
                        trivial=True, unlabelled=1)
    assert ids == ["patient001", "patient002", "patient003"]
    assert (tmp_path / "raw" / "training" / "patient001" / "Info.cfg").is_file()
    assert (tmp_path / "raw" / "testing" / "patient003" / "patient003_4d.nii.gz").is_file()
    assert not list((tmp_path / "raw" / "testing" / "patient003").glob("*_gt.nii.gz"))
    store = tmp_path / "store.zarr"
    result = execute_ingest(plan_ingest({"acdc": tmp_path / "raw"}, store, CONFIG), executor="serial", progress=False)
    assert not result.skipped, result.skipped
    opened = SliceStore.open(store)
    assert opened.subjects["labelled"].tolist() == [True, True, False]
    from typer.testing import CliRunner

    from orchestrator.cli import app

    info = CliRunner().invoke(app, ["store", "info", str(store)])
    assert info.exit_code == 0 and "subjects   3 (2 labelled)" in info.output
    # The phantom's labels went to disk in ACDC order and came back in store order: LV inside MYO.
    native = opened.native("patient001", "ED")
    assert set(np.unique(native.label)) == {0, LV, MYO, RV}
    from scipy import ndimage

    lv = native.label == LV
    ring = native.label[ndimage.binary_dilation(lv, iterations=1) & ~lv]  # the LV cavity is walled by MYO
    assert lv.any() and (ring == MYO).mean() > 0.6
    assert validate_store(store, progress=False) == []
