"""Geometry: canonical orientation (base at Z = 0), in-plane resampling and its inverse."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from datastore.geometry import (
    NativeGeometry,
    decide_base,
    canonical_affine,
    from_canonical,
    inverse_resample_inplane,
    resample_inplane,
    spacing_from_affine,
    to_canonical,
)
from datastore.preprocess import heart_centre, smallest_enclosing_circle


def _oblique_affine(slice_superior: bool, spacing=(1.4, 1.6, 8.0)) -> np.ndarray:
    """An oblique short-axis affine whose slice axis points superior (or inferior)."""
    angle = np.deg2rad(30)
    rot_x = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    axes = rot_x @ np.diag(spacing)
    if not slice_superior:
        axes[:, 2] *= -1
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = (-50.0, 20.0, 30.0)
    return affine


@pytest.mark.parametrize("slice_superior", [True, False])
def test_canonical_puts_the_most_superior_slice_first(slice_superior: bool) -> None:
    affine = _oblique_affine(slice_superior)
    n_slices = 7
    data = np.zeros((5, 6, n_slices, 3), np.float32)
    data += np.arange(n_slices, dtype=np.float32)[None, None, :, None]  # value = native k
    geometry = NativeGeometry.from_affine(affine, data.shape)
    canonical = geometry.to_canonical(data)
    assert canonical.shape == (3, n_slices, 6, 5)
    # World superior (S) coordinate of the centre voxel of each native slice k.
    world_s = [(affine @ np.array([2, 2.5, k, 1.0]))[2] for k in range(n_slices)]
    base_k = int(np.argmax(world_s))
    assert canonical[0, 0, 0, 0] == base_k
    assert geometry.flip_z == slice_superior == decide_base(affine).flip_z
    # The canonical affine agrees: canonical z = 0 is the most superior slice.
    can = geometry.canonical_affine
    s_of_z = [(can @ np.array([2, 2.5, z, 1.0]))[2] for z in range(n_slices)]
    assert np.all(np.diff(s_of_z) < 0)


@pytest.mark.parametrize("flip_z", [True, False])
def test_to_and_from_canonical_round_trip(flip_z: bool) -> None:
    rng = np.random.default_rng(0)
    for shape in ((4, 5, 6), (4, 5, 6, 3)):
        data = rng.random(shape)
        canonical = to_canonical(data, flip_z)
        assert canonical.shape == shape[::-1]
        assert np.array_equal(from_canonical(canonical, flip_z), data)
    # Canonical volume voxel (z, y, x) is native voxel (x, y, k) with k flipped when asked.
    data = rng.random((4, 5, 6))
    canonical = to_canonical(data, flip_z)
    k = 5 - 1 if flip_z else 1
    assert canonical[1, 2, 3] == data[3, 2, k]


def test_spacing_and_canonical_affine_closed_form() -> None:
    affine = _oblique_affine(True, spacing=(1.4, 1.6, 8.0))
    assert np.allclose(spacing_from_affine(affine), (8.0, 1.6, 1.4))
    flipped = canonical_affine(affine, True, 10)
    assert np.allclose(flipped @ [0, 0, 0, 1], affine @ [0, 0, 9, 1])
    assert np.allclose(flipped @ [0, 0, 9, 1], affine @ [0, 0, 0, 1])


def test_resample_identity_at_equal_spacing() -> None:
    rng = np.random.default_rng(1)
    volume = rng.random((3, 20, 24)).astype(np.float32)
    out = resample_inplane(volume, (1.25, 1.25), 1.25, 24, center_yx=(9.5, 11.5))
    # A 24-pixel grid centred on (9.5, 11.5): rows 9.5 - 11.5 .. 9.5 + 11.5 = -2 .. 21.
    assert out.shape == (3, 24, 24)
    np.testing.assert_allclose(out[:, 2:22, :], volume, atol=1e-5)
    assert np.allclose(out[:, :2], 0, atol=1e-5) and np.allclose(out[:, 22:], 0, atol=1e-5)  # zero padding


def test_resample_matches_scipy_map_coordinates() -> None:
    """Independent check of the coordinate convention with scipy (bilinear = order 1)."""
    rng = np.random.default_rng(2)
    image = ndimage.gaussian_filter(rng.random((40, 50)), 2).astype(np.float32)
    spacing, target, size, centre = (1.7, 1.3), 1.25, 32, (21.3, 22.8)
    ours = resample_inplane(image, spacing, target, size, centre, mode="bilinear")
    u = np.arange(size) - (size - 1) / 2
    rows = centre[0] + u * target / spacing[0]
    cols = centre[1] + u * target / spacing[1]
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    reference = ndimage.map_coordinates(image, [yy, xx], order=1, mode="constant", cval=0.0)
    inside = (yy >= 0) & (yy <= 39) & (xx >= 0) & (xx <= 49)
    np.testing.assert_allclose(ours[inside], reference[inside], atol=1e-5)


def test_point_lands_where_the_closed_form_says() -> None:
    label = np.zeros((1, 30, 30), np.uint8)
    label[0, 7, 19] = 1
    spacing, target, size, centre = (2.5, 2.5), 1.25, 64, (14.5, 14.5)
    out = resample_inplane(label, spacing, target, size, centre, mode="nearest")
    assert out.dtype == np.uint8
    ys, xs = np.nonzero(out[0])
    # Native pixel y maps to output pixel (y - c) * 2.5 / 1.25 + (S - 1) / 2; it covers 2x2 pixels.
    assert ys.mean() == pytest.approx((7 - 14.5) * 2 + 31.5)
    assert xs.mean() == pytest.approx((19 - 14.5) * 2 + 31.5)


def test_nearest_resample_then_inverse_is_identity_for_labels() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (4, 26, 31)).astype(np.uint8)
    centre = (12.0, 15.0)
    forward = resample_inplane(labels, (2.5, 2.5), 1.25, 80, centre, mode="nearest")
    back = inverse_resample_inplane(forward, (26, 31), (2.5, 2.5), 1.25, centre, mode="nearest")
    assert back.shape == labels.shape
    assert np.array_equal(back, labels)


def test_scores_inverse_recovers_label_maps_at_arbitrary_spacing() -> None:
    """Bicubic one-hot scores on the model grid, mapped back and argmaxed, give the labels again."""
    yy, xx = np.mgrid[0:48, 0:56]
    labels = np.zeros((2, 48, 56), np.uint8)
    labels[:, (yy - 24) ** 2 + (xx - 30) ** 2 < 14**2] = 2
    labels[:, (yy - 24) ** 2 + (xx - 30) ** 2 < 9**2] = 1
    labels[:, (yy - 20) ** 2 / 4 + (xx - 12) ** 2 < 8**2] = 3
    labels[1] = np.roll(labels[1], 3, axis=1)
    geometry = NativeGeometry(shape_zyx=(2, 48, 56), spacing_zyx=(10.0, 1.6, 1.45), affine=np.eye(4), flip_z=False)
    model_input = geometry.resample_to_model(labels, 1.25, 96, mode="nearest")
    scores = torch.nn.functional.one_hot(torch.from_numpy(model_input).long(), 4).permute(3, 0, 1, 2).float()
    native_scores = geometry.scores_to_native(scores, 1.25)
    assert tuple(native_scores.shape) == (4, 2, 48, 56)
    recovered = native_scores.argmax(0).numpy()
    assert (recovered == labels).mean() > 0.97


def test_border_padding_extends_edge_scores() -> None:
    scores = np.zeros((2, 1, 8, 8), np.float32)
    scores[1] = 1.0
    back = inverse_resample_inplane(scores, (40, 40), (1.0, 1.0), 1.25)
    # The native grid (40 mm) is larger than the model grid (10 mm): border padding, not zeros.
    assert np.allclose(back[1], 1.0) and np.allclose(back[0], 0.0)


def test_smallest_enclosing_circle_closed_forms() -> None:
    cy, cx, r = smallest_enclosing_circle(np.array([[0, 0], [0, 4], [3, 0]]))  # right triangle
    assert (cy, cx, r) == pytest.approx((1.5, 2.0, 2.5))
    cy, cx, r = smallest_enclosing_circle(np.array([[0, 0], [10, 0], [5, 1]]))  # obtuse: diameter
    assert (cy, cx, r) == pytest.approx((5.0, 0.0, 5.0))
    assert smallest_enclosing_circle(np.array([[2, 3]])) == pytest.approx((2, 3, 0))


def test_smallest_enclosing_circle_against_brute_force() -> None:
    rng = np.random.default_rng(4)
    points = rng.normal(size=(25, 2)) * [3, 7]
    cy, cx, r = smallest_enclosing_circle(points)
    assert np.all(np.hypot(points[:, 0] - cy, points[:, 1] - cx) <= r + 1e-9)
    best = np.inf
    for a, b in itertools.combinations(points, 2):
        c = (a + b) / 2
        rad = np.linalg.norm(a - c)
        if np.all(np.linalg.norm(points - c, axis=1) <= rad + 1e-9):
            best = min(best, rad)
    for a, b, c in itertools.combinations(points, 3):
        matrix = 2 * np.array([b - a, c - a])
        if abs(np.linalg.det(matrix)) < 1e-12:
            continue
        centre = np.linalg.solve(matrix, [b @ b - a @ a, c @ c - a @ a])
        rad = np.linalg.norm(a - centre)
        if np.all(np.linalg.norm(points - centre, axis=1) <= rad + 1e-9):
            best = min(best, rad)
    assert r == pytest.approx(best)


def test_heart_centre_of_a_disc() -> None:
    yy, xx = np.mgrid[0:60, 0:70]
    label = np.zeros((3, 60, 70), np.uint8)
    label[1][(yy - 20) ** 2 + (xx - 45) ** 2 <= 36] = 1
    assert heart_centre([label, np.zeros_like(label)]) == pytest.approx((20, 45), abs=1e-6)
    assert heart_centre([np.zeros_like(label)]) is None
