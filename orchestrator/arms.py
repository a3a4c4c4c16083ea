"""The arms of a fine-tuning grid: what initialises a cell, and what role the arm plays in the report.

An arm is a row of the report. Most arms are an initialisation from one pretraining method's run;
three are not:

- ``mim-encdec``: MIM's encoder *and* decoder (the option the published code was written for;
  ``mim`` loads the encoder only). Which one the paper reported cannot be told from its code, so
  both are arms.
- ``scratch-b`` (negative control, A/A): training from scratch again, differing from ``scratch``
  only in its training seeds. The report must find no difference between the two.
- ``supervised`` (positive control): the encoder of a model trained with the labels of the whole
  training pool (never the test subjects), loaded like a pretrained encoder. At small budgets it
  must come out better than scratch, or the grid cannot detect a real effect.

The method arms derive from the method vocabulary (``trainers/methods/names.py``): one arm per
method, and a method registered at run time is an arm too. Torch-free: the CLI and the report import it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from trainers.methods.names import METHOD_NAMES, SCRATCH, method_names

SUPERVISED = "supervised"
SSP_METHODS = METHOD_NAMES
#: Added to a ``scratch-b`` cell's training seed: far from any seed a grid uses for ``scratch``.
NEGATIVE_CONTROL_SEED_OFFSET = 1000

Role = Literal["reference", "method", "negative control", "positive control"]


@dataclass(frozen=True)
class Arm:
    """One grid arm.

    ``init`` is ``scratch`` or the name of the pretraining run kind it loads (an SSP method or
    ``supervised``); ``part`` the weight part it loads (None: the fine-tuning config's ``part`` when
    the run exports it, else the encoder); ``train_seed_offset`` is added to every training seed of
    its cells.
    """

    name: str
    init: str
    role: Role
    part: Literal["encoder", "encoder_decoder"] | None = "encoder"
    train_seed_offset: int = 0

    @property
    def pretrained(self) -> bool:
        """True when the arm loads weights from a pretraining (or supervised) run."""
        return self.init != SCRATCH


class _Arms(Mapping[str, Arm]):
    """Every arm, in report order: the reference, one arm per method (``method_names()``, so a method
    registered at run time included), MIM's second option, the controls."""

    def _all(self) -> dict[str, Arm]:
        arms = [Arm(SCRATCH, SCRATCH, "reference")]
        # A method arm loads the part its run exports that the fine-tuning config asks for, else the
        # encoder (the grid reads the parts from the run's manifest: ``grid.arm_part``).
        arms += [Arm(name, name, "method", part=None) for name in method_names()]
        arms += [
            Arm("mim-encdec", "mim", "method", part="encoder_decoder"),
            Arm("scratch-b", SCRATCH, "negative control", train_seed_offset=NEGATIVE_CONTROL_SEED_OFFSET),
            Arm(SUPERVISED, SUPERVISED, "positive control"),
        ]
        return {arm.name: arm for arm in arms}

    def __getitem__(self, name: str) -> Arm:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


ARMS: Mapping[str, Arm] = _Arms()


def init_kinds() -> tuple[str, ...]:
    """Pretraining run kinds an arm can load (``--pretrained KIND=RUN``): the methods and ``supervised``."""
    return (*method_names(), SUPERVISED)


def arm_order(name: str) -> int:
    """Position of an arm in reports (unknown names last)."""
    names = list(ARMS)
    return names.index(name) if name in names else len(names)


def unknown_arms(names: list[str] | tuple[str, ...]) -> list[str]:
    """The names that are not arms."""
    return [n for n in names if n not in ARMS]
