"""Store layout (schema 2): constants, node specifications, errors and the per-subject records.

Layout (``schema_version`` 2; full description in ``docs/store.md``)::

    <root>/zarr.json           root attributes: schema_version, ingest_config, package_version,
                               image_size, spacing, chunk_slices, native_chunk, csv_checksums,
                               hash, complete, skipped (no subject table: see commits/)
    <root>/commits/<a>-<b>.json  the subject table as an append-only commit log (datastore.commitlog)
    images        float16 (R, S, S)   every slice of every frame, z-scored per subject
    labels        uint8   (LR, S, S)  labels of the ED and ES slices only
    label_slice   int64   (LR,)       slice row of each label row (-1: padding)
    meta/subject  int32   (R,)        row in the subject table (-1: padding)
    meta/frame, meta/slice, meta/slice_count  int16 (R,)
    meta/phase    int8    (R,)        0 other, 1 ED, 2 ES
    meta/labelled bool    (R,)
    meta/label_row int32  (R,)        row in ``labels`` or -1
    native/image  float32 (V,)        every native ED/ES volume, flattened, at per-subject offsets
    native/label  uint8   (V,)

Every subject starts on a chunk boundary of ``images`` and ``labels`` (its last chunk is padded
with zero rows whose ``meta/subject`` is -1) and on a ``native_chunk`` boundary of the native
arrays, so a subject owns whole chunks and writers of different subjects never share one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
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
#: Per-slice metadata a subject brings itself (the rest is derived from its rows at commit).
SUBJECT_META = ("frame", "slice", "slice_count", "phase")
#: Slices per stored chunk of ``images``/``labels`` (measured in docs/store.md, "Chunk layout").
DEFAULT_CHUNK_SLICES = 32
#: Voxels per chunk of ``native/image`` and ``native/label`` (4 MiB of float32): about one
#: subject's ED + ES volumes, so a subject adds one or two chunk files per native array.
DEFAULT_NATIVE_CHUNK = 1 << 20
#: Rows per chunk of the 1D per-slice arrays, written by the driver at each commit: small enough that
#: rewriting the last chunk costs little (a commit rewrites at most two chunks per array).
META_CHUNK = 8192
#: The writer lock of a local store: a file in the store directory, ``fcntl.flock``-ed by the writer.
LOCK_NAME = ".sspctl-writer.lock"
#: Nodes every store holds (``None`` = a group), in creation order.
NODE_NAMES = (
    "images", "labels", "label_slice", "meta", *(f"meta/{k}" for k in META_DTYPES), "native", "native/image", "native/label",
)  # fmt: skip
GROUP_NODES = ("meta", "native")


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


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("sspctl")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


def is_url(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def store_arg(path: str | os.PathLike[str]) -> str:
    return str(path) if is_url(path) else str(Path(path).expanduser())


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
    """Everything the writer stores for one subject (output of ``preprocess``).

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

    def summary(self, content_hash: str | None = None) -> SubjectSummary:
        """Everything but the pixels: what the driver needs to allocate rows and commit."""
        native_sizes = {p: int(np.prod(self.native[p][0].shape)) for p in PHASES if p in self.native}
        return SubjectSummary(
            dataset=self.dataset,
            subject_id=self.subject_id,
            n_images=int(self.images.shape[0]),
            n_labels=int(self.labels.shape[0]),
            native_sizes=native_sizes,
            meta={k: np.asarray(getattr(self, k), dtype=META_DTYPES[k]) for k in SUBJECT_META},
            label_rows=np.asarray(self.label_rows, dtype=np.int64),
            info={**self.info, "content_hash": content_hash or self.info.get("content_hash") or self.content_hash()},
            warnings=list(self.warnings),
        )

    def content_hash(self) -> str:
        """sha256 of exactly the bytes the store holds for this subject."""
        return subject_content_hash(
            self.dataset,
            self.subject_id,
            self.images,
            {k: getattr(self, k) for k in SUBJECT_META},
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
    for key in SUBJECT_META:
        add(key, meta[key], META_DTYPES[key])
    add("labels", labels, "uint8")
    add("label_rows", label_rows, "int64")
    for phase in (p for p in PHASES if p in native):  # an unlabelled subject has none
        image, label = native[phase]
        add(f"native/{phase}/image", image, "float32")
        add(f"native/{phase}/label", label, "uint8")
    return digest.hexdigest()


@dataclass
class SubjectSummary:
    """A processed subject without its pixels: what the ingest driver allocates and commits.

    Crosses the Ray boundary from a worker to the driver (a few KB per subject).

    Attributes:
        n_images, n_labels: rows of ``images`` and ``labels`` the subject needs.
        native_sizes: voxels of each native volume (``{"ED": Z*Y*X, "ES": ...}``; empty if unlabelled).
        meta: ``frame``, ``slice``, ``slice_count``, ``phase`` arrays ``(n_images,)``.
        label_rows: int64 ``(n_labels,)``: subject-local image row of each label.
        info: the subject-table fields (with ``content_hash``).
    """

    dataset: str
    subject_id: str
    n_images: int
    n_labels: int
    native_sizes: dict[str, int]
    meta: dict[str, np.ndarray]
    label_rows: np.ndarray
    info: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    #: Seconds the worker spent reading and preprocessing the subject (for stage costs; not stored).
    process_s: float = 0.0


@dataclass(frozen=True)
class Allocation:
    """Where one subject goes: chunk-aligned row ranges and native offsets (chosen by the driver).

    ``[first_row, rows_end)`` of ``images``/``meta`` holds ``n_rows`` slices then zero padding up to
    the chunk boundary ``rows_end``; likewise labels; native volumes lie at ``native_offsets`` inside
    ``[native_start, native_end)``.
    """

    subject_index: int
    first_row: int
    n_rows: int
    rows_end: int
    first_label_row: int
    n_labels: int
    labels_end: int
    native_offsets: dict[str, int]
    native_start: int
    native_end: int


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-int(value) // int(multiple)) * int(multiple)


def legacy_store_error(target: str, attrs: dict[str, Any]) -> StoreError:
    """The one-line refusal of a store of another schema, naming the command that rebuilds it."""
    version = attrs.get("schema_version")
    sources = attrs.get("sources") or {}
    flags = " ".join(f"--{d} {root}" for d, root in sorted(sources.items()) if d in ("mnms", "mnms2", "acdc"))
    command = f"sspctl ingest {flags or '<sources>'} --store NEW_PATH"
    return StoreError(
        f"{target}: schema_version {version!r} is not supported (this sspctl reads {SCHEMA_VERSION}); "
        f"rebuild the store from its sources with `{command}`"
    )


def image_codecs() -> list[Any]:
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)]


def node_spec(name: str, image_size: int, chunk_slices: int, native_chunk: int) -> dict[str, Any] | None:
    """``create_array`` keywords of node ``name`` (``None`` for a group)."""
    from zarr.codecs import BloscCodec, BloscShuffle

    if name in GROUP_NODES:
        return None
    s = int(image_size)
    if name in ("images", "labels"):
        return {
            "shape": (0, s, s), "dtype": "float16" if name == "images" else "uint8",
            "chunks": (chunk_slices, s, s), "compressors": image_codecs(), "fill_value": 0,
            "dimension_names": ("slice" if name == "images" else "label", "y", "x"),
        }  # fmt: skip
    if name in ("native/image", "native/label"):
        return {
            "shape": (0,), "dtype": "float32" if name == "native/image" else "uint8", "chunks": (int(native_chunk),),
            "compressors": [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)], "fill_value": 0,
        }  # fmt: skip
    if name == "label_slice":
        return {"shape": (0,), "dtype": "int64", "chunks": (META_CHUNK,), "fill_value": -1}
    dtype = META_DTYPES[name.split("/", 1)[1]]
    return {"shape": (0,), "dtype": dtype, "chunks": (META_CHUNK,), "fill_value": False if dtype == "bool" else 0}


def create_nodes(
    group: Any, image_size: int, chunk_slices: int, native_chunk: int, names: Sequence[str], overwrite: bool = False
) -> None:
    """Create the empty nodes ``names`` (of ``NODE_NAMES``) under the root ``group``."""
    for name in names:
        spec = node_spec(name, image_size, chunk_slices, native_chunk)
        if spec is None:
            group.create_group(name, overwrite=overwrite)
            continue
        parent, _, leaf = name.rpartition("/")
        (group.require_group(parent) if parent else group).create_array(leaf, overwrite=overwrite, **spec)
