"""The interface every SSP method implements (one module per method, one registry dict).

A method owns its networks (``modules``: what DDP wraps and the optimizer steps), turns a loader
batch into a loss, and exports the weights fine-tuning loads. Augmentation runs inside
``training_step`` on the batch's device (batched torch ops, seeded by the ``generator``).
Everything a method does differently from the others lives on the method: moving the state it keeps
outside ``modules`` (``to``), converting that state to SyncBatchNorm, the figures it draws after an
epoch, and the weight parts it exports (``parts``; the pretraining manifest lists them, and the
fine-tuning grid reads them from there). ``MethodBase`` gives every hook its do-nothing default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import nn

from trainers.augment import Draws

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    #: The weight parts ``export`` returns, in order (``encoder`` first).
    parts: ClassVar[tuple[str, ...]]

    @property
    def modules(self) -> nn.Module:
        """Everything the optimizer updates (a single ``nn.Module``, wrapped by DDP)."""
        ...

    def to(self, device: torch.device | str, channels_last: bool = False) -> object:
        """Move the state kept outside ``modules`` (DINO: teacher and centre) to ``device``."""
        ...

    def convert_sync_batchnorm(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        """Convert the networks kept outside ``modules`` with ``convert`` (cross-rank BatchNorm; called with
        ``modules``'s conversion, ``trainers.runtime.convert_sync_batchnorm``)."""
        ...

    def epoch_figures(
        self, modules: nn.Module, images: Callable[[], torch.Tensor], device: torch.device, epoch: int, seed: int
    ) -> dict[str, Figure]:
        """Figures to log after ``epoch``, by artifact folder name (MIM: ``reconstructions``).

        ``images()`` reads a training batch ``(B, 1, H, W)`` (only called by methods that draw).
        """
        ...

    def training_step(
        self,
        batch: dict[str, torch.Tensor],
        model: nn.Module,
        epoch: int,
        step: int,
        generator: Draws,
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


class MethodBase:
    """The do-nothing default of every optional hook: no-op optimizer hooks, no extra state, nothing
    outside ``modules`` to move or convert, no epoch figures, and the ``encoder`` part only."""

    name: str
    parts: ClassVar[tuple[str, ...]] = ("encoder",)

    def to(self, device: torch.device | str, channels_last: bool = False) -> MethodBase:
        return self

    def convert_sync_batchnorm(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        pass

    def epoch_figures(
        self, modules: nn.Module, images: Callable[[], torch.Tensor], device: torch.device, epoch: int, seed: int
    ) -> dict[str, Figure]:
        return {}

    def before_optimizer_step(self, epoch: int) -> None:
        pass

    def after_optimizer_step(self, epoch: int, global_step: int, total_steps: int) -> None:
        pass

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected extra state keys {sorted(state)}")
