"""Discover ACDC subjects (``patientNNN`` folders with ``Info.cfg``), in its training and testing folders.

Layout (subject folders at any depth under the root)::

    <root>/.../patientNNN/patientNNN_4d.nii.gz                   4D cine (X, Y, Z, T)
                         patientNNN_frameXX.nii.gz               3D ED and ES frames (XX 1-based)
                         patientNNN_frameXX_gt.nii.gz            3D labels, ACDC order 1 RV, 2 MYO, 3 LV
                         Info.cfg                                ED, ES (1-based), Group, Height, Weight, NbFrame

The subjects are read by :func:`datastore.formats.read_phased`: ED/ES come from ``Info.cfg`` and
are checked against the frame files; labels are converted to the store's order (1 LV, 2 MYO,
3 RV) with :data:`ACDC_LABEL_MAP`. A subject without ``_gt`` files is unlabelled (pretraining only).
ACDC has no vendor column: the vendor is recorded as ``unknown``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from datastore.conventions import acdc_to_mnms
from datastore.formats import Discovery, FormatError, SkippedSubject, SubjectSource, check_subject_id

ACDC = "acdc"
INFO_FILE = "Info.cfg"
#: ACDC label value -> store label value, as a ``label_map`` string (1 RV -> 3, 2 MYO -> 2, 3 LV -> 1).
ACDC_LABEL_MAP = ",".join(f"{v}:{acdc_to_mnms(v)}" for v in (1, 2, 3))
UNKNOWN_VENDOR = "unknown"
_CINE = re.compile(r"^(?P<id>.+)_4d\.nii\.gz$")
#: File names of ACDC images (cine or frame), for ``sspctl predict``'s label convention.
_ACDC_IMAGE = re.compile(r"^patient\d+_(4d|frame\d+)\.nii(\.gz)?$")


def is_acdc_image(path: Path | str) -> bool:
    """True for ``patientNNN_4d.nii.gz`` / ``patientNNN_frameXX.nii.gz`` (labels in ACDC order)."""
    return bool(_ACDC_IMAGE.match(Path(path).name))


def read_info(path: Path) -> dict[str, str]:
    """``Info.cfg`` as ``{key: value}`` (lines ``Key: value``).

    Raises:
        FormatError: unreadable, a line without ``:``, or ``ED``/``ES`` missing or not integers >= 1.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read ({type(exc).__name__})") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise FormatError(f"{path}: line {number} is not 'Key: value' ({line.strip()[:40]!r})")
        values[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if key not in values:
            raise FormatError(f"{path}: no {key} line")
        if not values[key].isdigit() or int(values[key]) < 1:
            raise FormatError(f"{path}: {key} must be a 1-based frame number, got {values[key]!r}")
    return values


def _number(values: dict[str, str], key: str, path: Path) -> float | None:
    raw = values.get(key, "")
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise FormatError(f"{path}: {key} is not a number ({raw!r})") from None


def subject_source(folder: Path, subject_id: str) -> SubjectSource:
    """The files and ``Info.cfg`` metadata of one ACDC subject folder.

    Raises:
        FormatError: ``Info.cfg`` missing or malformed.
    """
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise FormatError(f"{info_path}: file not found")
    values = read_info(info_path)
    ed, es = int(values["ED"]), int(values["ES"])
    files: dict[str, Path] = {"cine": folder / f"{subject_id}_4d.nii.gz", "info": info_path}
    for phase, frame in (("ed", ed), ("es", es)):
        image = folder / f"{subject_id}_frame{frame:02d}.nii.gz"
        label = folder / f"{subject_id}_frame{frame:02d}_gt.nii.gz"
        if image.is_file():
            files[phase] = image
        if label.is_file():
            files[f"{phase}_gt"] = label
    frames = _number(values, "NbFrame", info_path)
    info: dict[str, Any] = {
        "vendor": UNKNOWN_VENDOR,
        "vendor_name": None,
        "centre": None,
        "pathology": values.get("Group") or None,
        "group": values.get("Group") or None,
        "height": _number(values, "Height", info_path),
        "weight": _number(values, "Weight", info_path),
        "ed_index": ed - 1,
        "es_index": es - 1,
        "frames_expected": None if frames is None else int(frames),
        "index_source": str(info_path),
        "label_map": ACDC_LABEL_MAP,
    }
    return SubjectSource(ACDC, subject_id, files, info)


def discover_acdc(root: Path | str) -> Discovery:
    """Find ACDC subjects under ``root`` (``training/`` and ``testing/`` alike).

    Raises:
        FormatError: the root is not a directory (nothing usable).
    """
    root = Path(root)
    if not root.is_dir():
        raise FormatError(f"{root}: acdc directory not found")
    found = Discovery(dataset=ACDC, root=root)
    seen: dict[str, Path] = {}
    for cine in sorted(root.rglob("*_4d.nii.gz")):
        match = _CINE.match(cine.name)
        if match is None or cine.parent.name != match.group("id"):
            continue
        subject_id = match.group("id")
        try:
            check_subject_id(subject_id, str(cine.parent))
            if subject_id in seen:
                raise FormatError(f"{cine.parent}: duplicate subject id {subject_id!r} (also {seen[subject_id]})")
            seen[subject_id] = cine.parent
            found.subjects.append(subject_source(cine.parent, subject_id))
        except FormatError as exc:
            found.skipped.append(SkippedSubject(ACDC, subject_id, str(exc)))
    found.subjects.sort(key=lambda s: s.subject_id)  # training/ and testing/ interleave by id
    if not seen and not found.skipped:
        found.warnings.append(f"{root}: no ACDC subject folder (patientNNN/patientNNN_4d.nii.gz) found")
    return found
