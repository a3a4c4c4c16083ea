"""Read a subject manifest (CSV or YAML): any site's scans, one row per subject.

Columns (``docs/store.md``, "Manifest"); paths are relative to the manifest's folder::

    subject_id           required; letters, digits, '_' and '-'
    cine                 4D cine (X, Y, Z, T); or, without it,
    ed, es               3D ED / ES volumes (ED alone is a single-phase subject)
    ed_label, es_label   optional 3D labels (both or neither; none = unlabelled, pretraining only)
    ed_frame, es_frame   optional 0-based cine frame indices of ED / ES
    label_map            optional SOURCE:TARGET pairs onto 1 LV, 2 MYO, 3 RV, e.g. 1:3,2:2,3:1
    vendor, centre, group, dataset   optional metadata (vendor defaults to 'unknown'; dataset to
                                     the manifest's file stem)

A row with a problem becomes a skipped subject whose reason names the manifest, the row and the
column (``site.csv: row 3, column 'cine': file not found (scans/p3.nii.gz)``); the other rows
still land. Problems with the whole file (unreadable, no ``subject_id`` column, unknown columns)
raise :class:`FormatError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from datastore.formats import (
    Discovery,
    FormatError,
    SkippedSubject,
    SubjectSource,
    check_subject_id,
    parse_label_map,
    sha256_file,
)

IMAGE_COLUMNS = ("cine", "ed", "es", "ed_label", "es_label")
META_COLUMNS = ("vendor", "centre", "group", "dataset")
COLUMNS = ("subject_id", *IMAGE_COLUMNS, "ed_frame", "es_frame", "label_map", *META_COLUMNS)
#: Manifest column -> reader file role.
ROLES = {"cine": "cine", "ed": "ed", "es": "es", "ed_label": "ed_gt", "es_label": "es_gt"}
_DATASET = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _rows(path: Path) -> list[dict[str, Any]]:
    """The manifest's rows as dicts of strings (CSV: header row; YAML: a list, or ``subjects:``)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FormatError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the manifest ({type(exc).__name__})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - strings only: ids keep zeros
        except yaml.YAMLError as exc:
            raise FormatError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and "subjects" in data:
            data = data["subjects"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FormatError(f"{path}: expected a list of subject mappings (or 'subjects:' holding one)")
        return [{str(k): "" if v is None else v for k, v in r.items()} for r in data]
    if path.suffix.lower() != ".csv":
        raise FormatError(f"{path}: manifest must be .csv, .yaml or .yml")
    import csv
    import io

    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise FormatError(f"{path}: empty manifest (no header row)")
    return [{k.strip(): (v or "") for k, v in r.items() if k is not None} for r in reader]


def _frame(value: str, where: str, column: str) -> int | None:
    if value == "":
        return None
    if not value.isdigit():
        raise FormatError(f"{where}, column {column!r}: expected a 0-based frame index, got {value!r}")
    return int(value)


def manifest_dataset(path: Path) -> str:
    """Default dataset name of a manifest's subjects: its file stem, lower-case, ``[a-z0-9_]``."""
    name = re.sub(r"[^a-z0-9_]", "_", path.stem.lower()).strip("_") or "manifest"
    return name if name[0].isalpha() else f"m_{name}"


def _subject(row: dict[str, Any], line: int, path: Path, default_dataset: str) -> SubjectSource:
    where = f"{path}: row {line}"
    values = {k: str(v).strip() for k, v in row.items()}
    subject_id = values.get("subject_id", "")
    if not subject_id:
        raise FormatError(f"{where}, column 'subject_id': empty")
    check_subject_id(subject_id, f"{where}, column 'subject_id'")
    files: dict[str, Path] = {}
    for column in IMAGE_COLUMNS:
        if values.get(column):
            file = (path.parent / values[column]).resolve()
            if not file.is_file():
                raise FormatError(f"{where}, column {column!r}: file not found ({values[column]})")
            files[ROLES[column]] = file
    if "cine" not in files and "ed" not in files:
        raise FormatError(f"{where}, column 'cine': give a cine (4D) or an ed volume (3D)")
    if "cine" not in files and "es" not in files and "es_gt" in files:
        raise FormatError(f"{where}, column 'es_label': an ES label needs an es volume or a cine")
    names = [f.name for f in files.values()]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: two columns name files with the same file name ({', '.join(names)})")
    dataset = values.get("dataset") or default_dataset
    if not _DATASET.match(dataset):
        raise FormatError(f"{where}, column 'dataset': {dataset!r} must be lower-case letters, digits and '_'")
    info: dict[str, Any] = {
        "vendor": values.get("vendor") or "unknown",
        "vendor_name": None,
        "centre": values.get("centre") or None,
        "pathology": values.get("group") or None,
        "group": values.get("group") or None,
        "ed_index": _frame(values.get("ed_frame", ""), where, "ed_frame"),
        "es_index": _frame(values.get("es_frame", ""), where, "es_frame"),
        "index_source": f"{where}, column 'ed_frame'/'es_frame'",
        "manifest": str(path),
    }
    if values.get("label_map"):
        parse_label_map(values["label_map"], f"{where}, column 'label_map'")  # fail early, per row
        info["label_map"] = values["label_map"]
    if "cine" not in files and (info["ed_index"] is not None or info["es_index"] is not None):
        raise FormatError(f"{where}, column 'ed_frame': frame indices need a cine")
    return SubjectSource(dataset, subject_id, files, info)


def discover_manifest(path: Path | str) -> Discovery:
    """Read a manifest: usable rows become subjects, bad rows skipped subjects naming row and column.

    Raises:
        FormatError: the file is unusable as a whole (missing, unreadable, no ``subject_id``
            column, unknown columns).
    """
    path = Path(path).resolve()
    rows = _rows(path)
    columns = {k for r in rows for k in r}
    if rows and "subject_id" not in columns:
        raise FormatError(f"{path}: no 'subject_id' column")
    unknown = sorted(columns - set(COLUMNS))
    if unknown:
        raise FormatError(f"{path}: unknown column(s) {', '.join(repr(c) for c in unknown)} (expected {', '.join(COLUMNS)})")
    default = manifest_dataset(path)
    found = Discovery(dataset=default, root=path.parent)
    found.csv_checksums[str(path)] = sha256_file(path)
    first_row: dict[tuple[str, str], int] = {}
    header = 1 if path.suffix.lower() == ".csv" else 0
    for index, row in enumerate(rows, start=1):
        line = index + header
        try:
            source = _subject(row, line, path, default)
        except FormatError as exc:
            raw = str(row.get("subject_id", "")).strip() or f"<row {line}>"
            found.skipped.append(SkippedSubject(str(row.get("dataset") or default), raw, str(exc)))
            continue
        key = (source.dataset, source.subject_id)
        if key in first_row:
            found.skipped.append(
                SkippedSubject(
                    source.dataset, source.subject_id,
                    f"{path}: row {line}, column 'subject_id': duplicate id {source.subject_id!r} (first in row {first_row[key]})",
                )
            )
            continue
        first_row[key] = line
        found.subjects.append(source)
    return found
