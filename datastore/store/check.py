"""Inspect and check a store: ``store_info``, ``store_size_bytes`` and ``validate_store``.

``validate_store`` runs one function per invariant (``STRUCTURE_CHECKS``, ``CONTENT_CHECKS``); each returns
one line per violation, naming the store and what is wrong.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from datastore.store.layout import (
    META_DTYPES,
    PHASES,
    SUBJECT_META,
    StoreError,
    dataset_hash,
    is_url,
    store_arg,
    subject_content_hash,
)
from datastore.store.reader import SliceStore


def store_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the store occupies (local walk, or fsspec ``du`` for URLs)."""
    target = store_arg(path)
    if is_url(target):
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # commits/ and the lock file are not zarr nodes
        members = group.members(max_depth=None)
    arrays = [(name, node) for name, node in members if isinstance(node, zarr.Array)]
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

    In order (``STRUCTURE_CHECKS``, then ``CONTENT_CHECKS``): the ingest finished; array lengths agree with the committed extents;
    every chunk of every array decodes (one line per damaged chunk, naming array and chunk);
    each subject owns whole chunks and its rows' metadata agrees with the subject table, padding
    rows belong to nobody; labels exist exactly on the ED/ES slices of labelled subjects and point
    back to their slice; native volumes lie inside the native arrays without overlap; images are
    finite, labels in {0, 1, 2, 3}, and every subject hash and the dataset hash recompute.
    """
    try:
        store = SliceStore.open(path)
        store.log  # noqa: B018 - the commit log must be readable
    except (StoreError, KeyError, ValueError) as exc:
        return [str(exc) if isinstance(exc, StoreError) else f"{path}: unreadable commit log ({exc})"]
    problems = [line for check in STRUCTURE_CHECKS for line in check(store, progress)]
    if problems:  # the content checks need a finished store whose every chunk decodes
        return problems
    return [line for check in CONTENT_CHECKS for line in check(store, progress)]


def check_finished(store: SliceStore, progress: bool) -> list[str]:
    if store.complete:
        return []
    return [f"{store.path}: ingest not finished (complete is false); rerun sspctl ingest"]


def check_shapes(store: SliceStore, progress: bool) -> list[str]:
    """Array lengths equal the committed extents (``finalize`` trims them)."""
    counts, s = store.log.counts, store.image_size
    rows, label_rows, voxels = (int(counts.get(k, 0)) for k in ("rows", "label_rows", "native_voxels"))
    expected = {"images": (rows, s, s), "labels": (label_rows, s, s), "label_slice": (label_rows,)}
    expected.update({f"meta/{k}": (rows,) for k in META_DTYPES})
    expected.update({"native/image": (voxels,), "native/label": (voxels,)})
    problems = []
    for name, shape in expected.items():
        try:
            actual = tuple(store.group[name].shape)
        except KeyError:
            problems.append(f"{store.path}: array {name!r} is missing")
            continue
        if actual != shape:
            problems.append(f"{store.path}: {name} has shape {actual}, expected {shape} from the commit record")
    return problems


def check_chunks(store: SliceStore, progress: bool) -> list[str]:
    return unreadable_chunks(store.group, store.path, progress)


def check_subject_rows(store: SliceStore, progress: bool) -> list[str]:
    """Each subject owns whole chunks; its rows' metadata agrees with its table row; padding is nobody's."""
    where, meta, n, chunk = store.path, store.meta, store.n_rows, store.chunk_slices
    problems: list[str] = []
    covered = np.zeros(n, dtype=np.int64)
    seen: set[tuple[str, str]] = set()
    for index, row in enumerate(store.log.rows):
        name = f"subject {row['dataset']}/{row['subject_id']}"
        if (row["dataset"], row["subject_id"]) in seen:
            problems.append(f"{where}: {name} appears twice in the subject table")
        seen.add((row["dataset"], row["subject_id"]))
        first, count, frames, slices = (int(row[k]) for k in ("first_row", "n_rows", "frames", "slices"))
        has_labels = bool(row.get("labelled", True))
        ed, es = (-1 if row.get(k) is None else int(row[k]) for k in ("ed", "es"))
        if count != frames * slices:
            problems.append(f"{where}: {name} has {count} rows, expected frames*slices = {frames * slices}")
        if first % chunk or int(row["first_label_row"]) % chunk:
            problems.append(f"{where}: {name} does not start on a chunk boundary (rows {first}, label rows {row['first_label_row']})")
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
    if np.any(covered > 1):
        problems.append(f"{where}: {int(np.sum(covered > 1))} slice rows are owned by more than one subject")
    padding = covered == 0
    if np.any(meta["subject"][padding] != -1) or np.any(meta["label_row"][padding] != -1) or np.any(meta["labelled"][padding]):
        problems.append(f"{where}: padding rows (owned by no subject) have metadata (meta/subject must be -1)")
    return problems


def check_labels(store: SliceStore, progress: bool) -> list[str]:
    """Labels only on ED/ES slices; ``label_row`` and ``label_slice`` map one-to-one, both ways."""
    where, meta, label_slice = store.path, store.meta, store.label_slice
    problems = []
    labelled = meta["labelled"]
    if np.any(labelled & (meta["phase"] == 0)):
        problems.append(f"{where}: meta/labelled marks slices that are not ED or ES slices")
    if not np.array_equal(labelled, meta["label_row"] >= 0):
        problems.append(f"{where}: meta/label_row disagrees with meta/labelled")
    label_rows = meta["label_row"][labelled]
    used = np.flatnonzero(label_slice >= 0)
    if len(label_rows) != store.n_labels or not np.array_equal(np.sort(label_rows), used):
        problems.append(f"{where}: meta/label_row does not map one-to-one onto the {store.n_labels} label rows")
    elif not np.array_equal(label_slice[label_rows], np.flatnonzero(labelled)):
        problems.append(f"{where}: label_slice does not point back to the labelled slices")
    return problems


def check_native_ranges(store: SliceStore, progress: bool) -> list[str]:
    """Native volumes of labelled subjects lie inside the native arrays and do not overlap."""
    where, limit = store.path, int(store.log.counts.get("native_voxels", 0))
    problems, spans = [], []
    for row in store.log.rows:
        name = f"subject {row['dataset']}/{row['subject_id']}"
        offsets = row.get("native_offsets") or {}
        wanted = set(PHASES) if row.get("labelled", True) else set()
        if set(offsets) != wanted:
            problems.append(f"{where}: {name} native volumes are missing")
            continue
        size = int(np.prod(row["native_shape_zyx"]))
        for phase, offset in offsets.items():
            if offset < 0 or offset + size > limit:
                problems.append(f"{where}: {name} native {phase} voxels [{offset}, {offset + size}) outside [0, {limit})")
            spans.append((int(offset), int(offset) + size))
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        problems.append(f"{where}: native volumes of two subjects overlap")
    return problems


def check_content(store: SliceStore, progress: bool) -> list[str]:
    """Values in range and every subject hash and the dataset hash recompute (one subject at a time)."""
    from tqdm import tqdm

    from datastore.store.reader import read_native

    where, meta, group, label_slice = store.path, store.meta, store.group, store.label_slice
    images, labels = group["images"], group["labels"]
    problems, subject_hashes = [], []
    for row in tqdm(store.log.rows, desc="validate", unit="subject", disable=not progress or None, leave=False):
        name = f"subject {row['dataset']}/{row['subject_id']}"
        first, count = int(row["first_row"]), int(row["n_rows"])
        l_first, l_count = int(row["first_label_row"]), int(row["n_labels"])
        sub_images = np.asarray(images[first : first + count])
        sub_labels = np.asarray(labels[l_first : l_first + l_count])
        if not np.all(np.isfinite(sub_images)):
            problems.append(f"{where}: {name} has non-finite image values")
        if sub_labels.size and int(sub_labels.max()) > 3:
            problems.append(f"{where}: {name} has label values outside {{0, 1, 2, 3}}")
        shape = tuple(int(v) for v in row["native_shape_zyx"])
        native = {p: read_native(group, where, int(o), shape) for p, o in (row.get("native_offsets") or {}).items()}
        for phase, (_, label) in native.items():
            if label.size and int(label.max()) > 3:
                problems.append(f"{where}: {name} native {phase} label values outside {{0, 1, 2, 3}}")
        part = slice(first, first + count)
        digest = subject_content_hash(
            row["dataset"], row["subject_id"], sub_images, {k: meta[k][part] for k in SUBJECT_META},
            sub_labels, label_slice[l_first : l_first + l_count] - first, native,
        )  # fmt: skip
        if digest != row["content_hash"]:
            problems.append(f"{where}: {name} content hash does not recompute (stored data changed)")
        subject_hashes.append((row["dataset"], row["subject_id"], digest))
    if store.complete and dataset_hash(subject_hashes) != store.hash:
        problems.append(f"{where}: dataset hash does not recompute ({store.hash})")
    return problems


Check = Callable[[SliceStore, bool], list[str]]
#: Checked first; any violation here stops the validation (the content checks would fail on it).
STRUCTURE_CHECKS: tuple[Check, ...] = (check_finished, check_shapes, check_chunks)
CONTENT_CHECKS: tuple[Check, ...] = (check_subject_rows, check_labels, check_native_ranges, check_content)
