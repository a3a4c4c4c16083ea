"""Losses as pure functions of tensors (fp32 inside, even under autocast).

SSP losses: ``ntxent`` (SimCLR), ``positional_ntxent`` (PCL), ``dino_loss`` / ``update_center``
(DINO), ``masked_mse`` (MIM). Supervised: ``segmentation_loss`` (fine-tuning, deep supervision).
"""

from trainers.losses.dino import dino_loss, update_center
from trainers.losses.mim import masked_mse
from trainers.losses.ntxent import ntxent, positional_ntxent
from trainers.losses.segmentation import segmentation_loss

__all__ = ["dino_loss", "masked_mse", "ntxent", "positional_ntxent", "segmentation_loss", "update_center"]
