"""Generic manifests (CSV/YAML): row/column errors, unlabelled subjects, several sources in one store."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from datastore.config import IngestConfig
from datastore.conventions import LV, RV
from datastore.formats import FormatError
from datastore.ingest import IngestError, execute_ingest, plan_ingest
from datastore.manifest import discover_manifest
from datastore.store import SliceStore, validate_store
from datastore.synth import write_dataset
from orchestrator.cli import app

CONFIG = IngestConfig(size=32, chunk_slices=16)
AFFINE = np.diag([1.5, 1.5, -8.0, 1.0])


def _scans(folder: Path, name: str) -> dict[str, str]:
    """A 3-frame cine, its ED (0) / ES (2) frames and labels in a site's own order (1 RV, 3 LV)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    cine = (rng.random((20, 18, 4, 3)) * 200).astype(np.float32)
    label = np.zeros((20, 18, 4), np.uint8)
    label[2:7, 3:10] = 1
    label[10:16, 4:12] = 2
    label[11:15, 6:10] = 3
    nib.save(nib.Nifti1Image(cine, AFFINE), folder / f"{name}_cine.nii.gz")
    nib.save(nib.Nifti1Image(cine[..., 0], AFFINE), folder / f"{name}_ed.nii.gz")
    nib.save(nib.Nifti1Image(cine[..., 2], AFFINE), folder / f"{name}_es.nii.gz")
    for phase in ("ed", "es"):
        nib.save(nib.Nifti1Image(label, AFFINE), folder / f"{name}_{phase}_gt.nii.gz")
    return {p: f"scans/{name}_{p}.nii.gz" for p in ("cine", "ed", "es", "ed_gt", "es_gt")}


def _manifest(tmp_path: Path) -> Path:
    a, b, c = (_scans(tmp_path / "scans", n) for n in ("a", "b", "c"))
    rows = [
        "subject_id,cine,ed,es,ed_label,es_label,ed_frame,es_frame,label_map,vendor,centre,group",
        f"s01,{a['cine']},,,{a['ed_gt']},{a['es_gt']},0,2,\"1:3,2:2,3:1\",X,north,NOR",  # labelled via indices
        f"s02,,{b['ed']},{b['es']},{b['ed_gt']},{b['es_gt']},,,\"1:3,2:2,3:1\",Y,,",       # 3D only
        f"s03,{c['cine']},,,,,,,,Y,,",                                                   # unlabelled
        "s04,scans/missing.nii.gz,,,,,,,,X,,",                                           # missing file
        f"s05,{a['cine']},,,{a['ed_gt']},{a['es_gt']},0,2,\"1:1,2:2\",X,,",              # label 3 unmapped
        f"s06,{a['cine']},,,,,zero,,,X,,",                                               # bad frame index
    ]
    path = tmp_path / "site.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_manifest_rows_land_and_bad_rows_name_row_and_column(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    found = discover_manifest(manifest)
    assert [s.subject_id for s in found.subjects] == ["s01", "s02", "s03", "s05"]
    reasons = {s.subject_id: s.reason for s in found.skipped}
    assert reasons["s04"] == f"{manifest}: row 5, column 'cine': file not found (scans/missing.nii.gz)"
    assert reasons["s06"].startswith(f"{manifest}: row 7, column 'ed_frame': expected a 0-based frame index")
    store = tmp_path / "store.zarr"
    result = execute_ingest(plan_ingest({"manifest": [manifest]}, store, CONFIG), executor="serial", progress=False)
    skipped = {s.subject_id: s.reason for s in result.skipped}
    assert set(skipped) == {"s04", "s05", "s06"}
    assert "label values [3] not in the label_map" in skipped["s05"] and "\n" not in skipped["s05"]
    table = SliceStore.open(store).subjects.set_index("subject_id")
    assert table["dataset"].unique().tolist() == ["site"]
    assert table["labelled"].to_dict() == {"s01": True, "s02": True, "s03": False}
    assert (table.loc["s01", "ed"], table.loc["s01", "es"]) == (0, 2)
    assert (table.loc["s02", "frames"], table.loc["s03", "vendor"]) == (2, "Y")
    native = SliceStore.open(store).native("s01", "ED")
    assert native.label.max() == RV and (native.label == LV).sum() == 4 * 4 * 4  # site's 3 -> LV
    assert validate_store(store, progress=False) == []


def test_yaml_manifest_and_whole_file_errors(tmp_path: Path) -> None:
    a = _scans(tmp_path / "scans", "a")
    path = tmp_path / "biobank.yaml"
    path.write_text(f"subjects:\n  - subject_id: '007'\n    cine: {a['cine']}\n    vendor: B\n")
    found = discover_manifest(path)
    assert [(s.dataset, s.subject_id) for s in found.subjects] == [("biobank", "007")]
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,cine,colour\nx,y,z\n")
    with pytest.raises(FormatError, match="unknown column\\(s\\) 'colour'"):
        discover_manifest(bad)
    again = tmp_path / "again.csv"  # gives biobank/007 a second time: skipped in both, the rest lands
    again.write_text(f"subject_id,cine,dataset\n007,{a['cine']},biobank\n008,{a['cine']},biobank\n")
    plan = plan_ingest({"manifest": [path, again]}, tmp_path / "s.zarr", CONFIG)
    assert [s.subject_id for s in plan.todo] == ["008"]
    assert [s.subject_id for s in plan.skipped] == ["007", "007"] and "is given by 2 sources" in plan.skipped[0].reason
    plan.writer.close()
    with pytest.raises(IngestError, match="manifest not found"):
        plan_ingest({"manifest": [tmp_path / "nope.csv"]}, tmp_path / "s.zarr", CONFIG)


def test_several_sources_into_one_mostly_unlabelled_store(tmp_path: Path) -> None:
    write_dataset(tmp_path / "mnms", "mnms", n_subjects=2, seed=0, size=32, frames=(3, 3), slices=(3, 3), trivial=True)
    write_dataset(tmp_path / "acdc", "acdc", n_subjects=3, seed=0, size=32, frames=(3, 3), slices=(3, 3), trivial=True,
                  unlabelled=3)
    a = _scans(tmp_path / "scans", "a")
    manifest = tmp_path / "pool.csv"
    manifest.write_text(f"subject_id,cine\nu1,{a['cine']}\nu2,{a['cine']}\n")
    store = tmp_path / "store.zarr"
    result = CliRunner().invoke(app, ["ingest", "--store", str(store), "--mnms", str(tmp_path / "mnms"), "--acdc",
                                      str(tmp_path / "acdc"), "--manifest", str(manifest), "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    table = SliceStore.open(store).subjects
    assert table.groupby("dataset")["labelled"].sum().to_dict() == {"acdc": 0, "mnms": 2, "pool": 0}
    assert validate_store(store, progress=False) == []
