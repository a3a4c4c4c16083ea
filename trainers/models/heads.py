"""Networks the SSP methods put on the U-Net encoder (spec §3.3, §3.4).

Every network keeps the encoder under ``encoder.`` (the same class and channel ladder as
``UNet2d(image_size, 4).encoder``, so its keys equal the fine-tuning U-Net's ``encoder.*`` keys) and
everything else under ``head.`` (never transferred).

- ``pooled_features``: encoder -> global average pool of the deepest map -> ``(B, C_deep)``.
- ``EncoderMLP`` (SimCLR, PCL): pooled 512-d features -> MLP 512-512-512 (ReLU, no BN, no norm).
- ``DINOHead``: Linear-BN-GELU-Linear-BN-GELU-Linear to a bottleneck, L2-normalise, then a
  weight-normalised ``Linear(bottleneck, out_dim, bias=False)`` whose magnitude ``g`` is fixed at 1.
- ``DINONet`` (DINO student/teacher): encoder per crop resolution, one head pass over all crops.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from trainers.models.unet import PAPER_WIDTH, Encoder, channel_ladder, level_channels


def build_encoder(image_size: int, width: int = PAPER_WIDTH) -> Encoder:
    """The fine-tuning U-Net's encoder for ``image_size`` px inputs (1 input channel) of base ``width``."""
    return Encoder(1, level_channels(image_size, channel_ladder(width)))


def pooled_features(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, C_deep)`` mean over the deepest feature map's pixels."""
    return encoder(x)[-1].mean(dim=(2, 3))


class ProjectionMLP(nn.Sequential):
    """``Linear(in, hidden) -> ReLU -> ... -> Linear(hidden, out)`` with ``layers`` linear layers."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 512, layers: int = 3) -> None:
        if layers < 1:
            raise ValueError(f"projection MLP needs >= 1 layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


class EncoderMLP(nn.Module):
    """SimCLR/PCL network: ``(B, 1, H, W)`` -> ``(B, out_dim)`` unnormalised projections."""

    def __init__(
        self, image_size: int, hidden_dim: int = 512, out_dim: int = 512, layers: int = 3, width: int = PAPER_WIDTH
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(image_size, width)
        self.head = ProjectionMLP(self.encoder.out_channels, hidden_dim, out_dim, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.encoder, x))


class DINOHead(nn.Module):
    """DINO projection head: ``(N, in_dim)`` -> ``(N, out_dim)`` logits.

    MLP with BatchNorm1d (statistics over every row of the pass, i.e. all crops of the step),
    L2 normalisation, then a weight-normalised last layer (``last_layer``) with ``g = 1`` frozen,
    so the logits are cosine similarities to ``out_dim`` learnable prototypes.
    """

    def __init__(
        self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256, use_bn: bool = True
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, hidden_dim, hidden_dim]
        for i in range(2):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if use_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


class DINONet(nn.Module):
    """DINO student (and teacher) network: encoder + ``DINOHead`` under ``head.``.

    ``forward(global_crops, local_crops=None)``: ``(n_g * B, 1, H, W)`` and ``(n_l * B, 1, h, w)``
    crop-major batches; the encoder runs once per resolution, the head once over the
    concatenation ``[globals; locals]`` -> ``(n_g * B + n_l * B, out_dim)`` logits.
    """

    def __init__(
        self,
        image_size: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn: bool = True,
        width: int = PAPER_WIDTH,
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(image_size, width)
        self.head = DINOHead(self.encoder.out_channels, out_dim, hidden_dim, bottleneck_dim, use_bn)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None) -> torch.Tensor:
        feats = [pooled_features(self.encoder, global_crops)]
        if local_crops is not None and local_crops.shape[0] > 0:
            feats.append(pooled_features(self.encoder, local_crops))
        return self.head(torch.cat(feats, dim=0))
