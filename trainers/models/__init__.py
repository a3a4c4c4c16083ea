"""Networks: the 2D U-Net and the heads the SSP methods put on its encoder."""

from trainers.models.unet import Decoder, Encoder, UNet2d, level_channels

__all__ = ["Decoder", "Encoder", "UNet2d", "level_channels"]
