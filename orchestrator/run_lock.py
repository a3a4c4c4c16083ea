"""Run locks: one process at a time per pretraining run, per grid and per grid cell.

The lock is ``datastore.locks.ExclusiveLock`` (the store writer's lock, generalised): a second
command on the same run fails with :class:`RunLockedError` naming the holder's pid and host (the
CLI exits 2); a lock left by a killed run is taken over with one warning.

Lock files: ``<workspace>/pretrain/<run>/.sspctl-run.lock``,
``<workspace>/finetune/<study>/.grid-<grid id>.lock`` and ``<cell output>/.sspctl-run.lock``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from datastore.locks import ExclusiveLock

log = logging.getLogger("sspctl.lock")

RUN_LOCK_NAME = ".sspctl-run.lock"


class RunLockedError(RuntimeError):
    """Another process runs the same thing; one line naming it and the holder (exit code 2)."""


class RunLock(ExclusiveLock):
    """The lock of one run (``what`` names it in messages, e.g. ``pretraining run pretrain-mim-ab12``)."""

    error = RunLockedError

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(path)
        self.what = what

    def busy_message(self, holder: str) -> str:
        return f"{self.what} is already running as {holder}; wait for it to finish or stop it (lock {self.path})"

    def takeover_message(self, holder: str) -> str:
        return f"{self.what}: taking over the lock left by {holder}, which no longer runs (killed?); resuming"


@contextlib.contextmanager
def run_lock(path: Path, what: str, warn: Callable[[str], None] | None = None) -> Iterator[RunLock]:
    """Hold the run lock at ``path`` for the ``with`` block; a stale-lock take-over is reported once.

    Args:
        warn: where the take-over warning goes (default: this module's logger).

    Raises:
        RunLockedError: another process holds the lock.
    """
    lock = RunLock(path, what)
    for note in lock.acquire():
        (warn or log.warning)(note)
    try:
        yield lock
    finally:
        lock.release()


def grid_lock_path(workspace_root: Path, study: str, grid_id: str) -> Path:
    """``<workspace>/finetune/<study>/.grid-<grid id>.lock`` (names checked by ``orchestrator.paths``)."""
    from orchestrator.paths import inside

    return inside(workspace_root, "finetune", study) / f".grid-{grid_id}.lock"
