"""Masked image modelling loss: squared error on the masked pixels only.

``loss = sum(((pred - target) * mask)^2) / sum(mask)`` (the published code's
``MSELoss(reduction="sum")`` divided by the number of masked pixels). Pixels outside the mask do
not affect the value or the gradient. fp32 under autocast.
"""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked pixels.

    Args:
        pred: ``(B, 1, H, W)`` reconstruction.
        target: ``(B, 1, H, W)`` unmasked (augmented) image.
        mask: ``(B, 1, H, W)`` with 1 where the input was masked, 0 elsewhere.

    Returns:
        fp32 scalar (squared intensity units of the z-scored image).
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        if pred.shape != target.shape or mask.shape != target.shape:
            raise ValueError(
                f"masked_mse: shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}, "
                f"mask {tuple(mask.shape)}"
            )
        m = mask.float()
        n = m.sum()
        if n <= 0:
            raise ValueError("masked_mse: the mask selects no pixel")
        diff = (pred.float() - target.float()) * m
        return (diff * diff).sum() / n
