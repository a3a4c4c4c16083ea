"""Writing a store: the driver's ``StoreWriter`` (allocate, commit, finalize) and the subject writes.

Protocol (``docs/store.md``, "Commit protocol"):

1. The driver **allocates** a subject's place from its :class:`SubjectSummary` (no pixels):
   chunk-aligned rows of ``images``/``labels`` and a ``native_chunk``-aligned range of the native
   arrays, after everything allocated so far, growing the arrays when needed.
2. Whoever holds the pixels (a Ray worker, or the driver itself) **writes** them with
   :func:`write_subject_data`: whole chunks that no other subject touches.
3. The driver **commits** subjects in allocation order: it writes their per-row metadata
   (``meta/*``, ``label_slice``: small, chunk-bounded writes), then publishes one commit-log entry
   (one small object, :mod:`datastore.commitlog`). A subject is visible once its entry exists,
   so it appears completely or not at all; everything allocated after the last entry is garbage
   that the next run's allocations overwrite.

``finalize`` compacts the log, trims the arrays to the committed extents and writes ``hash`` and
``complete`` into the root attributes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datastore.commitlog import CommitConflict, CommitLog, LogState, entry_name
from datastore.store.create import initial_attrs, open_or_create
from datastore.store.layout import (
    DEFAULT_CHUNK_SLICES,
    DEFAULT_NATIVE_CHUNK,
    META_DTYPES,
    PHASES,
    Allocation,
    StoreError,
    SubjectRecord,
    SubjectSummary,
    dataset_hash,
    is_url,
    round_up,
    store_arg,
)
from datastore.store.lock import WriterLock
from datastore.store.reader import commit_view

#: Arrays grow by at least this fraction when an allocation passes their end (fewer resizes).
GROWTH = 0.5


@dataclass
class PendingSubject:
    """A subject written (or being written) but not yet committed: its summary and its place."""

    summary: SubjectSummary
    allocation: Allocation

    @property
    def row(self) -> dict[str, Any]:
        """The subject-table row this subject will commit."""
        a, s = self.allocation, self.summary
        return {
            "subject_id": s.subject_id,
            "dataset": s.dataset,
            **s.info,
            "first_row": a.first_row,
            "n_rows": a.n_rows,
            "first_label_row": a.first_label_row,
            "n_labels": a.n_labels,
            "native_offsets": dict(a.native_offsets),
        }


def write_subject_data(store: str | Any, record: SubjectRecord, allocation: Allocation) -> float:
    """Write ``record``'s pixels at ``allocation``: whole chunks owned by this subject alone.

    ``store`` is the store path/URL (a Ray worker opens it itself) or an open root group. Padding
    up to the chunk boundaries is written as zeros, so the stored bytes do not depend on what an
    interrupted run left there. Idempotent: a retried write gives the same chunks. Returns the
    seconds it took (a stage cost of ``benchmarks/ingest.py``).
    """
    import time

    import zarr

    start = time.perf_counter()
    group = zarr.open_group(store, mode="r+") if isinstance(store, str) else store
    a = allocation
    images = np.zeros((a.rows_end - a.first_row, *record.images.shape[1:]), np.float16)
    images[: a.n_rows] = record.images
    group["images"][a.first_row : a.rows_end] = images
    if a.labels_end > a.first_label_row:
        labels = np.zeros((a.labels_end - a.first_label_row, *record.labels.shape[1:]), np.uint8)
        labels[: a.n_labels] = record.labels
        group["labels"][a.first_label_row : a.labels_end] = labels
    if a.native_end > a.native_start:
        for index, (name, dtype) in enumerate((("native/image", np.float32), ("native/label", np.uint8))):
            flat = np.zeros(a.native_end - a.native_start, dtype)
            for phase, offset in a.native_offsets.items():
                volume = np.asarray(record.native[phase][index], dtype=dtype).reshape(-1)
                flat[offset - a.native_start : offset - a.native_start + volume.size] = volume
            group[name][a.native_start : a.native_end] = flat
    return time.perf_counter() - start


class StoreWriter:
    """The one writer of a store (the ingest driver): allocates, commits, finalizes.

    A local store is locked for the writer's lifetime (:class:`WriterLock`); ``finalize`` and
    ``close`` release it, and any later write takes it again. fsspec URLs (``s3://``...) have no
    lock: run one ingest per store there (the commit log refuses a second writer's commit).
    """

    def __init__(self, group: Any, path: str, lock: WriterLock | None = None) -> None:
        self.group = group
        self.path = path
        self._lock = lock
        attrs = dict(group.attrs)
        self.image_size = int(attrs["image_size"])
        self.chunk_slices = int(attrs["chunk_slices"])
        self.native_chunk = int(attrs["native_chunk"])
        self._log = CommitLog(path)
        self.state: LogState = self._log.read()
        self._reserved = self._counts()  # extents including allocated, uncommitted subjects
        self._pending: list[PendingSubject] = []
        self._marked_incomplete = not attrs.get("complete", False)
        self._lengths: dict[str, int] = {}
        self._arrays: dict[str, Any] = {}  # handles opened once: each open reads a zarr.json
        #: One-line notes for the user from opening the store (e.g. a stale lock taken over).
        self.warnings: list[str] = []

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        ingest_config: dict[str, Any],
        image_size: int,
        spacing: float,
        chunk_slices: int = DEFAULT_CHUNK_SLICES,
        extra_attrs: dict[str, Any] | None = None,
        native_chunk: int = DEFAULT_NATIVE_CHUNK,
    ) -> StoreWriter:
        """Create a new store at ``path`` or reopen an interrupted one with the same config.

        Takes the writer lock of a local store first (held until ``finalize`` or ``close``).

        Raises:
            StoreError: another writer holds the lock; the path holds something else, another
                schema or another ingest config; a CSV recorded in ``csv_checksums`` changed
                while subjects are committed.
        """
        target = store_arg(path)
        lock = None if is_url(target) else WriterLock(Path(target))
        notes = lock.acquire() if lock is not None else []
        try:
            fresh = initial_attrs(ingest_config, image_size, spacing, chunk_slices, native_chunk, extra_attrs)
            group = open_or_create(target, fresh, extra_attrs)
            writer = cls(group, target, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        writer.warnings = notes  # shown once, by the caller
        return writer

    # -- state -----------------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        counts = {"rows": 0, "label_rows": 0, "native_voxels": 0, "slices": 0, "labels": 0}
        counts.update({k: int(v) for k, v in self.state.counts.items()})
        return counts

    @property
    def commit(self) -> dict[str, Any]:
        """The committed record: counts and subject rows (see ``SliceStore.commit``)."""
        return commit_view(self.state)

    @property
    def done(self) -> set[tuple[str, str]]:
        """``(dataset, subject_id)`` of every committed subject."""
        return {(r["dataset"], r["subject_id"]) for r in self.state.rows}

    def close(self) -> None:
        """Release the writer lock (committed subjects stay; the store can be resumed)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_lock(self) -> None:
        """Take the lock again if ``finalize``/``close`` released it (raises if someone holds it)."""
        if self._lock is not None and not self._lock.held:
            self.warnings.extend(self._lock.acquire())

    def _conflict(self) -> StoreError:
        stored = len(self._log.read().rows)
        return StoreError(
            f"{self.path}: the commit record changed under this writer ({stored} subjects stored, "
            f"{len(self.state.rows)} expected): another process wrote to the store"
        )

    # -- allocate --------------------------------------------------------------------------
    def allocate(self, summary: SubjectSummary) -> PendingSubject:
        """Reserve chunk-aligned space for ``summary`` after everything reserved so far.

        Grows the arrays (by at least half their length) so that a worker can write there at once.
        """
        self._ensure_lock()
        r = self._reserved
        first_row, first_label, native_start = r["rows"], r["label_rows"], r["native_voxels"]
        offsets, position = {}, native_start
        for phase in (p for p in PHASES if p in summary.native_sizes):
            offsets[phase] = position
            position += int(summary.native_sizes[phase])
        allocation = Allocation(
            subject_index=len(self.state.rows) + len(self._pending),
            first_row=first_row,
            n_rows=summary.n_images,
            rows_end=round_up(first_row + summary.n_images, self.chunk_slices),
            first_label_row=first_label,
            n_labels=summary.n_labels,
            labels_end=round_up(first_label + summary.n_labels, self.chunk_slices),
            native_offsets=offsets,
            native_start=native_start,
            native_end=round_up(position, self.native_chunk),
        )
        r.update(rows=allocation.rows_end, label_rows=allocation.labels_end, native_voxels=allocation.native_end)
        for names, length in (
            (("images", *(f"meta/{k}" for k in META_DTYPES)), allocation.rows_end),
            (("labels", "label_slice"), allocation.labels_end),
            (("native/image", "native/label"), allocation.native_end),
        ):
            for name in names:
                self._ensure_length(name, length)
        pending = PendingSubject(summary, allocation)
        self._pending.append(pending)
        return pending

    def _array(self, name: str) -> Any:
        """The array ``name``, opened once (this writer is the only one that resizes it)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _ensure_length(self, name: str, length: int) -> None:
        if self._lengths.get(name, -1) >= length:
            return
        array = self._array(name)
        current = int(array.shape[0])
        if current < length:
            current = max(length, int(current * (1 + GROWTH)))
            array.resize((current, *array.shape[1:]))
        self._lengths[name] = current

    # -- the single-process path -------------------------------------------------------------
    def append(self, record: SubjectRecord, content_hash: str | None = None) -> dict[str, Any]:
        """Write ``record`` after the reserved space, then commit it. Returns its table row."""
        pending = self.write_rows(record, content_hash)
        self.commit_subject(pending)
        return pending.row

    def write_rows(self, record: SubjectRecord, content_hash: str | None = None) -> PendingSubject:
        """Allocate and write ``record`` in this process (invisible until :meth:`commit_subject`)."""
        if self._log.exists(self.state.next_seq):  # unlocked URL store: someone else committed
            raise self._conflict()
        pending = self.allocate(record.summary(content_hash))
        write_subject_data(self.group, record, pending.allocation)
        return pending

    # -- commit ----------------------------------------------------------------------------
    def commit_subject(self, pending: PendingSubject) -> None:
        """Commit one written subject (see :meth:`commit_subjects`)."""
        self.commit_subjects([pending])

    def commit_subjects(self, subjects: Sequence[PendingSubject]) -> None:
        """Make written subjects visible: their metadata, then one commit-log entry.

        ``subjects`` must be the oldest allocated, uncommitted subjects, in allocation order.

        Raises:
            StoreError: out of order, or another process committed to the store meanwhile.
        """
        if not subjects:
            return
        self._ensure_lock()
        if list(subjects) != self._pending[: len(subjects)]:
            raise StoreError(f"{self.path}: subject {subjects[0].summary.subject_id!r} committed out of allocation order")
        self._write_meta(subjects)
        counts = self._counts()
        for item in subjects:
            a = item.allocation
            counts.update(
                rows=a.rows_end, label_rows=a.labels_end, native_voxels=a.native_end,
                slices=counts["slices"] + a.n_rows, labels=counts["labels"] + a.n_labels,
            )  # fmt: skip
        rows = json.loads(json.dumps([item.row for item in subjects]))
        if not self._marked_incomplete:  # a finished store being extended: not finished any more
            self.group.attrs.update({"hash": None, "complete": False})
            self._marked_incomplete = True
        try:
            self._log.append(self.state.next_seq, rows, counts)
        except CommitConflict:
            raise self._conflict() from None
        self.state.rows.extend(rows)
        self.state.counts = counts
        self.state.entries.append(entry_name(self.state.next_seq, self.state.next_seq))
        self.state.next_seq += 1
        del self._pending[: len(subjects)]

    def _write_meta(self, subjects: Sequence[PendingSubject]) -> None:
        """Per-row metadata and ``label_slice`` of ``subjects`` (one write per array, padding included)."""
        first, end = subjects[0].allocation.first_row, subjects[-1].allocation.rows_end
        l_first, l_end = subjects[0].allocation.first_label_row, subjects[-1].allocation.labels_end
        meta = {k: np.zeros(end - first, META_DTYPES[k]) for k in META_DTYPES}
        meta["subject"][:] = -1
        meta["label_row"][:] = -1
        label_slice = np.full(l_end - l_first, -1, np.int64)
        for item in subjects:
            a, s = item.allocation, item.summary
            rows = slice(a.first_row - first, a.first_row - first + a.n_rows)
            meta["subject"][rows] = a.subject_index
            for key in s.meta:
                meta[key][rows] = s.meta[key]
            label_row = np.full(a.n_rows, -1, np.int32)
            label_row[s.label_rows] = a.first_label_row + np.arange(a.n_labels, dtype=np.int32)
            meta["label_row"][rows] = label_row
            meta["labelled"][rows] = label_row >= 0
            label_slice[a.first_label_row - l_first : a.first_label_row - l_first + a.n_labels] = a.first_row + s.label_rows
        writes = [(f"meta/{key}", first, end, values) for key, values in meta.items()]
        if l_end > l_first:
            writes.append(("label_slice", l_first, l_end, label_slice))
        _write_concurrently([(self._array(name), lo, hi, values) for name, lo, hi, values in writes])

    # -- finish ----------------------------------------------------------------------------
    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> str:
        """Compact the log, trim arrays to the committed extents, write ``hash`` and ``complete``.

        A ``skipped`` list in ``extra_attrs`` is merged into the stored one (:func:`merge_skipped`).
        Releases the writer lock. Returns the dataset hash.
        """
        self._ensure_lock()
        if self._log.exists(self.state.next_seq):
            raise self._conflict()
        values = json.loads(json.dumps(extra_attrs or {}))
        if "skipped" in values:
            values["skipped"] = merge_skipped(self.group.attrs.get("skipped") or [], values["skipped"], self.done)
        self._log.compact(self.state)
        counts = self._counts()
        for names, length in (
            (("images", *(f"meta/{k}" for k in META_DTYPES)), counts["rows"]),
            (("labels", "label_slice"), counts["label_rows"]),
            (("native/image", "native/label"), counts["native_voxels"]),
        ):
            for name in names:
                array = self._array(name)
                if array.shape[0] != length:
                    array.resize((length, *array.shape[1:]))
                self._lengths.pop(name, None)
        self._reserved = counts
        self._pending.clear()
        digest = dataset_hash((r["dataset"], r["subject_id"], r["content_hash"]) for r in self.state.rows)
        self.group.attrs.update({**values, "hash": digest, "complete": True})
        self._marked_incomplete = False
        self.close()
        return digest


def _write_concurrently(writes: Sequence[tuple[Any, int, int, np.ndarray]]) -> None:
    """``array[lo:hi] = values`` for each write, issued together (one round of I/O, not one per array)."""
    import asyncio

    from zarr.core.sync import sync

    async def all_writes() -> None:
        await asyncio.gather(*(array._async_array.setitem(slice(lo, hi), values) for array, lo, hi, values in writes))

    sync(all_writes())


def merge_skipped(
    previous: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]], committed: set[tuple[str, str]]
) -> list[dict[str, Any]]:
    """Skipped-subject entries of earlier runs and this one: union by ``(dataset, subject_id)``.

    Earlier entries keep their position (the latest reason wins); new ones follow in their order;
    subjects committed since are dropped.
    """
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in [*previous, *current]:
        key = (str(entry["dataset"]), str(entry["subject_id"]))
        if key not in committed:
            merged[key] = {**merged.get(key, {}), **entry}
    return list(merged.values())
