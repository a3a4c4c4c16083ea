"""The registry of SSP methods: ``METHODS`` (name -> class) and ``register`` for one more method.

A method is one module in ``trainers/methods/``: its config block (a pydantic model with a
``name: Literal["<name>"]`` field, a ``MethodBlock``), its class (``base.SSPMethod``, usually a ``MethodBase``
subclass) and its paper defaults. Shipped methods are listed here and their names in
``names.METHOD_NAMES``; ``register`` adds one at run time (tests, plug-ins) everywhere at once: the
registry, the config union of ``PretrainConfig.method`` and the vocabulary of the CLI's grid.
"""

from __future__ import annotations

from typing import Any

from trainers.methods.base import SSPMethod
from trainers.methods.config import MethodBlock, add_method_config
from trainers.methods.dino import DINO
from trainers.methods.mim import MIM
from trainers.methods.names import METHOD_NAMES, add_method_name
from trainers.methods.pcl import PCL
from trainers.methods.simclr import SimCLR

METHODS: dict[str, type[SSPMethod]] = {cls.name: cls for cls in (SimCLR, PCL, DINO, MIM)}  # type: ignore[misc]
if tuple(METHODS) != METHOD_NAMES:  # pragma: no cover - a method added to one list but not the other
    raise RuntimeError(f"trainers.methods: registry {tuple(METHODS)} differs from names.METHOD_NAMES {METHOD_NAMES}")


def register(method: type[Any], config: type[MethodBlock], paper_defaults: dict[str, Any]) -> None:
    """Add a method: ``method.name`` is its name, ``config`` its block, ``paper_defaults`` the top-level
    ``PretrainConfig`` values it runs with unless the YAML says otherwise (``batch_size``, ``optimizer``...).

    Raises:
        ValueError: the name is taken or invalid, or ``config.name`` is not the method's name.
    """
    name = method.name
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    add_method_config(name, config, paper_defaults)
    add_method_name(name)
    METHODS[name] = method


__all__ = ["METHODS", "register"]
