"""Atomic, pickle-free torch files: the one way checkpoints and weight files are written and read."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

#: Lines of torch's load errors that advise loading with ``weights_only=False`` (code execution):
#: never shown to the user.
_UNSAFE_ADVICE = re.compile(r"weights.only|trust the source|arbitrary code|torch\.serialization\.|safe_globals", re.I)


class DiskWriteError(OSError):
    """A torch file could not be written (e.g. the disk is full); the previous file is unchanged."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a hidden temporary file beside ``path``, then rename it into place.

    A reader (or a resumed run) never sees a half-written file.

    Raises:
        DiskWriteError: the write failed (ENOSPC, EIO, ...); the temporary file is removed and
            ``path`` keeps its previous content, so a resumed run starts from the last good file.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch wraps some write errors in RuntimeError
        tmp.unlink(missing_ok=True)
        errno = getattr(exc, "errno", None)
        reason = (os.strerror(errno) if errno else str(exc).strip().splitlines()[0][:200]) or type(exc).__name__
        raise DiskWriteError(errno or 0, f"{path}: cannot write ({reason}); the previous file is unchanged") from None


def load_failure_reason(exc: BaseException) -> str:
    """The specific cause of a failed safe load (first sentence), without torch's advice to load unsafely."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return f"{found.group(0)}: a pickled object, not a plain tensor dict"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _UNSAFE_ADVICE.search(line)]
    return (lines[0].split(". ")[0] if lines else type(exc).__name__)[:200]


def safe_torch_load(path: Path, error: type[Exception], what: str) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU; any problem raises ``error`` in one line.

    ``what`` names the expected kind of file in the message (``"weights file"``, ``"checkpoint"``).
    The message never suggests loading the file unsafely.
    """
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem becomes one clear line
        raise error(
            f"{path}: not a readable safe {what} (damaged, truncated or not written by sspctl: {load_failure_reason(exc)})"
        ) from None
