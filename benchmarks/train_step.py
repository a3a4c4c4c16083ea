"""Train-step benchmark: what the ``sspctl pretrain`` path costs over a bare PyTorch loop, and GPU step speed.

``--device cpu`` (default) builds a small real store (synth -> ingest) and measures, on the same
method, model, global batch and data:

* ``plain``: a bare single-process loop (``SliceLoader`` -> ``training_step`` -> backward -> SGD step;
  no checkpoints, no tracking, no Ray);
* ``ray``: the real ``sspctl pretrain --workers 1`` path (``launch_pretrain``: Ray Train
  ``TorchTrainer``, per-epoch checkpoint via ``ray.train.report``, sqlite MLflow logging).

Both run ``--epochs`` epochs of ``--steps`` steps; epoch 0 is warm-up (cache fill, allocator), the
steady state is the median slices/s of the later epochs. ``ratios.ray_vs_plain`` = ray / plain
(target >= 0.95); ``startup_s`` is reported separately (Ray start + worker group + first epoch
set-up). The Ray worker gets ``--cpus`` CPUs (default all), the plain loop as many torch threads.

``--device cuda`` times the paper-size U-Net (256 x 256, deep supervision, 33.5 M parameters) on
synthetic on-device batches, so only the step is measured: our recipe (bf16 autocast,
channels_last, ``torch.compile``) against the published one (fp16 autocast + ``GradScaler``,
eager), at batch 32 (fine-tuning) and the SSP batch sizes (64 = PCL/DINO, 128 = MIM, 224 = SimCLR
images; ``--quick``: 32 only, fewer steps, < 2 minutes). Reports slices/s and achieved TFLOP/s from
the FLOPs counted with ``torch.utils.flop_counter`` (about 88.6 GFLOP forward+backward per slice).
Needs only torch and MONAI on the GPU machine.

Prints one JSON object. Usage: ``.venv/bin/python benchmarks/train_step.py [--device cuda --quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Forward+backward FLOPs per 256x256 slice of the paper's U-Net (docs/platform-notes), for reference.
PAPER_GFLOP_PER_SLICE = 88.6


# ----------------------------------------------------------------------------------------------
# CPU: plain loop vs the sspctl pretrain path
# ----------------------------------------------------------------------------------------------


def build_store(root: Path, image_size: int, subjects: int) -> str:
    """A finished store of phantom subjects (all frames) at ``image_size`` px under ``root``."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.synth import write_dataset

    store = root / "store.zarr"
    if not store.exists():
        write_dataset(root / "raw", "mnms", n_subjects=subjects, seed=0, size=image_size * 2, frames=(6, 6),
                      slices=(6, 8), trivial=True)
        plan = plan_ingest({"mnms": root / "raw"}, str(store), IngestConfig(size=image_size, spacing=2.5, chunk_slices=32))
        execute_ingest(plan, executor="serial", progress=False)
    return str(store)


def bench_config(method: str, image_size: int, batch: int, epochs: int, steps: int) -> dict[str, Any]:
    """The method's paper config at benchmark size (fp32 on CPU)."""
    config: dict[str, Any] = {"method": {"name": method}, "image_size": image_size, "batch_size": batch,
                              "epochs": epochs, "steps_per_epoch": steps}
    if method == "dino":
        config["method"].update({"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128})
    return config


def plain_loop(store: str, config_dict: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Bare single-process loop with ``cpus`` torch threads; per-epoch slices/s."""
    import torch

    from datastore.loader import ReadOptions, Shard, SliceLoader
    from trainers.methods.config import PretrainConfig
    from trainers.optimizers import build_optimizer
    from trainers.pretrain import build_method
    from trainers.runtime import augmentation_seed

    config = PretrainConfig.model_validate(config_dict)
    torch.set_num_threads(cpus)  # what the Ray worker gets (Ray sets its threads to its CPUs)
    loader = SliceLoader(store, None, batch_size=config.batch_size, shard=Shard(seed=config.seed),
                         read=ReadOptions(progress=False))
    torch.manual_seed(config.seed)
    method = build_method(config)
    model = method.modules
    optimizer = build_optimizer(config, model)
    rates = []
    steps = config.steps_per_epoch or len(loader)
    for epoch in range(config.epochs):
        loader.set_epoch(epoch)
        generator = torch.Generator().manual_seed(augmentation_seed(config.seed, 0, epoch))
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            loss = method.training_step(batch, model, epoch, step, generator)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step(epoch)
            optimizer.step()
            method.after_optimizer_step(epoch, epoch * steps + step + 1, config.epochs * steps)
        rates.append(steps * config.batch_size / (time.perf_counter() - started))
    return {"epoch_slices_per_s": rates, "threads": torch.get_num_threads()}


def ray_path(store: str, config_dict: dict[str, Any], workspace: Path, cpus: int) -> dict[str, Any]:
    """The real ``sspctl pretrain --workers 1`` path (one worker of ``cpus`` CPUs); per-epoch slices/s."""
    import yaml

    from orchestrator.pretrain_launch import PretrainRequest, launch_pretrain
    from orchestrator.workspace import Workspace
    from trainers.pretrain_outputs import read_events

    workspace.mkdir(parents=True, exist_ok=True)
    config_file = workspace / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_dict))
    request = PretrainRequest(
        method=config_dict["method"]["name"], store=store, workspace=Workspace.resolve(workspace),
        config_file=config_file, workers=1, gpus_per_worker=0.0, cpus_per_worker=float(cpus),
    )
    started = time.time()
    outcome = launch_pretrain(request, echo=lambda _: None, progress=False)
    total = time.time() - started
    events = read_events(outcome.run_dir)
    epochs = [e for e in events if e["event"] == "epoch"]
    first_start = epochs[0]["started"]
    threads = next((e.get("torch_threads") for e in events if e["event"] == "start"), None)
    return {"epoch_slices_per_s": [e["slices_per_s"] for e in epochs], "startup_s": first_start - started,
            "total_s": total, "threads": threads}


def steady(rates: list[float]) -> float:
    """Median slices/s of the epochs after the first (warm-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="sspctl-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        store = build_store(root / "data", args.image_size, args.subjects)
        build_s = time.perf_counter() - t0
        config = bench_config(args.method, args.image_size, args.batch, args.epochs, args.steps)
        plain = plain_loop(store, config, args.cpus)
        ray = ray_path(store, config, root / "ws", args.cpus)
    plain_steady, ray_steady = steady(plain["epoch_slices_per_s"]), steady(ray["epoch_slices_per_s"])
    return {
        "benchmark": "train_step", "device": "cpu", "method": args.method, "image_size": args.image_size,
        "global_batch": args.batch, "steps_per_epoch": args.steps, "epochs": args.epochs, "cpus": args.cpus,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min": round(os.getloadavg()[0], 1)},
        "store_build_s": round(build_s, 2),
        "plain": {"steady_slices_per_s": round(plain_steady, 2), "threads": plain["threads"],
                  "epoch_slices_per_s": [round(r, 2) for r in plain["epoch_slices_per_s"]]},
        "ray": {"steady_slices_per_s": round(ray_steady, 2), "threads": ray["threads"],
                "startup_s": round(ray["startup_s"], 2),
                "total_s": round(ray["total_s"], 2),
                "epoch_slices_per_s": [round(r, 2) for r in ray["epoch_slices_per_s"]]},
        "ratios": {"ray_vs_plain": round(ray_steady / plain_steady, 3)},
    }


# ----------------------------------------------------------------------------------------------
# CUDA: our step vs the published recipe on the paper-size U-Net
# ----------------------------------------------------------------------------------------------


def count_flops(model: Any, image_size: int) -> float:
    """Forward+backward FLOPs of one slice (``torch.utils.flop_counter``, batch 2 / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, image_size, image_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        sum(o.float().square().mean() for o in model(x, deep_supervision=True)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def time_recipe(recipe: str, batch: int, steps: int, warmup: int, image_size: int) -> dict[str, Any]:
    """Slices/s of SGD steps of a fresh paper U-Net under ``recipe`` (``ours`` or ``published``)."""
    import torch

    from trainers.models.unet import UNet2d

    torch.manual_seed(0)
    model = UNet2d(image_size, out_channels=4).cuda()
    ours = recipe == "ours"
    if ours:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = None if ours else torch.amp.GradScaler("cuda")
    dtype = torch.bfloat16 if ours else torch.float16
    forward = torch.compile(model) if ours else model
    x = torch.randn(batch, 1, image_size, image_size, device="cuda")
    if ours:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (batch, image_size, image_size), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            outs = forward(x, deep_supervision=True)
            loss = sum(torch.nn.functional.cross_entropy(
                o.float(), torch.nn.functional.interpolate(target[:, None].float(), size=o.shape[-2:], mode="nearest")[:, 0].long()
            ) for o in outs)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    result = {"recipe": recipe, "batch": batch, "slices_per_s": round(steps * batch / seconds, 1),
              "warmup_s": round(warm_s, 1), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del model, optimizer, forward
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device visible to torch")
    from trainers.models.unet import UNet2d

    torch.backends.cudnn.benchmark = True
    size = 256
    flops = count_flops(UNet2d(size, out_channels=4).cuda(), size)
    batches = [32] if args.quick else [32, 64, 128, 224]
    steps, warmup = (10, 3) if args.quick else (30, 5)
    rows = []
    for batch in batches:
        for recipe in ("published", "ours"):
            row = time_recipe(recipe, batch, steps, warmup, size)
            row["tflop_per_s"] = round(row["slices_per_s"] * flops / 1e12, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    speedups = {}
    for batch in batches:
        pub = next(r for r in rows if r["batch"] == batch and r["recipe"] == "published")
        our = next(r for r in rows if r["batch"] == batch and r["recipe"] == "ours")
        speedups[str(batch)] = round(our["slices_per_s"] / pub["slices_per_s"], 3)
    return {
        "benchmark": "train_step", "device": "cuda", "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "image_size": size, "gflop_per_slice_fwd_bwd": round(flops / 1e9, 1),
        "paper_gflop_per_slice": PAPER_GFLOP_PER_SLICE, "steps": steps, "warmup_steps": warmup,
        "results": rows, "ratios": {"ours_vs_published": speedups},
    }


def main() -> None:
    from trainers.methods.names import METHOD_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: plain loop vs sspctl path; cuda: step recipes")
    parser.add_argument("--quick", action="store_true", help="cuda: batch 32 only, 10 steps (< 2 minutes)")
    parser.add_argument("--method", default="mim", choices=METHOD_NAMES, help="cpu: SSP method")
    parser.add_argument("--image-size", type=int, default=64, help="cpu: slice edge in pixels")
    parser.add_argument("--batch", type=int, default=16, help="cpu: global batch (images)")
    parser.add_argument("--steps", type=int, default=8, help="cpu: steps per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="cpu: epochs (the first is warm-up)")
    parser.add_argument("--subjects", type=int, default=6, help="cpu: phantom subjects in the store")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                        help="cpu: torch threads of the plain loop = CPUs of the Ray worker (default: all)")
    args = parser.parse_args()
    result = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
