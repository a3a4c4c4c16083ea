"""``SliceStore``: the read API over a finished (or partially ingested) schema-2 store.

Only committed subjects are visible: the commit log (``datastore.commitlog``) says which rows,
label rows and native voxels they own. Zarr, fsspec and tensorstore handles are not fork-safe:
a ``SliceStore`` opens its arrays lazily on first use and pickles by path, so create it (or
unpickle it) inside each worker process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datastore.commitlog import CommitLog, LogState
from datastore.store.layout import (
    META_DTYPES,
    PHASES,
    SCHEMA_VERSION,
    StoreError,
    is_url,
    legacy_store_error,
    store_arg,
    unreadable,
)


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
    """Read API over a store (see the module docstring). Arrays open lazily; pickles by path.

    Rows: ``n_rows`` rows of ``images`` and ``meta`` are committed, of which ``n_slices`` hold
    slices; the others pad each subject to a chunk boundary (``meta["subject"] == -1``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = store_arg(path)
        self._group: Any = None
        self._attrs: dict[str, Any] | None = None
        self._log: LogState | None = None
        self._meta: dict[str, np.ndarray] | None = None
        self._subjects: Any = None
        self._row_of: dict[str, list[int]] | None = None

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

            if not is_url(self.path) and not Path(self.path).exists():
                raise StoreError(f"{self.path}: store not found")
            try:
                self._group = zarr.open_group(self.path, mode="r")
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"{self.path}: not a zarr v3 store ({exc})") from None
        return self._group

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (ingest config, checksums, hash...)."""
        if self._attrs is None:
            attrs = dict(self.group.attrs)
            if attrs.get("schema_version") != SCHEMA_VERSION:
                raise legacy_store_error(self.path, attrs)
            self._attrs = attrs
        return self._attrs

    @property
    def log(self) -> LogState:
        """The committed subject rows and counts (read once from ``commits/``)."""
        if self._log is None:
            self.attrs  # noqa: B018 - schema first
            self._log = CommitLog(self.path).read()
        return self._log

    @property
    def commit(self) -> dict[str, Any]:
        """``{"n_slices", "n_labels", "n_rows", "n_label_rows", "subjects": [row, ...]}``."""
        return commit_view(self.log)

    @property
    def n_rows(self) -> int:
        """Committed rows of ``images`` and ``meta`` (slices plus padding)."""
        return int(self.log.counts.get("rows", 0))

    @property
    def n_label_rows(self) -> int:
        """Committed rows of ``labels`` and ``label_slice`` (labels plus padding)."""
        return int(self.log.counts.get("label_rows", 0))

    @property
    def n_slices(self) -> int:
        """Slices of committed subjects (``n_rows`` less padding)."""
        return int(self.log.counts.get("slices", 0))

    @property
    def n_labels(self) -> int:
        return int(self.log.counts.get("labels", 0))

    @property
    def image_size(self) -> int:
        return int(self.attrs["image_size"])

    @property
    def chunk_slices(self) -> int:
        """Rows per stored chunk of ``images``: read ranges aligned to this for full speed."""
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
        """Per-row metadata arrays of length ``n_rows`` (read once); padding rows have subject -1."""
        if self._meta is None:
            n = self.n_rows
            self._meta = {k: np.asarray(self.group[f"meta/{k}"][:n]) for k in META_DTYPES}
        return self._meta

    @property
    def label_slice(self) -> np.ndarray:
        """int64 ``(n_label_rows,)``: slice row of each row of ``labels`` (-1: padding)."""
        return np.asarray(self.group["label_slice"][: self.n_label_rows])

    @property
    def subjects(self) -> Any:
        """``pandas.DataFrame``: one row per subject, in the order of ``meta["subject"]``."""
        if self._subjects is None:
            import pandas as pd

            self._subjects = pd.DataFrame(self.log.rows)
        return self._subjects

    # -- reads -----------------------------------------------------------------------------
    def _check_indices(self, indices: Sequence[int] | np.ndarray, limit: int, what: str) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= limit):
            raise IndexError(f"{self.path}: {what} index out of range [0, {limit})")
        return idx

    def read_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 ``(n, H, W)`` rows at ``indices`` (any order; duplicates allowed).

        Slow for scattered indices (zarr decodes whole chunks): prefer ``read_image_range``.
        """
        idx = self._check_indices(indices, self.n_rows, "slice")
        if idx.size == 0:
            return np.zeros((0, self.image_size, self.image_size), np.float32)
        unique, inverse = np.unique(idx, return_inverse=True)
        data = self._read_rows("images", unique)
        return np.asarray(data, dtype=np.float32)[inverse]

    def read_image_range(self, start: int, stop: int) -> np.ndarray:
        """float32 ``(stop - start, H, W)``: a contiguous run of rows (chunk-aligned is fastest)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"{self.path}: slice range [{start}, {stop}) outside [0, {self.n_rows})")
        return np.asarray(self._read_rows("images", slice(start, stop)), dtype=np.float32)

    def read_labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W)`` labels of the *slice rows* ``indices`` (all must be labelled)."""
        idx = self._check_indices(indices, self.n_rows, "slice")
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
        if self._row_of is None:  # an index, so that per-subject lookups stay O(1) at 50,000 subjects
            self._row_of = {}
            for index, r in enumerate(self.log.rows):
                self._row_of.setdefault(r["subject_id"], []).append(index)
        rows = [
            self.log.rows[i] for i in self._row_of.get(str(subject_id), [])
            if dataset is None or self.log.rows[i]["dataset"] == dataset
        ]  # fmt: skip
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
        offsets = row.get("native_offsets") or {}
        if not row.get("labelled", True) or phase not in offsets:
            raise KeyError(f"{self.path}: subject {row['dataset']}/{row['subject_id']} is unlabelled (no native ED/ES volumes)")
        shape = tuple(int(n) for n in row["native_shape_zyx"])
        image, label = read_native(self.group, self.path, int(offsets[phase]), shape)
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


def read_native(group: Any, where: str, offset: int, shape_zyx: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float32 image and uint8 label ``shape_zyx`` stored flat at ``offset`` of ``native/*``.

    Raises:
        CorruptChunkError: names the store, the array and the voxel range.
    """
    size = int(np.prod(shape_zyx))
    out = []
    for name, dtype in (("native/image", np.float32), ("native/label", np.uint8)):
        try:
            out.append(np.asarray(group[name][offset : offset + size], dtype=dtype).reshape(shape_zyx))
        except Exception as exc:  # noqa: BLE001 - codec errors have no common type
            raise unreadable(where, name, offset, offset + size, exc) from None
    return out[0], out[1]


def commit_view(log: LogState) -> dict[str, Any]:
    """The commit record as one dict (counts and the subject rows)."""
    counts = log.counts
    return {
        "n_slices": int(counts.get("slices", 0)),
        "n_labels": int(counts.get("labels", 0)),
        "n_rows": int(counts.get("rows", 0)),
        "n_label_rows": int(counts.get("label_rows", 0)),
        "native_voxels": int(counts.get("native_voxels", 0)),
        "subjects": log.rows,
    }
