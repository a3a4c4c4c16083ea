"""Supervised segmentation loss of the published study: 0.5 CE + 0.5 Dice with deep supervision.

Per output head (logits ``(B, C, h, w)``):

- CE over all ``C`` classes (background included) with one-hot *float* targets (probability
  targets), mean over all pixels;
- soft Dice per sample and per class over the spatial dims with smooth 1e-5 on numerator and
  denominator, ``dice_bc = (2 sum p g + 1e-5) / (sum p + sum g + 1e-5)``, background weight 0 and
  the foreground classes weighted equally (``[0, 1/3, 1/3, 1/3]``):
  ``dice_loss = sum_{b,c} w_c (1 - dice_bc) / B`` (per-slice Dice, not batch Dice);
- ``loss = 0.5 * CE + 0.5 * dice_loss``.

MONAI's ``DiceCELoss(include_background=False, softmax=True, batch=False, smooth 1e-5,
lambda 0.5/0.5)`` computes exactly this when given one-hot float targets (its CE then uses
probability targets and keeps the background), so it is used as is.

Deep supervision: head ``i`` (resolution ``H / 2**i``) is weighted ``2**-i / sum_j 2**-j`` over the
heads given; its target is the one-hot label map downsampled with ``nearest-exact``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from datastore.conventions import NUM_CLASSES

SMOOTH = 1e-5
CE_WEIGHT = 0.5
DICE_WEIGHT = 0.5


def deep_supervision_weights(num_heads: int) -> list[float]:
    """Weights ``2**-i / sum_j 2**-j`` for heads ``i = 0..num_heads-1`` (full resolution first)."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    raw = [2.0**-i for i in range(num_heads)]
    total = sum(raw)
    return [w / total for w in raw]


def one_hot(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Integer labels ``(B, H, W)`` -> float one-hot ``(B, num_classes, H, W)``."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)


@functools.cache
def _dice_ce() -> nn.Module:
    """MONAI's ``DiceCELoss`` with the published settings (stateless: one instance serves every call)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(
        include_background=False,
        to_onehot_y=False,
        softmax=True,
        batch=False,
        reduction="mean",
        smooth_nr=SMOOTH,
        smooth_dr=SMOOTH,
        lambda_dice=DICE_WEIGHT,
        lambda_ce=CE_WEIGHT,
    )


def head_loss(logits: torch.Tensor, target_onehot: torch.Tensor) -> torch.Tensor:
    """Loss of one head: ``logits`` ``(B, C, h, w)``, ``target_onehot`` float ``(B, C, h, w)``."""
    return _dice_ce()(logits, target_onehot)


def segmentation_loss(
    outputs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """0.5 CE + 0.5 foreground Dice, over one logit map or a list of deep-supervision heads.

    ``outputs`` is one logit map ``(B, C, H, W)`` or the list of head outputs (full resolution first,
    head ``i`` at ``H / 2**i``); ``labels`` are integer class maps ``(B, H, W)`` at full resolution.
    Returns a scalar tensor.
    """
    heads = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    target = one_hot(labels, num_classes).to(heads[0].device)
    if heads[0].shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"first head {tuple(heads[0].shape)} must be at the label resolution {tuple(labels.shape)}"
        )
    total = heads[0].new_zeros(())
    for weight, logits in zip(deep_supervision_weights(len(heads)), heads):
        scaled = target if logits.shape[-2:] == target.shape[-2:] else F.interpolate(
            target, size=logits.shape[-2:], mode="nearest-exact"
        )
        total = total + weight * head_loss(logits, scaled)
    return total
