"""SSP methods: the one registry ``METHODS`` (name -> class implementing ``base.SSPMethod``).

Build one with ``METHODS[config.method.name](config, image_size)`` where ``config`` is a
``trainers.methods.config.PretrainConfig``.
"""

from trainers.methods.base import SSPMethod
from trainers.methods.config import PretrainConfig
from trainers.methods.dino import DINO
from trainers.methods.mim import MIM
from trainers.methods.pcl import PCL
from trainers.methods.simclr import SimCLR

METHODS: dict[str, type[SSPMethod]] = {"simclr": SimCLR, "pcl": PCL, "dino": DINO, "mim": MIM}

__all__ = ["DINO", "METHODS", "MIM", "PCL", "PretrainConfig", "SSPMethod", "SimCLR"]
