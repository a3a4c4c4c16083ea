"""Batch normalisation over the global batch of all ranks, for CPU (gloo) data-parallel training.

Why: ``torch.nn.SyncBatchNorm`` raises for CPU tensors (its kernels are CUDA/XPU only), so a CPU
data-parallel run normalises every ``BatchNorm`` with the statistics of the *local* (per-rank)
batch, and a 2-rank run differs from a 1-rank run on the same global batch. ``CrossRankBatchNorm``
is a drop-in ``_BatchNorm`` that, in training mode with more than one rank, normalises with the
statistics of all ranks' rows. It is built from plain tensor ops plus one small all-reduce per
layer per forward (and one in backward), so it is slower than the native kernel: a step of the
test-sized U-Net (width 8, 64 px, 2 images per rank, 2 gloo ranks on 2 cores) takes 2.5x as long as
with per-worker BN, one at width 32, 128 px and 8 images per rank 1.12x
(``benchmarks/cross_rank_batchnorm.py``): latency, which a real batch hides and a toy one does not.
Use it only where cross-rank statistics matter (CPU/gloo runs that must match the single-process
result; ``trainers.runtime.sync_batchnorm_applies``).

Maths, for an input ``x`` of shape ``(N_r, C, *)`` on rank ``r`` (``*`` = zero or more spatial dims),
with every sum taken over the batch and spatial dims of each channel ``c``:

- ``(S1, S2, n) = all_reduce(sum x, sum x^2, N_r * prod(*))``, one all-reduce, in float64
- ``mu  = S1 / n``, ``var = S2 / n - mu^2``            global mean and biased variance (float64:
  the cancellation costs precision only when ``|mu|`` exceeds about ``1e6`` standard deviations)
- ``y   = (x - mu) / sqrt(var + eps) * weight + bias``  (in the input's precision, float32 at least)

The count travels in the same all-reduce as the sums, so ranks may hold different local batch
sizes. The all-reduce is autograd-aware: its backward all-reduces (sums) the incoming gradient, so
each rank's input gradient is the gradient of the *sum of all ranks' losses*, exactly as with
``torch.nn.SyncBatchNorm`` (every rank must therefore run backward, as under DDP). Parameter
gradients stay rank-local contributions; summed over ranks they equal the full-batch gradient
(DDP averages them, i.e. the gradient of the mean of the rank losses, again as with SyncBatchNorm).

Running statistics follow ``nn.BatchNorm*d`` on the full batch: ``num_batches_tracked += 1``;
factor ``f = momentum`` (or ``1 / num_batches_tracked`` when ``momentum is None``);
``running_mean = (1 - f) * running_mean + f * mu``;
``running_var = (1 - f) * running_var + f * var * n / (n - 1)`` (unbiased, global ``n``).
They are identical on every rank.

In eval mode, without an initialised process group, or with a group of one rank the layer is
exactly ``_BatchNorm.forward`` (``F.batch_norm``), as ``SyncBatchNorm`` does.

``torch.distributed.nn.functional.all_reduce`` does give the right backward on gloo in torch 2.13,
but it is deprecated there (a ``FutureWarning`` on every call, pointing at
``torch.distributed._functional_collectives.all_reduce``, which has no autograd support), so a
ten-line autograd function with the same semantics is used instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["CrossRankBatchNorm", "convert_cross_rank_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` that returns a new tensor; backward all-reduces (sums) the gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad_output, ctx.group), None


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the whole global batch of all ranks.

    Shape: input ``(N, C, *)`` (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``),
    output the same shape. ``N`` may differ between ranks. Parameters, buffers and state-dict keys
    are those of ``nn.BatchNorm*d`` (``weight``/``bias`` ``(C,)``, ``running_mean``/``running_var``
    ``(C,)``, ``num_batches_tracked`` ``()``), so checkpoints load into either.

    Args: as ``nn.BatchNorm2d`` (``num_features`` = ``C``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, ``device``, ``dtype``, ``bias``), plus ``process_group``: the ranks
    whose batches are pooled (default: the default/world group).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("CrossRankBatchNorm number of input channels should be non-zero")

    def _sync_group(self) -> Any | None:
        """The group to pool statistics over, or None when the plain local path applies."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``input`` ``(N, C, *)`` -> normalised tensor of the same shape and dtype."""
        self._check_input_dim(input)
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        return self._cross_rank_forward(input, group)

    def _cross_rank_forward(self, input: torch.Tensor, group: Any) -> torch.Tensor:
        # training mode only (``_sync_group`` returns None otherwise): batch statistics are always used
        momentum_factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum_factor = 1.0 / float(self.num_batches_tracked)

        channels = input.size(1)
        reduce_dims = [0, *range(2, input.dim())]
        stat_shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # half precision: float32 maths
        # One all-reduce: the per-channel sum and sum of squares in float64 (so E[x^2] - mu^2 keeps ~1e-16
        # relative precision unless |mu| > ~1e6 sigma) and the count, which lets ranks hold different batches.
        wide = x.double()
        local_count = wide.new_full((1,), float(input.numel() // channels))
        totals = _all_reduce_sum(torch.cat([wide.sum(dim=reduce_dims), (wide * wide).sum(dim=reduce_dims), local_count]),
                                 group)  # (2C + 1,)
        count = totals[-1].detach()
        n = float(count)  # the same on every rank, so all ranks raise together
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n:g} over all ranks")
        mean64 = totals[:channels] / count  # (C,)
        var64 = (totals[channels : 2 * channels] / count - mean64 * mean64).clamp_min(0.0)  # (C,), biased
        mean, var = mean64.to(x.dtype), var64.to(x.dtype)
        centred = x - mean.view(stat_shape)

        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1.0))
                for buffer, batch_stat in ((self.running_mean, mean.detach()), (self.running_var, unbiased)):
                    buffer.mul_(1.0 - momentum_factor).add_(batch_stat.to(buffer.dtype), alpha=momentum_factor)

        out = centred * torch.rsqrt(var + self.eps).view(stat_shape)
        if self.weight is not None:
            out = out * self.weight.view(stat_shape)
        if self.bias is not None:
            out = out + self.bias.view(stat_shape)
        return out.to(input.dtype)


def convert_cross_rank_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Replace every ``BatchNorm*d`` (any ``_BatchNorm`` not already a ``CrossRankBatchNorm``) in
    ``module`` with a ``CrossRankBatchNorm``, in place, as ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    The new layers share the old ``weight``/``bias`` parameters and ``running_mean``/``running_var``/
    ``num_batches_tracked`` tensors (nothing is copied), keep ``training`` (and ``qconfig``), so the
    state-dict keys and values are unchanged. Returns ``module`` itself, or the new layer when
    ``module`` is itself a batch-norm layer.
    """
    output = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError("cannot convert an uninitialised lazy batch-norm layer; run a forward first")
        output = CrossRankBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            bias=module.bias is not None,
        )
        if module.affine:
            with torch.no_grad():
                output.weight = module.weight
                output.bias = module.bias
        output.running_mean = module.running_mean
        output.running_var = module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.training = module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    for name, child in module.named_children():
        output.add_module(name, convert_cross_rank_batchnorm(child, process_group))
    return output
