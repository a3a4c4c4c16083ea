"""Write synthetic cine CMR datasets in the raw on-disk layouts of M&Ms and M&Ms-2.

M&Ms (``layout="mnms"``)::

    <out>/<ID>/<ID>_sa.nii.gz       4D cine (X, Y, Z, T), scanner integers
    <out>/<ID>/<ID>_sa_gt.nii.gz    4D labels, same shape, non-zero only at the ED and ES frames
    <out>/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv

M&Ms-2 (``layout="mnms2"``)::

    <out>/<NNN>/<NNN>_SA_CINE.nii.gz                       4D cine (X, Y, Z, T)
    <out>/<NNN>/<NNN>_SA_ED.nii.gz, <NNN>_SA_ES.nii.gz       3D, exact copies of cine frames
    <out>/<NNN>/<NNN>_SA_ED_gt.nii.gz, <NNN>_SA_ES_gt.nii.gz 3D labels
    <out>/dataset_information.csv

ACDC (``layout="acdc"``; the first two thirds under ``training/``, the rest under ``testing/``)::

    <out>/<part>/patientNNN/patientNNN_4d.nii.gz                 4D cine (X, Y, Z, T)
    <out>/<part>/patientNNN/patientNNN_frameXX.nii.gz            3D ED and ES frames (XX 1-based)
    <out>/<part>/patientNNN/patientNNN_frameXX_gt.nii.gz         3D labels in ACDC order (1 RV, 2 MYO, 3 LV)
    <out>/<part>/patientNNN/Info.cfg                             ED, ES, Group, Height, Weight, NbFrame

The last ``unlabelled`` ACDC subjects are written without ``_gt`` files (pretraining-only data).

The images come from ``datastore.phantom``; see ``docs/phantom.md`` for the conventions.
"""

from __future__ import annotations

import csv
import gzip
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from datastore.phantom import VENDOR_NAMES, PhantomVolume, render, sample_subject

Layout = Literal["mnms", "mnms2", "acdc"]
LAYOUTS: tuple[str, ...] = ("mnms", "mnms2", "acdc")

#: Seed stream of each layout (so ``mnms`` and ``mnms2`` written with one seed differ).
LAYOUT_STREAM: dict[str, int] = {"mnms": 0, "mnms2": 1, "acdc": 2}
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
MNMS2_CSV = "dataset_information.csv"
MNMS_COLUMNS = ["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex", "Height", "Weight"]
MNMS2_COLUMNS = ["SUBJECT_CODE", "DISEASE", "SEX", "AGE", "SCANNER", "FIELD", "VENDOR"]

#: Pathology codes and their sampling weights per layout (rough shares of the real datasets).
MNMS_PATHOLOGIES: dict[str, float] = {"NOR": 0.3, "DCM": 0.2, "HCM": 0.2, "HHD": 0.08, "ARV": 0.06, "IHD": 0.06, "AHS": 0.04, "Other": 0.06}
MNMS2_PATHOLOGIES: dict[str, float] = {"NOR": 0.2, "LV": 0.2, "HCM": 0.2, "ARR": 0.1, "FALL": 0.08, "CIA": 0.08, "TRI": 0.08, "DRV": 0.06}
#: Vendor letters and sampling weights per layout (M&Ms-2 has no Canon).
MNMS_VENDORS: dict[str, float] = {"A": 0.35, "B": 0.3, "C": 0.15, "D": 0.2}
MNMS2_VENDORS: dict[str, float] = {"A": 0.55, "B": 0.2, "C": 0.25}
#: ACDC: five groups of equal size, one Siemens site.
ACDC_GROUPS: dict[str, float] = {"NOR": 0.2, "DCM": 0.2, "HCM": 0.2, "MINF": 0.2, "RV": 0.2}
ACDC_VENDORS: dict[str, float] = {"A": 1.0}
LAYOUT_PATHOLOGIES = {"mnms": MNMS_PATHOLOGIES, "mnms2": MNMS2_PATHOLOGIES, "acdc": ACDC_GROUPS}
LAYOUT_VENDORS = {"mnms": MNMS_VENDORS, "mnms2": MNMS2_VENDORS, "acdc": ACDC_VENDORS}
#: M&Ms centres per vendor letter.
MNMS_CENTRES: dict[str, tuple[int, ...]] = {"A": (1, 6), "B": (2, 3), "C": (4,), "D": (5,)}
#: M&Ms-2 raw ``VENDOR`` strings (as in the real file) and scanner models per vendor letter.
MNMS2_VENDOR_STRINGS: dict[str, str] = {"A": "SIEMENS", "B": "Philips Medical Systems", "C": "GE MEDICAL SYSTEMS"}
MNMS2_SCANNERS: dict[str, tuple[tuple[str, float], ...]] = {
    "A": (("Avanto", 1.5), ("Symphony", 1.5), ("TrioTim", 3.0), ("Avanto Fit", 1.5)),
    "B": (("Achieva", 1.5), ("Achieva", 3.0)),
    "C": (("Signa Excite", 1.5), ("Signa Explorer", 1.5), ("SIGNA EXCITE", 3.0)),
}


class SynthConfig(BaseModel):
    """What ``sspctl synth`` writes: layout, subject count, seed and the grid ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Layout = Field("mnms", description="Raw on-disk layout: 'mnms' (M&Ms), 'mnms2' (M&Ms-2) or 'acdc' (ACDC).")
    n_subjects: int = Field(20, ge=1, le=10_000, description="Number of subjects to write.")
    seed: int = Field(0, ge=0, description="Root seed; subject i uses SeedSequence(seed).spawn child i.")
    size: int = Field(128, ge=32, le=1024, description="Stored matrix columns in pixels (rows may be 80-100% of it).")
    frames: tuple[int, int] = Field((20, 30), description="Inclusive range of cine frames per subject.")
    slices: tuple[int, int] = Field((8, 12), description="Inclusive range of short-axis slices per subject.")
    trivial: bool = Field(False, description="Clean images: no confounders, noise, shading or texture.")
    first_id: int = Field(1, ge=1, description="M&Ms-2 and ACDC: number of the first subject folder (001...).")
    vendors: tuple[str, ...] | None = Field(None, description="Restrict to these vendor letters (A-D).")
    unlabelled: int = Field(0, ge=0, description="ACDC only: write the last N subjects without _gt label files.")

    @field_validator("frames", "slices")
    @classmethod
    def _check_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 3 <= lo <= hi:
            raise ValueError(f"expected MIN MAX with 3 <= MIN <= MAX, got {lo} {hi}")
        return value

    @field_validator("vendors")
    @classmethod
    def _check_vendors(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        allowed = LAYOUT_VENDORS[info.data.get("layout") or "mnms"]
        for vendor in value or ():
            if vendor not in allowed:
                raise ValueError(f"vendor {vendor!r} not in {sorted(allowed)} for this layout")
        return value


def _subject_id_mnms(rng: np.random.Generator, taken: set[str]) -> str:
    """A 6-character code like the real M&Ms ``External code`` (letter digit letter digit letter digit)."""
    while True:
        chars = []
        for position in range(6):
            pool = string.ascii_uppercase if position % 2 == 0 else string.digits
            chars.append(pool[int(rng.integers(len(pool)))])
        code = "".join(chars)
        if code not in taken:
            taken.add(code)
            return code


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    probs = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=probs / probs.sum()))]


def _save_nifti(array_xyz: np.ndarray, affine: np.ndarray, path: Path, zooms: Sequence[float]) -> None:
    """Write a NIfTI-1 ``.nii.gz`` with sform = qform = ``affine`` and header zooms ``zooms``.

    gzip level 1: about 4x faster than nibabel's default for a few percent more bytes.
    """
    img = nib.Nifti1Image(array_xyz, affine)
    img.header.set_zooms(tuple(float(z) for z in zooms))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _to_nifti_axes(volume_tzyx: np.ndarray) -> np.ndarray:
    """(T, Z, Y, X) -> (X, Y, Z, T), the NIfTI array order of a 4D cine."""
    return np.ascontiguousarray(np.transpose(volume_tzyx, (3, 2, 1, 0)))


def _check_reader_invariants(sid: str, vol: PhantomVolume) -> None:
    """Fail loudly if the rules readers use to find ED/ES would be ambiguous for this subject.

    M&Ms readers take ED as the annotated frame with more labelled voxels; M&Ms-2 readers find
    ED/ES as the cine frame equal to the ``_SA_ED``/``_SA_ES`` volume.
    """
    p = vol.params
    if np.count_nonzero(vol.labels[p.ed_index]) <= np.count_nonzero(vol.labels[p.es_index]):
        raise RuntimeError(f"subject {sid}: ED frame does not have more labelled voxels than ES")
    for name, index in (("ED", p.ed_index), ("ES", p.es_index)):
        same = [t for t in range(vol.stored.shape[0]) if np.array_equal(vol.stored[t], vol.stored[index])]
        if same != [index]:
            raise RuntimeError(f"subject {sid}: {name} frame {index} is not unique in the cine (equal frames {same})")


def _write_mnms(folder: Path, sid: str, vol: PhantomVolume) -> None:
    p = vol.params
    gt = np.zeros_like(vol.labels)
    gt[p.ed_index] = vol.labels[p.ed_index]
    gt[p.es_index] = vol.labels[p.es_index]
    zooms4 = (*p.spacing_xyz, 1.0 / p.shape_tzyx[0])  # frame interval (s) of a 1 s cycle
    _save_nifti(_to_nifti_axes(vol.stored), p.affine, folder / f"{sid}_sa.nii.gz", zooms4)
    _save_nifti(_to_nifti_axes(gt), p.affine, folder / f"{sid}_sa_gt.nii.gz", zooms4)


def _write_mnms2(folder: Path, sid: str, vol: PhantomVolume) -> None:
    p = vol.params
    zooms4 = (*p.spacing_xyz, 1.0 / p.shape_tzyx[0])
    _save_nifti(_to_nifti_axes(vol.stored), p.affine, folder / f"{sid}_SA_CINE.nii.gz", zooms4)
    for phase, index in (("ED", p.ed_index), ("ES", p.es_index)):
        frame = np.ascontiguousarray(np.transpose(vol.stored[index], (2, 1, 0)))
        label = np.ascontiguousarray(np.transpose(vol.labels[index], (2, 1, 0)))
        _save_nifti(frame, p.affine, folder / f"{sid}_SA_{phase}.nii.gz", p.spacing_xyz)
        _save_nifti(label, p.affine, folder / f"{sid}_SA_{phase}_gt.nii.gz", p.spacing_xyz)


def _write_acdc(folder: Path, sid: str, vol: PhantomVolume, demo: Demographics, labelled: bool) -> None:
    p = vol.params
    zooms4 = (*p.spacing_xyz, 1.0 / p.shape_tzyx[0])
    _save_nifti(_to_nifti_axes(vol.stored), p.affine, folder / f"{sid}_4d.nii.gz", zooms4)
    to_acdc = np.array([0, 3, 2, 1], np.uint8)  # store order (1 LV, 3 RV) -> ACDC order (1 RV, 3 LV)
    for index in (p.ed_index, p.es_index):
        stem = folder / f"{sid}_frame{index + 1:02d}"
        frame = np.ascontiguousarray(np.transpose(vol.stored[index], (2, 1, 0)))
        _save_nifti(frame, p.affine, Path(f"{stem}.nii.gz"), p.spacing_xyz)
        if labelled:
            label = np.ascontiguousarray(np.transpose(to_acdc[vol.labels[index]], (2, 1, 0)))
            _save_nifti(label, p.affine, Path(f"{stem}_gt.nii.gz"), p.spacing_xyz)
    (folder / "Info.cfg").write_text(
        f"ED: {p.ed_index + 1}\nES: {p.es_index + 1}\nGroup: {demo.pathology}\nHeight: {demo.height}\n"
        f"NbFrame: {p.shape_tzyx[0]}\nWeight: {demo.weight}\n"
    )


@dataclass(frozen=True)
class Demographics:
    """CSV fields drawn per subject besides the images (vendor letter, pathology code, ...)."""

    vendor: str
    pathology: str
    sex: str
    age: int
    height: float
    weight: float


def synth_subject(
    seed: int,
    index: int,
    layout: Layout,
    size: int,
    frames: tuple[int, int],
    slices: tuple[int, int],
    trivial: bool = False,
    vendors: Sequence[str] | None = None,
) -> tuple[PhantomVolume, Demographics, np.random.Generator]:
    """Sample and render subject ``index`` of dataset ``seed``; also draw its CSV demographics.

    The subject depends only on ``(seed, layout, index)`` and the grid arguments, not on how many
    other subjects are written. Returns the volume, the demographics and the subject's metadata
    generator (for IDs and CSV extras, drawn after the demographics).
    """
    # == SeedSequence(seed).spawn(2)[layout].spawn(n)[index]: the two layouts never share anatomy.
    child = np.random.SeedSequence(seed, spawn_key=(LAYOUT_STREAM[layout], index))
    meta_seq, geo_seq, noise_seq = child.spawn(3)
    meta_rng, geo_rng = np.random.default_rng(meta_seq), np.random.default_rng(geo_seq)
    noise_rng = np.random.Generator(np.random.SFC64(noise_seq))  # faster normals for the noise
    vendor_weights = LAYOUT_VENDORS[layout]
    if vendors:
        vendor_weights = {v: w for v, w in vendor_weights.items() if v in vendors}
    vendor = _choice(meta_rng, vendor_weights)
    pathology = _choice(meta_rng, LAYOUT_PATHOLOGIES[layout])
    sex = "M" if meta_rng.random() < 0.6 else "F"
    demographics = Demographics(
        vendor=vendor,
        pathology=pathology,
        sex=sex,
        age=int(meta_rng.integers(12, 85)),
        height=round(float(meta_rng.normal(176 if sex == "M" else 163, 8)), 1),
        weight=round(float(meta_rng.normal(80 if sex == "M" else 66, 12)), 1),
    )
    params = sample_subject(geo_rng, vendor, pathology, size, frames, slices, trivial=trivial)
    return render(params, noise_rng), demographics, meta_rng


def write_dataset(
    out: Path,
    layout: Layout,
    n_subjects: int,
    seed: int,
    size: int = 96,
    frames: tuple[int, int] = (20, 30),
    slices: tuple[int, int] = (8, 12),
    trivial: bool = False,
    first_id: int = 1,
    vendors: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    unlabelled: int = 0,
) -> list[str]:
    """Write ``n_subjects`` phantom subjects under ``out`` in the raw layout of M&Ms or M&Ms-2.

    Args:
        out: dataset folder (created if missing; existing subject files are overwritten).
        layout: ``"mnms"`` or ``"mnms2"``.
        n_subjects: number of subjects.
        seed: root seed; the same arguments give byte-identical arrays.
        size: stored matrix columns (pixels); rows are 80-100% of it depending on the vendor.
        frames: inclusive range of cine frames T per subject.
        slices: inclusive range of slices Z per subject.
        trivial: clean images (no confounders, noise, shading) for smoke tests.
        first_id: M&Ms-2 and ACDC, number of the first subject folder.
        vendors: restrict to these vendor letters.
        progress: called with 1 after each subject (for a progress bar).
        unlabelled: ACDC only, write the last N subjects without label files.

    Returns:
        The subject IDs written, in order (folder names).

    Raises:
        pydantic.ValidationError: an argument is out of range (the message names it).
    """
    config = SynthConfig(
        layout=layout, n_subjects=n_subjects, seed=seed, size=size, frames=frames, slices=slices,
        trivial=trivial, first_id=first_id, vendors=tuple(vendors) if vendors else None, unlabelled=unlabelled,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    ids: list[str] = []
    rows: list[list[object]] = []
    for index in range(config.n_subjects):
        vol, demo, meta_rng = synth_subject(
            config.seed, index, config.layout, config.size, config.frames, config.slices,
            config.trivial, config.vendors,
        )
        p = vol.params
        if config.layout == "mnms":
            sid = _subject_id_mnms(meta_rng, taken)
            centres = MNMS_CENTRES[demo.vendor]
            centre = centres[int(meta_rng.integers(len(centres)))]
            rows.append([
                index, sid, VENDOR_NAMES[demo.vendor], demo.vendor, centre, p.ed_index, p.es_index,
                demo.age, demo.pathology, demo.sex, demo.height, demo.weight,
            ])
        elif config.layout == "mnms2":
            sid = f"{config.first_id + index:03d}"
            scanners = MNMS2_SCANNERS[demo.vendor]
            scanner, field = scanners[int(meta_rng.integers(len(scanners)))]
            rows.append([
                config.first_id + index, demo.pathology, demo.sex, demo.age, scanner, field,
                MNMS2_VENDOR_STRINGS[demo.vendor],
            ])
        else:
            sid = f"patient{config.first_id + index:03d}"
        _check_reader_invariants(sid, vol)
        if config.layout == "acdc":
            part = "training" if index < (2 * config.n_subjects + 2) // 3 else "testing"
            folder = out / part / sid
            folder.mkdir(parents=True, exist_ok=True)
            _write_acdc(folder, sid, vol, demo, labelled=index < config.n_subjects - config.unlabelled)
        else:
            folder = out / sid
            folder.mkdir(exist_ok=True)
            (_write_mnms if config.layout == "mnms" else _write_mnms2)(folder, sid, vol)
        ids.append(sid)
        if progress is not None:
            progress(1)
    if config.layout == "acdc":
        return ids  # ACDC keeps its metadata in each subject's Info.cfg
    csv_path = out / (MNMS_CSV if config.layout == "mnms" else MNMS2_CSV)
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MNMS_COLUMNS if config.layout == "mnms" else MNMS2_COLUMNS)
        writer.writerows(rows)
    return ids
