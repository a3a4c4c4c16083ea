"""The interface every SSP method implements (one module per method, one registry dict).

A method owns its networks (``modules``: what DDP wraps and the optimizer steps), turns a loader
batch into a loss, and exports the weights fine-tuning loads. Augmentation runs inside
``training_step`` on the batch's device (batched torch ops, seeded by the ``generator``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class SSPMethod(Protocol):
    """One self-supervised pretraining method.

    Lifecycle in the pretrain loop (per rank)::

        method = METHODS[name](config, image_size)      # builds networks on CPU
        method.modules.to(device); ddp = DDP(method.modules)   # or not, for 1 process
        for each step:
            out = method.training_step(batch, ddp, epoch, step, generator)   # {"loss": scalar, ...}
            out["loss"].backward(); method.before_optimizer_step(epoch); optimizer.step()
            method.after_optimizer_step(epoch, steps_done, total_steps)  # steps_done counts this step
    """

    name: str

    @property
    def modules(self) -> nn.Module:
        """Everything the optimizer updates (a single ``nn.Module``, wrapped by DDP)."""
        ...

    def training_step(
        self,
        batch: dict[str, torch.Tensor],
        model: nn.Module,
        epoch: int,
        step: int,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Augment ``batch`` (``image`` ``(B, 1, H, W)`` float, ``position`` ``(B,)``), run ``model``
        (``modules``, possibly DDP-wrapped), return ``{"loss": scalar tensor, ...}`` where other
        entries are detached scalars for logging. Cross-rank gathers happen here.
        """
        ...

    def before_optimizer_step(self, epoch: int) -> None:
        """Hook between backward and ``optimizer.step`` (DINO freezes its last layer in epoch 0)."""
        ...

    def after_optimizer_step(self, epoch: int, global_step: int, total_steps: int) -> None:
        """Hook after ``optimizer.step`` (DINO updates its EMA teacher)."""
        ...

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Method state outside ``modules`` to checkpoint (DINO teacher and centre); tensors only."""
        ...

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """Weights for fine-tuning, by part: ``{"encoder": {"encoder.*": ...}}`` and for MIM also
        ``"encoder_decoder"`` (``encoder.*`` + ``decoder.*``); keys match ``UNet2d.state_dict()``."""
        ...


class StatelessHooks:
    """No-op optimizer hooks and no extra state, for methods whose whole state is in ``modules``."""

    name: str

    def before_optimizer_step(self, epoch: int) -> None:
        pass

    def after_optimizer_step(self, epoch: int, global_step: int, total_steps: int) -> None:
        pass

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected extra state keys {sorted(state)}")
