"""The segmentation loss against a hand (numpy) computation, MONAI, and its deep-supervision weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.losses.segmentation import deep_supervision_weights, segmentation_loss


def _hand_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """0.5 CE (all classes) + 0.5 per-sample Dice with weights [0, 1/3, 1/3, 1/3], in float64 numpy."""
    b, c = logits.shape[:2]
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    g = np.eye(c)[labels].transpose(0, 3, 1, 2)
    ce = -(g * np.log(p)).sum(axis=1).mean()
    w = np.array([0, 1 / 3, 1 / 3, 1 / 3])
    dice_loss = 0.0
    for i in range(b):
        for k in range(c):
            d = (2 * (p[i, k] * g[i, k]).sum() + 1e-5) / (p[i, k].sum() + g[i, k].sum() + 1e-5)
            dice_loss += w[k] * (1 - d)
    return 0.5 * ce + 0.5 * dice_loss / b


def test_single_head_matches_hand_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 16, 16), generator=gen)
    labels[1] = 0  # a slice with no foreground: its Dice terms are (0+s)/(sum p + s)
    got = segmentation_loss(logits, labels).item()
    assert got == pytest.approx(_hand_loss(logits.numpy(), labels.numpy()), rel=1e-9)


def test_single_head_matches_monai_integer_label_path() -> None:
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 8, 8, generator=gen)
    labels = torch.randint(0, 4, (2, 8, 8), generator=gen)
    ref = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5,
                     lambda_dice=0.5, lambda_ce=0.5)(logits, labels[:, None])
    assert segmentation_loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-5)


def test_perfect_prediction_has_low_loss_and_wrong_has_high() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1
    perfect = F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 50.0
    wrong = F.one_hot((labels + 2) % 4, 4).permute(0, 3, 1, 2).float() * 50.0
    loss = segmentation_loss
    assert loss(perfect, labels).item() < 1e-4
    assert loss(wrong, labels).item() > 10


def test_deep_supervision_weights() -> None:
    w = deep_supervision_weights(6)
    assert w == pytest.approx([0.5079365, 0.2539683, 0.1269841, 0.0634921, 0.0317460, 0.0158730], abs=1e-6)
    assert sum(w) == pytest.approx(1.0)
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_sum_uses_nearest_exact_targets() -> None:
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (2, 16, 16), generator=gen)
    heads = [torch.randn(2, 4, 16 // 2**i, 16 // 2**i, generator=gen, dtype=torch.float64) for i in range(3)]
    onehot = F.one_hot(labels, 4).permute(0, 3, 1, 2).double()
    expected = 0.0
    for w, h in zip(deep_supervision_weights(3), heads):
        small = F.interpolate(onehot, size=h.shape[-2:], mode="nearest-exact").argmax(1)
        expected += w * _hand_loss(h.numpy(), small.numpy())
    assert segmentation_loss(heads, labels).item() == pytest.approx(expected, rel=1e-9)


def test_gradient_flows_to_every_head() -> None:
    heads = [torch.randn(1, 4, 8 // 2**i, 8 // 2**i, requires_grad=True) for i in range(2)]
    segmentation_loss(heads, torch.randint(0, 4, (1, 8, 8))).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in heads)


def test_rejects_mismatched_resolution() -> None:
    with pytest.raises(ValueError, match="label resolution"):
        segmentation_loss(torch.randn(1, 4, 8, 8), torch.zeros(1, 16, 16, dtype=torch.long))
