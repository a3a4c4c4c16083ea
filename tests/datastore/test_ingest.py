"""End to end on a real local Ray: synth -> ingest (both layouts, 2 workers) -> validate -> info,
kill-and-resume, no-op rerun, bad subjects skipped with exit 1. One Ray cluster for the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from datastore.ingest import CRASH_ENV, CRASH_MODE_ENV, InjectedCrash
from datastore.preprocess import heart_centre
from datastore.store import LOCK_NAME, SliceStore
from datastore.synth import write_dataset
from orchestrator.cli import app

SIZE = 64
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_cluster():  # noqa: ANN201
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # another module's cluster is still up: use it, leave it to its owner
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    grid = {"size": 40, "frames": (4, 5), "slices": (3, 4)}
    write_dataset(root / "mnms", "mnms", 3, seed=11, **grid)
    write_dataset(root / "mnms2", "mnms2", 3, seed=12, **grid)
    return {"mnms": root / "mnms", "mnms2": root / "mnms2"}


def ingest_args(raw: dict[str, Path], store: Path) -> list[str]:
    return ["ingest", "--mnms", str(raw["mnms"]), "--mnms2", str(raw["mnms2"]), "--store", str(store),
            "--size", str(SIZE), "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def store(ray_cluster, raw: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("store") / "cine.zarr"
    result = runner.invoke(app, ingest_args(raw, path))
    assert result.exit_code == 0, result.output
    assert "6 subjects" in result.output
    return path


def test_ingest_validate_info(store: Path) -> None:
    result = runner.invoke(app, ["store", "validate", str(store), "--no-progress"])
    assert result.exit_code == 0 and "valid" in result.output
    result = runner.invoke(app, ["store", "info", str(store), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    opened = SliceStore.open(store)
    subjects = opened.subjects
    assert info["subjects"] == 6 and info["hash"] == opened.hash and info["complete"]
    assert info["slices"] == int((subjects.frames * subjects.slices).sum()) == opened.n_slices
    assert info["labelled_slices"] == int(2 * subjects.slices.sum())
    assert {k: v["subjects"] for k, v in info["by_dataset"].items()} == {"mnms": 3, "mnms2": 3}
    assert sum(v["subjects"] for v in info["by_vendor"].values()) == 6 and info["size_bytes"] > 0
    assert opened.image_size == SIZE


def test_stored_slices_follow_the_conventions(store: Path) -> None:
    opened = SliceStore.open(store)
    meta = opened.meta
    assert set(opened.subjects.flip_z) == {True, False}  # both native slice orders are covered
    for row in opened.subjects.itertuples():
        rows = opened.subject_slices(row.subject_id)
        images = opened.read_image_range(rows.start, rows.stop)
        # Zero padding (the native FOV is smaller than 64 x 1.25 mm here) becomes the z-scored
        # subject minimum; bicubic may undershoot it a little near edges.
        z_min = -row.intensity_mean / row.intensity_std
        assert np.isclose(images[:, 0, :], z_min, atol=2e-3).any() or np.isclose(images[:, :, 0], z_min, atol=2e-3).any()
        assert images.min() >= z_min - 1.0
        native = opened.native(row.subject_id, "ED")
        assert native.image.shape == tuple(row.native_shape_zyx) and native.label.max() <= 3
        assert native.image.min() >= z_min - 1e-4
        # Base at Z = 0: canonical slice 0 is the most superior in world coordinates.
        world_s = [(native.geometry.canonical_affine @ [0, 0, z, 1])[2] for z in range(row.slices)]
        assert np.all(np.diff(world_s) < 0)
        # Crops are centred on the enclosing-circle centre of the ED + ES labels (native pixels).
        es = opened.native(row.subject_id, "ES")
        assert tuple(row.center_yx) == pytest.approx(heart_centre([native.label, es.label]))
        labelled = np.flatnonzero(meta["labelled"][rows]) + rows.start
        assert len(labelled) == 2 * row.slices and opened.read_labels(labelled).max() > 0
        # ... and anatomically: the labelled heart shrinks from the base towards the apex.
        area = (native.label > 0).sum(axis=(1, 2))
        labelled_z = np.flatnonzero(area)
        assert area[labelled_z[0]] > area[labelled_z[-1]]
        # ED slices of the store are the ED frame.
        assert set(meta["frame"][rows][meta["phase"][rows] == 1]) == {row.ed}


def test_tensorstore_opens_the_ingested_images(store: Path) -> None:
    tensorstore = pytest.importorskip("tensorstore")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "images")}}
    array = tensorstore.open(spec, read=True).result()
    opened = SliceStore.open(store)
    assert tuple(array.shape) == (opened.n_rows, SIZE, SIZE)
    idx = np.array([0, 7, opened.n_rows - 1])
    np.testing.assert_array_equal(array[idx].read().result().astype(np.float32), opened.read_images(idx))


def test_rerun_of_a_finished_ingest_is_a_noop(store: Path, raw: dict[str, Path]) -> None:
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    result = runner.invoke(app, ingest_args(raw, store))
    assert result.exit_code == 0 and "nothing to do" in result.output
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_crash_then_resume_gives_the_same_store(
    store: Path, raw: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "crashy.zarr"
    monkeypatch.setenv(CRASH_ENV, "2")
    crashed = runner.invoke(app, ingest_args(raw, path))
    assert isinstance(crashed.exception, InjectedCrash)
    partial = SliceStore.open(path)
    assert len(partial.subjects) == 2 and not partial.complete
    assert runner.invoke(app, ["store", "validate", str(path), "--no-progress"]).exit_code == 1
    monkeypatch.delenv(CRASH_ENV)
    resumed = runner.invoke(app, ingest_args(raw, path))
    assert resumed.exit_code == 0, resumed.output
    assert "4 subjects" in resumed.output and "2 already there" in resumed.output
    final = SliceStore.open(path)
    assert final.hash == SliceStore.open(store).hash  # no duplicates, no losses, order-independent
    uninterrupted = SliceStore.open(store)
    # Subjects are written in plan order, not Ray completion order: the same rows in the same place.
    assert list(final.subjects.subject_id) == list(uninterrupted.subjects.subject_id)
    for key in ("subject", "frame", "slice", "phase"):
        np.testing.assert_array_equal(final.meta[key], uninterrupted.meta[key])
    np.testing.assert_array_equal(final.read_images(np.arange(final.n_slices)),
                                  uninterrupted.read_images(np.arange(uninterrupted.n_slices)))
    assert runner.invoke(app, ["store", "validate", str(path), "--no-progress"]).exit_code == 0


def test_bad_subject_is_skipped_and_exit_is_1(ray_cluster, raw: dict[str, Path], tmp_path: Path) -> None:  # noqa: ANN001
    mnms = tmp_path / "mnms"
    shutil.copytree(raw["mnms"], mnms)
    victim = sorted(mnms.glob("*/*_sa_gt.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    result = runner.invoke(app, ["ingest", "--mnms", str(mnms), "--store", str(tmp_path / "s"), "--size", "32", "--no-progress"])
    assert result.exit_code == 1
    assert f"{victim}: truncated or corrupt gzip" in result.output and "skipped 1 subject" in result.output
    assert len(SliceStore.open(tmp_path / "s").subjects) == 2


def test_sigkill_then_resume_gives_the_same_store(store: Path, raw: dict[str, Path], tmp_path: Path) -> None:
    """A real SIGKILL right after a subject's rows were written but before its commit."""
    path = tmp_path / "killed.zarr"
    script = (
        "import sys; from datastore.config import IngestConfig; "
        "from datastore.ingest import plan_ingest, execute_ingest; "
        f"plan = plan_ingest({{'mnms': sys.argv[1], 'mnms2': sys.argv[2]}}, sys.argv[3], IngestConfig(size={SIZE})); "
        "execute_ingest(plan, executor='serial', progress=False)"
    )
    env = {**os.environ, CRASH_ENV: "3", CRASH_MODE_ENV: "sigkill"}
    killed = subprocess.Popen(
        [sys.executable, "-c", script, str(raw["mnms"]), str(raw["mnms2"]), str(path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, stderr = killed.communicate(timeout=120)
    killed_pid = killed.pid
    assert killed.returncode == -signal.SIGKILL, stderr
    partial = SliceStore.open(path)
    assert len(partial.subjects) == 3 and not partial.complete
    assert (path / LOCK_NAME).is_file()  # the killed writer could not remove its lock file
    resumed = runner.invoke(app, ingest_args(raw, path))
    assert resumed.exit_code == 0, resumed.output
    assert f"taking over the writer lock left by pid {killed_pid}" in resumed.output
    assert SliceStore.open(path).hash == SliceStore.open(store).hash
    assert not (path / LOCK_NAME).exists()
