"""MIM, masked image modelling (spec §4.4): the full U-Net reconstructs the augmented image from a
copy with ``mask_ratio`` of its square patches filled with ``fill_value``.

Network: ``UNet2d(image_size, out_channels=1, num_heads=1)`` (linear 1-channel output).
Per image, exactly ``round(0.75 * 64) = 48`` of the 8 x 8 patches (32 px at 256 px; the patch edge is
``image_size / patches_per_side``) are masked, chosen by top-k of uniform noise, after augmentation;
fill 0 (the z-scored mean). Loss: ``masked_mse`` over the masked pixels only, normalised by their
number (the same on every rank, so DDP's gradient average equals the global-batch gradient).
Exports ``encoder`` (``encoder.*``) and ``encoder_decoder`` (``encoder.*`` + ``decoder.*``); the
1-channel ``head.*`` is dropped, so both load into a 4-class ``UNet2d`` of the same size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainers.augment import Draws, augment, patch_mask
from trainers.losses.mim import masked_mse
from trainers.methods.base import MethodBase
from trainers.methods.config import MIMConfig, PretrainConfig
from trainers.methods.simclr import check_images, encoder_state
from trainers.models.unet import UNet2d

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Slices drawn per reconstruction figure.
FIGURE_SLICES = 4


class MIM(MethodBase):
    """MIM method (see the module docstring); implements ``SSPMethod``."""

    name = "mim"
    parts = ("encoder", "encoder_decoder")

    def __init__(self, config: PretrainConfig, image_size: int | None = None) -> None:
        if not isinstance(config.method, MIMConfig):
            raise ValueError(f"mim: config.method is {config.method.name!r}, expected 'mim'")
        self.config = config
        self.cfg: MIMConfig = config.method
        self.image_size = image_size or config.image_size
        if self.image_size % self.cfg.patches_per_side:
            raise ValueError(
                f"mim: patches_per_side {self.cfg.patches_per_side} does not divide image size {self.image_size}"
            )
        self.net = UNet2d(self.image_size, out_channels=1, num_heads=1, width=config.model_width)

    @property
    def modules(self) -> nn.Module:
        return self.net

    def masked_input(self, x: torch.Tensor, generator: Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, H, W)`` -> (masked input, mask) both ``(B, 1, H, W)``; mask 1 on masked pixels."""
        mask = patch_mask(x.shape[0], self.image_size, self.cfg.patches_per_side, self.cfg.mask_ratio, generator, x.device)
        return torch.where(mask.bool(), torch.full_like(x, self.cfg.fill_value), x), mask

    def training_step(
        self, batch: dict[str, torch.Tensor], model: nn.Module, epoch: int, step: int, generator: Draws
    ) -> dict[str, torch.Tensor]:
        """Augment -> mask -> reconstruct ``(B, 1, H, W)`` -> masked MSE."""
        x = augment(check_images(batch, self.image_size), self.cfg.augment, generator)
        inp, mask = self.masked_input(x, generator)
        pred = model(inp)
        return {"loss": masked_mse(pred, x, mask)}

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """``encoder`` and ``encoder_decoder`` parts, keys of a 4-class ``UNet2d``."""
        return {
            "encoder": encoder_state(self.net),
            "encoder_decoder": encoder_state(self.net, ("encoder.", "decoder.")),
        }

    def epoch_figures(
        self, modules: nn.Module, images: Callable[[], torch.Tensor], device: torch.device, epoch: int, seed: int
    ) -> dict[str, Figure]:
        """``reconstructions``: input / masked input / reconstruction of a few training slices."""
        import matplotlib.pyplot as plt

        x = images()[:FIGURE_SLICES].to(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = modules.training
        modules.eval()
        with torch.no_grad():
            masked, _ = self.masked_input(x, generator)
            recon = modules(masked)
        modules.train(was_training)
        fig, axes = plt.subplots(3, x.shape[0], figsize=(2 * x.shape[0], 6), squeeze=False)
        for r, (title, row) in enumerate(zip(("input", "masked", "reconstruction"), (x, masked, recon))):
            for c in range(x.shape[0]):
                axes[r][c].imshow(row[c, 0].float().cpu().numpy(), cmap="gray")
                axes[r][c].set_axis_off()
            axes[r][0].set_title(title, fontsize=8, loc="left")
        fig.suptitle(f"MIM epoch {epoch}")
        return {"reconstructions": fig}
