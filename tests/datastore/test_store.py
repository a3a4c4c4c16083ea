"""The store: atomic appends, the read API, tensorstore interop, info and validate."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from datastore.store import (
    LOCK_NAME,
    PHASES,
    SliceStore,
    StoreError,
    StoreWriter,
    SubjectRecord,
    dataset_hash,
    merge_skipped,
    store_info,
    validate_store,
)

SIZE = 32
CONFIG = {"spacing": 1.25, "size": SIZE}


def make_record(subject_id: str, frames: int = 3, slices: int = 4, seed: int = 0, dataset: str = "mnms") -> SubjectRecord:
    """A synthetic subject with ED = frame 0, ES = frame 2."""
    rng = np.random.default_rng(seed)
    n = frames * slices
    frame, slice_index = np.divmod(np.arange(n), slices)
    phase = np.where(frame == 0, 1, np.where(frame == 2, 2, 0)).astype(np.int8)
    label_rows = np.concatenate([0 * slices + np.arange(slices), 2 * slices + np.arange(slices)])
    native = {
        p: (rng.standard_normal((slices, 10, 12)).astype(np.float32), rng.integers(0, 4, (slices, 10, 12)).astype(np.uint8))
        for p in PHASES
    }
    return SubjectRecord(
        dataset=dataset,
        subject_id=subject_id,
        images=rng.standard_normal((n, SIZE, SIZE)).astype(np.float16),
        frame=frame,
        slice=slice_index,
        slice_count=np.full(n, slices),
        phase=phase,
        labels=rng.integers(0, 4, (2 * slices, SIZE, SIZE)).astype(np.uint8),
        label_rows=label_rows,
        native=native,
        info={
            "vendor": "A",
            "frames": frames,
            "slices": slices,
            "ed": 0,
            "es": 2,
            "native_shape_zyx": [slices, 10, 12],
            "spacing_zyx": [8.0, 1.5, 1.5],
            "affine": np.eye(4).tolist(),
            "flip_z": True,
            "center_yx": [4.5, 5.5],
        },
    )


def write(path: Path, records: list[SubjectRecord], chunk_slices: int = 8) -> str:
    writer = StoreWriter.open(path, CONFIG, SIZE, 1.25, chunk_slices=chunk_slices)
    for record in records:
        writer.append(record)
    return writer.finalize()


def test_read_api_returns_what_was_written(tmp_path: Path) -> None:
    records = [make_record("A01", seed=1), make_record("B02", frames=2, slices=3, seed=2, dataset="mnms2")]
    records[1].info.update(frames=2, slices=3, es=1, native_shape_zyx=[3, 10, 12])
    records[1].phase = np.where(records[1].frame == 0, 1, 2).astype(np.int8)
    records[1].label_rows = np.arange(6)
    records[1].labels = records[1].labels[:6]
    digest = write(tmp_path / "s.zarr", records)
    store = SliceStore.open(tmp_path / "s.zarr")
    assert store.n_slices == 12 + 6 and store.image_size == SIZE and store.hash == digest
    assert list(store.subjects["subject_id"]) == ["A01", "B02"]
    assert list(store.subjects["dataset"]) == ["mnms", "mnms2"]
    # Each subject starts on a chunk boundary (8 rows); padding rows belong to nobody (-1).
    assert store.n_rows == 16 + 8 and store.subject_slices("B02") == slice(16, 22)
    np.testing.assert_array_equal(store.meta["subject"], [0] * 12 + [-1] * 4 + [1] * 6 + [-1] * 2)
    np.testing.assert_array_equal(store.meta["labelled"], store.meta["phase"] > 0)
    # Reads in any order, with duplicates, float32 exactly equal to the float16 written.
    got = store.read_images([17, 2, 2])
    assert got.dtype == np.float32 and got.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(got[0], records[1].images[1].astype(np.float32))
    np.testing.assert_array_equal(got[1:], records[0].images[[2, 2]].astype(np.float32))
    np.testing.assert_array_equal(store.read_image_range(8, 16)[:4], records[0].images[8:12])
    np.testing.assert_array_equal(store.read_image_range(8, 16)[4:], 0)  # padding
    labels = store.read_labels([9, 0, 16])  # slice rows: ES of A01, ED of A01, ED of B02
    np.testing.assert_array_equal(labels[0], records[0].labels[5])
    np.testing.assert_array_equal(labels[1], records[0].labels[0])
    np.testing.assert_array_equal(labels[2], records[1].labels[0])
    with pytest.raises(IndexError, match="no label"):
        store.read_labels([4])
    with pytest.raises(IndexError, match="out of range"):
        store.read_images([24])
    volume = store.native("A01", "ES")
    np.testing.assert_array_equal(volume.label, records[0].native["ES"][1])
    np.testing.assert_array_equal(store.native("B02", "ED", dataset="mnms2").image, records[1].native["ED"][0])
    assert volume.flip_z and volume.spacing_zyx == (8.0, 1.5, 1.5) and volume.geometry.shape_zyx == (4, 10, 12)
    assert store.chunk_slices == 8
    clone = pickle.loads(pickle.dumps(store))  # pickles by path, reopens lazily
    assert clone._group is None and clone.n_slices == 18


def test_hash_does_not_depend_on_append_order(tmp_path: Path) -> None:
    a, b = make_record("A", seed=1), make_record("B", seed=2)
    assert write(tmp_path / "ab", [a, b]) == write(tmp_path / "ba", [b, a])
    assert write(tmp_path / "ab2", [a, make_record("B", seed=3)]) != write(tmp_path / "ab3", [a, b])
    assert dataset_hash([("m", "A", "1"), ("m", "B", "2")]) == dataset_hash([("m", "B", "2"), ("m", "A", "1")])


def test_uncommitted_rows_are_invisible_and_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, CONFIG, SIZE, 1.25, chunk_slices=8)
    writer.append(make_record("A", seed=1))
    writer.write_rows(make_record("CRASH", seed=9))  # data written, never committed
    writer.close()  # the crashed writer's process is gone, and its lock with it
    partial = SliceStore.open(path)
    assert partial.n_slices == 12 and not partial.complete and list(partial.subjects.subject_id) == ["A"]
    assert zarr.open_group(str(path), mode="r")["images"].shape[0] >= 32  # garbage beyond the commit
    resumed = StoreWriter.open(path, CONFIG, SIZE, 1.25, chunk_slices=8)
    assert resumed.done == {("mnms", "A")}
    resumed.append(make_record("B", seed=2))
    digest = resumed.finalize()
    assert digest == write(tmp_path / "clean", [make_record("A", seed=1), make_record("B", seed=2)])
    assert validate_store(path, progress=False) == []


def test_reopening_with_another_config_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "s", [make_record("A")])
    with pytest.raises(StoreError, match="another config.*size"):
        StoreWriter.open(tmp_path / "s", {**CONFIG, "size": 64}, 64, 1.25)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("{}")
    with pytest.raises(StoreError, match="junk"):
        StoreWriter.open(tmp_path / "junk", CONFIG, SIZE, 1.25)
    with pytest.raises(StoreError, match="not found"):
        SliceStore.open(tmp_path / "missing").n_slices


def test_tensorstore_reads_the_same_values(tmp_path: Path) -> None:
    tensorstore = pytest.importorskip("tensorstore")
    write(tmp_path / "s.zarr", [make_record("A", seed=1), make_record("B", seed=2)])
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "s.zarr" / "images")}}
    array = tensorstore.open(spec, read=True).result()
    via_ts = array[5:20].read().result()
    via_zarr = SliceStore.open(tmp_path / "s.zarr").read_image_range(5, 20)
    assert via_ts.dtype == np.float16
    np.testing.assert_array_equal(via_ts.astype(np.float32), via_zarr)


def test_info_counts(tmp_path: Path) -> None:
    write(tmp_path / "s", [make_record("A"), make_record("B", dataset="mnms2")])
    info = store_info(tmp_path / "s")
    assert info["subjects"] == 2 and info["slices"] == 24 and info["labelled_slices"] == 16
    assert info["by_dataset"] == {"mnms": {"subjects": 1, "slices": 12}, "mnms2": {"subjects": 1, "slices": 12}}
    assert info["by_vendor"]["mnms2/A"] == {"subjects": 1, "slices": 12}
    assert info["size_bytes"] > 0 and info["complete"] and len(info["hash"]) == 64
    json.dumps(info)


def test_validate_detects_each_kind_of_damage(tmp_path: Path) -> None:
    path = tmp_path / "s"
    write(path, [make_record("A", seed=1), make_record("B", seed=2)])
    assert validate_store(path, progress=False) == []
    group = zarr.open_group(str(path), mode="r+")

    group["labels"][3, 0, 0] = 7
    assert any("outside {0, 1, 2, 3}" in p for p in validate_store(path, progress=False))
    group["labels"][3, 0, 0] = 0

    original = group["images"][18]  # B starts at the chunk boundary 16
    group["images"][18] = original + 1
    problems = validate_store(path, progress=False)
    assert any("subject mnms/B content hash" in p for p in problems)
    assert any("dataset hash" in p for p in problems)
    group["images"][18] = original

    group["meta/subject"][13] = 0  # a padding row claimed by subject A
    assert any("padding rows" in p for p in validate_store(path, progress=False))
    group["meta/subject"][13] = -1

    phase = group["meta/phase"][:]
    group["meta/phase"][5] = 1
    assert any("meta/phase" in p for p in validate_store(path, progress=False))
    group["meta/phase"][:] = phase

    group["images"].resize((31, SIZE, SIZE))
    assert any("images has shape (31" in p for p in validate_store(path, progress=False))


def test_validate_reports_an_unfinished_ingest(tmp_path: Path) -> None:
    writer = StoreWriter.open(tmp_path / "s", CONFIG, SIZE, 1.25)
    writer.append(make_record("A"))
    assert any("not finished" in p for p in validate_store(tmp_path / "s", progress=False))
    assert validate_store(tmp_path / "nothing", progress=False)[0].endswith("store not found")


def test_fsspec_url_store(tmp_path: Path) -> None:
    url = f"memory://{tmp_path.name}/s.zarr"
    writer = StoreWriter.open(url, CONFIG, SIZE, 1.25)
    writer.append(make_record("A"))
    writer.finalize()
    store = SliceStore.open(url)
    assert store.n_slices == 12 and store.read_images([3]).shape == (1, SIZE, SIZE)
    assert StoreWriter.open(url, CONFIG, SIZE, 1.25).done == {("mnms", "A")}
    assert validate_store(url, progress=False) == [] and store_info(url)["size_bytes"] > 0


def test_store_cli_exit_codes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    runner = CliRunner()
    write(tmp_path / "s", [make_record("A")])
    result = runner.invoke(app, ["store", "info", str(tmp_path / "s")])
    assert result.exit_code == 0 and "subjects   1" in result.output and "mnms/A" in result.output
    assert runner.invoke(app, ["store", "validate", str(tmp_path / "s"), "--no-progress"]).exit_code == 0
    zarr.open_group(str(tmp_path / "s"), mode="r+")["labels"][0, 0, 0] = 9
    result = runner.invoke(app, ["store", "validate", str(tmp_path / "s"), "--no-progress"])
    assert result.exit_code == 1 and "invalid: " in result.output
    result = runner.invoke(app, ["store", "info", str(tmp_path / "missing"), "--json"])
    assert result.exit_code == 2 and "store not found" in result.output


def test_a_second_writer_is_refused_until_the_first_finishes(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, CONFIG, SIZE, 1.25)
    assert (path / LOCK_NAME).is_file()
    with pytest.raises(StoreError, match=f"store {path} is being written by pid {os.getpid()} on {socket.gethostname()}"):
        StoreWriter.open(path, CONFIG, SIZE, 1.25)
    writer.append(make_record("A"))
    writer.finalize()  # releases the lock and removes its file
    assert not (path / LOCK_NAME).exists()
    with StoreWriter.open(path, CONFIG, SIZE, 1.25) as again:
        assert again.done == {("mnms", "A")} and again.warnings == []
    assert not (path / LOCK_NAME).exists() and validate_store(path, progress=False) == []


def test_writer_lock_between_processes_and_a_stale_lock_after_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    script = (
        "import sys; from datastore.store import StoreWriter; "
        f"w = StoreWriter.open(sys.argv[1], {CONFIG!r}, {SIZE}, 1.25); print('locked', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"being written by pid {child.pid} on {socket.gethostname()}"):
            StoreWriter.open(path, CONFIG, SIZE, 1.25)
    finally:
        child.kill()  # SIGKILL: the kernel drops the flock, the lock file stays behind
        child.wait(timeout=60)
    assert (path / LOCK_NAME).is_file()
    writer = StoreWriter.open(path, CONFIG, SIZE, 1.25)
    assert len(writer.warnings) == 1 and f"taking over the writer lock left by pid {child.pid}" in writer.warnings[0]
    writer.append(make_record("A"))
    writer.finalize()
    assert validate_store(path, progress=False) == []


def test_commit_rereads_the_record_and_refuses_another_writers_work(tmp_path: Path) -> None:
    url = f"memory://{tmp_path.name}/unlocked.zarr"  # fsspec URLs have no lock
    first, second = StoreWriter.open(url, CONFIG, SIZE, 1.25), StoreWriter.open(url, CONFIG, SIZE, 1.25)
    first.append(make_record("A"))
    with pytest.raises(StoreError, match="commit record changed under this writer .1 subjects stored, 0 expected"):
        second.append(make_record("B", seed=2))
    assert SliceStore.open(url).subjects.subject_id.tolist() == ["A"]


def test_half_created_stores_are_completed(tmp_path: Path) -> None:
    old_kill = tmp_path / "old.zarr"  # an older version killed between group creation and attributes
    zarr.open_group(str(old_kill), mode="w-").create_array("images", shape=(0, 8, 8), dtype="float16", chunks=(4, 8, 8))
    new_kill = tmp_path / "new.zarr"  # killed after the root attributes, before every array existed
    StoreWriter.open(new_kill, CONFIG, SIZE, 1.25).close()
    for name in ("labels", "meta", "native"):
        shutil.rmtree(new_kill / name)
    for path in (old_kill, new_kill):
        writer = StoreWriter.open(path, CONFIG, SIZE, 1.25)
        writer.append(make_record("A"))
        writer.finalize()
        assert validate_store(path, progress=False) == [], path
        assert SliceStore.open(path).read_images([0]).shape == (1, SIZE, SIZE)
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w-")
    foreign.create_array("other", shape=(0,), dtype="int8", chunks=(4,))
    with pytest.raises(StoreError, match="foreign.zarr: exists and is not an sspctl store"):
        StoreWriter.open(tmp_path / "foreign.zarr", CONFIG, SIZE, 1.25)
    assert not (tmp_path / "foreign.zarr" / LOCK_NAME).exists()


def test_merge_skipped_keeps_earlier_runs() -> None:
    earlier = [{"dataset": "mnms", "subject_id": "A", "reason": "a1"}, {"dataset": "mnms", "subject_id": "B", "reason": "b"}]
    now = [{"dataset": "mnms2", "subject_id": "C", "reason": "c"}, {"dataset": "mnms", "subject_id": "A", "reason": "a2"}]
    merged = merge_skipped(earlier, now, committed={("mnms", "B")})
    assert merged == [{"dataset": "mnms", "subject_id": "A", "reason": "a2"}, {"dataset": "mnms2", "subject_id": "C", "reason": "c"}]
