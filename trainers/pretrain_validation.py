"""Validation loss and best checkpoint of SSP pretraining (method-spec section 4, as published).

Every epoch, SimCLR, PCL and MIM score their own SSP loss on the split's validation subjects (all
frames, images only); the epoch with the lowest validation loss is the run's *best* checkpoint,
exported next to the last one. DINO has no validation loop in the published code: its best epoch is
the one with the lowest epoch training loss.

Comparable across epochs: one validation pass is a fixed set of augmented views. The loader always
yields its epoch-0 order and the augmentation generator is seeded from ``(seed, rank)`` only
(``validation_seed``), so two epochs differ only in the weights they score. The networks run in eval
mode without gradient: BatchNorm uses its running statistics and does not update them, so validation
images never enter the exported weights. Each rank scores its own share; the mean is all-reduced
(sum and count), so every rank gets the same value whatever the worker count.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from datastore.loader_options import ReadOptions, Shard

BEST_SUFFIX = "_best"

log = logging.getLogger("sspctl.pretrain")


def validation_seed(seed: int, rank: int) -> int:
    """A 63-bit augmentation seed of rank ``rank``'s validation passes: the same in every epoch."""
    digest = hashlib.blake2b(f"valid/{seed}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def skip_reason(config: Any, valid_subjects: list[str] | None) -> str | None:
    """Why a run with ``config`` (``PretrainConfig``) and these validation subjects does not validate; ``None`` if it does."""
    if not config.validates:
        if config.best_metric == "train_loss":
            return "DINO has no validation loop (published): best checkpoint = lowest epoch training loss"
        return "valid_batch_size is null: no validation loss and no best checkpoint"
    if not valid_subjects:
        return "no validation subjects (pretrain with --split FILE to use its valid part): no best checkpoint"
    return None


def open_validation(job: Any, rank: int, world_size: int, read: ReadOptions) -> tuple[Any | None, str | None]:
    """This rank's validation loader for a ``trainers.jobs.PretrainJob``, or ``(None, why there is none)``.

    ``read`` is the worker's read options (``trainers.loading.for_worker``): the validation loader
    plans against the same budget as the training loader, on its own.

    Rank 0 logs the reason (DINO's, which is by design, at info level; any other as a warning).
    """
    config = job.config
    loader, skipped = None, skip_reason(config, job.valid_subjects)
    if skipped is None:
        loader, skipped = build_valid_loader(job.store, job.valid_subjects, config, rank, world_size, read=read)
    if skipped is not None and rank == 0:
        (log.info if config.best_metric == "train_loss" else log.warning)("validation: %s", skipped)
    return loader, skipped


def build_valid_loader(
    store: str, valid_subjects: list[str], config: Any, rank: int, world_size: int, read: ReadOptions = ReadOptions()
) -> tuple[Any | None, str | None]:
    """This rank's validation ``SliceLoader`` (all frames, full batches, shuffled once), or ``(None, reason)``.

    The global ``config.valid_batch_size`` is split over the ranks like the training batch.
    """
    from datastore.loader import LoaderError, SliceLoader
    from trainers.runtime import per_rank_batch

    batch = per_rank_batch(config.valid_batch_size, world_size, key="valid_batch_size")
    try:
        loader = SliceLoader(store, valid_subjects, labelled_only=False, batch_size=batch,
                             shard=Shard(rank=rank, world_size=world_size, seed=config.seed), read=read)
    except LoaderError as exc:
        return None, f"validation subjects unusable ({exc}): no best checkpoint"
    return loader, None


def validation_loss(
    method: Any, modules: torch.nn.Module, loader: Any, device: torch.device, *, seed: int, rank: int,
    world_size: int, steps: int | None, amp_dtype: torch.dtype | None, channels_last: bool = False,
) -> float:
    """Mean SSP loss over at most ``steps`` validation batches of every rank (the same value on each).

    ``modules`` is the unwrapped network (no DDP: a forward without backward must not arm DDP's
    gradient hooks); cross-rank gathers inside the method still run, every rank having as many
    batches. The training mode of ``modules`` is restored afterwards.
    """
    from trainers.runtime import WorkerContext, autocast, device_batches

    limit = len(loader) if steps is None else min(steps, len(loader))
    loader.set_epoch(0)
    generator = torch.Generator(device=device).manual_seed(validation_seed(seed, rank))
    was_training = modules.training
    modules.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    try:
        with torch.no_grad():
            for step, batch in enumerate(device_batches(loader, device, channels_last, limit)):
                with autocast(device, amp_dtype):
                    out = method.training_step(batch, modules, 0, step, generator)
                total += out["loss"].detach().double()
                count += 1
    finally:
        modules.train(was_training)
    return WorkerContext(rank, world_size, False, device).mean(total, count)


@dataclass
class BestSoFar:
    """The best epoch so far by ``metric``, with (on the rank that exports) that epoch's exported weights.

    ``weights`` maps part -> CPU state dict (``SSPMethod.export()``); it stays ``None`` on ranks that
    do not export. ``to_state``/``from_state`` carry it through a training checkpoint.
    """

    metric: Literal["valid_loss", "train_loss"]
    epoch: int = -1
    loss: float = math.inf
    weights: dict[str, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def found(self) -> bool:
        """Whether any epoch has been scored."""
        return self.epoch >= 0

    def offer(self, epoch: int, loss: float, export: Callable[[], dict[str, dict[str, torch.Tensor]]] | None) -> bool:
        """Keep ``epoch`` if ``loss`` is finite and strictly lower than the best so far; ``export()``
        (``None`` on non-exporting ranks) gives its weights. Returns whether it became the best."""
        if not math.isfinite(loss) or loss >= self.loss:
            return False
        self.epoch, self.loss = epoch, float(loss)
        if export is not None:
            self.weights = {part: {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
                            for part, state in export().items()}
        return True

    def to_state(self) -> dict[str, Any] | None:
        """The checkpoint's ``best`` entry (``None`` before the first scored epoch)."""
        if not self.found:
            return None
        return {"epoch": self.epoch, "loss": self.loss, "metric": self.metric, "weights": self.weights or {}}

    @classmethod
    def from_state(cls, metric: Literal["valid_loss", "train_loss"], state: dict[str, Any] | None) -> BestSoFar:
        """Restore from a checkpoint's ``best`` entry (a fresh tracker when it is absent or of another metric)."""
        if not state or state.get("metric") != metric:
            return cls(metric)
        return cls(metric, int(state["epoch"]), float(state["loss"]), state.get("weights") or None)


def best_file_name(part: str) -> str:
    """``encoder`` -> ``encoder_best.pt``."""
    return f"{part}{BEST_SUFFIX}.pt"


__all__ = ["BestSoFar", "best_file_name", "build_valid_loader", "open_validation", "skip_reason", "validation_loss", "validation_seed"]
