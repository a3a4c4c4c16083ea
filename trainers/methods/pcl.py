"""PCL, positional contrastive learning (spec §4.2): SimCLR whose positives are every pair of rows
with slice positions ``|pos_i - pos_j| < threshold`` (strict; ``pos = slice / slice_count``), across
subjects and frames; the two views of an image share its position. Projections and positions are
gathered over ranks (global batch), as in SimCLR.
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.augment import Draws
from trainers.distributed import gather_with_grad, scale_grad_for_ddp
from trainers.losses.ntxent import positional_ntxent
from trainers.methods.config import PCLConfig
from trainers.methods.simclr import SimCLR, check_images


class PCL(SimCLR):
    """PCL method; implements ``SSPMethod``. Needs ``batch["position"]`` ``(B,)``."""

    name = "pcl"
    config_type = PCLConfig

    def training_step(
        self, batch: dict[str, torch.Tensor], model: nn.Module, epoch: int, step: int, generator: Draws
    ) -> dict[str, torch.Tensor]:
        """Views -> projections ``(2B, D)`` -> gather (with positions) -> positional NT-Xent."""
        x = check_images(batch, self.image_size)
        if "position" not in batch or batch["position"].shape != (x.shape[0],):
            raise ValueError(f"pcl: batch['position'] must have shape ({x.shape[0]},)")
        positions = batch["position"].to(device=x.device, dtype=torch.float32).repeat_interleave(2)
        z = gather_with_grad(model(self.views(x, generator)))
        positions = gather_with_grad(positions)
        assert isinstance(self.cfg, PCLConfig)
        loss = positional_ntxent(z, positions, threshold=self.cfg.threshold, temperature=self.cfg.temperature)
        return {"loss": scale_grad_for_ddp(loss)}
