"""Damaged chunks and a full disk: one line naming what failed, and a store that stays consistent."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from datastore.loader import as_source
from datastore.store import CorruptChunkError, SliceStore, validate_store
from orchestrator.cli import app
from test_store import make_record, write  # the store tests' synthetic subjects


def _corrupt(path: Path) -> None:
    """Overwrite a chunk file with bytes no codec accepts (what a bad disk or a partial copy leaves)."""
    path.write_bytes(b"\x02\x01garbage" + bytes(range(200)))


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """A finished 2-subject store (24 slices, 8 per chunk) with images chunk 1 and a native label damaged."""
    store = tmp_path / "s.zarr"
    write(store, [make_record("A01", seed=1), make_record("B02", seed=2)])
    _corrupt(store / "images" / "c" / "1" / "0" / "0")
    _corrupt(store / "native" / "label" / "c" / "1")  # B02's native volumes: the second native chunk
    return store


def test_validate_reports_every_damaged_chunk_in_one_line(damaged: Path) -> None:
    problems = validate_store(damaged, progress=False)
    assert len(problems) == 2, problems
    assert any("array images chunk 1.0.0 (rows [8, 16)) unreadable" in p for p in problems), problems
    assert any("array native/label chunk 1 (rows [1048576, 2097152)) unreadable" in p for p in problems), problems
    assert all("\n" not in p and str(damaged) in p for p in problems)


def test_store_validate_command_exits_1_with_one_line_per_chunk(damaged: Path) -> None:
    result = CliRunner().invoke(app, ["store", "validate", str(damaged), "--no-progress"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("invalid: ") for line in lines), result.output
    assert "Traceback" not in result.output


def test_reads_name_the_store_the_array_and_the_rows(damaged: Path) -> None:
    store = SliceStore.open(damaged)
    np.testing.assert_array_equal(store.read_image_range(0, 8).shape, (8, 32, 32))  # good chunks still read
    with pytest.raises(CorruptChunkError, match=rf"store {damaged}: array images rows \[4, 12\) unreadable"):
        store.read_image_range(4, 12)
    with pytest.raises(CorruptChunkError, match=r"array images rows \[9, 10\)"):
        store.read_images([9])
    with pytest.raises(CorruptChunkError, match=r"array native/label rows \[1049056, 1049536\) unreadable"):
        store.native("B02", "ES")
    assert store.native("A01", "ES").label.shape == (4, 10, 12)  # another subject's chunk still reads
    with pytest.raises(CorruptChunkError, match=rf"store {damaged}: array images rows \[8, 16\)"):
        as_source(store).read_image_range(8, 16)  # the training loader's path
    with pytest.raises(CorruptChunkError, match=rf"store {damaged}: array images rows \[8, 16\)"):
        as_source(store).read_image_ranges([(0, 8), (8, 16)])  # one concurrent call: the damaged run is named


@pytest.mark.slow
def test_ingest_on_a_full_disk_fails_in_one_line_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC in the store's write path: one line, committed subjects intact, the rerun finishes the store."""
    from zarr.storage import LocalStore

    from datastore.synth import write_dataset

    write_dataset(tmp_path / "raw", "mnms", n_subjects=3, seed=0, size=32, frames=(3, 3), slices=(3, 3), trivial=True)
    args = ["ingest", "--mnms", str(tmp_path / "raw"), "--size", "32", "--workers", "1", "--no-progress"]
    clean = CliRunner().invoke(app, [*args, "--store", str(tmp_path / "clean.zarr")])
    assert clean.exit_code == 0, clean.output

    original = LocalStore.set
    image_writes = []

    async def full_after_one_subject(self: LocalStore, key: str, value: object) -> None:
        if key.startswith("native/image/c/"):
            image_writes.append(key)
            if len(image_writes) > 1:  # the second subject's native chunk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_after_one_subject)
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, [*args, "--store", str(store)])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "No space left on device" in error[0] and "1 subjects committed" in error[0], result.output
    assert "Traceback" not in result.output
    opened = SliceStore.open(store)
    assert len(opened.subjects) == 1 and not opened.complete
    assert opened.read_image_range(0, opened.n_slices).shape == (opened.n_slices, 32, 32)  # committed rows intact
    assert not (store / ".sspctl-writer.lock").exists()

    monkeypatch.undo()
    again = CliRunner().invoke(app, [*args, "--store", str(store)])
    assert again.exit_code == 0, again.output
    assert SliceStore.open(store).hash == SliceStore.open(tmp_path / "clean.zarr").hash
    assert validate_store(store, progress=False) == []
