"""Schema 2 grows linearly: constant-size commits, packed native arrays, old stores refused, cheap reruns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from datastore.commitlog import LOG_DIR
from datastore.config import IngestConfig
from datastore.ingest import IngestError, execute_ingest, plan_ingest
from datastore.store import SliceStore, StoreError, StoreWriter, validate_store
from orchestrator.cli import app
from test_store import CONFIG, SIZE, make_record


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_a_commit_writes_the_same_bytes_at_subject_20_as_at_subject_1(tmp_path: Path) -> None:
    """The root zarr.json never grows, each commit adds one log entry of constant size, native is 2 arrays."""
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, CONFIG, SIZE, 1.25, chunk_slices=8, native_chunk=1024)
    root_sizes, entry_sizes = [], []
    for index in range(20):
        writer.append(make_record(f"S{index:03d}", seed=index))
        root_sizes.append((path / "zarr.json").stat().st_size)
        entries = sorted((path / LOG_DIR).iterdir())
        assert len(entries) == index + 1  # one new object per commit, none rewritten
        entry_sizes.append(entries[-1].stat().st_size)
    assert len(set(root_sizes)) == 1, root_sizes
    assert max(entry_sizes) - min(entry_sizes) <= 32, entry_sizes  # only the digits of offsets and counts differ
    digest = writer.finalize()
    assert [p.name for p in (path / LOG_DIR).iterdir()] == ["000000000-000000019.json"]  # compacted
    # Native volumes live in 2 arrays: a zarr.json each plus one chunk per subject (480 voxels, 1024 per chunk).
    native_files = _files(path / "native")
    assert len(native_files) == 1 + 2 * (1 + 20), len(native_files)
    store = SliceStore.open(path)
    assert store.hash == digest and len(store.subjects) == 20
    assert store.native("S019", "ED").image.shape == (4, 10, 12)
    assert validate_store(path, progress=False) == []


def test_a_compaction_killed_half_way_reads_the_same(tmp_path: Path) -> None:
    """The compacted entry written, the old ones not yet removed: readers follow the widest entry."""
    path = tmp_path / "s.zarr"
    writer = StoreWriter.open(path, CONFIG, SIZE, 1.25, chunk_slices=8)
    for index in range(3):
        writer.append(make_record(f"S{index}", seed=index))
    loose = {p.name: p.read_bytes() for p in (path / LOG_DIR).iterdir()}
    writer.finalize()
    for name, data in loose.items():  # put the loose entries back beside the compacted one
        (path / LOG_DIR / name).write_bytes(data)
    store = SliceStore.open(path)
    assert store.subjects.subject_id.tolist() == ["S0", "S1", "S2"]
    resumed = StoreWriter.open(path, CONFIG, SIZE, 1.25, chunk_slices=8)
    resumed.append(make_record("S3", seed=3))
    resumed.finalize()
    assert SliceStore.open(path).subjects.subject_id.tolist() == ["S0", "S1", "S2", "S3"]
    assert validate_store(path, progress=False) == []


def test_a_schema_1_store_is_refused_in_one_line_naming_the_rebuild_command(tmp_path: Path) -> None:
    old = tmp_path / "old.zarr"
    attrs = {"schema_version": 1, "sources": {"mnms": "/data/MnM"}, "commit": {"n_slices": 0, "n_labels": 0, "subjects": []}}
    zarr.open_group(str(old), mode="w-", attributes=attrs)
    expected = "schema_version 1 is not supported (this sspctl reads 2); rebuild the store from its sources with `sspctl ingest --mnms /data/MnM --store NEW_PATH`"
    with pytest.raises(StoreError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        SliceStore.open(old)
    with pytest.raises(StoreError, match="rebuild the store"):
        StoreWriter.open(old, CONFIG, SIZE, 1.25)
    result = CliRunner().invoke(app, ["store", "info", str(old)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and expected in result.output


def test_a_noop_rerun_hashes_no_unchanged_source_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Size and mtime beside each checksum: only files whose stat changed are read again."""
    import datastore.formats
    from datastore.synth import write_dataset

    raw = tmp_path / "raw"
    write_dataset(raw, "mnms", n_subjects=3, seed=0, size=32, frames=(3, 3), slices=(3, 3), trivial=True)
    config = IngestConfig(size=32)
    execute_ingest(plan_ingest({"mnms": raw}, tmp_path / "s.zarr", config), executor="serial", progress=False)
    hashed: list[str] = []
    real = datastore.formats.sha256_file

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(datastore.formats, "sha256_file", counting)
    assert plan_ingest({"mnms": raw}, tmp_path / "s.zarr", config).noop
    assert all(name.endswith(".csv") for name in hashed), hashed  # the CSV only, no subject file
    cine = sorted(raw.glob("*/*_sa.nii.gz"))[0]
    os.utime(cine, ns=(cine.stat().st_atime_ns, cine.stat().st_mtime_ns + 10**9))  # touched, same bytes
    hashed.clear()
    assert plan_ingest({"mnms": raw}, tmp_path / "s.zarr", config).noop
    assert [n for n in hashed if not n.endswith(".csv")] == [cine.name]
    data = bytearray(cine.read_bytes())
    data[-1] ^= 1  # same size, new content and mtime: re-hashed and refused
    cine.write_bytes(bytes(data))
    with pytest.raises(IngestError, match=f"{cine}: changed since it was ingested"):
        plan_ingest({"mnms": raw}, tmp_path / "s.zarr", config)


def test_commit_log_entries_are_published_exclusively(tmp_path: Path) -> None:
    """Two writers that both think they own commit 1: the second's publish fails, nothing is lost."""
    from datastore.commitlog import CommitConflict, CommitLog

    log = CommitLog(str(tmp_path))
    log.append(0, [{"subject_id": "A"}], {"rows": 8})
    with pytest.raises(CommitConflict):
        log.append(0, [{"subject_id": "B"}], {"rows": 8})
    state = log.read()
    assert [r["subject_id"] for r in state.rows] == ["A"] and state.next_seq == 1
    assert not [p for p in (tmp_path / LOG_DIR).iterdir() if p.name.startswith(".")]  # no temporary left
    assert json.loads((tmp_path / LOG_DIR / "000000000-000000000.json").read_text())["counts"] == {"rows": 8}
