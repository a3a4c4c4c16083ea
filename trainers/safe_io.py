"""Atomic, pickle-free torch files: the one way checkpoints and weight files are written and read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a hidden temporary file beside ``path``, then rename it into place.

    A reader (or a resumed run) never sees a half-written file.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def safe_torch_load(path: Path, error: type[Exception], what: str) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; any problem raises ``error`` in one line.

    ``what`` names the expected kind of file in the message (``"weights file"``, ``"checkpoint"``).
    """
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem becomes one clear line
        raise error(f"{path}: not a readable safe {what} ({str(exc).splitlines()[0][:200]})") from None
