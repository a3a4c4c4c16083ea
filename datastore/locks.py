"""One exclusive, crash-safe lock file per resource: ``fcntl.flock`` plus who holds it.

Used for a store's writer (``datastore.store.WriterLock``) and for runs (pretraining, a grid, a grid
cell: ``orchestrator.run_lock``). The file holds the holder's pid, host and start time, for the
message a second process gets. The kernel drops a ``flock`` when its process dies, so a lock file
left by a killed process is stale as soon as nobody holds it: the next process takes it over and
reports that once (as a warning string). Releasing removes the file. A second acquirer in the same
process (another ``ExclusiveLock`` on the same file) is refused like any other.

Local filesystems only (``flock`` on NFS depends on the mount).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def holder_text(holder: Mapping[str, Any]) -> str:
    """``pid N on HOST (since TIME)`` from a lock file's content (``?`` for unknown fields)."""
    since = f" (since {holder['since']})" if holder.get("since") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{since}"


def _read_holder(fd: int) -> dict[str, Any]:
    """The JSON ``{"pid", "host", "since"}`` written by the lock's holder; ``{}`` if unreadable."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


_HELD: weakref.WeakSet[ExclusiveLock] = weakref.WeakSet()


class ExclusiveLock:
    """An exclusive lock on ``path`` (see the module doc).

    Subclasses name the resource in their messages (:meth:`busy_message`, :meth:`takeover_message`)
    and choose the exception raised (``error``).
    """

    #: Exception raised when the lock is held elsewhere or cannot be created.
    error: type[Exception] = RuntimeError

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def busy_message(self, holder: str) -> str:
        """The one line for a second acquirer; ``holder`` is ``pid N on HOST (since T)``."""
        return f"{self.path} is locked by {holder}"

    def takeover_message(self, holder: str) -> str:
        """The one warning when a stale lock left by ``holder`` is taken over."""
        return f"{self.path}: taking over the lock left by {holder}, which no longer holds it (killed?)"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> list[str]:
        """Take the lock (idempotent); returns warnings (a stale lock taken over, at most one).

        Raises:
            ``self.error``: another process (or lock object) holds it, or the file cannot be created.
        """
        if self._fd is not None:
            return []
        for _ in range(5):  # the file may be removed by a releasing holder between open and flock
            fd = self._open_locked()
            if fd is None:
                continue
            previous = _read_holder(fd)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            _HELD.add(self)
            same_process = previous.get("pid") == me["pid"] and previous.get("host") == me["host"]
            if not previous or same_process:
                return []
            return [self.takeover_message(holder_text(previous))]
        raise self.error(f"{self.path}: the lock file keeps being replaced; retry")

    def _open_locked(self) -> int | None:
        """Open and flock the lock file; None if it was replaced meanwhile (retry)."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self.error(f"{self.path}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise self.error(self.busy_message(holder_text(holder))) from None
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(self)
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass  # already gone: nothing to clean up
        finally:
            os.close(fd)

    def __del__(self) -> None:
        self.release()


@atexit.register
def _release_held_locks() -> None:
    """Remove the lock files of holders never released (the kernel would drop the locks anyway)."""
    for lock in list(_HELD):
        lock.release()
