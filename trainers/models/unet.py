"""The nnU-Net-style 2D U-Net of the published study, built from MONAI's DynUNet blocks.

Each level is two 3x3 conv + BatchNorm + LeakyReLU(0.01) (MONAI ``UnetBasicBlock``); the encoder
downsamples by strided convolution, the decoder upsamples by transposed convolution and
concatenates the skip (MONAI ``UnetUpBlock``). Parameters live under three stable prefixes so that
weights move between pretraining and fine-tuning by name:

- ``encoder.``  the contracting path (transferred by every SSP method),
- ``decoder.``  the expanding path (transferred by MIM's encoder+decoder option),
- ``head.``     the 1x1 output convolutions (never transferred).
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

#: Channels per resolution level of the paper's network (256x256 input -> 7 levels down to 4x4).
PAPER_CHANNELS: tuple[int, ...] = (32, 64, 128, 256, 512, 512, 512)
#: Base width (channels of the first level) of the paper's network.
PAPER_WIDTH = 32


def channel_ladder(width: int = PAPER_WIDTH) -> tuple[int, ...]:
    """Channels per level for base ``width``: doubling per level, capped at 16 x width.

    ``channel_ladder(32) == PAPER_CHANNELS``; smaller widths make CPU demos fast.
    """
    if width < 1:
        raise ValueError(f"model width must be >= 1, got {width}")
    return tuple(min(width * 2**level, 16 * width) for level in range(len(PAPER_CHANNELS)))
#: Smallest feature map edge (pixels) at the bottleneck.
BOTTLENECK_SIZE = 4
_NORM = "batch"
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def level_channels(image_size: int, channels: tuple[int, ...] = PAPER_CHANNELS) -> tuple[int, ...]:
    """Channels per level for a square input of ``image_size`` pixels.

    The depth is derived from the size so the bottleneck is ``BOTTLENECK_SIZE`` pixels
    (256 -> 7 levels, 128 -> 6, 64 -> 5), capped at ``len(channels)``.

    Raises:
        ValueError: if ``image_size`` is not ``BOTTLENECK_SIZE * 2**k`` with k >= 1.
    """
    ratio = image_size / BOTTLENECK_SIZE
    levels = int(round(math.log2(ratio))) + 1 if ratio >= 2 else 0
    if levels < 2 or BOTTLENECK_SIZE * 2 ** (levels - 1) != image_size:
        raise ValueError(
            f"image size {image_size} px is not {BOTTLENECK_SIZE} x a power of two >= 2 (e.g. 64, 128, 256)"
        )
    return tuple(channels[: min(levels, len(channels))])


class Encoder(nn.Module):
    """Contracting path: ``len(channels)`` levels, the first at full resolution.

    Input ``(B, in_channels, H, W)``; output the list of level features, full resolution first,
    level ``i`` shaped ``(B, channels[i], H / 2**i, W / 2**i)``.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        blocks = []
        for level, out_ch in enumerate(channels):
            in_ch = in_channels if level == 0 else channels[level - 1]
            stride = 1 if level == 0 else 2
            blocks.append(UnetBasicBlock(2, in_ch, out_ch, kernel_size=3, stride=stride, norm_name=_NORM, act_name=_ACT))
        self.blocks = nn.ModuleList(blocks)

    @property
    def out_channels(self) -> int:
        """Channels of the deepest (bottleneck) feature map."""
        return self.channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """Expanding path: one transposed-conv up block per level above the bottleneck.

    Takes the encoder's feature list and returns the decoder features, full resolution first:
    ``len(channels) - 1`` maps, map ``i`` shaped ``(B, channels[i], H / 2**i, W / 2**i)``.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        ups = []
        for level in range(len(channels) - 2, -1, -1):  # deepest first
            ups.append(
                UnetUpBlock(
                    2, channels[level + 1], channels[level], kernel_size=3, stride=1,
                    upsample_kernel_size=2, norm_name=_NORM, act_name=_ACT, trans_bias=True,
                )
            )
        self.blocks = nn.ModuleList(ups)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        x = features[-1]
        outputs = []
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(x, skip)
            outputs.append(x)
        return outputs[::-1]


class UNet2d(nn.Module):
    """2D U-Net with deep supervision.

    Args:
        image_size: square input edge in pixels (sets the depth, see ``level_channels``).
        out_channels: output classes (4 for segmentation, 1 for MIM reconstruction).
        in_channels: input channels (1 for CMR).
        num_heads: output heads, full resolution first; ``None`` means every decoder level
            (6 for 256x256, the paper's deep supervision), 1 means no deep supervision.
        width: channels of the first level (32 in the paper); the ladder is ``channel_ladder(width)``.

    ``forward(x)`` maps ``(B, in_channels, H, W)`` to full-resolution logits
    ``(B, out_channels, H, W)``; ``forward(x, deep_supervision=True)`` returns the list of
    ``num_heads`` logit maps, map ``i`` at ``H / 2**i``.
    """

    def __init__(
        self,
        image_size: int,
        out_channels: int,
        in_channels: int = 1,
        num_heads: int | None = None,
        width: int = PAPER_WIDTH,
    ) -> None:
        super().__init__()
        ladder = level_channels(image_size, channel_ladder(width))
        max_heads = len(ladder) - 1
        num_heads = max_heads if num_heads is None else num_heads
        if not 1 <= num_heads <= max_heads:
            raise ValueError(f"num_heads must be in 1..{max_heads} for a {image_size}px input, got {num_heads}")
        self.image_size = image_size
        self.encoder = Encoder(in_channels, ladder)
        self.decoder = Decoder(ladder)
        self.head = nn.ModuleList(UnetOutBlock(2, ladder[i], out_channels) for i in range(num_heads))

    def forward(self, x: torch.Tensor, deep_supervision: bool = False) -> torch.Tensor | list[torch.Tensor]:
        decoded = self.decoder(self.encoder(x))
        if not deep_supervision:
            return self.head[0](decoded[0])
        return [head(feat) for head, feat in zip(self.head, decoded)]
