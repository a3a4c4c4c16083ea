"""The SGD optimizer of a pretraining run, built from its config (``trainers.methods.config.OptimizerConfig``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainers.methods.config import PretrainConfig


def param_groups(config: PretrainConfig, module: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in groups; each carries ``apply_weight_decay``.

    With ``exclude_bias_and_norm_from_wd`` biases and 1-D parameters (norms) form a second
    group without weight decay (DINO). Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if config.optimizer.exclude_bias_and_norm_from_wd and (name.endswith(".bias") or p.ndim <= 1):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "apply_weight_decay": True, "weight_decay": config.optimizer.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0})
    return groups


def build_optimizer(config: PretrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """SGD over ``param_groups(config, module)`` at the step-0 learning rate."""
    import torch

    return torch.optim.SGD(
        param_groups(config, module),
        lr=config.optimizer.lr,
        momentum=config.optimizer.momentum,
        nesterov=config.optimizer.nesterov,
    )


__all__ = ["build_optimizer", "param_groups"]
