"""The one vocabulary of pretraining methods: names only, no torch (the CLI, configs and report import it).

Everything that lists methods derives from ``METHOD_NAMES``: the registry ``trainers.methods.METHODS``,
the grid's arms (``orchestrator/arms.py``), the study config, the deploy config, the ``pretrain``
command's choices and the benchmark. A method added at run time (``trainers.methods.register``)
joins ``method_names()``.
"""

from __future__ import annotations

from typing import Literal

#: The initialisation of a cell that loads no pretrained weights.
SCRATCH = "scratch"
#: The shipped SSP methods, in report order.
METHOD_NAMES: tuple[str, ...] = ("simclr", "pcl", "dino", "mim")
#: One of ``METHOD_NAMES`` (pydantic fields, CLI choices).
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]
#: A label budget: a number of labelled training subjects, or every one.
Budget = int | Literal["all"]

_added: list[str] = []


def method_names() -> tuple[str, ...]:
    """The shipped methods, then those registered at run time, in that order."""
    return (*METHOD_NAMES, *_added)


def add_method_name(name: str) -> None:
    """Make ``name`` a known method (``trainers.methods.register`` calls it).

    Raises:
        ValueError: ``name`` is ``scratch``, empty, or not a plain lower-case name.
    """
    if name == SCRATCH or not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(f"method name {name!r}: use a plain lower-case name other than {SCRATCH!r}")
    if name not in method_names():
        _added.append(name)


__all__ = ["METHOD_NAMES", "SCRATCH", "Budget", "MethodName", "add_method_name", "method_names"]
