"""Batched, device-agnostic augmentation of z-scored CMR slices (the published recipe, spec §2).

All ops take a batch ``(B, 1, H, W)`` float on any device, draw their random parameters from a
``torch.Generator`` (per image, independently) and run as batched torch ops on the batch's device,
so the same code runs on CPU in tests and on CUDA in production. Per-pixel noise is drawn from a
device generator seeded from the given one, so a run is deterministic for a given generator
state *and device* (CPU and CUDA streams differ).

Order (``augment``; ``augment_pair`` for image + label batches), each op applied per image with its
probability from ``AugmentConfig``:

1. ``random_affine``: one sampling grid built by broadcasting, one **bicubic** ``grid_sample``
   (the published resampler: images bicubic, labels nearest, spec §2.1).
   Output coordinates ``o`` (normalised, align_corners=False) map to input coordinates
   ``fov * R(theta) @ diag(s * fx, s * fy) @ (o + t)``: rotation ``theta ~ U(-rot, rot)`` degrees
   (counter-clockwise), isotropic scale ``s ~ U(scale_range)`` where **s > 1 zooms out** (wider field
   of view), flips ``fx, fy = -1`` with ``flip_p`` each, translation ``t`` up to
   ``translate_fraction`` of the output width per axis, applied *before* scaling (the paper's
   ±40 px of 256), and ``fov = crop_fraction`` (output edge / input edge at the same pixel spacing;
   DINO's 128 px local crops of a 256 px slice use 0.5). Outside the input the image is padded with
   its own minimum (the paper pads with the subject minimum, which a per-subject z-score maps to
   the slice background; the per-image minimum is our stand-in).
   Bicubic is torch's cubic convolution (Keys, ``a = -0.75``), whose negative lobes over- and
   undershoot at sharp edges: at most about 11 % of a step per axis (the lobe minimum
   ``-0.111``), up to about 23 % at a corner (both axes), e.g. below the padding minimum next to a
   bright border. The result is deliberately **not clamped** to the input range: the published
   resampler (``grid_sample(mode="bicubic")``, then z-scoring) does not clamp either, and the later
   intensity ops that need a range (gamma, solarize) take the augmented image's own min/max.
   ``random_affine_pair`` / ``affine_resample_label`` warp an integer label map with the *same*
   parameters by **nearest** neighbour (values stay in the input's label set; outside the input
   the label is 0, background).
2. ``gaussian_noise``: ``x + N(0, std^2)``, ``std ~ U(0, noise_std_max)`` per image (MONAI default
   ``sample_std=True``).
3. ``gaussian_blur``: separable Gaussian, ``sigma ~ U(smooth_sigma)`` pixels, kernel truncated at
   4 sigma, replicate padding.
4. ``scale_intensity``: ``x * (1 + f)``, ``f ~ U(scale_intensity_range)`` (MONAI
   ``RandScaleIntensity`` semantics: factors (0.6, 1.5) multiply by 1.6-2.5, spec pitfall 1).
5. ``shift_intensity``: ``x + U(shift_range)``.
6. ``adjust_gamma``: ``((x - min) / (range + 1e-7))^gamma * range + min`` per image,
   ``gamma ~ U(gamma_range)`` (MONAI ``RandAdjustContrast``).
7. ``solarize``: pixels above ``solarize_threshold`` become ``max - x``, ``max`` = the image's own
   maximum (the paper uses the subject's z-scored maximum; the per-image maximum is our stand-in).

``patch_mask`` draws MIM's exact-ratio patch masks.

**Draws.** Every op takes ``gen``: a ``torch.Generator`` (draws for the batch it is given) or a
``RankRows`` (a generator seeded the same on every rank, and this rank's place in the global batch):
then each draw is made for the whole global batch ``world_size * B`` and this rank keeps its rows
``rank * B : (rank + 1) * B``. The global batch is then augmented exactly as one process augments it,
whatever the number of ranks (elastic training: ``docs/pretraining.md``); per-pixel noise is drawn for
the global batch too (``world_size`` times the draws, cheap next to the model). A per-image result
never depends on the other images of the batch (the blur's kernel is truncated per image).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

Range = tuple[float, float]


class AugmentConfig(BaseModel):
    """Probabilities and ranges of one view's augmentation (defaults: SimCLR/PCL/MIM/baseline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_fraction: float = Field(1.0, gt=0.0, le=1.0, description="output edge / input edge (DINO local: 0.5)")
    rotation_deg: float = Field(180.0, ge=0.0, le=180.0, description="rotation drawn from U(-r, r) degrees")
    scale_range: Range = Field((0.7, 1.4), description="isotropic scale; > 1 zooms out")
    translate_fraction: float = Field(40 / 256, ge=0.0, description="max shift per axis, fraction of output width")
    flip_p: float = Field(0.5, ge=0.0, le=1.0, description="flip probability per axis")
    noise_p: float = Field(0.2, ge=0.0, le=1.0)
    noise_std_max: float = Field(0.2, ge=0.0, description="noise std ~ U(0, this)")
    smooth_p: float = Field(0.2, ge=0.0, le=1.0)
    smooth_sigma: Range = Field((0.5, 1.5), description="Gaussian blur sigma range, pixels")
    scale_intensity_p: float = Field(1.0, ge=0.0, le=1.0)
    scale_intensity_range: Range = Field((0.6, 1.5), description="x * (1 + f)")
    shift_p: float = Field(1.0, ge=0.0, le=1.0)
    shift_range: Range = (-0.4, 0.4)
    gamma_p: float = Field(1.0, ge=0.0, le=1.0)
    gamma_range: Range = (0.7, 1.5)
    solarize_p: float = Field(0.0, ge=0.0, le=1.0)
    solarize_threshold: float = 0.0

    @model_validator(mode="after")
    def _ranges_ordered(self) -> AugmentConfig:
        for name in ("scale_range", "smooth_sigma", "scale_intensity_range", "shift_range", "gamma_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} > upper bound {hi}")
        if self.scale_range[0] <= 0 or self.smooth_sigma[0] < 0 or self.gamma_range[0] <= 0:
            raise ValueError("scale_range and gamma_range must be > 0 and smooth_sigma >= 0")
        return self


@dataclass(frozen=True)
class RankRows:
    """Draws for rank ``rank`` of ``world_size``: ``generator`` is seeded the same on every rank; each draw
    is made for ``world_size * B`` rows and this rank keeps rows ``rank * B : (rank + 1) * B``."""

    generator: torch.Generator
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")


#: What the augmentation ops draw from: a generator (the batch is everything) or a rank's rows of a global batch.
Draws: TypeAlias = torch.Generator | RankRows


def _rows(gen: Draws, n: int, draw: Callable[[torch.Generator, int], torch.Tensor]) -> torch.Tensor:
    """``draw(generator, rows)`` for this batch's ``n`` rows: all of them, or this rank's of the global batch."""
    if isinstance(gen, torch.Generator):
        return draw(gen, n)
    return draw(gen.generator, n * gen.world_size)[gen.rank * n : (gen.rank + 1) * n]


def _generator(gen: Draws) -> torch.Generator:
    return gen if isinstance(gen, torch.Generator) else gen.generator


def _device_generator(gen: Draws, device: torch.device) -> Draws:
    """``gen`` itself if it lives on ``device``, else a device generator seeded from ``gen`` (same rows)."""
    base = _generator(gen)
    if base.device.type == device.type:
        return gen
    seed = int(torch.randint(0, 2**62, (1,), generator=base, device=base.device))
    moved = torch.Generator(device=device).manual_seed(seed)
    return moved if isinstance(gen, torch.Generator) else RankRows(moved, gen.rank, gen.world_size)


def _rand(gen: Draws, n: int) -> torch.Tensor:
    """``(n,)`` float32 draws from U(0, 1) on the generator's device."""
    return _rows(gen, n, lambda g, rows: torch.rand(rows, generator=g, device=g.device))


def _uniform(gen: Draws, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    """``(n,)`` float32 draws from U(lo, hi), drawn on the generator's device, moved to ``device``."""
    return (lo + (hi - lo) * _rand(gen, n)).to(device)


def _coin(gen: Draws, n: int, p: float, device: torch.device) -> torch.Tensor:
    """``(n,)`` bool, True with probability ``p``."""
    return (_rand(gen, n) < p).to(device)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` for broadcasting against ``(B, 1, H, W)``."""
    return v.reshape(-1, 1, 1, 1)


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"augmentation expects a batch (B, 1, H, W), got {tuple(x.shape)}")


class AffineParams(NamedTuple):
    """Per-image parameters of ``random_affine``, each ``(B,)`` float32."""

    theta: torch.Tensor  # rotation, radians, counter-clockwise
    scale: torch.Tensor  # isotropic, > 1 zooms out
    flip_x: torch.Tensor  # -1 or 1
    flip_y: torch.Tensor
    t_x: torch.Tensor  # translation before scaling, normalised output units (2 = full width)
    t_y: torch.Tensor


def sample_affine(b: int, gen: Draws, cfg: AugmentConfig, device: torch.device) -> AffineParams:
    """Draw ``random_affine``'s parameters for ``b`` images."""
    theta = _uniform(gen, b, -cfg.rotation_deg, cfg.rotation_deg, device) * (math.pi / 180.0)
    scale = _uniform(gen, b, *cfg.scale_range, device)
    flip_x = torch.where(_coin(gen, b, cfg.flip_p, device), -1.0, 1.0)
    flip_y = torch.where(_coin(gen, b, cfg.flip_p, device), -1.0, 1.0)
    # normalised units: the output spans [-1, 1], so a shift of f * width is 2 * f
    t_x = _uniform(gen, b, -2 * cfg.translate_fraction, 2 * cfg.translate_fraction, device)
    t_y = _uniform(gen, b, -2 * cfg.translate_fraction, 2 * cfg.translate_fraction, device)
    return AffineParams(theta, scale, flip_x, flip_y, t_x, t_y)


def _affine_grid(p: AffineParams, h_in: int, w_in: int, crop_fraction: float, device: torch.device) -> torch.Tensor:
    """The ``grid_sample`` grid of ``in = fov * R @ diag(s fx, s fy) @ (o + t)``.

    Returns:
        ``(B, h, w, 2)`` float32 input coordinates (x, y), normalised, align_corners=False, with
        ``h = max(1, round(h_in * crop_fraction))`` and likewise ``w``.
    """
    h, w = max(1, round(h_in * crop_fraction)), max(1, round(w_in * crop_fraction))
    ox = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1  # (w,)
    oy = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1  # (h,)
    px = (ox[None, None, :] + p.t_x[:, None, None]) * (p.scale * p.flip_x)[:, None, None]  # (B, 1, w)
    py = (oy[None, :, None] + p.t_y[:, None, None]) * (p.scale * p.flip_y)[:, None, None]  # (B, h, 1)
    cos, sin = torch.cos(p.theta)[:, None, None], torch.sin(p.theta)[:, None, None]
    gx = (cos * px - sin * py) * crop_fraction  # (B, h, w)
    gy = (sin * px + cos * py) * crop_fraction
    return torch.stack((gx, gy), dim=-1)


def affine_resample(x: torch.Tensor, p: AffineParams, crop_fraction: float = 1.0) -> torch.Tensor:
    """Resample images with one broadcast grid: ``in = fov * R @ diag(s fx, s fy) @ (o + t)``, bicubic.

    Args:
        x: ``(B, 1, H, W)`` float images.
        p: per-image parameters, each ``(B,)``.
        crop_fraction: output edge / input edge.

    Returns:
        ``(B, 1, round(H * crop_fraction), round(W * crop_fraction))``: bicubic (torch's Keys
        kernel), padded with each image's minimum, not clamped (bicubic overshoot at sharp edges is
        kept, as in the published resampler; see the module docstring).
    """
    _check(x)
    _, _, h_in, w_in = x.shape
    grid = _affine_grid(p, h_in, w_in, crop_fraction, x.device).to(x.dtype)
    x_min = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - x_min, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    return out + x_min


def affine_resample_label(label: torch.Tensor, p: AffineParams, crop_fraction: float = 1.0) -> torch.Tensor:
    """Warp integer label maps with the same transform as ``affine_resample``, nearest neighbour.

    Args:
        label: ``(B, H, W)`` integer class indices (any integer dtype; values below 2**24).
        p: per-image parameters, each ``(B,)`` (the ones the images were warped with).
        crop_fraction: output edge / input edge.

    Returns:
        ``(B, round(H * crop_fraction), round(W * crop_fraction))`` of ``label``'s dtype: every value
        is an input value of that image, or 0 (background) outside the input.
    """
    if label.ndim != 3 or label.is_floating_point() or label.is_complex():
        raise ValueError(f"label warp expects integer class maps (B, H, W), got {tuple(label.shape)} {label.dtype}")
    _, h_in, w_in = label.shape
    grid = _affine_grid(p, h_in, w_in, crop_fraction, label.device)
    out = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out[:, 0].round().to(label.dtype)


def random_affine(x: torch.Tensor, gen: Draws, cfg: AugmentConfig) -> torch.Tensor:
    """Rotate, scale, flip and translate each image (bicubic); ``(B, 1, H, W)`` -> ``(B, 1, h, w)``.

    ``h = round(H * crop_fraction)``; see the module docstring for the transform.
    """
    _check(x)
    return affine_resample(x, sample_affine(x.shape[0], gen, cfg, x.device), cfg.crop_fraction)


def random_affine_pair(
    image: torch.Tensor, label: torch.Tensor, gen: Draws, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``random_affine`` of images and their label maps with one parameter draw per image.

    Images ``(B, 1, H, W)`` float are warped bicubically, labels ``(B, H, W)`` integer by nearest
    neighbour (spec §2.1). Draws exactly what ``random_affine(image, gen, cfg)`` draws, so the
    image output and the generator state afterwards are the same as for the image alone.

    Returns:
        ``(B, 1, h, w)`` images and ``(B, h, w)`` labels, ``h = round(H * crop_fraction)``.
    """
    _check(image)
    if label.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"label shape {tuple(label.shape)} does not match images {tuple(image.shape)}")
    p = sample_affine(image.shape[0], gen, cfg, image.device)
    return affine_resample(image, p, cfg.crop_fraction), affine_resample_label(label, p, cfg.crop_fraction)


def gaussian_noise(x: torch.Tensor, gen: Draws, p: float, std_max: float) -> torch.Tensor:
    """Add ``N(0, std^2)`` per pixel to each selected image, ``std ~ U(0, std_max)``."""
    b = x.shape[0]
    apply = _coin(gen, b, p, x.device)
    std = _uniform(gen, b, 0.0, std_max, x.device) * apply
    noise = _rows(_device_generator(gen, x.device), b, lambda g, rows: torch.randn(
        (rows, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype))
    return x + noise * _per_image(std).to(x.dtype)


def _kernel_radius(sigma: torch.Tensor) -> torch.Tensor:
    """Per-image kernel radius in pixels, ``int(4 * sigma + 0.5)`` (scipy's ``truncate=4.0``), at least 1."""
    return (4.0 * sigma + 0.5).floor().clamp_min(1)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B,)`` sigmas -> ``(B, 2 * radius + 1)`` normalised 1-D Gaussian kernels, each truncated at its
    own radius (``_kernel_radius``): an image's blur does not depend on the other images' sigmas."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (taps[None, :] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    k = k * (taps.abs()[None, :] <= _kernel_radius(sigma)[:, None])
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma (pixels) per image: ``(B, 1, H, W)``, ``(B,)`` -> same shape.

    Each image's kernel is truncated at ``int(4 sigma + 0.5)`` pixels, as scipy's ``gaussian_filter``.
    """
    _check(x)
    b, _, h, w = x.shape
    radius = int(_kernel_radius(sigma).max())
    k = _gaussian_kernels(sigma, radius).to(x.dtype)  # (B, K)
    y = x.reshape(1, b, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=b)
    return y.reshape(b, 1, h, w)


def random_blur(x: torch.Tensor, gen: Draws, p: float, sigma_range: Range) -> torch.Tensor:
    """Blur each image with probability ``p``, ``sigma ~ U(sigma_range)`` pixels."""
    b = x.shape[0]
    apply = _coin(gen, b, p, x.device)
    sigma = _uniform(gen, b, *sigma_range, x.device)
    if not bool(apply.any()):
        return x
    out = x.clone()
    out[apply] = gaussian_blur(x[apply], sigma[apply])
    return out


def scale_intensity(x: torch.Tensor, gen: Draws, p: float, factors: Range) -> torch.Tensor:
    """``x * (1 + f)``, ``f ~ U(factors)``, per selected image (MONAI ``RandScaleIntensity``)."""
    b = x.shape[0]
    apply = _coin(gen, b, p, x.device)
    f = _uniform(gen, b, *factors, x.device)
    mult = torch.where(apply, 1.0 + f, torch.ones_like(f))
    return x * _per_image(mult).to(x.dtype)


def shift_intensity(x: torch.Tensor, gen: Draws, p: float, offsets: Range) -> torch.Tensor:
    """``x + U(offsets)`` per selected image."""
    b = x.shape[0]
    apply = _coin(gen, b, p, x.device)
    off = _uniform(gen, b, *offsets, x.device) * apply
    return x + _per_image(off).to(x.dtype)


def adjust_gamma(x: torch.Tensor, gen: Draws, p: float, gammas: Range) -> torch.Tensor:
    """Per-image gamma on the min-max normalised image, range restored (MONAI ``RandAdjustContrast``)."""
    b = x.shape[0]
    apply = _coin(gen, b, p, x.device)
    gamma = _uniform(gen, b, *gammas, x.device)
    gamma = torch.where(apply, gamma, torch.ones_like(gamma))
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    rng = x.amax(dim=(1, 2, 3), keepdim=True) - lo
    unit = ((x - lo) / (rng + 1e-7)).clamp_min(0.0)
    return unit.pow(_per_image(gamma).to(x.dtype)) * rng + lo


def solarize(x: torch.Tensor, gen: Draws, p: float, threshold: float) -> torch.Tensor:
    """Pixels above ``threshold`` become ``max - x`` (``max`` per image) in each selected image."""
    b = x.shape[0]
    apply = _per_image(_coin(gen, b, p, x.device))
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(apply & (x > threshold), top - x, x)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: Draws) -> torch.Tensor:
    """The full chain of the module docstring: ``(B, 1, H, W)`` -> ``(B, 1, H * crop_fraction, ...)``.

    Runs with autocast off, in ``x``'s dtype: the train loops call it inside their autocast region,
    where the blur's convolution would otherwise return bf16/fp16 into the fp32 batch.
    """
    _check(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _intensity_chain(random_affine(x, gen, cfg), cfg, gen)


def augment_pair(
    image: torch.Tensor, label: torch.Tensor, cfg: AugmentConfig, gen: Draws
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a labelled batch: ``image`` ``(B, 1, H, W)`` float, ``label`` ``(B, H, W)`` integer.

    The geometric transform is drawn once and applied to the image (bicubic) and to the label map
    (nearest neighbour, 0 = background outside the input), as the published resampler (spec §2.1);
    then the intensity ops of ``augment`` act on the image only. Same draws, in the same order, as
    ``augment``; autocast off as there. Returns the image and an int64 label of the input shapes.
    """
    _check(image)
    with torch.autocast(device_type=image.device.type, enabled=False):
        image, label = random_affine_pair(image, label.long(), gen, cfg)
        return _intensity_chain(image, cfg, gen), label


def _intensity_chain(x: torch.Tensor, cfg: AugmentConfig, gen: Draws) -> torch.Tensor:
    """Steps 2-7 of the module docstring (everything after the affine warp)."""
    x = gaussian_noise(x, gen, cfg.noise_p, cfg.noise_std_max)
    x = random_blur(x, gen, cfg.smooth_p, cfg.smooth_sigma)
    x = scale_intensity(x, gen, cfg.scale_intensity_p, cfg.scale_intensity_range)
    x = shift_intensity(x, gen, cfg.shift_p, cfg.shift_range)
    x = adjust_gamma(x, gen, cfg.gamma_p, cfg.gamma_range)
    if cfg.solarize_p > 0:
        x = solarize(x, gen, cfg.solarize_p, cfg.solarize_threshold)
    return x


def masked_count(num_patches: int, ratio: float) -> int:
    """Patches masked per image: ``round(ratio * num_patches)`` (Python rounding, as published)."""
    return int(round(ratio * num_patches))


def patch_mask(
    batch: int, image_size: int, patches_per_side: int, ratio: float, gen: Draws, device: torch.device
) -> torch.Tensor:
    """MIM mask: exactly ``masked_count(P * P, ratio)`` of the ``P x P`` square patches per image.

    Patches are chosen uniformly per image (top-k of U(0, 1) noise).

    Returns:
        ``(batch, 1, image_size, image_size)`` float32, 1 on masked pixels, 0 elsewhere.
    """
    if image_size % patches_per_side:
        raise ValueError(f"image size {image_size} px is not divisible into {patches_per_side} patches per side")
    n = patches_per_side * patches_per_side
    k = masked_count(n, ratio)
    noise = _rows(gen, batch, lambda g, rows: torch.rand(rows, n, generator=g, device=g.device))
    idx = noise.topk(k, dim=1).indices
    mask = torch.zeros(batch, n, device=noise.device).scatter_(1, idx, 1.0)
    patch = image_size // patches_per_side
    mask = mask.reshape(batch, 1, patches_per_side, patches_per_side)
    mask = mask.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return mask.to(device)
