"""Base and apex from the world geometry, cross-checked with the LV cavity (docs/store.md)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datastore.config import IngestConfig
from datastore.conventions import LV
from datastore.formats import read_subject
from datastore.geometry import BASE_TO_APEX_RAS, decide_base, to_canonical
from datastore.ingest import execute_ingest, plan_ingest
from datastore.manifest import discover_manifest
from datastore.preprocess import preprocess
from datastore.store import SliceStore

CONFIG = IngestConfig(size=32, chunk_slices=16, center_on_heart=False)


def _short_axis_affine(slice_step: np.ndarray, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """Affine whose slice axis is ``slice_step`` (mm) and whose in-plane axes are orthogonal to it."""
    normal = slice_step / np.linalg.norm(slice_step)
    helper = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([1.5 * u, 1.5 * v, slice_step], axis=1)
    affine[:3, 3] = origin
    return affine


def _lv_cone(n_slices: int, apex_last: bool) -> np.ndarray:
    """An LV cavity label (X, Y, Z) whose radius shrinks from the base to the apex."""
    label = np.zeros((24, 24, n_slices), np.uint8)
    yy, xx = np.mgrid[:24, :24]
    for k in range(n_slices):
        depth = k if apex_last else n_slices - 1 - k
        radius = 9.0 - 1.5 * depth
        label[..., k][np.hypot(yy - 12, xx - 12) < radius + 1.5] = 2
        label[..., k][np.hypot(yy - 12, xx - 12) < radius] = LV
    return label


@pytest.mark.parametrize("flip_axis", [None, 0, 1, 2])
def test_the_four_axis_flips(flip_axis: int | None) -> None:
    """One oblique stack stored as is, or flipped along voxel axis i, j or k (the affine adjusted so
    every voxel keeps its world position): the canonical volume always starts at the base slice."""
    n_slices = 7
    affine = _short_axis_affine(8.0 * BASE_TO_APEX_RAS)  # k runs base -> apex
    depth = np.zeros((5, 6, n_slices), np.float32) + np.arange(n_slices, dtype=np.float32)  # value = depth
    data, stored_affine = depth, affine
    if flip_axis is not None:
        data = np.flip(depth, axis=flip_axis).copy()
        flip = np.eye(4)
        flip[flip_axis, flip_axis], flip[flip_axis, 3] = -1.0, depth.shape[flip_axis] - 1
        stored_affine = affine @ flip
    decision = decide_base(stored_affine)
    assert decision.source == "geometry" and abs(decision.geometry_margin) == pytest.approx(1.0)
    assert decision.flip_z == (flip_axis == 2)
    canonical = to_canonical(data, decision.flip_z)  # (Z, Y, X)
    assert canonical[:, 0, 0].tolist() == list(range(n_slices))


def test_oblique_stack_follows_the_long_axis_not_the_superior_component() -> None:
    """A slice axis that goes slightly *superior* but mostly left-anterior runs base -> apex: the old
    ``affine[2, 2] > 0`` rule called its last slice the base."""
    step = 8.0 * np.array([-0.75, 0.65, 0.1]) / np.linalg.norm([-0.75, 0.65, 0.1])
    affine = _short_axis_affine(step)
    assert affine[2, 2] > 0
    decision = decide_base(affine)
    assert not decision.flip_z and decision.source == "geometry" and decision.geometry_margin > 0.5


def test_labels_overrule_the_geometry_with_a_warning_and_ambiguity_keeps_file_order() -> None:
    affine = _short_axis_affine(8.0 * BASE_TO_APEX_RAS)
    cone = _lv_cone(6, apex_last=False)  # the cavity grows with k: k runs apex -> base
    areas = np.count_nonzero(cone == LV, axis=(0, 1))
    decision = decide_base(affine, areas, subject="site/s1")
    assert decision.flip_z and decision.source == "labels"
    assert "site/s1" in decision.warning and "following the labels" in decision.warning
    # A long-axis-like stack (slice axis perpendicular to the long axis), no labels: file order.
    perpendicular = np.cross(BASE_TO_APEX_RAS, [0.0, 0.0, 1.0])
    ambiguous = decide_base(_short_axis_affine(8.0 * perpendicular / np.linalg.norm(perpendicular)), subject="s2")
    assert not ambiguous.flip_z and ambiguous.source == "file order" and "s2: base/apex ambiguous" in ambiguous.warning


@pytest.fixture(scope="module")
def nibabel_example_affine() -> np.ndarray:
    """The affine of nibabel's own test file ``example4d.nii.gz`` (a real oblique LAS scanner header)."""
    import nibabel.tests as tests

    path = Path(tests.__file__).parent / "data" / "example4d.nii.gz"
    if not path.is_file():
        pytest.skip("nibabel's test data is not installed")
    return np.asarray(nib.load(path).affine, dtype=np.float64)


def _write_subject(folder: Path, name: str, affine: np.ndarray, apex_last: bool) -> dict[str, str]:
    """Cine (X, Y, Z, T) whose slice k holds the value of its depth from the base, plus ED/ES labels."""
    n_slices, frames = 6, 2
    depth = np.arange(n_slices) if apex_last else np.arange(n_slices)[::-1]
    cine = np.zeros((24, 24, n_slices, frames), np.float32)
    cine += (10.0 * depth)[None, None, :, None]
    cine[3:9, 3:9] += 50.0  # an in-plane marker: catches x/y handling
    cine[..., 1] += 1.0
    label = _lv_cone(n_slices, apex_last)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(cine, affine), folder / f"{name}.nii.gz")
    for phase in ("ed", "es"):
        nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_{phase}_gt.nii.gz")
    return {"cine": f"{name}.nii.gz", "ed_label": f"{name}_ed_gt.nii.gz", "es_label": f"{name}_es_gt.nii.gz"}


def _reverse_k(affine: np.ndarray, n_slices: int) -> np.ndarray:
    """The affine of the same stack written in the opposite slice order."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, n_slices - 1
    return affine @ flip


def test_apex_first_and_base_first_stacks_give_the_same_canonical_volume(
    tmp_path: Path, nibabel_example_affine: np.ndarray
) -> None:
    """One anatomy written base-first and apex-first, on the real oblique header of nibabel's
    example4d.nii.gz (copied at test time) and on a synthetic short-axis header."""
    headers = {"example4d": nibabel_example_affine, "shortaxis": _short_axis_affine(8.0 * BASE_TO_APEX_RAS)}
    rows = ["subject_id,cine,ed_label,es_label,ed_frame,es_frame"]
    for tag, affine in headers.items():
        geometry_base_first = decide_base(affine)
        # Write the base at the end the geometry calls the base, then the same stack reversed.
        base_first_affine = _reverse_k(affine, 6) if geometry_base_first.flip_z else affine
        for order, (aff, apex_last) in {"basefirst": (base_first_affine, True),
                                        "apexfirst": (_reverse_k(base_first_affine, 6), False)}.items():
            files = _write_subject(tmp_path, f"{tag}_{order}", aff, apex_last)
            rows.append(f"{tag}_{order},{files['cine']},{files['ed_label']},{files['es_label']},0,1")
    (tmp_path / "phantoms.csv").write_text("\n".join(rows) + "\n")
    found = discover_manifest(tmp_path / "phantoms.csv")
    records = {s.subject_id: preprocess(read_subject(s), CONFIG) for s in found.subjects}
    for tag in headers:
        base_first, apex_first = records[f"{tag}_basefirst"], records[f"{tag}_apexfirst"]
        assert base_first.info["flip_z"] != apex_first.info["flip_z"]
        np.testing.assert_array_equal(base_first.images, apex_first.images)
        for phase in ("ED", "ES"):
            np.testing.assert_array_equal(base_first.native[phase][1], apex_first.native[phase][1])
            np.testing.assert_allclose(base_first.native[phase][0], apex_first.native[phase][0])
        # Canonical slice 0 is the base: the largest LV cavity.
        lv = np.count_nonzero(base_first.native["ED"][1] == LV, axis=(1, 2))
        assert lv[0] == lv.max() and lv[-1] == lv.min()
    decision = records["example4d_basefirst"].info
    assert decision["base_decision"] in ("geometry", "labels") and "base_margin" in decision


def test_decision_and_margin_land_in_the_subject_table(tmp_path: Path, nibabel_example_affine: np.ndarray) -> None:
    files = _write_subject(tmp_path, "scan", nibabel_example_affine, apex_last=True)
    (tmp_path / "one.csv").write_text(f"subject_id,cine\nnolabels,{files['cine']}\n")
    store = tmp_path / "store.zarr"
    result = execute_ingest(plan_ingest({"manifest": [tmp_path / "one.csv"]}, store, CONFIG), executor="serial",
                            progress=False)
    assert not result.skipped
    row = SliceStore.open(store).subject_row("nolabels")
    expected = decide_base(nibabel_example_affine)
    assert row["base_decision"] == expected.source and row["flip_z"] == expected.flip_z
    assert row["base_margin"] == pytest.approx(expected.geometry_margin, abs=1e-4)
    assert row["base_label_margin"] is None


def test_ingest_warns_with_the_subject_id_and_follows_the_labels(tmp_path: Path) -> None:
    """Labels whose LV cavity grows towards the slice the geometry calls the apex win, with a warning."""
    affine = _short_axis_affine(8.0 * BASE_TO_APEX_RAS)  # geometry: k = 0 is the base
    files = _write_subject(tmp_path, "contra", affine, apex_last=False)  # anatomy: k = 0 is the apex
    (tmp_path / "site.csv").write_text(
        f"subject_id,cine,ed_label,es_label,ed_frame,es_frame\ncontra,{files['cine']},{files['ed_label']},"
        f"{files['es_label']},0,1\n")
    store = tmp_path / "store.zarr"
    result = execute_ingest(plan_ingest({"manifest": [tmp_path / "site.csv"]}, store, CONFIG), executor="serial",
                            progress=False)
    assert [w for w in result.warnings if "site/contra" in w and "following the labels" in w]
    row = SliceStore.open(store).subject_row("contra")
    assert row["flip_z"] and row["base_decision"] == "labels" and row["base_label_margin"] > 0.5
    lv = np.count_nonzero(SliceStore.open(store).native("contra", "ED").label == LV, axis=(1, 2))
    assert lv[0] == lv.max()
