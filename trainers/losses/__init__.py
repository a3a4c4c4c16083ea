"""Losses as pure functions of tensors (fp32 inside, even under autocast).

SSP losses: ``ntxent`` (SimCLR), ``positional_ntxent`` (PCL), ``dino_loss`` / ``update_center``
(DINO), ``masked_mse`` (MIM). The supervised segmentation loss lives in
``trainers.losses.segmentation``.
"""

from trainers.losses.dino import dino_loss, update_center
from trainers.losses.mim import masked_mse
from trainers.losses.ntxent import ntxent, positional_ntxent

__all__ = ["dino_loss", "masked_mse", "ntxent", "positional_ntxent", "update_center"]
