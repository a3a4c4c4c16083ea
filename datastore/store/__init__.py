"""The Zarr v3 slice store (schema 2): layout, reader, writer lock, writer, checks.

Modules: ``layout`` (constants, node specs, records, hashes), ``reader`` (``SliceStore``),
``lock`` (``WriterLock``), ``create`` (open/create on disk), ``writer`` (``StoreWriter`` and the
per-subject writes of parallel ingest), ``check`` (``store_info``, ``validate_store``); the
commit log is ``datastore.commitlog``. Everything is re-exported here, so
``from datastore.store import SliceStore`` keeps working. Full description: ``docs/store.md``.
"""

from datastore.store.check import store_info, store_size_bytes, unreadable_chunks, validate_store
from datastore.store.layout import (
    DEFAULT_CHUNK_SLICES,
    DEFAULT_NATIVE_CHUNK,
    LOCK_NAME,
    META_DTYPES,
    NODE_NAMES,
    PHASES,
    SCHEMA_VERSION,
    Allocation,
    CorruptChunkError,
    StoreError,
    SubjectRecord,
    SubjectSummary,
    dataset_hash,
    subject_content_hash,
    unreadable,
)
from datastore.store.lock import WriterLock
from datastore.store.reader import NativeVolume, SliceStore
from datastore.store.writer import PendingSubject, StoreWriter, merge_skipped, write_subject_data

__all__ = [
    "DEFAULT_CHUNK_SLICES", "DEFAULT_NATIVE_CHUNK", "LOCK_NAME", "META_DTYPES", "NODE_NAMES", "PHASES", "SCHEMA_VERSION",
    "Allocation", "CorruptChunkError", "NativeVolume", "PendingSubject", "SliceStore", "StoreError", "StoreWriter",
    "SubjectRecord", "SubjectSummary", "WriterLock", "dataset_hash", "merge_skipped", "store_info", "store_size_bytes",
    "subject_content_hash", "unreadable", "unreadable_chunks", "validate_store", "write_subject_data",
]  # fmt: skip
