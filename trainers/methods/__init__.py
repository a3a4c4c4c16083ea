"""SSP methods: the one registry ``METHODS`` (name -> class implementing ``base.SSPMethod``).

Build one with ``METHODS[config.method.name](config, image_size)`` where ``config`` is a
``trainers.methods.config.PretrainConfig``. The names alone are in ``trainers.methods.names``
(torch-free); this package imports torch only when one of its names below is first used, so that
importing the vocabulary stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "METHODS": "trainers.methods.registry",
    "register": "trainers.methods.registry",
    "SSPMethod": "trainers.methods.base",
    "MethodBase": "trainers.methods.base",
    "PretrainConfig": "trainers.methods.config",
    "DINO": "trainers.methods.dino",
    "MIM": "trainers.methods.mim",
    "PCL": "trainers.methods.pcl",
    "SimCLR": "trainers.methods.simclr",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


__all__ = sorted(_LAZY)
