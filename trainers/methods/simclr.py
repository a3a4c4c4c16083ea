"""SimCLR (spec §4.1): two augmented views per image, NT-Xent (tau 0.1) over the GLOBAL batch.

Network: ``EncoderMLP`` (U-Net encoder -> average pool of the deepest map -> MLP 512-512-512),
encoder under ``encoder.``, MLP under ``head.``. Views of image ``k`` are rows ``2k, 2k + 1``.
With several ranks the projections are all-gathered (gradient through the local rows) and every
rank computes the loss of the whole global batch; the gradient is scaled by ``world_size`` so that
DDP's averaging yields the single-process gradient (``trainers.distributed``). The encoder's
BatchNorm sees each rank's ``2 * B_local`` views (plain BN; the loop may convert to SyncBatchNorm).
"""

from __future__ import annotations

import torch
from torch import nn

from trainers.augment import Draws, augment
from trainers.distributed import gather_with_grad, scale_grad_for_ddp
from trainers.losses.ntxent import ntxent
from trainers.methods.base import MethodBase
from trainers.methods.config import PretrainConfig, SimCLRConfig
from trainers.models.heads import EncoderMLP


def check_images(batch: dict[str, torch.Tensor], image_size: int) -> torch.Tensor:
    """``batch["image"]`` as ``(B, 1, image_size, image_size)`` float32 (float64 kept, for exact
    comparisons), or a one-line ``ValueError``."""
    if "image" not in batch:
        raise ValueError("batch has no 'image' entry")
    x = batch["image"]
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] != (image_size, image_size):
        raise ValueError(f"batch['image'] must be (B, 1, {image_size}, {image_size}), got {tuple(x.shape)}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def encoder_state(module: nn.Module, prefixes: tuple[str, ...] = ("encoder.",)) -> dict[str, torch.Tensor]:
    """CPU copies of the ``module.state_dict()`` entries whose key starts with one of ``prefixes``."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k.startswith(prefixes)}


class SimCLR(MethodBase):
    """SimCLR method (see the module docstring); implements ``SSPMethod``."""

    name = "simclr"
    config_type: type[SimCLRConfig] = SimCLRConfig

    def __init__(self, config: PretrainConfig, image_size: int | None = None) -> None:
        if not isinstance(config.method, self.config_type) or config.method.name != self.name:
            raise ValueError(f"{self.name}: config.method is {config.method.name!r}, expected {self.name!r}")
        self.config = config
        self.cfg = config.method
        self.image_size = image_size or config.image_size
        self.net = EncoderMLP(
            self.image_size, self.cfg.hidden_dim, self.cfg.projection_dim, self.cfg.mlp_layers, width=config.model_width
        )

    @property
    def modules(self) -> nn.Module:
        return self.net

    def views(self, x: torch.Tensor, generator: Draws) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(2B, 1, H, W)`` two independent views per image, adjacent rows."""
        v0 = augment(x, self.cfg.augment, generator)
        v1 = augment(x, self.cfg.augment, generator)
        return torch.stack((v0, v1), dim=1).reshape(-1, *x.shape[1:])

    def training_step(
        self, batch: dict[str, torch.Tensor], model: nn.Module, epoch: int, step: int, generator: Draws
    ) -> dict[str, torch.Tensor]:
        """Views -> projections ``(2B, D)`` -> gather -> NT-Xent; returns ``{"loss"}``."""
        x = check_images(batch, self.image_size)
        z = gather_with_grad(model(self.views(x, generator)))
        loss = ntxent(z, temperature=self.cfg.temperature)
        return {"loss": scale_grad_for_ddp(loss)}

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"encoder": {"encoder.*": tensor}}``, keys of ``UNet2d(image_size, 4)``."""
        return {"encoder": encoder_state(self.net)}
