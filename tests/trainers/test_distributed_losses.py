"""Two gloo processes reproduce the single-process global-batch losses, input gradients and DINO centre."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.ui import free_port
from trainers.distributed import all_reduce_mean, broadcast_module, gather_with_grad, scale_grad_for_ddp
from trainers.losses import ntxent, positional_ntxent, update_center

WORLD = 2
ROWS_PER_RANK = 6  # 3 images x 2 views


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    z = torch.randn(WORLD * ROWS_PER_RANK, 8, generator=g, dtype=torch.float64)
    pos = (torch.randint(0, 10, (WORLD * ROWS_PER_RANK // 2,), generator=g) / 10).repeat_interleave(2).double()
    teacher = torch.randn(WORLD * 4, 16, generator=g)
    return z, pos, teacher


def _single_process_reference() -> dict[str, torch.Tensor]:
    z, pos, teacher = _global_inputs()
    out: dict[str, torch.Tensor] = {}
    for name, fn in (("ntxent", lambda x: ntxent(x, temperature=0.1)), ("pcl", lambda x: positional_ntxent(x, pos))):
        zz = z.clone().requires_grad_(True)
        loss = fn(zz)
        loss.backward()
        out[f"{name}_loss"], out[f"{name}_grad"] = loss.detach(), zz.grad.clone()
    out["center"] = update_center(torch.full((1, 16), 0.5), teacher, 0.9)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z, pos, teacher = _global_inputs()
        local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        result: dict[str, torch.Tensor] = {}
        losses = {
            "ntxent": lambda x, p: ntxent(x, temperature=0.1),
            "pcl": lambda x, p: positional_ntxent(x, p),
        }
        for name, fn in losses.items():
            z_local = z[local].clone().requires_grad_(True)
            loss = fn(gather_with_grad(z_local), gather_with_grad(pos[local].clone()))
            loss.backward()
            result[f"{name}_loss"], result[f"{name}_grad"] = loss.detach(), z_local.grad.clone()
        # the DDP helper: same value, gradient x world size
        z_local = z[local].clone().requires_grad_(True)
        scaled = scale_grad_for_ddp(ntxent(gather_with_grad(z_local), temperature=0.1))
        scaled.backward()
        result["scaled_loss"], result["scaled_grad"] = scaled.detach(), z_local.grad.clone()
        result["center"] = update_center(torch.full((1, 16), 0.5), teacher[rank * 4 : (rank + 1) * 4], 0.9)
        result["mean"] = all_reduce_mean(torch.tensor([float(rank)]))
        torch.manual_seed(rank)  # a module (DINO's teacher) initialised differently on each rank
        module = torch.nn.BatchNorm1d(3)
        torch.nn.init.normal_(module.weight)
        broadcast_module(module)
        result["broadcast"] = module.weight.detach().clone()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_the_single_process_global_batch(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ref = _single_process_reference()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        for name in ("ntxent", "pcl"):
            assert torch.allclose(got[f"{name}_loss"], ref[f"{name}_loss"], atol=1e-6), (rank, name)
            assert torch.allclose(got[f"{name}_grad"], ref[f"{name}_grad"][local], atol=1e-6), (rank, name)
        assert torch.allclose(got["scaled_loss"], ref["ntxent_loss"], atol=1e-6)
        assert torch.allclose(got["scaled_grad"], WORLD * ref["ntxent_grad"][local], atol=1e-6)
        assert torch.allclose(got["center"], ref["center"], atol=1e-6)
        assert got["mean"].item() == 0.5
    torch.manual_seed(0)
    rank0_weight = torch.nn.init.normal_(torch.nn.BatchNorm1d(3).weight.detach().clone())
    for rank in range(WORLD):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["broadcast"], rank0_weight)
