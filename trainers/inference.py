"""Segment a NIfTI scan with a fine-tuned model and write a label NIfTI on the input's grid.

Steps (the training/evaluation preprocessing of ``datastore/preprocess.py`` and
``trainers/evaluation.py``):

1. read ``.nii``/``.nii.gz`` (``datastore.formats.load_nifti``); accept a 3D volume ``(X, Y, Z)`` or a
   4D cine ``(X, Y, Z, T)``; refuse 2D, non-finite intensities, and invalid spacing;
2. canonical orientation ``(T, Z, Y, X)``, base at ``Z = 0`` decided from the world geometry
   (``datastore.geometry.decide_base``; no labels here, so an ambiguous stack keeps its file order);
3. intensities: subtract the minimum of the whole scan, z-score with the mean and standard deviation
   of the whole scan (all frames), as ingest does per subject;
4. every frame: slices resampled to the model grid (``image_size`` px at the model's spacing,
   centred on the image centre), logits mapped back to the native grid bicubically with border
   padding, argmax;
5. undo the reorientation and write uint8 labels with the input's affine and shape, in the input's
   label convention (ACDC files: 1 RV, 2 MYO, 3 LV) or M&Ms order {0 background, 1 LV, 2 MYO, 3 RV}.

A fine-tuned model on disk is a directory holding ``model.pt`` (a ``UNet2d`` state dict, loadable
with ``torch.load(weights_only=True)``) and ``model.json`` (``image_size``, ``spacing_mm``,
``num_classes``, ...; see ``docs/evaluation.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL_FILE = "model.pt"
MODEL_META = "model.json"


class InferenceError(ValueError):
    """A model or scan cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class Segmenter:
    """A loaded fine-tuned model: the network (eval mode, on ``device``) and its ``model.json``."""

    model: torch.nn.Module
    meta: dict[str, Any]
    device: torch.device

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def spacing_mm(self) -> float:
        return float(self.meta["spacing_mm"])


def model_dir(path: str | Path) -> Path:
    """The model directory of ``path``: itself, or the folder of a ``model.pt``/``model.json`` file."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise InferenceError(f"{path}: model not found")
    if not (path / MODEL_META).is_file():
        raise InferenceError(f"{path}: no {MODEL_META} here (expected a fine-tuned model directory from sspctl finetune)")
    return path


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """Load a fine-tuned model directory (or its ``model.pt``) onto ``device``.

    Raises:
        InferenceError: missing or malformed ``model.json``/``model.pt``, or weights that do not fit.
    """
    from trainers.models.unet import UNet2d
    from trainers.weights import WeightsError, load_weights

    directory = model_dir(path)
    meta_path = directory / MODEL_META
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InferenceError(f"{meta_path}: not valid JSON ({exc})") from None
    for key in ("image_size", "spacing_mm"):
        if key not in meta:
            raise InferenceError(f"{meta_path}: missing key {key}")
    try:
        state = load_weights(directory / meta.get("file", MODEL_FILE))
    except WeightsError as exc:
        raise InferenceError(str(exc)) from None
    try:
        model = UNet2d(int(meta["image_size"]), int(meta.get("num_classes", 4)), width=int(meta.get("model_width", 32)))
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise InferenceError(f"{directory / MODEL_FILE}: does not fit the model of {meta_path} ({str(exc).splitlines()[0]})") from None
    device = torch.device(device)
    model.to(device).eval()
    return Segmenter(model=model, meta=meta, device=device)


def read_scan(path: str | Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read a 3D or 4D NIfTI: ``(data float32 (X, Y, Z[, T]), affine (4, 4), header)``.

    Raises:
        InferenceError: not a NIfTI file, not 3D/4D, non-finite values, or invalid spacing.
    """
    from datastore.formats import FormatError, load_nifti

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: input file not found")
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise InferenceError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        image, _ = load_nifti(path)
    except FormatError as exc:
        raise InferenceError(str(exc)) from None
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if not 3 <= len(shape) <= 4:
        raise InferenceError(f"{path}: image is {len(shape)}D {shape}; expected a 3D volume (X, Y, Z) or 4D cine (X, Y, Z, T)")
    if min(shape[:2]) < 2:
        raise InferenceError(f"{path}: in-plane size {shape[:2]} is too small to segment")
    affine = np.asarray(image.affine, dtype=np.float64)
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not (np.all(np.isfinite(zooms)) and np.all(zooms > 0) and np.all(np.isfinite(affine)) and np.all(norms > 1e-6)):
        shown = tuple(round(float(v), 4) for v in (norms if np.all(np.isfinite(norms)) else zooms))
        raise InferenceError(f"{path}: invalid voxel spacing {shown} mm (must be finite and > 0)")
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - truncated data and the like
        raise InferenceError(f"{path}: cannot read the voxel data ({str(exc).splitlines()[0]})") from None
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InferenceError(f"{path}: {bad} non-finite (NaN/inf) intensities")
    return data, affine, image.header


def normalise(canonical: np.ndarray, source: str = "<scan>") -> np.ndarray:
    """Subtract the scan's minimum, then z-score with its mean and std (all frames together)."""
    shifted = canonical - np.float32(canonical.min())
    mean, std = float(shifted.mean(dtype=np.float64)), float(shifted.std(dtype=np.float64))
    if not std > 0:
        raise InferenceError(f"{source}: constant intensities, nothing to segment")
    return ((shifted - np.float32(mean)) / np.float32(std)).astype(np.float32)


def predict_array(segmenter: Segmenter, data: np.ndarray, affine: np.ndarray, source: str = "<scan>",
                  progress: bool = False) -> np.ndarray:
    """Labels ``uint8`` of the input's shape ``(X, Y, Z[, T])`` for NIfTI-ordered ``data``."""
    from tqdm import tqdm

    from datastore.geometry import NativeGeometry
    from trainers.evaluation import model_scores_fn, segment_volume

    geometry = NativeGeometry.from_affine(affine, data.shape)
    canonical = normalise(geometry.to_canonical(data), source)  # (Z, Y, X) or (T, Z, Y, X)
    frames = canonical[None] if canonical.ndim == 3 else canonical
    scores_fn = model_scores_fn(segmenter.model, segmenter.device)
    labels = np.stack([
        segment_volume(scores_fn, frame, geometry, segmenter.image_size, segmenter.spacing_mm).label
        for frame in tqdm(frames, desc="predict", unit="frame", disable=not progress)
    ])  # (T, Z, Y, X)
    native = geometry.to_native(labels if data.ndim == 4 else labels[0])
    assert native.shape == data.shape, (native.shape, data.shape)
    return native.astype(np.uint8)


def output_convention(input_path: str | Path, labels: str) -> str | None:
    """The ``label_map`` (input convention -> store order) to write predictions in, or None for
    M&Ms order.

    ``labels``: ``mnms`` (1 LV, 2 MYO, 3 RV), ``acdc`` (1 RV, 2 MYO, 3 LV), ``input`` (ACDC order for
    an ACDC file name ``patientNNN_4d``/``_frameXX``, else M&Ms order) or an explicit map
    ``SOURCE:TARGET,...`` in the manifest's syntax (the input's values onto the store's).

    Raises:
        InferenceError: an unknown value or a malformed map.
    """
    from datastore.acdc import ACDC_LABEL_MAP, is_acdc_image
    from datastore.formats import FormatError, parse_label_map

    if labels == "mnms":
        return None
    if labels == "acdc" or (labels == "input" and is_acdc_image(input_path)):
        return ACDC_LABEL_MAP
    if labels == "input":
        return None
    try:
        parse_label_map(labels, "--labels")
    except FormatError as exc:
        raise InferenceError(f"{exc} (or use input, mnms, acdc)") from None
    return labels


def to_convention(labels: np.ndarray, label_map: str | None) -> np.ndarray:
    """Store-order labels (1 LV, 2 MYO, 3 RV) -> the convention whose ``label_map`` maps onto them."""
    if label_map is None:
        return labels
    from datastore.formats import parse_label_map

    lookup = np.zeros(4, np.uint8)
    for source_value, store_value in parse_label_map(label_map, "label_map").items():
        lookup[store_value] = source_value
    return lookup[labels]


def predict_nifti(segmenter: Segmenter, input_path: str | Path, output_path: str | Path,
                  progress: bool = True, labels: str = "input") -> Path:
    """Segment ``input_path`` and write the labels to ``output_path`` with the input's affine and shape.

    ``labels`` picks the written label convention (:func:`output_convention`).
    """
    import nibabel as nib

    convention = output_convention(input_path, labels)
    data, affine, header = read_scan(input_path)
    labels_out = to_convention(predict_array(segmenter, data, affine, source=str(input_path), progress=progress), convention)
    out_header = header.copy()
    out_header.set_data_dtype(np.uint8)
    out_header.set_slope_inter(1.0, 0.0)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = klass(labels_out.reshape(tuple(int(n) for n in header.get_data_shape())), affine, out_header)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, output_path)
    return output_path
