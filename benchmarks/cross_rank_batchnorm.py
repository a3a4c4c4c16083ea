"""What cross-rank BatchNorm costs a CPU data-parallel step: ``CrossRankBatchNorm`` against per-worker BN.

Two gloo ranks (spawned processes, 1 torch thread each) train the fine-tuning U-Net
(``trainers.models.unet.UNet2d``) under DDP on random ``(B, 1, H, W)`` batches: forward, a mean
over the deep-supervision outputs, backward. Both sides run in one invocation, one after the other
with the same seed and sizes:

* ``per_worker_bn``: plain ``BatchNorm2d`` (each rank's own statistics: what CPU runs with per-rank
  batches use);
* ``cross_rank_bn``: the same network converted with ``convert_cross_rank_batchnorm`` (one all-reduce
  per BN layer per forward and one in backward: what CPU runs with global batches use).

The figure is the median ms per step over ``--steps`` steps after 5 warm-up steps, rank 0's clock;
``ratio`` = cross / per-worker. The all-reduces are latency, so the ratio shrinks as the batch and
the image grow. Prints one JSON object.
Usage: ``.venv/bin/python benchmarks/cross_rank_batchnorm.py [--width 8] [--size 64] [--batch 2]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank: int, port: int, args: argparse.Namespace, cross: bool, out: str) -> None:
    from trainers.cross_rank_batchnorm import convert_cross_rank_batchnorm
    from trainers.models.unet import UNet2d

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = UNet2d(args.size, 4, width=args.width)
        if cross:
            net = convert_cross_rank_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        x = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(rank))
        times = []
        for step in range(5 + args.steps):
            started = time.perf_counter()
            outputs = model(x)
            loss = sum(o.mean() for o in outputs) if isinstance(outputs, (list, tuple)) else outputs.mean()
            loss.backward()
            if step >= 5:
                times.append(time.perf_counter() - started)
        if rank == 0:
            Path(out).write_text(json.dumps(statistics.median(times) * 1000))
    finally:
        dist.destroy_process_group()


def _median_ms(args: argparse.Namespace, cross: bool) -> float:
    from orchestrator.ui import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "ms.json")
        mp.start_processes(_rank, args=(port, args, cross, out), nprocs=2, join=True, start_method="spawn")
        return float(json.loads(Path(out).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8, help="U-Net base width (the paper's: 32)")
    parser.add_argument("--size", type=int, default=64, help="image edge in px")
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    args = parser.parse_args()
    per_worker, cross = _median_ms(args, cross=False), _median_ms(args, cross=True)
    print(json.dumps({
        "benchmark": "cross_rank_batchnorm", "ranks": 2, "backend": "gloo", "torch_threads_per_rank": 1,
        "width": args.width, "size": args.size, "batch_per_rank": args.batch, "steps": args.steps,
        "ms_per_step": {"per_worker_bn": round(per_worker, 2), "cross_rank_bn": round(cross, 2)},
        "ratio": round(cross / per_worker, 2), "torch": torch.__version__, "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
