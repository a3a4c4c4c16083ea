"""Batched augmentation: determinism, shapes, geometry cases, bicubic/nearest oracles, intensity ranges, blur oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.augment import (
    AugmentConfig,
    RankRows,
    augment_pair,
    adjust_gamma,
    AffineParams,
    affine_resample,
    affine_resample_label,
    augment,
    gaussian_blur,
    gaussian_noise,
    masked_count,
    patch_mask,
    random_affine,
    random_affine_pair,
    sample_affine,
    scale_intensity,
    shift_intensity,
    solarize,
)

NO_INTENSITY = dict(noise_p=0.0, smooth_p=0.0, scale_intensity_p=0.0, shift_p=0.0, gamma_p=0.0)
IDENTITY_GEOMETRY = dict(rotation_deg=0.0, scale_range=(1.0, 1.0), translate_fraction=0.0, flip_p=0.0)


def _images(b: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_is_deterministic_under_a_generator_and_varies_with_the_seed() -> None:
    x = _images()
    cfg = AugmentConfig(noise_p=1.0, smooth_p=0.5, solarize_p=0.5)
    a, b = augment(x, cfg, _gen(7)), augment(x, cfg, _gen(7))
    assert torch.equal(a, b)
    assert not torch.allclose(a, augment(x, cfg, _gen(8)))
    assert a.shape == x.shape and a.device == x.device and torch.isfinite(a).all()


def test_images_of_a_batch_get_independent_parameters() -> None:
    x = _images(1).repeat(4, 1, 1, 1)
    out = augment(x, AugmentConfig(), _gen(0))
    assert not torch.allclose(out[0], out[1])


def test_crop_fraction_sets_the_output_size() -> None:
    out = augment(_images(3, 32), AugmentConfig(crop_fraction=0.5), _gen(0))
    assert out.shape == (3, 1, 16, 16)


def test_identity_geometry_returns_the_input() -> None:
    x = _images()
    out = random_affine(x, _gen(0), AugmentConfig(**IDENTITY_GEOMETRY))
    assert torch.allclose(out, x, atol=1e-5)


def test_certain_flips_flip_both_axes_exactly() -> None:
    x = _images()
    cfg = AugmentConfig(**{**IDENTITY_GEOMETRY, "flip_p": 1.0})
    assert torch.allclose(random_affine(x, _gen(0), cfg), x.flip(-1).flip(-2), atol=1e-5)


def test_broadcast_grid_matches_torch_affine_grid() -> None:
    """Independent oracle: the matrix fov * R @ S @ [I | t] through F.affine_grid + grid_sample."""
    x = _images(6, 32)
    cfg = AugmentConfig(crop_fraction=0.5, translate_fraction=0.3)
    p = sample_affine(6, _gen(4), cfg, x.device)
    ours = affine_resample(x, p, cfg.crop_fraction)
    cos, sin = torch.cos(p.theta), torch.sin(p.theta)
    rot = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)  # (B, 2, 2)
    lin = rot @ torch.diag_embed(torch.stack((p.scale * p.flip_x, p.scale * p.flip_y), -1)) * cfg.crop_fraction
    shift = lin @ torch.stack((p.t_x, p.t_y), -1)[..., None]
    theta = torch.cat((lin, shift), dim=-1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [6, 1, 16, 16], align_corners=False)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    ref = F.grid_sample(x - lo, grid, mode="bicubic", padding_mode="zeros", align_corners=False) + lo
    assert torch.allclose(ours, ref, atol=1e-5)


def _keys(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (torch's bicubic uses a = -0.75)."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _bicubic_oracle(img: np.ndarray, p: AffineParams, i: int, fov: float, h: int, w: int) -> np.ndarray:
    """Independent numpy reference of one image's warp: the matrix in pixel units + Keys taps, zero outside."""
    hi, wi = img.shape
    ox = (np.arange(w) * 2 + 1) / w - 1
    oy = (np.arange(h) * 2 + 1) / h - 1
    oy, ox = np.meshgrid(oy, ox, indexing="ij")
    th, s = float(p.theta[i]), float(p.scale[i])
    px = (ox + float(p.t_x[i])) * s * float(p.flip_x[i])
    py = (oy + float(p.t_y[i])) * s * float(p.flip_y[i])
    gx = (np.cos(th) * px - np.sin(th) * py) * fov
    gy = (np.sin(th) * px + np.cos(th) * py) * fov
    ix, iy = ((gx + 1) * wi - 1) / 2, ((gy + 1) * hi - 1) / 2  # align_corners=False pixel coordinates
    x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
    out = np.zeros((h, w))
    for dy in range(-1, 3):
        for dx in range(-1, 3):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < hi) & (xx >= 0) & (xx < wi)
            vals = np.where(inside, img[np.clip(yy, 0, hi - 1), np.clip(xx, 0, wi - 1)], 0.0)
            out += vals * _keys(ix - xx) * _keys(iy - yy)
    return out


def test_image_warp_is_bicubic_against_a_numpy_keys_oracle() -> None:
    """Spec §2.1: images are resampled bicubically (a bilinear warp is up to 0.7 off this oracle here)."""
    x = _images(3, 20, seed=2).double()
    cfg = AugmentConfig(crop_fraction=0.75, translate_fraction=0.2)
    p = sample_affine(3, _gen(9), cfg, x.device)
    ours = affine_resample(x, p, cfg.crop_fraction)
    assert ours.shape == (3, 1, 15, 15)
    for i in range(3):
        lo = float(x[i].min())
        ref = _bicubic_oracle(x[i, 0].numpy() - lo, p, i, cfg.crop_fraction, 15, 15) + lo
        np.testing.assert_allclose(ours[i, 0].numpy(), ref, atol=5e-5)  # float32 grid


def test_integer_translation_equals_a_roll_for_images_and_labels() -> None:
    """A whole-pixel shift samples the grid nodes: bicubic and nearest both return the input pixels."""
    size, kx, ky = 24, 3, -2
    x = _images(1, size, seed=5)
    label = torch.randint(0, 4, (1, size, size), generator=_gen(1))
    one = torch.ones(1)
    p = AffineParams(0 * one, one, one, one, one * 2 * kx / size, one * 2 * ky / size)
    image_out, label_out = affine_resample(x, p), affine_resample_label(label, p)
    interior = (slice(4, size - 4), slice(4, size - 4))
    rolled = np.roll(x[0, 0].numpy(), (-ky, -kx), axis=(0, 1))
    np.testing.assert_allclose(image_out[0, 0].numpy()[interior], rolled[interior], atol=1e-4)
    rolled_label = np.roll(label[0].numpy(), (-ky, -kx), axis=(0, 1))
    np.testing.assert_array_equal(label_out[0].numpy()[interior], rolled_label[interior])
    assert torch.equal(affine_resample_label(label, p._replace(t_x=0 * one, t_y=0 * one)), label)  # identity


def test_label_warp_is_nearest_and_keeps_the_label_set() -> None:
    label = torch.tensor([0, 2, 5, 7])[torch.randint(0, 4, (6, 32, 32), generator=_gen(3))]
    image = torch.randn(6, 1, 32, 32, generator=_gen(4))
    cfg = AugmentConfig(crop_fraction=0.5, translate_fraction=0.3)
    out_image, out_label = random_affine_pair(image, label, _gen(11), cfg)
    assert out_label.shape == (6, 16, 16) and out_label.dtype == label.dtype
    assert set(out_label.unique().tolist()) <= {0, 2, 5, 7}
    assert len(set(out_label.unique().tolist())) == 4
    # the same draw as random_affine of the image alone, and the label follows the image
    assert torch.equal(out_image, random_affine(image, _gen(11), cfg))
    # the label follows the image: a disc label and its image overlap after the warp
    yy, xx = torch.meshgrid(torch.arange(32) - 13.0, torch.arange(32) - 17.0, indexing="ij")
    disc = ((yy**2 + xx**2) < 8**2).long().expand(6, 32, 32) * 3
    warped_image, warped_label = random_affine_pair(disc[:, None].float(), disc, _gen(12), cfg)
    assert set(warped_label.unique().tolist()) == {0, 3}
    agreement = ((warped_image[:, 0] > 1.5) == (warped_label == 3)).float().mean()
    assert agreement > 0.95, agreement
    with pytest.raises(ValueError, match="integer"):
        affine_resample_label(label.float(), sample_affine(6, _gen(0), cfg, image.device))


def test_bicubic_overshoot_is_kept_not_clamped() -> None:
    """Documented choice: like the published resampler, the bicubic warp is not clamped to the input range."""
    x = torch.zeros(1, 1, 16, 16)
    x[..., :, 8:] = 1.0  # a unit step
    one = torch.ones(1)
    p = AffineParams(0 * one, one, one, one, one * 1.0 / 16, 0 * one)  # half-pixel shift
    out = affine_resample(x, p)[0, 0, :, 2:14]
    assert out.min() < -0.05 and out.max() > 1.05  # Keys lobe at 1.5 px: -0.094 on each side of the step
    assert out.min() > -0.112 and out.max() < 1.112  # the lobe minimum -0.111 bounds a 1-D step


def test_scale_above_one_zooms_out_and_pads_with_the_image_minimum() -> None:
    size = 32
    yy, xx = torch.meshgrid(torch.arange(size) - 15.5, torch.arange(size) - 15.5, indexing="ij")
    disc = ((yy**2 + xx**2) < 8**2).float()[None, None] * 3.0 - 1.0  # background -1, disc 2
    cfg = AugmentConfig(**{**IDENTITY_GEOMETRY, "scale_range": (2.0, 2.0)})
    out = random_affine(disc, _gen(0), cfg)
    assert (out > 0.5).sum() < 0.5 * (disc > 0.5).sum()  # disc area shrinks by ~4
    assert torch.allclose(out[..., 0, 0], torch.tensor(-1.0))  # padded corner = image minimum
    zoom_in = random_affine(disc, _gen(0), AugmentConfig(**{**IDENTITY_GEOMETRY, "scale_range": (0.5, 0.5)}))
    assert (zoom_in > 0.5).sum() > 2 * (disc > 0.5).sum()


def test_translation_moves_content_by_the_configured_fraction() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 16, 16] = 1.0
    cfg = AugmentConfig(**{**IDENTITY_GEOMETRY, "translate_fraction": 0.25})
    out = random_affine(x, _gen(3), cfg)
    peak = torch.nonzero(out[0, 0] == out.max())[0]
    shift = (peak - torch.tensor([16, 16])).abs()
    assert shift.max() <= 8 and shift.max() >= 1  # at most 0.25 * 32 px per axis


def test_scale_intensity_uses_monai_one_plus_factor_semantics() -> None:
    x = _images().abs() + 0.1
    out = scale_intensity(x, _gen(0), 1.0, (0.6, 1.5))
    ratio = (out / x).reshape(4, -1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))
    assert ((ratio >= 1.6 - 1e-6) & (ratio <= 2.5 + 1e-6)).all()


def test_shift_intensity_adds_one_offset_per_image_within_range() -> None:
    x = _images()
    diff = (shift_intensity(x, _gen(0), 1.0, (-0.4, 0.4)) - x).reshape(4, -1)
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-6)
    assert (diff.abs() <= 0.4 + 1e-6).all()


def test_gamma_keeps_each_image_range() -> None:
    x = _images()
    out = adjust_gamma(x, _gen(0), 1.0, (0.7, 1.5))
    assert torch.allclose(out.amin((1, 2, 3)), x.amin((1, 2, 3)), atol=1e-5)
    assert torch.allclose(out.amax((1, 2, 3)), x.amax((1, 2, 3)), atol=1e-5)
    assert not torch.allclose(out, x)


def test_noise_probability_zero_is_identity_and_std_is_bounded() -> None:
    x = torch.zeros(8, 1, 64, 64)
    assert torch.equal(gaussian_noise(x, _gen(0), 0.0, 0.2), x)
    out = gaussian_noise(x, _gen(0), 1.0, 0.2)
    std = out.reshape(8, -1).std(dim=1)
    assert (std < 0.22).all() and (std > 0).all() and len(set(std.tolist())) == 8


def test_blur_matches_scipy_gaussian_filter() -> None:
    from scipy.ndimage import gaussian_filter

    x = _images(2, 24)
    sigma = torch.tensor([1.0, 1.0])
    ours = gaussian_blur(x, sigma)
    for i in range(2):
        ref = gaussian_filter(x[i, 0].double().numpy(), sigma=1.0, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(ours[i, 0].numpy(), ref, atol=1e-5)


def test_solarize_inverts_pixels_above_threshold() -> None:
    x = _images()
    out = solarize(x, _gen(0), 1.0, 0.0)
    top = x.amax((1, 2, 3), keepdim=True).expand_as(x)
    above = x > 0
    assert torch.allclose(out[above], (top - x)[above]) and torch.equal(out[~above], x[~above])


def test_probability_zero_intensity_ops_leave_the_image_unchanged() -> None:
    x = _images()
    out = augment(x, AugmentConfig(**IDENTITY_GEOMETRY, **NO_INTENSITY), _gen(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_patch_mask_masks_exactly_the_ratio_in_whole_patches() -> None:
    mask = patch_mask(5, 64, 8, 0.75, _gen(0), torch.device("cpu"))
    assert mask.shape == (5, 1, 64, 64)
    assert torch.all(mask.mean(dim=(1, 2, 3)) == 0.75)
    patches = mask.reshape(5, 8, 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(5, 64, 64)
    assert torch.all(patches.amin(-1) == patches.amax(-1))  # each patch all 0 or all 1
    assert not torch.equal(mask[0], mask[1])
    assert torch.equal(mask, patch_mask(5, 64, 8, 0.75, _gen(0), torch.device("cpu")))
    assert masked_count(64, 0.75) == 48 and masked_count(5, 0.5) == 2  # Python (banker's) rounding


def test_config_rejects_reversed_ranges_and_bad_probabilities() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gamma_range"):
        AugmentConfig(gamma_range=(1.5, 0.7))
    with pytest.raises(ValidationError):
        AugmentConfig(noise_p=1.5)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        augment(torch.zeros(2, 32, 32), AugmentConfig(), _gen(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_runs_on_cuda_with_a_cpu_generator() -> None:
    x = _images().cuda()
    a = augment(x, AugmentConfig(noise_p=1.0), _gen(1))
    assert a.device == x.device
    assert torch.equal(a, augment(x, AugmentConfig(noise_p=1.0), _gen(1)))
    m = patch_mask(2, 32, 8, 0.75, _gen(0), x.device)
    assert m.device == x.device


def test_blur_truncates_each_kernel_at_its_own_radius_like_scipy() -> None:
    from scipy.ndimage import gaussian_filter

    x = _images(3, 24)
    sigmas = [0.6, 1.4, 1.0]
    ours = gaussian_blur(x, torch.tensor(sigmas))  # one batch: the widest kernel must not widen the others
    for i, sigma in enumerate(sigmas):
        ref = gaussian_filter(x[i, 0].double().numpy(), sigma=sigma, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(ours[i, 0].numpy(), ref, atol=1e-5)


ALL_OPS = AugmentConfig(noise_p=0.7, smooth_p=0.7, solarize_p=0.5, solarize_threshold=0.5)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_rows_augment_the_global_batch_as_one_process_does(world_size: int) -> None:
    """Every rank augments its rows of the global batch exactly as one process augments the whole batch."""
    x = _images(8, 32)
    label = torch.randint(0, 4, (8, 32, 32), generator=_gen(5))
    whole = augment(x, ALL_OPS, _gen(3))
    whole_pair = augment_pair(x, label, ALL_OPS, _gen(4))
    whole_mask = patch_mask(8, 32, 4, 0.6, _gen(6), x.device)
    n = 8 // world_size
    close = dict(rtol=1e-5, atol=1e-5)  # float32 rounding: batched convolutions sum in another order
    for rank in range(world_size):
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.allclose(augment(x[rows], ALL_OPS, RankRows(_gen(3), rank, world_size)), whole[rows], **close)
        image, lab = augment_pair(x[rows], label[rows], ALL_OPS, RankRows(_gen(4), rank, world_size))
        assert torch.allclose(image, whole_pair[0][rows], **close) and torch.equal(lab, whole_pair[1][rows])
        assert torch.equal(patch_mask(n, 32, 4, 0.6, RankRows(_gen(6), rank, world_size), x.device), whole_mask[rows])


def test_rank_rows_of_one_rank_draw_what_the_generator_draws() -> None:
    x = _images(4, 32)
    assert torch.equal(augment(x, ALL_OPS, RankRows(_gen(2))), augment(x, ALL_OPS, _gen(2)))
    with pytest.raises(ValueError, match="rank 2 is not in"):
        RankRows(_gen(0), 2, 2)
