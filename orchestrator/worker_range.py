"""How many Ray Train workers a run may use: a fixed ``N`` or an elastic range ``MIN-MAX``.

``WorkerRange`` is what ``sspctl pretrain --workers``, ``sspctl finetune --workers-per-trial`` and the
study config's ``pretrain.workers`` / ``finetune.workers_per_trial`` accept: an int ``N`` or a string
``"N"`` / ``"MIN-MAX"``. A fixed count becomes ``ScalingConfig(num_workers=N)`` (today's behaviour: a
lost worker restarts the whole group of ``N``); a range becomes Ray Train V2's elastic
``num_workers=(MIN, MAX)``: training starts once ``MIN`` workers can be placed, grows towards ``MAX``
and, after a worker or node is lost, goes on with the workers left from the last checkpoint.

The global batch stays the configured value at every count (each worker takes ``batch / count``), so
every count of the range must divide it (``check_global_batch``).

Torch-free (pydantic only): the CLI and the study config import it.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class WorkerRangeError(ValueError):
    """A worker count or range is malformed or does not fit the run; one line."""


class WorkerRange(BaseModel):
    """``min`` to ``max`` workers (equal for a fixed count). Dumps back to ``N`` or ``"MIN-MAX"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: int = Field(ge=1, description="workers training needs to start and to go on")
    max: int = Field(ge=1, description="workers training grows to when the cluster has room")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, WorkerRange):
            return {"min": value.min, "max": value.max}
        if isinstance(value, bool):
            raise ValueError(f"expected N or MIN-MAX workers, got {value!r}")
        if isinstance(value, int):
            return {"min": value, "max": value}
        if isinstance(value, str):
            match = _RANGE.match(value)
            if match is None:
                raise ValueError(f"expected N or MIN-MAX workers (e.g. 2 or 1-4), got {value!r}")
            low = int(match.group(1))
            return {"min": low, "max": int(match.group(2) or low)}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"MIN-MAX workers needs MIN <= MAX, got {self.min}-{self.max}")
        return self

    @model_serializer
    def _dump(self) -> int | str:
        return self.min if self.min == self.max else f"{self.min}-{self.max}"

    @property
    def elastic(self) -> bool:
        """Whether the count may change during the run."""
        return self.min != self.max

    @property
    def num_workers(self) -> int | tuple[int, int]:
        """``ScalingConfig(num_workers=...)``: ``N`` or ``(MIN, MAX)``."""
        return (self.min, self.max) if self.elastic else self.min

    def counts(self) -> range:
        """Every worker count the run may see."""
        return range(self.min, self.max + 1)

    def __str__(self) -> str:
        return str(self._dump())


def parse_workers(value: int | str | WorkerRange, flag: str) -> WorkerRange:
    """``value`` as a ``WorkerRange``.

    Raises:
        WorkerRangeError: one line naming ``flag`` and the problem.
    """
    from pydantic import ValidationError

    try:
        return WorkerRange.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        raise WorkerRangeError(f"{flag}: {message}") from None


def check_global_batch(workers: WorkerRange, global_batch: int, flag: str, key: str = "batch_size") -> None:
    """Every count of ``workers`` must divide ``global_batch``.

    An SSL loss over a batch (SimCLR's and PCL's contrastive terms, DINO's centre) is not a sum of
    per-micro-batch losses, so gradient accumulation would change the objective; a count that does
    not divide the global batch is therefore refused before training starts.

    Raises:
        WorkerRangeError: naming ``flag``, ``key`` and the counts that do not divide it.
    """
    bad = [n for n in workers.counts() if global_batch % n]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        raise WorkerRangeError(
            f"{flag} {workers}: {key}: the global batch {global_batch} is not divisible by {shown} workers; every "
            f"count from MIN to MAX must divide it"
        )


def check_failures(workers: WorkerRange, max_failures: int, flag: str) -> None:
    """An elastic range needs restarts: Ray Train resizes only through a failure or a scheduled resize.

    Raises:
        WorkerRangeError: ``max_failures`` is 0 with an elastic range.
    """
    if workers.elastic and max_failures == 0:
        raise WorkerRangeError(f"{flag} {workers}: an elastic range needs --max-failures >= 1 (or -1, unlimited)")


__all__ = ["WorkerRange", "WorkerRangeError", "check_failures", "check_global_batch", "parse_workers"]
