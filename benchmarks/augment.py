"""Augmentation benchmark: our batched torch chain against per-sample MONAI transforms.

Both sides apply the same recipe (``trainers.augment.AugmentConfig`` defaults: random affine with
rotation +-180 deg, scale 0.7-1.4, translation, flips, bicubic resampling; Gaussian noise, blur,
intensity scale, shift, gamma) to the same ``(B, 1, H, W)`` float32 batch:

* ``batched``: ``trainers.augment.augment`` on the whole batch on ``--device`` (what the train
  loops run: one ``grid_sample`` and a few element-wise kernels per batch);
* ``per_sample``: MONAI's array transforms, one image at a time, as a per-sample dataset pipeline
  would (``RandAffine`` + ``RandFlip`` x2 + ``RandGaussianNoise`` + ``RandGaussianSmooth`` +
  ``RandScaleIntensity`` + ``RandShiftIntensity`` + ``RandAdjustContrast``), always on the CPU.

Each side runs ``--repeats`` times after one warm-up; the figure is the median slices/s, and
``ratios.batched_vs_per_sample`` = batched / per_sample. Both sides run in this one process, one
after the other per repeat (ABAB), so machine noise hits both alike.

Prints one JSON object. Usage: ``.venv/bin/python benchmarks/augment.py [--device cuda] [--size 256]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainers.augment import AugmentConfig, augment  # noqa: E402


def monai_chain(cfg: AugmentConfig, size: int, seed: int) -> Any:
    """The per-sample MONAI equivalent of ``cfg`` for ``(1, size, size)`` images."""
    from monai import transforms as T

    lo, hi = cfg.scale_range
    chain = T.Compose(
        [
            T.RandAffine(
                prob=1.0,
                rotate_range=math.radians(cfg.rotation_deg),
                scale_range=(lo - 1.0, hi - 1.0),
                translate_range=(cfg.translate_fraction * size, cfg.translate_fraction * size),
                mode="bicubic",
                padding_mode="zeros",
            ),
            T.RandFlip(prob=cfg.flip_p, spatial_axis=0),
            T.RandFlip(prob=cfg.flip_p, spatial_axis=1),
            T.RandGaussianNoise(prob=cfg.noise_p, std=cfg.noise_std_max),
            T.RandGaussianSmooth(sigma_x=cfg.smooth_sigma, sigma_y=cfg.smooth_sigma, prob=cfg.smooth_p),
            T.RandScaleIntensity(factors=cfg.scale_intensity_range, prob=cfg.scale_intensity_p),
            T.RandShiftIntensity(offsets=cfg.shift_range, prob=cfg.shift_p),
            T.RandAdjustContrast(gamma=cfg.gamma_range, prob=cfg.gamma_p),
        ]
    )
    chain.set_random_state(seed=seed)
    return chain


def time_batched(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> float:
    """Seconds for one batched augmentation of ``x`` (synchronised on CUDA)."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    augment(x, cfg, gen)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_per_sample(x: torch.Tensor, chain: Any) -> float:
    """Seconds to run ``chain`` over each image of ``x`` (CPU), one image at a time."""
    start = time.perf_counter()
    for image in x:
        chain(image)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device of the batched side (cpu or cuda)")
    parser.add_argument("--size", type=int, default=128, help="image edge, pixels")
    parser.add_argument("--batch", type=int, default=64, help="slices per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = AugmentConfig()
    cpu_batch = torch.randn(args.batch, 1, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batch = cpu_batch.to(device)
    gen = torch.Generator(device=device).manual_seed(0)  # the train loops draw on the batch's device
    chain = monai_chain(cfg, args.size, seed=0)
    time_batched(batch, cfg, gen)  # warm-up: allocator, kernels
    time_per_sample(cpu_batch[:4], chain)
    batched, per_sample = [], []
    for _ in range(args.repeats):
        batched.append(args.batch / time_batched(batch, cfg, gen))
        per_sample.append(args.batch / time_per_sample(cpu_batch, chain))
    med_b, med_p = statistics.median(batched), statistics.median(per_sample)
    result = {
        "benchmark": "augment",
        "config": {**vars(args), "device": str(device)},
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "batched_slices_per_s": {"median": round(med_b, 1), "min": round(min(batched), 1), "max": round(max(batched), 1)},
        "per_sample_slices_per_s": {"median": round(med_p, 1), "min": round(min(per_sample), 1),
                                    "max": round(max(per_sample), 1)},
        "ratios": {"batched_vs_per_sample": round(med_b / med_p, 2)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
