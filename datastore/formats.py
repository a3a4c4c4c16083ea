"""Discover and read M&Ms and M&Ms-2 subjects (raw NIfTI layouts of method-spec 1.1) with nibabel.

Every problem with an input raises :class:`FormatError` whose message is one line of the form
``<file>: <problem>``, so that ``sspctl ingest`` can skip the subject and report it.

Layouts (subject folders are found at any depth under the dataset root)::

    M&Ms    <root>/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
            <root>/.../<ID>/<ID>_sa.nii.gz, <ID>_sa_gt.nii.gz        4D (X, Y, Z, T)
    M&Ms-2  <root>/dataset_information.csv
            <root>/.../<NNN>/<NNN>_SA_CINE.nii.gz                   4D (X, Y, Z, T)
                            <NNN>_SA_ED.nii.gz, _SA_ES.nii.gz        3D (X, Y, Z)
                            <NNN>_SA_ED_gt.nii.gz, _SA_ES_gt.nii.gz  3D labels
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MNMS, MNMS2 = "mnms", "mnms2"
DATASETS = (MNMS, MNMS2)
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS2_CSV = "dataset_information.csv"
MNMS_COLUMNS = ("External code", "Vendor")
MNMS2_COLUMNS = ("SUBJECT_CODE", "VENDOR")
#: M&Ms-2 vendor names -> the M&Ms vendor letters (method-spec 1.1: Siemens A, Philips B, GE C).
VENDOR_LETTERS = {"siemens": "A", "philips": "B", "ge": "C"}
LABEL_VALUES = (0, 1, 2, 3)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


#: ``SubjectSource.info`` keys that steer the reader and are not subject-table fields.
READER_KEYS = ("ed_index", "es_index", "index_source", "frames_expected")


class FormatError(ValueError):
    """A raw input file is unusable; ``str(error)`` is one line ``<file>: <problem>``."""


@dataclass(frozen=True)
class SubjectSource:
    """A discovered subject: its files by role and its CSV metadata (nothing read yet).

    ``files`` roles: M&Ms ``cine``, ``gt``; the others (:func:`read_phased`) ``cine``, ``ed``, ``es``,
    ``ed_gt``, ``es_gt`` (any may be absent for ACDC and manifests), ACDC also ``info`` (Info.cfg).
    """

    dataset: str
    subject_id: str
    files: dict[str, Path]
    info: dict[str, Any]

    @property
    def main_file(self) -> Path:
        """The file named in messages about the whole subject: the cine, else the first image."""
        return self.files.get("cine") or next(iter(self.files.values()))


@dataclass(frozen=True)
class SkippedSubject:
    """A subject left out, with the one-line reason (``<file>: <problem>``)."""

    dataset: str
    subject_id: str
    reason: str


@dataclass
class Discovery:
    """What :func:`discover` found under one dataset root."""

    dataset: str
    root: Path
    subjects: list[SubjectSource] = field(default_factory=list)
    skipped: list[SkippedSubject] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    csv_checksums: dict[str, str] = field(default_factory=dict)

    def skipped_ids(self) -> set[str]:
        """Ids of the subjects already known to be unusable."""
        return {s.subject_id for s in self.skipped}


@dataclass
class RawSubject:
    """A subject as read from disk, validated, still in NIfTI voxel order.

    Attributes:
        cine: float32 ``(X, Y, Z, T)`` intensities (finite).
        affine: 4x4 voxel ``(i, j, k)`` -> RAS+ mm of the cine.
        labels: ``{frame index: uint8 (X, Y, Z)}`` for the ED and ES frames, in store order
            (1 LV, 2 MYO, 3 RV); empty for an unlabelled subject (pretraining only).
        ed, es: cine frame indices of end-diastole and end-systole (None when unknown).
        checksums: sha256 of each source file, keyed by file name.
    """

    source: SubjectSource
    cine: np.ndarray
    affine: np.ndarray
    labels: dict[int, np.ndarray]
    ed: int | None
    es: int | None
    checksums: dict[str, str]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_subject_id(subject_id: str, where: str) -> str:
    """Return ``subject_id`` if it is a safe path component, else raise naming ``where``."""
    if not _SAFE_ID.match(subject_id):
        raise FormatError(
            f"{where}: subject id {subject_id!r} is not allowed "
            "(letters, digits, '_' and '-' only; it must not escape the store path)"
        )
    return subject_id


# -- discovery -------------------------------------------------------------------------------


def discover(root: Path | str, dataset: str) -> Discovery:
    """Find the subjects of ``dataset`` ("mnms" | "mnms2") under ``root`` and join their CSV rows.

    Raises:
        FormatError: the root or its CSV is missing or lacks required columns (nothing usable).
    """
    root = Path(root)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if not root.is_dir():
        raise FormatError(f"{root}: {dataset} directory not found")
    found = Discovery(dataset=dataset, root=root)
    csv_path = _find_csv(root, dataset)
    found.csv_checksums[str(csv_path)] = sha256_file(csv_path)
    rows = _read_csv(csv_path, dataset, found)
    folders = _subject_folders(root, dataset, found)
    for subject_id in sorted(folders):
        folder = folders[subject_id]
        if subject_id in found.skipped_ids():
            continue
        if subject_id not in rows:
            found.skipped.append(
                SkippedSubject(dataset, subject_id, f"{csv_path}: no row for subject {subject_id!r} ({folder})")
            )
            continue
        files = _subject_files(folder, subject_id, dataset)
        missing = [p for p in files.values() if not p.is_file()]
        if missing:
            found.skipped.append(SkippedSubject(dataset, subject_id, f"{missing[0]}: file not found"))
            continue
        found.subjects.append(SubjectSource(dataset, subject_id, files, rows[subject_id]))
    for subject_id in sorted(set(rows) - set(folders)):
        found.warnings.append(f"{csv_path}: subject {subject_id!r} has a CSV row but no folder under {root}")
    return found


def _find_csv(root: Path, dataset: str) -> Path:
    name = MNMS_CSV if dataset == MNMS else MNMS2_CSV
    for candidate in (root / name, root.parent / name):
        if candidate.is_file():
            return candidate
    raise FormatError(f"{root / name}: {dataset} metadata CSV not found")


def _read_csv(path: Path, dataset: str, found: Discovery) -> dict[str, dict[str, Any]]:
    """Rows keyed by subject id; bad rows become skipped subjects (or warnings without an id)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    required = MNMS_COLUMNS if dataset == MNMS else MNMS2_COLUMNS
    absent = [c for c in required if c not in table.columns]
    if absent:
        raise FormatError(f"{path}: missing column(s) {', '.join(repr(c) for c in absent)}")
    rows: dict[str, dict[str, Any]] = {}
    line_of: dict[str, int] = {}
    duplicates: set[str] = set()
    for position, record in enumerate(table.to_dict("records")):
        line = position + 2  # header is line 1
        record = {k: str(v).strip() for k, v in record.items()}
        try:
            subject_id, info = (_mnms_row if dataset == MNMS else _mnms2_row)(record, f"{path}: line {line}")
        except FormatError as exc:
            raw_id = record.get(required[0], "")
            if raw_id and _SAFE_ID.match(_normalise_id(raw_id, dataset)):
                found.skipped.append(SkippedSubject(dataset, _normalise_id(raw_id, dataset), str(exc)))
            else:
                found.skipped.append(SkippedSubject(dataset, raw_id or f"<line {line}>", str(exc)))
            continue
        if subject_id in rows or subject_id in duplicates:
            duplicates.add(subject_id)
            first = line_of.get(subject_id)
            rows.pop(subject_id, None)
            found.skipped.append(
                SkippedSubject(
                    dataset,
                    subject_id,
                    f"{path}: duplicate subject id {subject_id!r} (lines {first} and {line})",
                )
            )
            continue
        rows[subject_id] = info
        line_of[subject_id] = line
    return rows


def _normalise_id(raw: str, dataset: str) -> str:
    if dataset == MNMS2 and raw.isdigit():
        return raw.zfill(3)
    return raw


def _optional_number(value: str, where: str, column: str, integer: bool = False) -> float | int | None:
    if value in ("", "nan", "NaN", "NA"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise FormatError(f"{where}: column {column!r} is not a number ({value!r})") from None
    if integer:
        if not number.is_integer():
            raise FormatError(f"{where}: column {column!r} is not an integer ({value!r})")
        return int(number)
    return number


def _mnms_row(record: dict[str, str], where: str) -> tuple[str, dict[str, Any]]:
    subject_id = record.get("External code", "")
    if not subject_id:
        raise FormatError(f"{where}: empty 'External code'")
    check_subject_id(subject_id, where)
    vendor = record.get("Vendor", "")
    if not vendor:
        raise FormatError(f"{where}: empty 'Vendor' for subject {subject_id!r}")
    info = {
        "vendor": vendor,
        "vendor_name": record.get("VendorName") or None,
        "centre": _optional_number(record.get("Centre", ""), where, "Centre", integer=True),
        "pathology": record.get("Pathology") or None,
        "sex": record.get("Sex") or None,
        "age": _optional_number(record.get("Age", ""), where, "Age"),
        "csv_ed": _optional_number(record.get("ED", ""), where, "ED", integer=True),
        "csv_es": _optional_number(record.get("ES", ""), where, "ES", integer=True),
    }
    return subject_id, info


def _mnms2_row(record: dict[str, str], where: str) -> tuple[str, dict[str, Any]]:
    raw = record.get("SUBJECT_CODE", "")
    if not raw:
        raise FormatError(f"{where}: empty 'SUBJECT_CODE'")
    if not raw.isdigit():
        check_subject_id(raw, where)
        raise FormatError(f"{where}: 'SUBJECT_CODE' must be an integer, got {raw!r}")
    subject_id = raw.zfill(3)
    vendor_name = record.get("VENDOR", "")
    if not vendor_name:
        raise FormatError(f"{where}: empty 'VENDOR' for subject {subject_id!r}")
    letter = next(
        (v for k, v in VENDOR_LETTERS.items() if vendor_name.lower().startswith(k)), vendor_name
    )
    info = {
        "vendor": letter,
        "vendor_name": vendor_name,
        "centre": None,
        "pathology": record.get("DISEASE") or None,
        "sex": record.get("SEX") or None,
        "age": _optional_number(record.get("AGE", ""), where, "AGE"),
        "scanner": record.get("SCANNER") or None,
        "field": _optional_number(record.get("FIELD", ""), where, "FIELD"),
    }
    return subject_id, info


def _subject_folders(root: Path, dataset: str, found: Discovery) -> dict[str, Path]:
    suffix = "_sa.nii.gz" if dataset == MNMS else "_SA_CINE.nii.gz"
    folders: dict[str, Path] = {}
    for cine in sorted(root.rglob(f"*{suffix}")):
        subject_id = cine.name[: -len(suffix)]
        if cine.parent.name != subject_id:
            continue  # e.g. a reformatted copy elsewhere; only <ID>/<ID>_... counts
        if not _SAFE_ID.match(subject_id):
            found.skipped.append(
                SkippedSubject(dataset, subject_id, f"{cine.parent}: subject id {subject_id!r} is not allowed")
            )
            continue
        if subject_id in folders:
            found.skipped.append(
                SkippedSubject(
                    dataset,
                    subject_id,
                    f"{cine.parent}: duplicate subject id {subject_id!r} (also {folders[subject_id]})",
                )
            )
            continue
        folders[subject_id] = cine.parent
    for sid in {s.subject_id for s in found.skipped if "duplicate subject id" in s.reason}:
        folders.pop(sid, None)
    return folders


def _subject_files(folder: Path, subject_id: str, dataset: str) -> dict[str, Path]:
    if dataset == MNMS:
        return {"cine": folder / f"{subject_id}_sa.nii.gz", "gt": folder / f"{subject_id}_sa_gt.nii.gz"}
    stem = folder / f"{subject_id}_SA_"
    return {
        "cine": Path(f"{stem}CINE.nii.gz"),
        "ed": Path(f"{stem}ED.nii.gz"),
        "es": Path(f"{stem}ES.nii.gz"),
        "ed_gt": Path(f"{stem}ED_gt.nii.gz"),
        "es_gt": Path(f"{stem}ES_gt.nii.gz"),
    }


# -- reading ---------------------------------------------------------------------------------


def load_nifti(path: Path) -> tuple[Any, str]:
    """Load a ``.nii``/``.nii.gz`` file fully into memory; returns ``(image, sha256)``.

    Raises:
        FormatError: unreadable, truncated or corrupt gzip, or not a NIfTI file.
    """
    import nibabel as nib

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from None
    checksum = hashlib.sha256(raw).hexdigest()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise FormatError(f"{path}: truncated or corrupt gzip ({exc})") from None
    elif str(path).endswith(".gz"):
        raise FormatError(f"{path}: not a gzip file (a .nii.gz must be gzip-compressed)")
    errors = []
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            # nibabel silently "fixes" zero or negative pixdim on load; keep the raw values.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # header oddities are judged below, not warned
                raw_header = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)
                image = klass.from_bytes(raw)
        except Exception as exc:  # noqa: BLE001 - nibabel raises several types
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        image.raw_pixdim = np.asarray(raw_header["pixdim"], dtype=np.float64)
        return image, checksum
    raise FormatError(f"{path}: not a NIfTI file ({errors[0]})")


def _array(image: Any, path: Path) -> np.ndarray:
    try:
        return np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{path}: truncated NIfTI data ({str(exc).splitlines()[0]})") from None


def _check_geometry(image: Any, path: Path) -> None:
    zooms = np.asarray(getattr(image, "raw_pixdim", np.ones(8))[1:4], dtype=np.float64)
    if zooms.size < 3 or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise FormatError(f"{path}: invalid voxel spacing {tuple(float(z) for z in zooms)} mm (must be > 0)")
    affine = np.asarray(image.affine, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(norms <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise FormatError(f"{path}: degenerate affine (zero or non-finite voxel spacing)")


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise FormatError(f"{path}: {bad} non-finite (NaN/inf) intensities")


def _as_label(data: np.ndarray, path: Path) -> np.ndarray:
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise FormatError(f"{path}: label values must be integers in {{0, 1, 2, 3}}")
    values = np.unique(data.astype(np.int64))
    outside = [int(v) for v in values if v not in LABEL_VALUES]
    if outside:
        raise FormatError(f"{path}: label values {outside[:5]} outside {{0, 1, 2, 3}}")
    return data.astype(np.uint8)


def _read_cine(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    image, checksum = load_nifti(path)
    if len(image.shape) != 4:
        raise FormatError(f"{path}: expected a 4D cine (X, Y, Z, T), got {len(image.shape)}D shape {tuple(image.shape)}")
    _check_geometry(image, path)
    data = _array(image, path)
    _check_finite(data, path)
    return data, np.asarray(image.affine, dtype=np.float64), checksum


#: Largest difference (mm, or mm per voxel) allowed between a label/ED/ES affine and the cine's.
AFFINE_TOLERANCE_MM = 1e-3


def _read_volume(path: Path, shape: tuple[int, ...], affine: np.ndarray, what: str) -> tuple[np.ndarray, str]:
    """A label / ED / ES volume that must share the cine's grid: same shape and affine."""
    image, checksum = load_nifti(path)
    if tuple(image.shape) != tuple(shape):
        raise FormatError(f"{path}: {what} shape {tuple(image.shape)} != cine shape {tuple(shape)}")
    own = np.asarray(image.affine, dtype=np.float64)
    if not np.allclose(own, affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.nanmax(np.abs(own - affine))) if np.all(np.isfinite(own)) else float("nan")
        raise FormatError(
            f"{path}: {what} affine differs from the cine affine by up to {worst:.4g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm): not on the cine's voxel grid"
        )
    return _array(image, path), checksum


def read_subject(source: SubjectSource) -> RawSubject:
    """Read and validate one subject; ED/ES as in method-spec 1.2.

    M&Ms: the two labelled frames of the 4D GT, ED = the one with more labelled voxels.
    Every other layout (M&Ms-2, ACDC, manifest) goes through :func:`read_phased`.

    Raises:
        FormatError: one line naming the offending file.
    """
    if source.dataset != MNMS:
        return read_phased(source)
    files = source.files
    cine, affine, cine_sum = _read_cine(files["cine"])
    checksums = {files["cine"].name: cine_sum}
    gt_data, checksums[files["gt"].name] = _read_volume(files["gt"], cine.shape, affine, "label")
    gt = _as_label(gt_data, files["gt"])
    counts = np.count_nonzero(gt.reshape(-1, gt.shape[-1]), axis=0)
    labelled = [int(t) for t in np.flatnonzero(counts)]
    if not labelled:
        raise FormatError(f"{files['gt']}: no labelled frame (all labels are 0)")
    if len(labelled) != 2:
        raise FormatError(f"{files['gt']}: {len(labelled)} labelled frame(s) {labelled}, expected 2 (ED and ES)")
    first, second = labelled
    ed, es = (first, second) if counts[first] >= counts[second] else (second, first)
    labels = {ed: gt[..., ed], es: gt[..., es]}
    return RawSubject(source, cine, affine, labels, ed, es, checksums)


def read_phased(source: SubjectSource) -> RawSubject:
    """Read a subject whose files are a cine and/or per-phase volumes (M&Ms-2, ACDC, manifest).

    ``source.files`` roles (all optional except one image): ``cine`` 4D; ``ed``/``es`` 3D copies of
    cine frames (or, without a cine, the only images: they become a 2-frame cine, ED then ES);
    ``ed_gt``/``es_gt`` 3D labels. ``source.info`` may give ``ed_index``/``es_index`` (0-based cine
    frames) and ``label_map`` (``{source value: store value}``, applied to the labels).

    ED/ES: the given indices, checked against the cine frames the ``ed``/``es`` volumes equal; or
    those frames when no index is given. Labels are both phases or none: a subject without labels
    is valid (pretraining only) and has ``labels == {}``.

    Raises:
        FormatError: one line naming the offending file.
    """
    files, info = source.files, source.info
    checksums: dict[str, str] = {}
    phase_paths = {p: files[p] for p in ("ed", "es") if p in files}
    if "cine" in files:
        cine, affine, checksums[files["cine"].name] = _read_cine(files["cine"])
        frame_shape = cine.shape[:3]
        phases: dict[str, int] = {}
        for phase, path in phase_paths.items():
            what = f"_SA_{phase.upper()}" if source.dataset == MNMS2 else f"{phase.upper()} volume"
            volume, checksums[path.name] = _read_volume(path, frame_shape, affine, what)
            phases[phase] = _matching_frame(cine, volume, path)
        expected = info.get("frames_expected")
        if expected is not None and int(expected) != cine.shape[-1]:
            raise FormatError(
                f"{info.get('index_source') or files['cine']}: says {expected} frames, the cine has {cine.shape[-1]}"
            )
        for phase in ("ed", "es"):
            given = info.get(f"{phase}_index")
            if given is None:
                continue
            where = info.get("index_source") or files["cine"]
            if not 0 <= int(given) < cine.shape[-1]:
                raise FormatError(f"{where}: {phase.upper()} frame {given} outside the cine's {cine.shape[-1]} frames")
            if phase in phases and phases[phase] != int(given):
                raise FormatError(
                    f"{phase_paths[phase]}: equals cine frame {phases[phase]}, but {where} gives "
                    f"{phase.upper()} = frame {given}"
                )
            phases[phase] = int(given)
    else:
        if not phase_paths:
            raise FormatError(f"{source.subject_id}: no image (give a cine, or ED/ES volumes)")
        volumes: list[np.ndarray] = []
        affine = None
        for phase, path in phase_paths.items():
            if affine is None:
                image, checksums[path.name] = load_nifti(path)
                if len(image.shape) != 3:
                    raise FormatError(f"{path}: expected a 3D volume (X, Y, Z), got shape {tuple(image.shape)}")
                _check_geometry(image, path)
                affine = np.asarray(image.affine, dtype=np.float64)
                data = _array(image, path)
            else:
                data, checksums[path.name] = _read_volume(path, volumes[0].shape, affine, f"{phase.upper()} volume")
            _check_finite(data, path)
            volumes.append(data)
        cine = np.stack(volumes, axis=-1)
        phases = {phase: t for t, phase in enumerate(phase_paths)}
    assert affine is not None
    labels = _read_labels(source, cine.shape[:3], affine, phases, checksums)
    for path in files.values():  # files not read as images (e.g. ACDC's Info.cfg): for resume checks
        if path.name not in checksums:
            checksums[path.name] = sha256_file(path)
    ed, es = phases.get("ed"), phases.get("es")
    if ed is not None and ed == es:
        raise FormatError(f"{files.get('es', files.get('cine'))}: ED and ES are the same cine frame ({ed})")
    return RawSubject(source, cine, affine, labels, ed, es, checksums)


def _read_labels(
    source: SubjectSource,
    frame_shape: tuple[int, ...],
    affine: np.ndarray,
    phases: dict[str, int],
    checksums: dict[str, str],
) -> dict[int, np.ndarray]:
    """The ED and ES labels (store order) keyed by cine frame, or ``{}`` for an unlabelled subject."""
    files = source.files
    present = [p for p in ("ed", "es") if f"{p}_gt" in files]
    if not present:
        return {}
    if len(present) == 1:
        other = "es" if present[0] == "ed" else "ed"
        raise FormatError(f"{files[present[0] + '_gt']}: {present[0].upper()} label without an {other.upper()} label (give both or neither)")
    text = source.info.get("label_map")
    label_map = None if text is None else parse_label_map(text, str(source.main_file))
    labels: dict[int, np.ndarray] = {}
    for phase in present:
        path = files[f"{phase}_gt"]
        if phase not in phases:
            raise FormatError(f"{path}: label given but the {phase.upper()} frame is unknown (give its index or image)")
        data, checksums[path.name] = _read_volume(path, frame_shape, affine, "label")
        label = _as_label(data, path) if label_map is None else apply_label_map(data, label_map, path)
        if not label.any():
            raise FormatError(f"{path}: no labelled voxel (the {phase.upper()} label is empty)")
        labels[phases[phase]] = label
    return labels


def parse_label_map(text: str, where: str) -> dict[int, int]:
    """``"1:3,2:2,3:1"`` -> ``{1: 3, 2: 2, 3: 1}`` (source value -> store value; 0 stays 0).

    Raises:
        FormatError: malformed pairs, a value outside {0, 1, 2, 3}, or two sources on one target.
    """
    mapping: dict[int, int] = {}
    for pair in (p.strip() for p in str(text).split(",") if p.strip()):
        left, sep, right = pair.partition(":")
        if not sep or not left.strip().isdigit() or not right.strip().isdigit():
            raise FormatError(f"{where}: label_map entry {pair!r} is not SOURCE:TARGET (e.g. 1:3,2:2,3:1)")
        src, dst = int(left), int(right)
        if dst not in LABEL_VALUES:
            raise FormatError(f"{where}: label_map target {dst} outside {{0, 1, 2, 3}} (1 LV, 2 MYO, 3 RV)")
        if src in mapping:
            raise FormatError(f"{where}: label_map maps source value {src} twice")
        mapping[src] = dst
    if not mapping:
        raise FormatError(f"{where}: label_map is empty")
    targets = [v for v in mapping.values() if v]
    if len(targets) != len(set(targets)):
        raise FormatError(f"{where}: label_map maps two source values onto one class ({text})")
    mapping.setdefault(0, 0)
    return mapping


def apply_label_map(data: np.ndarray, mapping: dict[int, int], path: Path) -> np.ndarray:
    """Integer labels in the source convention -> uint8 store order (1 LV, 2 MYO, 3 RV).

    Raises:
        FormatError: non-integer values, or a value the map does not cover (named).
    """
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise FormatError(f"{path}: label values must be integers")
    values = data.astype(np.int64)
    present = [int(v) for v in np.unique(values)]
    unmapped = [v for v in present if v not in mapping]
    if unmapped:
        raise FormatError(f"{path}: label values {unmapped[:5]} not in the label_map {dict(sorted(mapping.items()))}")
    lookup = np.zeros(max(present) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        if src <= max(present):
            lookup[src] = dst
    return lookup[values]


def _matching_frame(cine: np.ndarray, volume: np.ndarray, path: Path) -> int:
    """Index of the cine frame equal to ``volume`` (exact up to float rounding)."""
    _check_finite(volume, path)
    diffs = np.abs(cine - volume[..., None]).reshape(-1, cine.shape[-1]).max(axis=0)
    frame = int(np.argmin(diffs))
    tolerance = 1e-5 * max(1.0, float(np.abs(volume).max()))
    if diffs[frame] > tolerance:
        raise FormatError(f"{path}: no cine frame equals this volume (closest frame {frame}, max diff {diffs[frame]:.3g})")
    return frame
