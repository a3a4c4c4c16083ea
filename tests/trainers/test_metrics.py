"""Dice against closed forms, MONAI ``DiceMetric`` and medpy ``dc``, with the empty-mask rule."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from trainers.metrics import batch_dice_2d, dice_binary, dice_per_class, dice_per_slice


def test_closed_forms() -> None:
    a = np.zeros((4, 8, 8), bool)
    a[1:3, 2:6, 2:6] = True  # 32 voxels
    assert dice_binary(a, a) == 1.0
    b = np.zeros_like(a)
    b[0, 0, 0] = True
    assert dice_binary(a, b) == 0.0  # disjoint
    c = np.zeros_like(a)
    c[1:3, 2:6, 2:4] = True  # 16 voxels, all inside a
    assert dice_binary(a, c) == pytest.approx(2 * 16 / 48)
    assert dice_binary(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty
    assert dice_binary(a, np.zeros_like(a)) == 0.0  # one empty
    assert dice_binary(np.zeros_like(a), a) == 0.0


def test_per_class_and_shape_check() -> None:
    truth = np.zeros((2, 6, 6), np.uint8)
    truth[:, 1:3, 1:3] = 1
    truth[:, 3:5, 3:5] = 3
    pred = truth.copy()
    pred[0, 1, 1] = 0
    d = dice_per_class(pred, truth)
    assert d[1] == pytest.approx(2 * 7 / 15)
    assert d[2] == 1.0  # MYO absent in both
    assert d[3] == 1.0
    with pytest.raises(ValueError, match="differs"):
        dice_per_class(pred[:1], truth)


def test_against_monai_and_medpy_on_random_volumes() -> None:
    from medpy.metric.binary import dc
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    for trial in range(5):
        truth = rng.integers(0, 4, (6, 20, 20))
        pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, truth.shape))
        if trial == 4:  # a class missing from both -> MONAI NaN and medpy NaN, ours 1
            truth[truth == 2] = 0
            pred[pred == 2] = 0
        ours = dice_per_class(pred, truth)
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=4)
        monai_d = metric(torch.as_tensor(pred)[None, None], torch.as_tensor(truth)[None, None])[0].numpy()
        for j, c in enumerate((1, 2, 3)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                medpy_d = dc(pred == c, truth == c)
            if not (truth == c).any() and not (pred == c).any():
                assert math.isnan(medpy_d) and math.isnan(monai_d[j]) and ours[c] == 1.0
            else:
                assert ours[c] == pytest.approx(medpy_d, abs=1e-12)
                assert ours[c] == pytest.approx(float(monai_d[j]), abs=1e-6)


def test_per_slice_and_batch_2d_agree() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (5, 12, 12))
    pred = np.where(rng.random(truth.shape) < 0.6, truth, 0)
    truth[2] = 0
    pred[2] = 0  # empty slice: all classes 1
    pred[3][pred[3] == 3] = 0  # RV missing from prediction only on slice 3
    per_slice = dice_per_slice(pred, truth)
    assert per_slice.shape == (5, 3)
    assert (per_slice[2] == 1.0).all()
    assert per_slice[3, 2] == 0.0
    for z in range(5):
        for j, c in enumerate((1, 2, 3)):
            assert per_slice[z, j] == dice_binary(pred[z] == c, truth[z] == c)
    batch = batch_dice_2d(torch.as_tensor(pred), torch.as_tensor(truth)).numpy()
    np.testing.assert_allclose(batch, per_slice, atol=1e-12)
