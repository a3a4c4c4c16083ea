"""Networks: the 2D U-Net and the heads the SSP methods put on its encoder."""

from trainers.models.unet import Decoder, Encoder, UNet2d, channel_ladder, level_channels

__all__ = ["Decoder", "Encoder", "UNet2d", "channel_ladder", "level_channels"]
