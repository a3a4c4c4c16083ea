"""The Zarr v3 slice store: layout, the single append writer, and the read API ``SliceStore``.

Layout (``schema_version`` 1; full description in ``docs/store.md``)::

    <root>/zarr.json           root attributes: schema_version, ingest_config, package_version,
                               image_size, spacing, chunk_slices, csv_checksums, commit, hash, complete
    images        float16 (N, S, S)   every slice of every frame, z-scored per subject
    labels        uint8   (L, S, S)   labels of the ED and ES slices only
    label_slice   int64   (L,)        slice row of each label row
    meta/subject  int32   (N,)        row in the subject table
    meta/frame, meta/slice, meta/slice_count  int16 (N,)
    meta/phase    int8    (N,)        0 other, 1 ED, 2 ES
    meta/labelled bool    (N,)
    meta/label_row int32  (N,)        row in ``labels`` or -1
    native/<dataset>-<subject_id>/<ED|ES>/image float32 (Z, Y, X), label uint8 (Z, Y, X)

Commit protocol: a subject's rows are written first, then one root-attribute update (a single
atomic object write) records the new counts and the subject's table row. Rows beyond the
committed counts are garbage from an interrupted run and are overwritten by the next append.
``finalize`` trims the arrays to the committed counts and writes the content hash.

One writer at a time: a local store is locked by its ``StoreWriter`` (``fcntl.flock`` on
``<store>/.sspctl-writer.lock``, released by ``finalize``/``close`` or the end of the process);
fsspec URLs have no lock. See ``docs/store.md`` ("Concurrency").

Zarr, fsspec and tensorstore handles are not fork-safe: a ``SliceStore`` opens its arrays lazily on
first use and pickles by path, so create it (or unpickle it) inside each worker process.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datastore.locks import ExclusiveLock

SCHEMA_VERSION = 1
PHASES = ("ED", "ES")
META_DTYPES: dict[str, str] = {
    "subject": "int32",
    "frame": "int16",
    "slice": "int16",
    "slice_count": "int16",
    "phase": "int8",
    "labelled": "bool",
    "label_row": "int32",
}
#: Slices per stored chunk of ``images``/``labels`` (measured in docs/store.md, "Chunk layout").
DEFAULT_CHUNK_SLICES = 32
#: The writer lock of a local store: a file in the store directory, ``fcntl.flock``-ed by the writer.
LOCK_NAME = ".sspctl-writer.lock"
#: Nodes every store holds (``None`` = a group), in creation order.
NODE_NAMES = ("images", "labels", "label_slice", "meta", *(f"meta/{k}" for k in META_DTYPES), "native")
_GROUP_NODES = ("meta", "native")


class StoreError(ValueError):
    """The store is missing, of another schema, or inconsistent; the message names the path."""


class CorruptChunkError(StoreError):
    """Stored data could not be read (a damaged or truncated chunk); names store, array and rows."""


def unreadable(store: str, array: str, start: int, stop: int, exc: BaseException) -> CorruptChunkError:
    """The one-line error for a failed read of rows ``[start, stop)`` of ``array`` in ``store``."""
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return CorruptChunkError(
        f"store {store}: array {array} rows [{start}, {stop}) unreadable ({reason}); "
        f"`sspctl store validate {store}` lists the damaged chunks"
    )


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("sspctl")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


def _is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def _store_arg(path: str | os.PathLike[str]) -> str:
    return str(path) if _is_url(path) else str(Path(path).expanduser())


def subject_key(dataset: str, subject_id: str) -> str:
    """Group name of a subject under ``native/`` (ids are validated to be path-safe at read time)."""
    return f"{dataset}-{subject_id}"


def dataset_hash(subject_hashes: Iterable[tuple[str, str, str]]) -> str:
    """Content hash of a store: sha256 over sorted ``dataset/subject_id:subject_hash`` lines.

    Sorting makes it independent of the order in which subjects completed.
    """
    lines = sorted(f"{d}/{s}:{h}" for d, s, h in subject_hashes)
    digest = hashlib.sha256(f"sspctl-store-v{SCHEMA_VERSION}\n".encode())
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


@dataclass
class SubjectRecord:
    """Everything the writer appends for one subject (output of ``preprocess``).

    Attributes:
        dataset, subject_id: identity (``mnms``/``mnms2``, the dataset's own id).
        images: float16 ``(n, S, S)``, frames first then slices (``t * Z + z``).
        frame, slice, slice_count, phase: int ``(n,)`` per-slice metadata.
        labels: uint8 ``(m, S, S)`` for the labelled slices.
        label_rows: int ``(m,)`` index into ``images`` (subject-local) of each label.
        native: ``{"ED"|"ES": (image float32 (Z, Y, X), label uint8 (Z, Y, X))}``; empty for an
            unlabelled subject (``info["labelled"]`` False: no labels, pretraining only).
        info: JSON-able subject-table fields (vendor, geometry, intensity statistics, sources...).
        warnings: one-line notes for the user (e.g. an ambiguous base/apex decision); not stored.
    """

    dataset: str
    subject_id: str
    images: np.ndarray
    frame: np.ndarray
    slice: np.ndarray
    slice_count: np.ndarray
    phase: np.ndarray
    labels: np.ndarray
    label_rows: np.ndarray
    native: dict[str, tuple[np.ndarray, np.ndarray]]
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def content_hash(self) -> str:
        """sha256 of exactly the bytes the store holds for this subject."""
        return subject_content_hash(
            self.dataset,
            self.subject_id,
            self.images,
            {k: getattr(self, k) for k in ("frame", "slice", "slice_count", "phase")},
            self.labels,
            self.label_rows,
            self.native,
        )


def subject_content_hash(
    dataset: str,
    subject_id: str,
    images: np.ndarray,
    meta: dict[str, np.ndarray],
    labels: np.ndarray,
    label_rows: np.ndarray,
    native: dict[str, tuple[np.ndarray, np.ndarray]],
) -> str:
    """sha256 over a subject's stored arrays in their stored dtypes (used by ingest and validate)."""
    digest = hashlib.sha256(f"{dataset}/{subject_id}\n".encode())

    def add(name: str, array: np.ndarray, dtype: str) -> None:
        array = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        digest.update(f"{name}:{array.shape}\n".encode())
        digest.update(array.tobytes())

    add("images", images, "float16")
    for key in ("frame", "slice", "slice_count", "phase"):
        add(key, meta[key], META_DTYPES[key])
    add("labels", labels, "uint8")
    add("label_rows", label_rows, "int64")
    for phase in (p for p in PHASES if p in native):  # an unlabelled subject has none
        image, label = native[phase]
        add(f"native/{phase}/image", image, "float32")
        add(f"native/{phase}/label", label, "uint8")
    return digest.hexdigest()


@dataclass(frozen=True)
class NativeVolume:
    """A subject's ED or ES volume at native resolution, canonical orientation (base at ``Z = 0``).

    Attributes:
        image: float32 ``(Z, Y, X)``, z-scored with the subject's 4D-cine statistics.
        label: uint8 ``(Z, Y, X)`` in {0, 1, 2, 3}.
        spacing_zyx: voxel spacing in mm.
        affine: native NIfTI affine (voxel ``(i, j, k)`` of the source file -> RAS+ mm).
        flip_z: whether the native slice order was reversed to put the base at ``Z = 0``.
        center_yx: heart centre (native canonical pixel coords) the store's slices are centred on.
        subject_id, dataset, phase: identity.
    """

    image: np.ndarray
    label: np.ndarray
    spacing_zyx: tuple[float, float, float]
    affine: np.ndarray
    flip_z: bool
    center_yx: tuple[float, float]
    subject_id: str
    dataset: str
    phase: str

    @property
    def geometry(self) -> Any:
        """The :class:`datastore.geometry.NativeGeometry` to resample and map predictions back."""
        from datastore.geometry import NativeGeometry

        return NativeGeometry(
            shape_zyx=tuple(int(n) for n in self.image.shape),  # type: ignore[arg-type]
            spacing_zyx=self.spacing_zyx,
            affine=self.affine,
            flip_z=self.flip_z,
        )


class SliceStore:
    """Read API over a finished (or partially ingested) store; see the module docstring.

    Only committed rows are visible. Arrays open lazily on first use; the object pickles by path.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = _store_arg(path)
        self._group: Any = None
        self._attrs: dict[str, Any] | None = None
        self._meta: dict[str, np.ndarray] | None = None
        self._subjects: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SliceStore:
        """Open the store at ``path`` (local path or fsspec URL) and check its schema."""
        store = cls(path)
        store.attrs  # noqa: B018 - fail early on a missing or foreign store
        return store

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    # -- handles ---------------------------------------------------------------------------
    @property
    def group(self) -> Any:
        """The root ``zarr.Group`` (opened on first use)."""
        if self._group is None:
            import zarr

            if not _is_url(self.path) and not Path(self.path).exists():
                raise StoreError(f"{self.path}: store not found")
            try:
                self._group = zarr.open_group(self.path, mode="r")
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"{self.path}: not a zarr v3 store ({exc})") from None
        return self._group

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (ingest config, checksums, commit record, hash...)."""
        if self._attrs is None:
            attrs = dict(self.group.attrs)
            version = attrs.get("schema_version")
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
                )
            self._attrs = attrs
        return self._attrs

    @property
    def commit(self) -> dict[str, Any]:
        return self.attrs["commit"]

    @property
    def n_slices(self) -> int:
        return int(self.commit["n_slices"])

    @property
    def n_labels(self) -> int:
        return int(self.commit["n_labels"])

    @property
    def image_size(self) -> int:
        return int(self.attrs["image_size"])

    @property
    def chunk_slices(self) -> int:
        """Slices per stored chunk of ``images``: read ranges aligned to this for full speed."""
        return int(self.attrs["chunk_slices"])

    @property
    def hash(self) -> str | None:
        """Content hash of the dataset (None until the ingest finished)."""
        return self.attrs.get("hash")

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    # -- tables ----------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, np.ndarray]:
        """Per-slice metadata arrays of length ``n_slices`` (read once)."""
        if self._meta is None:
            n = self.n_slices
            self._meta = {k: np.asarray(self.group[f"meta/{k}"][:n]) for k in META_DTYPES}
        return self._meta

    @property
    def label_slice(self) -> np.ndarray:
        """int64 ``(L,)``: slice row of each row of ``labels``."""
        return np.asarray(self.group["label_slice"][: self.n_labels])

    @property
    def subjects(self) -> Any:
        """``pandas.DataFrame``: one row per subject, in the order of ``meta["subject"]``."""
        if self._subjects is None:
            import pandas as pd

            self._subjects = pd.DataFrame(self.commit["subjects"])
        return self._subjects

    # -- reads -----------------------------------------------------------------------------
    def _check_indices(self, indices: Sequence[int] | np.ndarray, limit: int, what: str) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= limit):
            raise IndexError(f"{self.path}: {what} index out of range [0, {limit})")
        return idx

    def read_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 ``(n, H, W)`` slices at ``indices`` (any order; duplicates allowed).

        Slow for scattered indices (zarr decodes whole chunks): prefer ``read_image_range``.
        """
        idx = self._check_indices(indices, self.n_slices, "slice")
        if idx.size == 0:
            return np.zeros((0, self.image_size, self.image_size), np.float32)
        unique, inverse = np.unique(idx, return_inverse=True)
        data = self._read_rows("images", unique)
        return np.asarray(data, dtype=np.float32)[inverse]

    def read_image_range(self, start: int, stop: int) -> np.ndarray:
        """float32 ``(stop - start, H, W)``: a contiguous run of slices (chunk-aligned is fastest)."""
        if not 0 <= start <= stop <= self.n_slices:
            raise IndexError(f"{self.path}: slice range [{start}, {stop}) outside [0, {self.n_slices})")
        return np.asarray(self._read_rows("images", slice(start, stop)), dtype=np.float32)

    def read_labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W)`` labels of the *slice rows* ``indices`` (all must be labelled)."""
        idx = self._check_indices(indices, self.n_slices, "slice")
        rows = self.meta["label_row"][idx]
        if (rows < 0).any():
            bad = idx[rows < 0][:5].tolist()
            raise IndexError(f"{self.path}: slices {bad} have no label (meta['labelled'] is False)")
        if rows.size == 0:
            return np.zeros((0, self.image_size, self.image_size), np.uint8)
        unique, inverse = np.unique(rows, return_inverse=True)
        data = self._read_rows("labels", unique)
        return np.asarray(data, dtype=np.uint8)[inverse]

    def _read_rows(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        """Rows of the 3D array ``name`` (a slice, or sorted unique indices).

        Raises:
            CorruptChunkError: a chunk could not be decoded (names the store, array and row range).
        """
        array = self.group[name]
        try:
            if isinstance(rows, slice):
                return np.asarray(array[rows])
            return np.asarray(array.get_orthogonal_selection((rows, slice(None), slice(None))))
        except Exception as exc:  # noqa: BLE001 - codec errors have no common type
            first, last = (rows.start, rows.stop) if isinstance(rows, slice) else (int(rows[0]), int(rows[-1]) + 1)
            raise unreadable(self.path, name, first, last, exc) from None

    def subject_row(self, subject_id: str, dataset: str | None = None) -> dict[str, Any]:
        """The subject-table row of ``subject_id`` (``dataset`` disambiguates equal ids)."""
        rows = [
            r
            for r in self.commit["subjects"]
            if r["subject_id"] == str(subject_id) and (dataset is None or r["dataset"] == dataset)
        ]
        if not rows:
            raise KeyError(f"{self.path}: no subject {subject_id!r}")
        if len(rows) > 1:
            raise KeyError(f"{self.path}: subject id {subject_id!r} is in several datasets; pass dataset=")
        return rows[0]

    def native(self, subject_id: str, phase: str, dataset: str | None = None) -> NativeVolume:
        """The native-resolution canonical ``phase`` ("ED"|"ES") image and label of a subject."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        row = self.subject_row(subject_id, dataset)
        if not row.get("labelled", True):
            raise KeyError(f"{self.path}: subject {row['dataset']}/{row['subject_id']} is unlabelled (no native ED/ES volumes)")
        name = f"native/{subject_key(row['dataset'], row['subject_id'])}/{phase}"
        node = self.group[name]
        try:
            image, label = np.asarray(node["image"][:], dtype=np.float32), np.asarray(node["label"][:], dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - codec errors have no common type
            raise unreadable(self.path, name, 0, int(row["native_shape_zyx"][0]), exc) from None
        return NativeVolume(
            image=image,
            label=label,
            spacing_zyx=tuple(float(v) for v in row["spacing_zyx"]),  # type: ignore[arg-type]
            affine=np.asarray(row["affine"], dtype=np.float64),
            flip_z=bool(row["flip_z"]),
            center_yx=tuple(float(v) for v in row["center_yx"]),  # type: ignore[arg-type]
            subject_id=row["subject_id"],
            dataset=row["dataset"],
            phase=phase,
        )

    def subject_slices(self, subject_id: str, dataset: str | None = None) -> slice:
        """The contiguous slice rows ``[first_row, first_row + n_rows)`` of one subject."""
        row = self.subject_row(subject_id, dataset)
        return slice(int(row["first_row"]), int(row["first_row"]) + int(row["n_rows"]))


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


class StoreWriter:
    """The one writer of a store (the ingest driver). Appends whole subjects atomically.

    A local store is locked for the writer's lifetime (:class:`WriterLock`); ``finalize`` and
    ``close`` release it, and any later write takes it again. fsspec URLs (``s3://``...) have no
    lock: run one ingest per store there.
    """

    def __init__(self, group: Any, path: str, lock: WriterLock | None = None) -> None:
        self.group = group
        self.path = path
        self._lock = lock
        attrs = dict(group.attrs)
        self.commit: dict[str, Any] = attrs["commit"]
        self.image_size = int(attrs["image_size"])
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
    ) -> StoreWriter:
        """Create a new store at ``path`` or reopen an interrupted one with the same config.

        Takes the writer lock of a local store first (held until ``finalize`` or ``close``).

        Raises:
            StoreError: another writer holds the lock; the path holds something else, another
                schema or another ingest config; a CSV recorded in ``csv_checksums`` changed
                while subjects are committed.
        """
        target = _store_arg(path)
        lock = None if _is_url(target) else WriterLock(Path(target))
        notes = lock.acquire() if lock is not None else []
        try:
            fresh = _initial_attrs(ingest_config, image_size, spacing, chunk_slices, extra_attrs)
            group = _open_or_create(target, fresh, extra_attrs, image_size, chunk_slices)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        writer = cls(group, target, lock)
        writer.warnings = notes  # shown once, by the caller
        return writer

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

    def _check_commit_unchanged(self) -> None:
        """Re-read the commit record (one small object read): refuse to write over another writer."""
        import zarr

        stored = dict(zarr.open_group(self.group.store, mode="r").attrs).get("commit") or {}
        counts = [(c.get("n_slices"), c.get("n_labels"), len(c.get("subjects", []))) for c in (stored, self.commit)]
        if counts[0] != counts[1]:
            raise StoreError(
                f"{self.path}: the commit record changed under this writer ({counts[0][2]} subjects "
                f"stored, {counts[1][2]} expected): another process wrote to the store"
            )

    def _update_attrs(self, values: dict[str, Any]) -> None:
        # One update = one rewrite of the root zarr.json (an atomic object write).
        self.group.attrs.update(json.loads(json.dumps(values)))

    @property
    def done(self) -> set[tuple[str, str]]:
        """``(dataset, subject_id)`` of every committed subject."""
        return {(r["dataset"], r["subject_id"]) for r in self.commit["subjects"]}

    def _ensure_length(self, name: str, length: int) -> Any:
        array = self.group[name]
        if array.shape[0] < length:
            array.resize((length, *array.shape[1:]))
        return array

    def append(self, record: SubjectRecord, content_hash: str | None = None) -> dict[str, Any]:
        """Write ``record``'s rows after the committed ones, then commit it. Returns its table row."""
        row = self.write_rows(record, content_hash)
        self.commit_subject(row)
        return row

    def write_rows(self, record: SubjectRecord, content_hash: str | None = None) -> dict[str, Any]:
        """Write ``record``'s data after the committed rows (invisible until :meth:`commit_subject`).

        Returns the subject-table row to commit.
        """
        self._ensure_lock()
        n0, l0 = int(self.commit["n_slices"]), int(self.commit["n_labels"])
        n, m = record.images.shape[0], record.labels.shape[0]
        n1, l1 = n0 + n, l0 + m
        subject_row = len(self.commit["subjects"])
        self._ensure_length("images", n1)[n0:n1] = record.images.astype(np.float16, copy=False)
        self._ensure_length("labels", l1)[l0:l1] = record.labels.astype(np.uint8, copy=False)
        self._ensure_length("label_slice", l1)[l0:l1] = n0 + np.asarray(record.label_rows, np.int64)
        label_row = np.full(n, -1, np.int32)
        label_row[np.asarray(record.label_rows, np.int64)] = l0 + np.arange(m, dtype=np.int32)
        values = {
            "subject": np.full(n, subject_row, np.int32),
            "frame": record.frame,
            "slice": record.slice,
            "slice_count": record.slice_count,
            "phase": record.phase,
            "labelled": label_row >= 0,
            "label_row": label_row,
        }
        for key, dtype in META_DTYPES.items():
            self._ensure_length(f"meta/{key}", n1)[n0:n1] = np.asarray(values[key], dtype=dtype)
        key = subject_key(record.dataset, record.subject_id)
        for phase in (p for p in PHASES if p in record.native):
            image, label = record.native[phase]
            for name, data, dtype in (("image", image, "float32"), ("label", label, "uint8")):
                _write_whole(self.group, f"native/{key}/{phase}/{name}", np.asarray(data, dtype=dtype))
        row = {
            "subject_id": record.subject_id,
            "dataset": record.dataset,
            **record.info,
            "first_row": n0,
            "n_rows": n,
            "first_label_row": l0,
            "n_labels": m,
            "content_hash": content_hash or record.content_hash(),
        }
        return row

    def commit_subject(self, row: dict[str, Any]) -> None:
        """Make a subject written by :meth:`write_rows` visible: one root-attribute update.

        Raises:
            StoreError: the row was not written at the end, or another process changed the commit.
        """
        self._ensure_lock()
        self._check_commit_unchanged()
        if row["first_row"] != self.commit["n_slices"] or row["first_label_row"] != self.commit["n_labels"]:
            raise StoreError(f"{self.path}: subject {row['subject_id']!r} was not written at the end of the store")
        commit = {
            "n_slices": row["first_row"] + row["n_rows"],
            "n_labels": row["first_label_row"] + row["n_labels"],
            "subjects": [*self.commit["subjects"], row],
        }
        self._update_attrs({"commit": commit, "hash": None, "complete": False})
        self.commit = json.loads(json.dumps(commit))

    def finalize(self, extra_attrs: dict[str, Any] | None = None) -> str:
        """Trim arrays to the committed counts, write ``hash`` and ``complete``; return the hash.

        A ``skipped`` list in ``extra_attrs`` is merged into the stored one (:func:`merge_skipped`).
        Releases the writer lock.
        """
        self._ensure_lock()
        self._check_commit_unchanged()
        values = json.loads(json.dumps(extra_attrs or {}))
        if "skipped" in values:
            values["skipped"] = merge_skipped(self.group.attrs.get("skipped") or [], values["skipped"], self.done)
        n, m = int(self.commit["n_slices"]), int(self.commit["n_labels"])
        for name in ("images", *(f"meta/{k}" for k in META_DTYPES)):
            array = self.group[name]
            if array.shape[0] != n:
                array.resize((n, *array.shape[1:]))
        for name in ("labels", "label_slice"):
            array = self.group[name]
            if array.shape[0] != m:
                array.resize((m, *array.shape[1:]))
        digest = dataset_hash(
            (r["dataset"], r["subject_id"], r["content_hash"]) for r in self.commit["subjects"]
        )
        self._update_attrs({**values, "hash": digest, "complete": True})
        self.close()
        return digest


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


def _initial_attrs(
    ingest_config: dict[str, Any],
    image_size: int,
    spacing: float,
    chunk_slices: int,
    extra_attrs: dict[str, Any] | None,
) -> dict[str, Any]:
    """Root attributes of a new store (JSON-normalised)."""
    import zarr

    return json.loads(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "package_version": _package_version(),
                "zarr_version": zarr.__version__,
                "ingest_config": ingest_config,
                "image_size": int(image_size),
                "spacing": float(spacing),
                "chunk_slices": int(chunk_slices),
                "commit": {"n_slices": 0, "n_labels": 0, "subjects": []},
                "hash": None,
                "complete": False,
                **(extra_attrs or {}),
            }
        )
    )


def _local_store_exists(target: str) -> bool:
    """True when ``target`` holds anything besides the writer lock file."""
    path = Path(target)
    if not path.exists():
        return False
    return not path.is_dir() or any(p.name != LOCK_NAME for p in path.iterdir())


def _open_or_create(
    target: str, fresh: dict[str, Any], extra_attrs: dict[str, Any] | None, image_size: int, chunk_slices: int
) -> Any:
    """The root group of a new, half-created or resumable store at ``target`` (lock held).

    ``fresh`` = the root attributes of a new store; ``extra_attrs`` (sources, csv_checksums) are
    merged into those of an existing one.

    A new store's root ``zarr.json`` is written once, with every schema attribute, before any
    array: a kill can leave arrays missing (recreated here while nothing is committed) but never
    a group without attributes. A group without attributes holding only empty sspctl nodes (left
    by an older version killed during creation) is completed as well.
    """
    import zarr

    exists = _url_exists(target) if _is_url(target) else _local_store_exists(target)
    if not exists:
        group = zarr.open_group(target, mode="w-" if _is_url(target) else "a", attributes=fresh)
        _create_nodes(group, image_size, chunk_slices, NODE_NAMES)
        return group
    try:
        group = zarr.open_group(target, mode="r+")
    except Exception as exc:  # noqa: BLE001
        raise StoreError(f"{target}: exists but is not a zarr store ({exc})") from None
    attrs = dict(group.attrs)
    if not attrs and _is_zarr_group_document(target) and _holds_only_empty_nodes(group):
        _create_nodes(group, image_size, chunk_slices, NODE_NAMES, overwrite=True)
        group.attrs.update(fresh)  # last: a kill before it leaves the same recognisable state
        return group
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{target}: exists and is not an sspctl store of schema_version {SCHEMA_VERSION}")
    if attrs.get("ingest_config") != fresh["ingest_config"]:
        raise StoreError(
            f"{target}: was ingested with another config ({_config_diff(attrs.get('ingest_config') or {}, fresh['ingest_config'])}); "
            "use a new --store path"
        )
    _complete_nodes(group, target, attrs)
    extra = json.loads(json.dumps(extra_attrs or {}))
    if attrs["commit"]["subjects"]:
        _check_csv_checksums(target, attrs.get("csv_checksums") or {}, extra.get("csv_checksums") or {})
    for key, value in extra.items():  # e.g. a rerun with only --mnms2 keeps the mnms root
        if isinstance(value, dict) and isinstance(attrs.get(key), dict):
            extra[key] = {**attrs[key], **value}
    if any(attrs.get(k) != v for k, v in extra.items()):
        group.attrs.update(extra)  # e.g. sources moved; a no-op rerun writes nothing
    return group


def _is_zarr_group_document(target: str) -> bool:
    """True if the root ``zarr.json`` is a complete zarr v3 group document (as zarr writes it)."""
    try:
        if _is_url(target):
            import fsspec

            with fsspec.open(f"{target.rstrip('/')}/zarr.json", "rb") as handle:
                document = json.loads(handle.read())
        else:
            document = json.loads((Path(target) / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("zarr_format") == 3 and document.get("node_type") == "group"


def _holds_only_empty_nodes(group: Any) -> bool:
    """True if every node under ``group`` is an empty sspctl array or group (nothing ingested)."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lock file is "not a component of a Zarr hierarchy"
        members = group.members(max_depth=None)
    for name, node in members:
        if name in _GROUP_NODES and isinstance(node, zarr.Group):
            continue
        if name in NODE_NAMES and isinstance(node, zarr.Array) and node.shape[:1] == (0,):
            continue
        return False
    return True


def _missing_nodes(group: Any) -> list[str]:
    missing = []
    for name in NODE_NAMES:
        try:
            group[name]
        except KeyError:
            missing.append(name)
    return missing


def _complete_nodes(group: Any, target: str, attrs: dict[str, Any]) -> None:
    """Create the nodes a creation killed half-way left out; refuse if subjects are committed."""
    missing = _missing_nodes(group)
    if not missing:
        return
    if attrs["commit"]["subjects"]:
        raise StoreError(f"{target}: node(s) {', '.join(missing)} missing from a store with committed subjects; use a new --store path")
    _create_nodes(group, int(attrs["image_size"]), int(attrs["chunk_slices"]), missing)


def _check_csv_checksums(target: str, stored: dict[str, str], current: dict[str, str]) -> None:
    """Refuse to resume when a metadata CSV (matched by file name) changed since it was ingested."""
    for path, digest in sorted(current.items()):
        for old_path, old in sorted(stored.items()):
            if Path(old_path).name == Path(path).name and old != digest:
                raise StoreError(
                    f"{path}: changed since subjects were ingested into {target} (sha256 {old[:12]}... -> "
                    f"{digest[:12]}...); resuming would mix old and new metadata: use a new --store path"
                )


def _url_exists(url: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    new = json.loads(json.dumps(new))
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown difference"


def _image_codecs() -> list[Any]:
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)]


def _node_spec(name: str, image_size: int, chunk_slices: int) -> dict[str, Any] | None:
    """``create_array`` keywords of node ``name`` (``None`` for a group)."""
    if name in _GROUP_NODES:
        return None
    s = int(image_size)
    if name in ("images", "labels"):
        return {
            "shape": (0, s, s), "dtype": "float16" if name == "images" else "uint8",
            "chunks": (chunk_slices, s, s), "compressors": _image_codecs(), "fill_value": 0,
            "dimension_names": ("slice" if name == "images" else "label", "y", "x"),
        }  # fmt: skip
    if name == "label_slice":
        return {"shape": (0,), "dtype": "int64", "chunks": (65536,), "fill_value": -1}
    dtype = META_DTYPES[name.split("/", 1)[1]]
    return {"shape": (0,), "dtype": dtype, "chunks": (65536,), "fill_value": False if dtype == "bool" else 0}


def _create_nodes(
    group: Any, image_size: int, chunk_slices: int, names: Sequence[str], overwrite: bool = False
) -> None:
    """Create the empty nodes ``names`` (of ``NODE_NAMES``) under the root ``group``."""
    for name in names:
        spec = _node_spec(name, image_size, chunk_slices)
        if spec is None:
            group.create_group(name, overwrite=overwrite)
            continue
        parent, _, leaf = name.rpartition("/")
        (group.require_group(parent) if parent else group).create_array(leaf, overwrite=overwrite, **spec)


def _write_whole(group: Any, name: str, data: np.ndarray) -> None:
    """Write ``data`` as one single-chunk array at ``name`` (replacing a leftover of a crashed run)."""
    from zarr.codecs import BloscCodec, BloscShuffle

    group.create_array(
        name, data=data, chunks=data.shape or (1,),
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)],
        overwrite=True,
    )


# -- inspection ------------------------------------------------------------------------------


def store_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the store occupies (local walk, or fsspec ``du`` for URLs)."""
    target = _store_arg(path)
    if _is_url(target):
        import fsspec

        fs, root = fsspec.core.url_to_fs(target)
        return int(fs.du(root))
    return sum(p.stat().st_size for p in Path(target).rglob("*") if p.is_file())


def store_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a store: counts, hash, per-dataset and per-vendor counts, size on disk."""
    store = SliceStore.open(path)
    rows = store.commit["subjects"]
    by_dataset: dict[str, dict[str, int]] = {}
    by_vendor: dict[str, dict[str, int]] = {}
    for row in rows:
        for table, key in ((by_dataset, row["dataset"]), (by_vendor, f"{row['dataset']}/{row.get('vendor')}")):
            entry = table.setdefault(key, {"subjects": 0, "slices": 0})
            entry["subjects"] += 1
            entry["slices"] += int(row["n_rows"])
    return {
        "path": store.path,
        "schema_version": store.attrs["schema_version"],
        "complete": store.complete,
        "hash": store.hash,
        "subjects": len(rows),
        "slices": store.n_slices,
        "labelled_slices": store.n_labels,
        "labelled_subjects": sum(bool(r.get("labelled", True)) for r in rows),
        "image_size": store.image_size,
        "spacing_mm": store.attrs.get("spacing"),
        "chunk_slices": store.chunk_slices,
        "by_dataset": dict(sorted(by_dataset.items())),
        "by_vendor": dict(sorted(by_vendor.items())),
        "skipped": len(store.attrs.get("skipped") or []),
        "size_bytes": store_size_bytes(path),
        "package_version": store.attrs.get("package_version"),
        "ingest_config": store.attrs.get("ingest_config"),
    }


def unreadable_chunks(group: Any, where: str, progress: bool = False) -> list[str]:
    """Read every chunk of every array under ``group``; one line per chunk that cannot be decoded.

    A missing chunk is not an error (zarr fills it); a damaged or truncated one is.
    """
    import zarr
    from tqdm import tqdm

    arrays = [(name, node) for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]
    problems: list[str] = []
    for name, array in tqdm(arrays, desc="chunks", unit="array", disable=not progress or None, leave=False):
        for index in np.ndindex(*array.cdata_shape):
            region = tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape, strict=True)
            )
            try:
                array[region]
            except Exception as exc:  # noqa: BLE001 - codec errors have no common type
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                rows = f" (rows [{region[0].start}, {region[0].stop}))" if region else ""
                problems.append(f"{where}: array {name} chunk {'.'.join(map(str, index))}{rows} unreadable ({reason})")
    return problems


def validate_store(path: str | os.PathLike[str], progress: bool = True) -> list[str]:
    """Check every invariant of a store; returns one line per violation (empty = valid).

    Checks: the ingest finished; array lengths agree with the committed counts; every chunk of every
    array decodes (one line per damaged chunk, naming array and chunk); metadata ranges
    (subject, frame, slice, slice_count, phase) agree with the subject table; labels exist exactly
    on the ED/ES slices of labelled subjects (none for ``labelled: false`` rows), point back to
    their slice and hold values in {0, 1, 2, 3}; images are finite; native volumes (labelled
    subjects only) match the table; every subject hash and the dataset hash recompute.
    """
    from tqdm import tqdm

    try:
        store = SliceStore.open(path)
        commit = store.commit
    except (StoreError, KeyError) as exc:
        return [str(exc) if isinstance(exc, StoreError) else f"{path}: missing root attribute {exc}"]
    where = store.path
    problems: list[str] = []
    if not store.complete:
        problems.append(f"{where}: ingest not finished (complete is false); rerun sspctl ingest")
    n, m, s = store.n_slices, store.n_labels, store.image_size
    group = store.group
    expected = {"images": (n, s, s), "labels": (m, s, s), "label_slice": (m,)}
    expected.update({f"meta/{k}": (n,) for k in META_DTYPES})
    for name, shape in expected.items():
        try:
            actual = tuple(group[name].shape)
        except KeyError:
            problems.append(f"{where}: array {name!r} is missing")
            continue
        if actual != shape:
            problems.append(f"{where}: {name} has shape {actual}, expected {shape} from the commit record")
    problems.extend(unreadable_chunks(group, where, progress))
    if problems:  # the content checks below need every chunk
        return problems
    meta = store.meta
    rows = commit["subjects"]
    label_slice = store.label_slice
    # Subject table against metadata.
    covered = np.zeros(n, dtype=np.int64)
    seen: set[tuple[str, str]] = set()
    for index, row in enumerate(rows):
        name = f"subject {row['dataset']}/{row['subject_id']}"
        if (row["dataset"], row["subject_id"]) in seen:
            problems.append(f"{where}: {name} appears twice in the subject table")
        seen.add((row["dataset"], row["subject_id"]))
        first, count, frames, slices = (int(row[k]) for k in ("first_row", "n_rows", "frames", "slices"))
        has_labels = bool(row.get("labelled", True))
        ed, es = (-1 if row.get(k) is None else int(row[k]) for k in ("ed", "es"))
        if count != frames * slices:
            problems.append(f"{where}: {name} has {count} rows, expected frames*slices = {frames * slices}")
        if first < 0 or first + count > n:
            problems.append(f"{where}: {name} rows [{first}, {first + count}) outside [0, {n})")
            continue
        covered[first : first + count] += 1
        part = slice(first, first + count)
        checks = {
            "subject": meta["subject"][part] == index,
            "frame": (meta["frame"][part] >= 0) & (meta["frame"][part] < frames),
            "slice": (meta["slice"][part] >= 0) & (meta["slice"][part] < slices),
            "slice_count": meta["slice_count"][part] == slices,
            "phase": meta["phase"][part]
            == np.where(meta["frame"][part] == ed, 1, np.where(meta["frame"][part] == es, 2, 0)),
            "labelled": meta["labelled"][part] == ((meta["phase"][part] > 0) & has_labels),
        }
        for key, ok in checks.items():
            if not np.all(ok):
                problems.append(f"{where}: meta/{key} disagrees with the subject table for {name}")
        n_labelled = int(meta["labelled"][part].sum())
        if n_labelled != int(row["n_labels"]) or n_labelled != 2 * slices * has_labels:
            problems.append(f"{where}: {name} has {n_labelled} labelled slices, expected {2 * slices * has_labels}")
    if np.any(covered != 1):
        problems.append(f"{where}: {int(np.sum(covered != 1))} slice rows are not owned by exactly one subject")
    # Labels only on ED/ES slices and pointing back.
    labelled = meta["labelled"]
    if np.any(labelled & (meta["phase"] == 0)):
        problems.append(f"{where}: meta/labelled marks slices that are not ED or ES slices")
    if not np.array_equal(labelled, meta["label_row"] >= 0):
        problems.append(f"{where}: meta/label_row disagrees with meta/labelled")
    label_rows = meta["label_row"][labelled]
    if not np.array_equal(np.sort(label_rows), np.arange(m)):
        problems.append(f"{where}: meta/label_row does not map one-to-one onto the {m} label rows")
    elif not np.array_equal(label_slice[label_rows], np.flatnonzero(labelled)):
        problems.append(f"{where}: label_slice does not point back to the labelled slices")
    # Content: values and hashes, one subject at a time.
    images, labels = group["images"], group["labels"]
    subject_hashes = []
    for row in tqdm(rows, desc="validate", unit="subject", disable=not progress or None, leave=False):
        name = f"subject {row['dataset']}/{row['subject_id']}"
        first, count = int(row["first_row"]), int(row["n_rows"])
        l_first, l_count = int(row["first_label_row"]), int(row["n_labels"])
        sub_images = np.asarray(images[first : first + count])
        sub_labels = np.asarray(labels[l_first : l_first + l_count])
        if not np.all(np.isfinite(sub_images)):
            problems.append(f"{where}: {name} has non-finite image values")
        if sub_labels.size and int(sub_labels.max()) > 3:
            problems.append(f"{where}: {name} has label values outside {{0, 1, 2, 3}}")
        native: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        try:
            for phase in PHASES if row.get("labelled", True) else ():
                node = group[f"native/{subject_key(row['dataset'], row['subject_id'])}/{phase}"]
                native[phase] = (np.asarray(node["image"][:]), np.asarray(node["label"][:]))
                if list(native[phase][0].shape) != list(row["native_shape_zyx"]) or native[phase][1].shape != native[phase][0].shape:
                    problems.append(f"{where}: {name} native {phase} shape disagrees with native_shape_zyx")
                if native[phase][1].size and int(native[phase][1].max()) > 3:
                    problems.append(f"{where}: {name} native {phase} label values outside {{0, 1, 2, 3}}")
        except KeyError:
            problems.append(f"{where}: {name} native volumes are missing")
            continue
        part = slice(first, first + count)
        digest = subject_content_hash(
            row["dataset"],
            row["subject_id"],
            sub_images,
            {k: meta[k][part] for k in ("frame", "slice", "slice_count", "phase")},
            sub_labels,
            label_slice[l_first : l_first + l_count] - first,
            native,
        )
        if digest != row["content_hash"]:
            problems.append(f"{where}: {name} content hash does not recompute (stored data changed)")
        subject_hashes.append((row["dataset"], row["subject_id"], digest))
    if store.complete and dataset_hash(subject_hashes) != store.hash:
        problems.append(f"{where}: dataset hash does not recompute ({store.hash})")
    return problems
