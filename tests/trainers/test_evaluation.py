"""Native-space evaluation: the geometry round trip on a perfect model, the Dice tables and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datastore.geometry import NativeGeometry
from trainers.evaluation import (
    DICE_2D_COLUMNS,
    DICE_3D_COLUMNS,
    evaluate_volumes,
    model_scores_fn,
    relative_positions,
    segment_volume,
)
from trainers.models.unet import UNet2d

IMAGE_SIZE, SPACING = 64, 1.25


def _phantom(shape_zyx: tuple[int, int, int], spacing_yx: tuple[float, float], shift_px: int = 0) -> np.ndarray:
    """Concentric LV (1) / MYO (2) rings and an RV (3) blob, radii in mm, on slices 1..Z-2."""
    z, h, w = shape_zyx
    yy, xx = np.meshgrid((np.arange(h) - h / 2 - 3) * spacing_yx[0], (np.arange(w) - w / 2 + shift_px) * spacing_yx[1],
                         indexing="ij")
    r = np.hypot(yy, xx)
    label = np.zeros(shape_zyx, np.uint8)
    for k in range(1, z - 1):
        scale = 1.0 - 0.15 * k
        label[k][r < 18 * scale] = 2
        label[k][r < 11 * scale] = 1
        label[k][np.hypot(yy + 2, xx - 26 * scale) < 10 * scale] = 3
    return label


def _geometry(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]) -> NativeGeometry:
    z, y, x = shape_zyx
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], -spacing_zyx[0], 1.0])  # base at k = 0
    return NativeGeometry.from_affine(affine, (x, y, z))


def _oracle(label_zyx: np.ndarray, geometry: NativeGeometry):
    """A 'model' whose scores are the ground truth's one-hot maps resampled (bilinear) to the model grid."""
    onehot = F.one_hot(torch.as_tensor(label_zyx).long(), 4).permute(3, 0, 1, 2).float()  # (C, Z, Y, X)
    grid = geometry.resample_to_model(onehot, SPACING, IMAGE_SIZE, mode="bilinear")  # (C, Z, S, S)
    logits = grid.permute(1, 0, 2, 3).contiguous() * 10.0

    def scores(x: torch.Tensor) -> torch.Tensor:
        assert x.shape == (label_zyx.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
        return logits

    return scores


@pytest.mark.parametrize("spacing_yx", [(1.0, 1.0), (1.25, 1.25), (1.4, 1.1), (0.8, 0.8)])
def test_perfect_model_round_trip_gives_dice_near_one(spacing_yx: tuple[float, float]) -> None:
    shape = (6, 50, 57)
    geometry = _geometry(shape, (8.0, *spacing_yx))
    label = _phantom(shape, spacing_yx)
    image = label.astype(np.float32)
    result = evaluate_volumes(_oracle(label, geometry), [("s1", 1, image, label, geometry)], IMAGE_SIZE, SPACING)
    assert list(result.dice3d.columns) == DICE_3D_COLUMNS
    assert list(result.dice2d.columns) == DICE_2D_COLUMNS
    assert len(result.dice3d) == 3 and set(result.dice3d["class"]) == {"LV", "MYO", "RV"}
    assert (result.dice3d["dice"] > 0.99).all(), result.dice3d
    empty_slices = result.dice2d[result.dice2d["slice"].isin([0, 5])]
    assert (empty_slices["dice"] == 1.0).all()  # both empty -> 1


def test_shifted_prediction_scores_lower() -> None:
    shape = (6, 50, 57)
    geometry = _geometry(shape, (8.0, 1.0, 1.0))
    label = _phantom(shape, (1.0, 1.0))
    shifted = _phantom(shape, (1.0, 1.0), shift_px=6)
    result = evaluate_volumes(_oracle(shifted, geometry), [("s1", 2, label.astype(np.float32), label, geometry)],
                              IMAGE_SIZE, SPACING)
    assert (result.dice3d["dice"] < 0.85).all()
    assert set(result.dice3d["phase"]) == {"ES"}


def test_segment_volume_with_a_real_unet_has_native_shape() -> None:
    torch.manual_seed(0)
    shape = (3, 40, 45)
    geometry = _geometry(shape, (10.0, 1.3, 1.3))
    seg = segment_volume(model_scores_fn(UNet2d(IMAGE_SIZE, 4)), np.random.rand(*shape).astype(np.float32),
                         geometry, IMAGE_SIZE, SPACING)
    assert seg.label.shape == shape and seg.scores.shape == (4, *shape)
    assert seg.label.dtype == np.uint8 and set(np.unique(seg.label)) <= {0, 1, 2, 3}


def test_relative_positions() -> None:
    truth = np.zeros((6, 4, 4), np.uint8)
    truth[1:5, 1, 1] = 1
    pos = relative_positions(truth)
    assert np.isnan(pos[0]) and np.isnan(pos[5])
    np.testing.assert_allclose(pos[1:5], [0, 1 / 3, 2 / 3, 1])


def test_write_tables_and_overlay(tmp_path) -> None:
    shape = (5, 40, 40)
    geometry = _geometry(shape, (8.0, 1.0, 1.0))
    label = _phantom(shape, (1.0, 1.0))
    result = evaluate_volumes(_oracle(label, geometry), [("s9", 1, label.astype(np.float32), label, geometry)],
                              IMAGE_SIZE, SPACING)
    paths = result.write(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["test_dice2d.csv", "test_dice3d.csv", "test_overlay.png"]
    assert (tmp_path / "test_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = result.summary()
    assert set(summary) == {"dice_mean", "dice_LV", "dice_MYO", "dice_RV"} and summary["dice_mean"] > 0.95
