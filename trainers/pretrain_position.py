"""Where a pretraining run stands inside an epoch, and when it checkpoints there.

* ``Position``: the epoch a run resumes in, the optimiser steps of that epoch already done, the
  worker count that did them and their summed loss (from ``TrainState.position``).
* ``StepCheckpoints``: after every optimiser step, decides whether this step ends with a checkpoint:
  every ``every`` global steps (``--checkpoint-every-steps``), or as soon as any rank was asked to
  stop (SIGTERM, ``trainers.preemption``). The decision is the same on every rank, because
  ``ray.train.report`` is a barrier every rank must reach.

Resuming inside an epoch: the loader's epoch order is a pure function of (seed, epoch, rank, world
size), so with the SAME worker count the resumed run draws and drops the first ``batch`` batches of
that order and continues with exactly the batches an uninterrupted run would have used (no slice
skipped or repeated within the epoch). With a DIFFERENT count the ranks own other slices, so the
rest of that epoch comes from the new count's order after dropping its first ``batch`` global
batches: the step count, the schedules and the epoch boundary stay exact, but within that one epoch
some slices may be seen twice and others not at all. From the next epoch on every slice is seen once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


class WorkerStopped(RuntimeError):
    """A worker ends because another rank was asked to stop (its stop checkpoint is written)."""


@dataclass(frozen=True)
class Position:
    """``batch`` optimiser steps of ``epoch`` are done (by ``world_size`` workers; summed loss ``loss_sum``)."""

    epoch: int
    batch: int
    world_size: int | None
    loss_sum: float

    @classmethod
    def fresh(cls) -> Position:
        """The start of the run."""
        return cls(epoch=0, batch=0, world_size=None, loss_sum=0.0)

    @classmethod
    def from_state(cls, saved: Mapping[str, Any] | None, next_epoch: int) -> Position:
        """From ``TrainState.position``; ``None`` (an end-of-epoch checkpoint) gives the start of ``next_epoch``."""
        if not saved:
            return cls(epoch=next_epoch, batch=0, world_size=None, loss_sum=0.0)
        return cls(epoch=int(saved["epoch"]), batch=int(saved["batch"]), world_size=int(saved["world_size"]),
                   loss_sum=float(saved["loss_sum"]))


class StepCheckpoints:
    """Calls ``checkpoint(epoch, steps done in the epoch, global step, loss sum)`` when a step ends one.

    A step ends a checkpoint when ``every`` divides the global step, or when any rank saw a stop
    request (``stop_requested``, all-reduced with ``any_rank``). A due checkpoint at the last step of
    an epoch is left to the end-of-epoch report; a stop checkpoint is written there too (a resume
    then skips the whole epoch's batches and only finishes it). After a stop checkpoint
    ``on_stop(global step)`` runs (it ends the worker).
    """

    def __init__(
        self, every: int | None, steps_per_epoch: int, checkpoint: Callable[[int, int, int, torch.Tensor], None], *,
        stop_requested: Callable[[], bool] | None = None, any_rank: Callable[[bool], bool] | None = None,
        on_stop: Callable[[int], None] | None = None,
    ) -> None:
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint = checkpoint
        self.stop_requested = stop_requested
        self.any_rank = any_rank or (lambda flag: flag)
        self.on_stop = on_stop

    def after_step(self, epoch: int, batch_done: int, global_step: int, loss_sum: torch.Tensor) -> None:
        """Checkpoint (and stop) after this step if due; see the class docstring."""
        stop = self.stop_requested is not None and self.any_rank(self.stop_requested())
        due = self.every is not None and global_step % self.every == 0
        if stop or (due and batch_done < self.steps_per_epoch):
            self.checkpoint(epoch, batch_done, global_step, loss_sum)
        if stop and self.on_stop is not None:
            self.on_stop(global_step)


__all__ = ["Position", "StepCheckpoints", "WorkerStopped"]
