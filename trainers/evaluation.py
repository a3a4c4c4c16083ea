"""Native-space evaluation of a segmentation model (method-spec section 6).

For each test subject and phase (ED, ES): the canonical native volume ``(Z, Y, X)`` is resampled
slice by slice to the model grid (``image_size`` x ``image_size`` pixels at ``spacing_mm``,
centred on the *image* centre: no heart centring, no augmentation), the slices of the volume form
one batch, the model's full-resolution logits ``(Z, C, S, S)`` are mapped back to the native grid
(bicubic on the scores, border padding), and the argmax is compared with the native label.

Outputs (pandas, long format):

- 3D table ``subject_id, phase, class, dice``: one row per subject x phase x class (LV, MYO, RV),
  Dice over the whole native volume, empty-mask rule of ``datastore/conventions.py``;
- 2D table ``subject_id, phase, slice, position, class, dice``: per native slice, ``position`` =
  ``(slice - base) / (apex - base)`` with base/apex the first/last slice with ground-truth
  foreground (NaN outside that range or when only one slice has foreground).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from datastore.conventions import FOREGROUND_CLASSES, LABEL_NAMES, PHASE_ED, PHASE_ES, PHASE_NAMES
from datastore.geometry import NativeGeometry
from trainers.metrics import dice_per_class, dice_per_slice

#: Maps model-grid input slices ``(N, 1, S, S)`` float32 to logits ``(N, C, S, S)``.
ScoresFn = Callable[[torch.Tensor], torch.Tensor]

DICE_3D_COLUMNS = ["subject_id", "phase", "class", "dice"]
DICE_2D_COLUMNS = ["subject_id", "phase", "slice", "position", "class", "dice"]


@dataclass(frozen=True)
class Segmentation:
    """Result of segmenting one native volume.

    Attributes:
        label: predicted labels ``(Z, Y, X)`` uint8 on the native grid.
        scores: per-class scores ``(C, Z, Y, X)`` float32 on the native grid (before argmax).
    """

    label: np.ndarray
    scores: np.ndarray


def model_scores_fn(model: nn.Module, device: torch.device | str = "cpu", batch_size: int = 64) -> ScoresFn:
    """Wrap a ``UNet2d`` as a ``ScoresFn``: eval mode, no grad, full-resolution head only."""

    def scores(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        outs = []
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                outs.append(model(x[start : start + batch_size].to(device)).float().cpu())
        return torch.cat(outs, dim=0)

    return scores


def segment_volume(
    scores_fn: ScoresFn,
    image: np.ndarray,
    geometry: NativeGeometry,
    image_size: int,
    spacing_mm: float,
) -> Segmentation:
    """Segment a canonical native image ``(Z, Y, X)`` (model-ready intensities) in native space.

    ``geometry`` gives the in-plane spacing (mm) used to build the model grid; the model grid is
    ``image_size`` pixels at ``spacing_mm`` mm centred on the native image centre.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {image.shape}")
    # Training slices were zero-padded before the z-score, so their padding is the subject's
    # minimum; pad these already z-scored slices with the volume's minimum, not with 0 (its mean).
    volume = np.asarray(image, dtype=np.float32)
    floor = float(volume.min())
    grid = geometry.resample_to_model(volume - floor, spacing_mm, image_size, mode="bicubic") + floor
    logits = scores_fn(torch.from_numpy(np.ascontiguousarray(grid))[:, None])  # (Z, C, S, S)
    scores = geometry.scores_to_native(logits.permute(1, 0, 2, 3).contiguous(), spacing_mm)  # (C, Z, Y, X)
    scores_np = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    return Segmentation(label=scores_np.argmax(0).astype(np.uint8), scores=scores_np.astype(np.float32))


def relative_positions(truth: np.ndarray) -> np.ndarray:
    """``(slice - base) / (apex - base)`` per slice of a ``(Z, Y, X)`` label; NaN outside [base, apex]."""
    has_fg = np.flatnonzero((truth > 0).reshape(truth.shape[0], -1).any(1))
    pos = np.full(truth.shape[0], np.nan)
    if has_fg.size >= 2:
        base, apex = int(has_fg[0]), int(has_fg[-1])
        idx = np.arange(base, apex + 1)
        pos[base : apex + 1] = (idx - base) / (apex - base)
    elif has_fg.size == 1:
        pos[has_fg[0]] = 0.0
    return pos


def dice_tables(
    subject_id: str, phase: int, pred: np.ndarray, truth: np.ndarray
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the 3D and 2D Dice tables for one subject x phase (see module doc)."""
    phase_name = PHASE_NAMES[phase]
    rows3 = [
        {"subject_id": subject_id, "phase": phase_name, "class": LABEL_NAMES[c], "dice": d}
        for c, d in dice_per_class(pred, truth, FOREGROUND_CLASSES).items()
    ]
    per_slice = dice_per_slice(pred, truth, FOREGROUND_CLASSES)
    positions = relative_positions(truth)
    rows2 = [
        {"subject_id": subject_id, "phase": phase_name, "slice": z, "position": positions[z],
         "class": LABEL_NAMES[c], "dice": per_slice[z, j]}
        for z in range(per_slice.shape[0])
        for j, c in enumerate(FOREGROUND_CLASSES)
    ]
    return rows3, rows2


@dataclass(frozen=True)
class EvaluationResult:
    """3D and 2D Dice tables plus a few native segmentations kept for figures."""

    dice3d: pd.DataFrame
    dice2d: pd.DataFrame
    examples: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]  # (subject, phase, image, truth, pred)

    def summary(self) -> dict[str, float]:
        """Mean 3D Dice overall and per class (``dice_mean``, ``dice_LV``, ...)."""
        out = {"dice_mean": float(self.dice3d["dice"].mean())} if len(self.dice3d) else {}
        for name, group in self.dice3d.groupby("class"):
            out[f"dice_{name}"] = float(group["dice"].mean())
        return out

    def write(self, directory: str | Path, prefix: str = "test") -> list[Path]:
        """Write ``<prefix>_dice3d.csv`` and ``<prefix>_dice2d.csv`` (and the overlay PNG) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{prefix}_dice3d.csv", directory / f"{prefix}_dice2d.csv"]
        self.dice3d.to_csv(paths[0], index=False)
        self.dice2d.to_csv(paths[1], index=False)
        if self.examples:
            subject, phase, image, truth, pred = self.examples[0]
            paths.append(overlay_figure(image, truth, pred, directory / f"{prefix}_overlay.png",
                                        title=f"{subject} {phase}"))
        return paths


def evaluate_volumes(
    scores_fn: ScoresFn,
    volumes: Iterable[tuple[str, int, np.ndarray, np.ndarray, NativeGeometry]],
    image_size: int,
    spacing_mm: float,
    keep_examples: int = 1,
    progress: bool = False,
    total: int | None = None,
) -> EvaluationResult:
    """Evaluate ``(subject_id, phase, image (Z,Y,X), label (Z,Y,X), geometry)`` items in native space."""
    from tqdm import tqdm

    rows3: list[dict[str, Any]] = []
    rows2: list[dict[str, Any]] = []
    examples = []
    for subject_id, phase, image, truth, geometry in tqdm(volumes, desc="evaluate", total=total, disable=not progress):
        seg = segment_volume(scores_fn, image, geometry, image_size, spacing_mm)
        r3, r2 = dice_tables(subject_id, phase, seg.label, np.asarray(truth))
        rows3 += r3
        rows2 += r2
        if len(examples) < keep_examples:
            examples.append((subject_id, PHASE_NAMES[phase], np.asarray(image), np.asarray(truth), seg.label))
    return EvaluationResult(
        dice3d=pd.DataFrame(rows3, columns=DICE_3D_COLUMNS),
        dice2d=pd.DataFrame(rows2, columns=DICE_2D_COLUMNS),
        examples=examples,
    )


def split_subject_id(subject_id: str) -> tuple[str, str | None]:
    """``"<dataset>/<id>"`` -> ``(id, dataset)``; a plain id -> ``(id, None)`` (the loader's id forms)."""
    if "/" in subject_id:
        dataset, sid = subject_id.split("/", 1)
        return sid, dataset
    return subject_id, None


def store_volumes(
    store: Any, subject_ids: Sequence[str], phases: Sequence[int] = (PHASE_ED, PHASE_ES)
) -> Iterable[tuple[str, int, np.ndarray, np.ndarray, NativeGeometry]]:
    """Yield the evaluation items of ``subject_ids`` from a ``SliceStore`` (lazily, one volume at a time).

    The native images are already z-scored with the subject's statistics (``NativeVolume.image``).
    """
    for subject_id in subject_ids:
        sid, dataset = split_subject_id(str(subject_id))
        for phase in phases:
            native = store.native(sid, PHASE_NAMES[phase], dataset=dataset)
            yield str(subject_id), phase, native.image, native.label, native.geometry


def evaluate_store(
    scores_fn: ScoresFn,
    store: Any,
    subject_ids: Sequence[str],
    image_size: int,
    spacing_mm: float,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate the ED and ES volumes of ``subject_ids`` of an open ``SliceStore``."""
    items = store_volumes(store, subject_ids)
    return evaluate_volumes(scores_fn, items, image_size, spacing_mm, progress=progress,
                            total=2 * len(subject_ids))


def overlay_figure(
    image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: str | Path, n_slices: int = 3, title: str = ""
) -> Path:
    """PNG of ``n_slices`` slices of a ``(Z, Y, X)`` volume: image, truth overlay, prediction overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fg = np.flatnonzero((truth > 0).reshape(truth.shape[0], -1).any(1))
    candidates = fg if fg.size else np.arange(truth.shape[0])
    picks = np.unique(candidates[np.linspace(0, candidates.size - 1, min(n_slices, candidates.size)).astype(int)])
    cmap = ListedColormap([(0, 0, 0, 0), (1, 0, 0, 0.45), (0, 1, 0, 0.45), (0, 0.4, 1, 0.45)])
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    for row, z in enumerate(picks):
        for col, (name, overlay) in enumerate((("image", None), ("truth", truth[z]), ("prediction", pred[z]))):
            ax = axes[row, col]
            ax.imshow(image[z], cmap="gray")
            if overlay is not None:
                ax.imshow(overlay, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(f"{name} z={z}", fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
