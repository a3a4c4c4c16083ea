"""Dice scores on label maps, with the project's empty-mask rule.

For one class ``c``: ``2 |P ∩ G| / (|P| + |G|)`` over all voxels given; both masks empty ->
``DICE_BOTH_EMPTY`` (1.0), exactly one empty -> ``DICE_ONE_EMPTY`` (0.0) (``datastore/conventions``).
Spacing does not enter Dice, so volumes are compared voxel by voxel on one grid.
"""

from __future__ import annotations

import numpy as np
import torch

from datastore.conventions import DICE_BOTH_EMPTY, DICE_ONE_EMPTY, FOREGROUND_CLASSES


def dice_binary(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape (any dimensionality)."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    size_p, size_t = int(pred.sum()), int(truth.sum())
    if size_p == 0 and size_t == 0:
        return DICE_BOTH_EMPTY
    if size_p == 0 or size_t == 0:
        return DICE_ONE_EMPTY
    return 2.0 * int(np.logical_and(pred, truth).sum()) / (size_p + size_t)


def dice_per_class(
    pred: np.ndarray, truth: np.ndarray, classes: tuple[int, ...] = FOREGROUND_CLASSES
) -> dict[int, float]:
    """3D (or any-D) Dice per class of two integer label maps of the same shape, e.g. ``(Z, Y, X)``."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return {c: dice_binary(pred == c, truth == c) for c in classes}


def dice_per_slice(
    pred: np.ndarray, truth: np.ndarray, classes: tuple[int, ...] = FOREGROUND_CLASSES
) -> np.ndarray:
    """2D Dice of each slice of label volumes ``(Z, Y, X)``: array ``(Z, len(classes))``."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.ndim != 3 or pred.shape != truth.shape:
        raise ValueError(f"expected two (Z, Y, X) label volumes of one shape, got {pred.shape} and {truth.shape}")
    out = np.empty((pred.shape[0], len(classes)), dtype=np.float64)
    for z in range(pred.shape[0]):
        for j, c in enumerate(classes):
            out[z, j] = dice_binary(pred[z] == c, truth[z] == c)
    return out


def batch_dice_2d(
    pred: torch.Tensor, truth: torch.Tensor, classes: tuple[int, ...] = FOREGROUND_CLASSES
) -> torch.Tensor:
    """Per-slice Dice of a batch of label maps ``(B, H, W)`` (int): tensor ``(B, len(classes))``.

    The training-time validation metric (argmax prediction vs truth, each slice on its own).
    """
    if pred.shape != truth.shape or pred.dim() != 3:
        raise ValueError(f"expected two (B, H, W) label batches of one shape, got {tuple(pred.shape)}, {tuple(truth.shape)}")
    cols = []
    for c in classes:
        p = (pred == c).flatten(1)
        t = (truth == c).flatten(1)
        inter = (p & t).sum(1).double()
        sp, st = p.sum(1).double(), t.sum(1).double()
        denom = sp + st
        dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.full_like(denom, DICE_BOTH_EMPTY))
        dice = torch.where((sp == 0) ^ (st == 0), torch.full_like(denom, DICE_ONE_EMPTY), dice)
        cols.append(dice)
    return torch.stack(cols, dim=1)
