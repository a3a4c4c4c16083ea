"""Training schedules as pure functions of a config and a position in the run.

Pretraining (``step`` = optimizer steps since the start of the run, ``steps_per_epoch`` = steps of
one epoch; ``config`` a ``trainers.methods.config.PretrainConfig``):

- ``lr_at``: ``cosine_epoch`` = ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch (SimCLR, PCL,
  MIM; constant inside an epoch); ``warmup_cosine_step`` = DINO's per-iteration linear warm-up from 0
  over ``warmup_epochs`` then cosine to ``min_lr`` (warm-up clipped to the run).
- ``weight_decay_at``: constant, or DINO's per-iteration cosine to ``weight_decay_end``.
- ``apply_schedule`` sets both on an optimizer built by ``trainers.optimizers.build_optimizer``
  (groups without ``apply_weight_decay`` keep 0).
- ``teacher_temperature`` (DINO, per epoch) and ``ema_momentum`` (DINO's teacher, per iteration).

Fine-tuning: ``poly_factor`` (poly LR, per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainers.methods.config import DINOConfig, PretrainConfig


def total_steps(config: PretrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    return config.epochs * steps_per_epoch


def lr_at(config: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based, counted over the run)."""
    base, low = config.optimizer.lr, config.schedule.min_lr
    if config.schedule.kind == "cosine_epoch":
        epoch = min(step // max(steps_per_epoch, 1), config.epochs)
        return low + (base - low) * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    total = total_steps(config, steps_per_epoch)
    warm = min(config.schedule.warmup_epochs, config.epochs) * steps_per_epoch
    if step < warm:  # numpy.linspace(0, base, warm)[step], as DINO's cosine_scheduler
        return base * step / (warm - 1) if warm > 1 else 0.0
    rest = total - warm
    if rest <= 0:
        return base
    frac = min(step - warm, rest) / rest
    return low + 0.5 * (base - low) * (1 + math.cos(math.pi * frac))


def weight_decay_at(config: PretrainConfig, step: int, steps_per_epoch: int) -> float:
    """Weight decay for step ``step``: constant, or cosine to ``weight_decay_end`` per iteration."""
    start, end = config.optimizer.weight_decay, config.optimizer.weight_decay_end
    if end is None:
        return start
    total = total_steps(config, steps_per_epoch)
    frac = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * frac))


def apply_schedule(config: PretrainConfig, optimizer: torch.optim.Optimizer, step: int, steps_per_epoch: int) -> float:
    """Set every group's ``lr`` and the decayed groups' ``weight_decay`` for ``step``; return the lr."""
    lr = lr_at(config, step, steps_per_epoch)
    wd = weight_decay_at(config, step, steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group.get("apply_weight_decay", True) else 0.0
    return lr


def teacher_temperature(dino: DINOConfig, epoch: int, epochs: int) -> float:
    """``linspace(start, end, W)[epoch]`` for ``epoch < W``, then ``end``; ``W = min(warm-up, epochs)``."""
    warm = min(dino.teacher_temp_warmup_epochs, epochs)
    if epoch >= warm:
        return dino.teacher_temp_end
    if warm == 1:
        return dino.teacher_temp_start
    return dino.teacher_temp_start + (dino.teacher_temp_end - dino.teacher_temp_start) * epoch / (warm - 1)


def ema_momentum(dino: DINOConfig, step: int, total: int) -> float:
    """Teacher EMA momentum of step ``step``: cosine from start to end over the run's ``total`` iterations."""
    if total <= 0:
        return dino.momentum_teacher_end
    frac = min(max(step, 0), total) / total
    return dino.momentum_teacher_end + 0.5 * (dino.momentum_teacher_start - dino.momentum_teacher_end) * (
        1 + math.cos(math.pi * frac)
    )


def poly_factor(epochs: int, power: float) -> Callable[[int], float]:
    """LR factor of epoch ``e``: ``(1 - e / epochs) ** power`` (0 from ``epochs`` on).

    The closed form of ``torch.optim.lr_scheduler.PolynomialLR(total_iters=epochs, power)`` at integer
    epochs; unlike that scheduler's recursive update it stays right when a resumed run changes
    ``epochs``.
    """

    def factor(epoch: int) -> float:
        return max(0.0, 1.0 - min(epoch, epochs) / epochs) ** power

    return factor


__all__ = [
    "apply_schedule", "ema_momentum", "lr_at", "poly_factor", "teacher_temperature", "total_steps", "weight_decay_at",
]
