"""The writer lock of a local store (``datastore.locks.ExclusiveLock`` with the store's messages)."""

from __future__ import annotations

from pathlib import Path

from datastore.locks import ExclusiveLock
from datastore.store.layout import LOCK_NAME, StoreError


class WriterLock(ExclusiveLock):
    """Exclusive writer lock of a local store: ``<store>/.sspctl-writer.lock`` (``datastore.locks``).

    A lock file left by a killed ingest is stale as soon as nobody holds it: the next writer takes it
    over with one warning.
    """

    error = StoreError

    def __init__(self, store_dir: Path) -> None:
        super().__init__(store_dir / LOCK_NAME)
        self.store_dir = store_dir

    def acquire(self) -> list[str]:
        if self._fd is None and self.store_dir.exists() and not self.store_dir.is_dir():
            raise StoreError(f"{self.store_dir}: exists and is not a directory (not a zarr store)")
        return super().acquire()

    def busy_message(self, holder: str) -> str:
        return f"store {self.store_dir} is being written by {holder}; wait for that ingest to finish or use another --store path"

    def takeover_message(self, holder: str) -> str:
        return f"store {self.store_dir}: taking over the writer lock left by {holder}, which no longer holds it (killed?); resuming"
