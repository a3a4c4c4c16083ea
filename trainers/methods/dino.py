"""DINO (spec §4.3): self-distillation with an EMA teacher, 2 global + ``n_local_crops`` local crops.

Per step, from each image ``(B, 1, H, W)``: a "blur" global view and a "solarize" global view
(``H x H``) and ``n_local_crops`` local views (``H/2 x H/2``), stacked crop-major (all images'
crop 0, then crop 1, ...). The student (``DINONet`` in ``modules``) sees every crop: the encoder
runs once per resolution and the head ONCE over all ``(2 + n_local) * B`` rows, so the head's
BatchNorm statistics span every crop of the (rank-local) batch. The teacher sees the globals only,
without gradient, in train mode (its BN keeps its own running statistics; they are not EMA-copied).

- Loss: ``trainers.losses.dino_loss`` with student temperature 0.1 and teacher temperature
  ``trainers.schedules.teacher_temperature(config, epoch, epochs)`` (0.02 -> 0.04 over 30 epochs, per epoch, clipped
  to the run length).
- Centre: updated after the loss with momentum 0.9 from the teacher logits, the batch mean
  all-reduced over ranks, so every rank holds the same centre.
- ``before_optimizer_step``: drops the gradient of ``last_layer`` parameters while
  ``epoch < freeze_last_layer_epochs`` (1: epoch 0).
- ``after_optimizer_step(epoch, global_step, total_steps)``: EMA update of every teacher
  parameter with ``m = trainers.schedules.ema_momentum(config, global_step - 1, total_steps)`` (0.996 -> 1 cosine,
  per iteration). ``global_step`` = optimizer steps taken so far *including the one just taken*
  (the loop increments before the hook), so the step just taken has 0-based index
  ``global_step - 1`` and uses ``momentum_schedule[global_step - 1]``, as DINO's ``main_dino.py``
  (``m = momentum_schedule[it]``, ``it = len(loader) * epoch + i``): the first update uses the base
  0.996 and the last the schedule's final entry. Identical on all ranks because the student
  parameters are identical after the DDP step.
- Teacher init: independent random init by default (faithful to the published code); with
  ``teacher_init_from_student`` the teacher starts as a copy of the student (standard DINO).
- The loop sets LR and weight decay per iteration with ``trainers.schedules.apply_schedule``; biases
  and 1-D parameters have no weight decay; the frozen weight-norm magnitude is not optimised.
- ``extra_state``: the teacher's state dict (``teacher.*``) and the centre (``center``).
- Ranks: the teacher is broadcast from rank 0 at the first step (DDP only syncs the student), so
  ranks seeded differently still share one teacher.
- Cross-rank BatchNorm: when the loop converts the student (``modules``) to cross-rank BatchNorm
  (N > 1 ranks: ``SyncBatchNorm`` on CUDA, ``CrossRankBatchNorm`` on CPU with global batches) it also calls
  ``convert_sync_batchnorm`` with the same conversion for the teacher, so
  the teacher's train-mode BN normalises its global views with global-batch statistics like the
  student's (as DINO's ``main_dino.py`` converts both). Parameter names and order, and so the EMA
  pairing and the ``teacher.*`` checkpoint keys, are unchanged by the conversion.
- Export: the STUDENT's ``encoder.*`` weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainers.augment import Draws, augment
from trainers.distributed import broadcast_module
from trainers.losses.dino import dino_loss, update_center
from trainers.methods.base import MethodBase
from trainers.methods.config import DINOConfig, PretrainConfig
from trainers.methods.simclr import check_images, encoder_state
from trainers.models.heads import DINONet
from trainers.schedules import ema_momentum, teacher_temperature

N_GLOBAL = 2


class DINO(MethodBase):
    """DINO method (see the module docstring); implements ``SSPMethod``."""

    name = "dino"

    def __init__(self, config: PretrainConfig, image_size: int | None = None) -> None:
        if not isinstance(config.method, DINOConfig):
            raise ValueError(f"dino: config.method is {config.method.name!r}, expected 'dino'")
        self.config = config
        self.cfg: DINOConfig = config.method
        self.image_size = image_size or config.image_size
        self.model_width = config.model_width
        if self.cfg.n_local_crops and (self.image_size * self.cfg.local.crop_fraction) < 4:
            raise ValueError(f"dino: local crops of a {self.image_size}px image are smaller than 4 px")
        self.student = self._net()
        self.teacher = self._net()
        if self.cfg.teacher_init_from_student:
            self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.center = torch.zeros(1, self.cfg.out_dim)
        self._teacher_synced = False

    def _net(self) -> DINONet:
        c = self.cfg
        return DINONet(self.image_size, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.use_bn, width=self.model_width)

    @property
    def modules(self) -> nn.Module:
        return self.student

    @property
    def n_crops(self) -> int:
        return N_GLOBAL + self.cfg.n_local_crops

    def crops(self, x: torch.Tensor, generator: Draws) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 1, H, W)`` -> globals ``(2B, 1, H, W)`` and locals ``(n_local * B, 1, H/2, W/2)``, crop-major."""
        globals_ = torch.cat((augment(x, self.cfg.global_blur, generator), augment(x, self.cfg.global_solarize, generator)))
        if not self.cfg.n_local_crops:
            return globals_, None
        locals_ = torch.cat([augment(x, self.cfg.local, generator) for _ in range(self.cfg.n_local_crops)])
        return globals_, locals_

    def to(self, device: torch.device | str, channels_last: bool = False) -> DINO:
        """Move the state outside ``modules`` (teacher, centre) to ``device``; ``modules`` is the loop's job.

        With ``channels_last`` the teacher's weights take the NHWC layout the student has.
        """
        self.teacher.to(device)
        if channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.center = self.center.to(device)
        return self

    def convert_sync_batchnorm(self, convert: Callable[[nn.Module], nn.Module]) -> None:
        """Convert the teacher's BatchNorm with ``convert`` (weights shared, keys kept), as the loop
        converts ``modules`` (the student): both normalise with the global batch's statistics."""
        self.teacher = convert(self.teacher)

    def _follow(self, device: torch.device) -> None:
        """Keep the teacher and centre on the batch's device (they live outside ``modules``)."""
        if self.center.device != device:
            self.center = self.center.to(device)
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        if not self._teacher_synced:  # DDP syncs the student only; start every rank from rank 0's teacher
            broadcast_module(self.teacher)
            self._teacher_synced = True

    def training_step(
        self, batch: dict[str, torch.Tensor], model: nn.Module, epoch: int, step: int, generator: Draws
    ) -> dict[str, torch.Tensor]:
        """Crops -> student ``(n_crops * B, D)`` and teacher ``(2B, D)`` logits -> DINO loss; updates the centre."""
        x = check_images(batch, self.image_size)
        self._follow(x.device)
        globals_, locals_ = self.crops(x, generator)
        student_out = model(globals_, locals_)
        self.teacher.train()
        with torch.no_grad():
            teacher_out = self.teacher(globals_)
        teacher_temp = teacher_temperature(self.cfg, epoch, self.config.epochs)
        loss = dino_loss(
            student_out, teacher_out, self.center, self.cfg.student_temp, teacher_temp, N_GLOBAL, self.n_crops
        )
        self.center = update_center(self.center, teacher_out, self.cfg.center_momentum)
        return {"loss": loss, "teacher_temp": torch.tensor(teacher_temp)}

    def before_optimizer_step(self, epoch: int) -> None:
        """Drop the last layer's gradient during the first ``freeze_last_layer_epochs`` epochs."""
        if epoch >= self.cfg.freeze_last_layer_epochs:
            return
        for name, p in self.student.named_parameters():
            if "last_layer" in name:
                p.grad = None

    def momentum_for(self, global_step: int, total_steps: int) -> float:
        """EMA momentum after ``global_step`` optimizer steps (>= 1, counting the one just taken).

        ``momentum_schedule[global_step - 1]`` of DINO's cosine schedule over ``total_steps``: the
        first update uses ``momentum_teacher_start`` (0.996), the last ``ema_momentum(total - 1)``.

        Raises:
            ValueError: if ``global_step < 1`` (the hook runs after a step, so at least one was taken).
        """
        if global_step < 1:
            raise ValueError(f"dino: global_step counts optimizer steps taken (>= 1), got {global_step}")
        return ema_momentum(self.cfg, global_step - 1, total_steps)

    @torch.no_grad()
    def after_optimizer_step(self, epoch: int, global_step: int, total_steps: int) -> None:
        """EMA ``teacher = m * teacher + (1 - m) * student`` over all parameters, ``m = momentum_for(global_step)``."""
        m = self.momentum_for(global_step, total_steps)
        for p_s, p_t in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            p_t.mul_(m).add_(p_s.detach().to(p_t.device), alpha=1.0 - m)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        state["center"] = self.center.detach().cpu().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if "center" not in state:
            raise ValueError("dino: extra state has no 'center'")
        teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        device = next(self.teacher.parameters()).device
        self.teacher.load_state_dict(teacher, strict=True)
        self.center = state["center"].to(device=device, dtype=torch.float32).reshape(1, -1).clone()

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """The student's ``{"encoder": {"encoder.*": tensor}}``."""
        return {"encoder": encoder_state(self.student)}
