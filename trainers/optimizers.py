"""SGD built from an ``OptimizerConfig`` (``trainers.methods.config``): pretraining's, with its parameter
groups, and fine-tuning's (``FinetuneConfig.optimizer``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainers.methods.config import OptimizerConfig, PretrainConfig


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


def sgd(optimizer: OptimizerConfig, params: Any) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` over ``params`` (parameters or groups) with ``optimizer``'s settings.

    Groups that set their own ``weight_decay`` keep it.
    """
    import torch

    return torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum, nesterov=optimizer.nesterov,
                           weight_decay=optimizer.weight_decay)


def build_optimizer(config: PretrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    """A pretraining run's SGD over ``param_groups(config, module)`` at the step-0 learning rate."""
    return sgd(config.optimizer, param_groups(config, module))


__all__ = ["build_optimizer", "param_groups", "sgd"]
