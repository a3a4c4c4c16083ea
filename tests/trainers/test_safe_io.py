"""Torch files: a full disk keeps the previous file; a bad file never earns advice to load it unsafely."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from trainers.checkpoint import STATE_FILE, TrainState, load_checkpoint, save_checkpoint
from trainers.safe_io import DiskWriteError
from trainers.weights import WeightsError, load_weights, save_weights


def _unsafe_advice(message: str) -> bool:
    return "weights_only" in message or "False" in message or "trust" in message


def test_damaged_and_pickled_weights_get_one_line_without_unsafe_advice(tmp_path: Path) -> None:
    good = tmp_path / "encoder.pt"
    save_weights({"encoder.w": torch.zeros(2)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    pickled = tmp_path / "pickled.pt"
    torch.save({"encoder.w": torch.nn.Linear(1, 1)}, pickled)
    for path, cause in ((truncated, "failed"), (pickled, "Unsupported global")):
        with pytest.raises(WeightsError) as info:
            load_weights(path)
        message = str(info.value)
        assert message.startswith(f"{path}: not a readable safe weights file") and cause in message, message
        assert "\n" not in message and not _unsafe_advice(message), message


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = TrainState(epoch=0, global_step=1, model={"w": torch.zeros(3)}, optimizer={}, config={})
    save_checkpoint(tmp_path, state)
    real_save = torch.save

    def full_disk(obj: object, path: Path) -> None:  # writes part of the file, then runs out of space
        Path(path).write_bytes(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    later = TrainState(epoch=1, global_step=2, model={"w": torch.ones(3)}, optimizer={}, config={})
    with pytest.raises(DiskWriteError) as info:
        save_checkpoint(tmp_path, later)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"{tmp_path / STATE_FILE}: cannot write (No space left on device); "
                               "the previous file is unchanged")
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path).epoch == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["meta.json", STATE_FILE]), "no temporary file left"
