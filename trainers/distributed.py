"""Cross-rank helpers for the SSP losses; every function is a no-op in a single process.

- ``gather_with_grad(x)``: concatenate the rank-local ``(n, ...)`` tensors of all ranks along dim 0
  in rank order. Gradient flows only through this rank's own slice; the other ranks' slices are
  constants. So a loss computed over the gathered *global* batch on every rank has, w.r.t. this
  rank's local rows, exactly the gradient the single-process loss on the concatenated batch has.
- ``scale_grad_for_ddp(loss)``: DDP *averages* parameter gradients over ranks. For a loss that every
  rank computes over the whole global batch (NT-Xent, PCL) the averaged gradient would be
  ``1 / world_size`` of the single-process one; this helper multiplies the gradient (not the value)
  by ``world_size`` so the DDP step equals the single-GPU step.
- ``all_reduce_mean(x)``: mean of ``x`` over ranks (DINO's batch centre); returns a new tensor.
- ``broadcast_module(module)``: rank 0's parameters and buffers to every rank (DINO's teacher,
  which DDP does not wrap).

Ranks must pass tensors of the same shape (equal per-rank batches, which the loader guarantees).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 when no process group is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when no process group is initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` ``(n, ...)`` into ``(world_size * n, ...)``, rank-major.

    The local slice is ``x`` itself (keeps its autograd graph); the remote slices are detached.
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a detached copy; ``x`` itself is untouched)."""
    out = x.detach().clone()
    if not is_distributed():
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into ``module`` on every rank (in place)."""
    if not is_distributed():
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=src)


def scale_grad_for_ddp(loss: torch.Tensor) -> torch.Tensor:
    """Same value as ``loss``; gradient multiplied by ``world_size`` (see the module docstring)."""
    n = world_size()
    if n == 1:
        return loss
    return loss + (n - 1) * (loss - loss.detach())
