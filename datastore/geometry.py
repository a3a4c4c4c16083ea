"""Volume geometry: canonical orientation and in-plane resampling (forward and inverse).

Axis conventions (see ``datastore/conventions.py``):

* NIfTI arrays as nibabel returns them are indexed ``(i, j, k[, t])`` = ``(X, Y, Z[, T])``; for
  short-axis cines ``k`` is the slice axis.
* Canonical arrays are ``(Z, Y, X)`` (or ``(T, Z, Y, X)``): the numpy transpose of the NIfTI
  voxel order, with ``Z`` flipped when needed so that ``Z = 0`` is the **base**. Which end is the
  base is decided from the world geometry (:func:`decide_base`): the slice whose centre lies
  furthest up the base-to-apex direction, cross-checked with the LV cavity where labels exist.
* In-plane resampling works on the last two axes ``(Y, X)``. Spacings are in millimetres, pixel
  coordinates are 0-based pixel centres (``y = 0`` is the centre of the first row).

The in-plane resampling is the scale-only transform of method-spec section 6: an output grid of
``size x size`` pixels at ``target_spacing`` mm whose centre pixel sits on a chosen point of the
native grid (the image centre by default; the heart centre at ingest). The inverse maps per-class
scores from that grid back to the native grid (bicubic, border padding), so that evaluation can
compute 3D Dice at native resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Mode = Literal["bicubic", "bilinear", "nearest"]
Padding = Literal["zeros", "border", "reflection"]


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm as ``(z, y, x)`` = norms of the affine's ``k, j, i`` columns."""
    affine = np.asarray(affine, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    return float(norms[2]), float(norms[1]), float(norms[0])


#: Base-to-apex direction of the LV long axis in RAS+ world coordinates (unit vector): the apex
#: lies left (-x), anterior (+y) and inferior (-z) of the base. Short-axis stacks are planned
#: perpendicular to this axis, so their slice axis is nearly parallel (or anti-parallel) to it.
BASE_TO_APEX_RAS = np.array([-0.6, 0.5, -0.62]) / np.linalg.norm([-0.6, 0.5, -0.62])
#: Below this |cosine| between the slice axis and ``BASE_TO_APEX_RAS`` the geometry does not decide.
GEOMETRY_MARGIN_MIN = 0.2
#: Below this |Spearman correlation| of LV cavity area against slice index the labels do not decide.
LABEL_MARGIN_MIN = 0.5


@dataclass(frozen=True)
class BaseDecision:
    """Which end of a short-axis stack is the base, and how sure the decision is.

    Attributes:
        flip_z: True when the base is the last NIfTI slice (``k = Z - 1``): reverse to put it first.
        source: ``"geometry"``, ``"labels"`` (labels overruled or replaced an ambiguous geometry),
            or ``"file order"`` (both ambiguous: ``k = 0`` is taken as the base).
        geometry_margin: cosine between the slice axis ``+k`` and ``BASE_TO_APEX_RAS`` in [-1, 1];
            > 0 means ``k`` runs base to apex. Ambiguous when ``|margin| < GEOMETRY_MARGIN_MIN``.
        label_margin: Spearman correlation of LV cavity area with ``k`` (< 0: the cavity shrinks
            with ``k``, so ``k`` runs base to apex), or None without labels.
        warning: a one-line message when the labels overruled the geometry or nothing decided.
    """

    flip_z: bool
    source: str
    geometry_margin: float
    label_margin: float | None = None
    warning: str | None = None

    def as_info(self) -> dict[str, object]:
        """Subject-table fields (JSON-able)."""
        return {
            "base_decision": self.source,
            "base_margin": round(float(self.geometry_margin), 4),
            "base_label_margin": None if self.label_margin is None else round(float(self.label_margin), 4),
        }


def geometry_margin(affine: np.ndarray) -> float:
    """Cosine between the slice axis ``+k`` of ``affine`` and the base-to-apex direction.

    Projecting each slice centre ``affine @ (i_c, j_c, k, 1)`` onto ``BASE_TO_APEX_RAS`` gives
    ``p(k) = p(0) + k * (affine[:3, 2] . d)``: linear in ``k``, so the sign of this cosine says which
    end projects smallest (the base), and its size how far the stack is from a long-axis view.
    """
    column = np.asarray(affine, dtype=np.float64)[:3, 2]
    return float(column @ BASE_TO_APEX_RAS / np.linalg.norm(column))


def label_margin(lv_areas: np.ndarray) -> float | None:
    """Spearman correlation of the per-slice LV cavity area (native order ``k``) with ``k``.

    Only slices holding LV count; None with fewer than 3 such slices (nothing to correlate).
    """
    areas = np.asarray(lv_areas, dtype=np.float64)
    k = np.flatnonzero(areas > 0)
    if len(k) < 3:
        return None
    ranks_a = np.argsort(np.argsort(areas[k], kind="stable"), kind="stable").astype(np.float64)
    ranks_k = np.arange(len(k), dtype=np.float64)
    if np.all(ranks_a == ranks_a[0]):
        return 0.0
    return float(np.corrcoef(ranks_k, ranks_a)[0, 1])


def decide_base(affine: np.ndarray, lv_areas: np.ndarray | None = None, subject: str = "scan") -> BaseDecision:
    """Decide which end of a short-axis stack is the base (see ``docs/store.md``, "Base and apex").

    Args:
        affine: 4x4 voxel ``(i, j, k)`` -> RAS+ mm.
        lv_areas: optional LV cavity voxel count per native slice ``k`` (``(Z,)``, e.g. the ED label
            summed over ``i, j``); the cavity shrinks towards the apex.
        subject: name used in warnings.

    Rule: the geometry decides (base = the slice centre with the smallest projection onto
    ``BASE_TO_APEX_RAS``); where labels decide too and disagree, warn and follow the labels; when
    the geometry is ambiguous the labels decide; when both are ambiguous, warn and keep the file
    order (``k = 0`` is the base).
    """
    g = geometry_margin(affine)
    lab = label_margin(lv_areas) if lv_areas is not None else None
    geometry_decides = abs(g) >= GEOMETRY_MARGIN_MIN
    labels_decide = lab is not None and abs(lab) >= LABEL_MARGIN_MIN
    geometry_flip = g < 0
    labels_flip = bool(lab is not None and lab > 0)
    if geometry_decides and (not labels_decide or labels_flip == geometry_flip):
        return BaseDecision(geometry_flip, "geometry", g, lab)
    if labels_decide:
        warning = None
        if geometry_decides:
            warning = (
                f"{subject}: the LV cavity grows towards the slice the geometry calls the apex "
                f"(geometry margin {g:+.2f}, label margin {lab:+.2f}); following the labels"
            )
        return BaseDecision(labels_flip, "labels", g, lab, warning)
    return BaseDecision(
        False,
        "file order",
        g,
        lab,
        f"{subject}: base/apex ambiguous (slice axis at cosine {g:+.2f} to the long axis, no usable labels); "
        "keeping the file order (first slice = base)",
    )


@dataclass(frozen=True)
class NativeGeometry:
    """Where a canonical ``(Z, Y, X)`` volume came from, and how to go back.

    Attributes:
        shape_zyx: canonical volume shape ``(Z, Y, X)`` in voxels.
        spacing_zyx: voxel spacing in mm, ``(slice thickness or gap, row, column)``.
        affine: the native NIfTI affine (4x4, voxel ``(i, j, k)`` -> RAS+ mm) of the source file.
        flip_z: True when the native slice order was reversed to put the base at ``Z = 0``.
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    affine: np.ndarray
    flip_z: bool

    @classmethod
    def from_affine(
        cls, affine: np.ndarray, native_shape_xyz: tuple[int, ...], flip_z: bool | None = None
    ) -> NativeGeometry:
        """Geometry of a NIfTI volume with voxel shape ``(X, Y, Z[, T])`` and ``affine``.

        ``flip_z`` defaults to the geometry-only :func:`decide_base` (ingest passes the decision
        that also used the labels).
        """
        x, y, z = (int(n) for n in native_shape_xyz[:3])
        return cls(
            shape_zyx=(z, y, x),
            spacing_zyx=spacing_from_affine(affine),
            affine=np.asarray(affine, dtype=np.float64),
            flip_z=decide_base(affine).flip_z if flip_z is None else bool(flip_z),
        )

    def to_canonical(self, data: np.ndarray) -> np.ndarray:
        """NIfTI-ordered ``(X, Y, Z)`` or ``(X, Y, Z, T)`` array -> ``(Z, Y, X)`` / ``(T, Z, Y, X)``."""
        return to_canonical(data, self.flip_z)

    def to_native(self, volume: np.ndarray) -> np.ndarray:
        """Canonical ``(Z, Y, X)`` or ``(C, Z, Y, X)`` -> NIfTI order ``(X, Y, Z)`` / ``(X, Y, Z, C)``.

        The result can be saved with ``self.affine`` and overlays the source file voxel by voxel.
        """
        return from_canonical(volume, self.flip_z)

    @property
    def canonical_affine(self) -> np.ndarray:
        """Affine of the canonical volume seen as a NIfTI ``(x, y, z)`` array (z flip folded in)."""
        return canonical_affine(self.affine, self.flip_z, self.shape_zyx[0])

    def resample_to_model(
        self,
        volume: np.ndarray | torch.Tensor,
        target_spacing: float,
        size: int,
        mode: Mode = "bicubic",
    ) -> np.ndarray | torch.Tensor:
        """Canonical ``(..., Y, X)`` native slices -> ``(..., size, size)`` at ``target_spacing`` mm,
        centred on the image centre with zero padding (the evaluation input of method-spec 6)."""
        return resample_inplane(
            volume, self.spacing_zyx[1:], target_spacing, size, center_yx=None, mode=mode
        )

    def scores_to_native(
        self,
        scores: np.ndarray | torch.Tensor,
        target_spacing: float,
        center_yx: tuple[float, float] | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Per-class scores ``(C, Z, S, S)`` on the model grid -> ``(C, Z, Y, X)`` on the native grid.

        Bicubic on scores with border padding (method-spec 6); take ``argmax(0)`` afterwards.
        ``center_yx`` must be the centre the forward resampling used (default: image centre).
        """
        return inverse_resample_inplane(
            scores,
            native_shape_yx=self.shape_zyx[1:],
            spacing_yx=self.spacing_zyx[1:],
            target_spacing=target_spacing,
            center_yx=center_yx,
            mode="bicubic",
            padding_mode="border",
        )


def to_canonical(data: np.ndarray, flip_z: bool) -> np.ndarray:
    """``(X, Y, Z)`` -> ``(Z, Y, X)`` or ``(X, Y, Z, T)`` -> ``(T, Z, Y, X)``, base at ``Z = 0``.

    Returns a C-contiguous copy.
    """
    if data.ndim not in (3, 4):
        raise ValueError(f"expected a 3D or 4D NIfTI-ordered array, got shape {data.shape}")
    out = np.transpose(data, tuple(range(data.ndim))[::-1])
    if flip_z:
        out = out[..., ::-1, :, :]
    return np.ascontiguousarray(out)


def from_canonical(volume: np.ndarray, flip_z: bool) -> np.ndarray:
    """Inverse of :func:`to_canonical`: ``(Z, Y, X)`` -> ``(X, Y, Z)``, ``(C, Z, Y, X)`` -> ``(X, Y, Z, C)``."""
    if volume.ndim not in (3, 4):
        raise ValueError(f"expected a canonical (Z, Y, X) or (C, Z, Y, X) array, got {volume.shape}")
    if flip_z:
        volume = volume[..., ::-1, :, :]
    return np.ascontiguousarray(np.transpose(volume, tuple(range(volume.ndim))[::-1]))


def canonical_affine(affine: np.ndarray, flip_z: bool, n_slices: int) -> np.ndarray:
    """Affine mapping canonical voxel ``(x, y, z)`` (z from the base) to RAS+ mm."""
    affine = np.asarray(affine, dtype=np.float64)
    if not flip_z:
        return affine.copy()
    flip = np.eye(4)
    flip[2, 2] = -1.0
    flip[2, 3] = n_slices - 1
    return affine @ flip


def _normalised_coords(
    n_out: int, out_spacing: float, in_spacing: float, center: float, n_in: int
) -> torch.Tensor:
    """Normalised input coordinates (``align_corners=False``) of the ``n_out`` output pixel centres.

    Output pixel ``u`` lies ``(u - (n_out - 1) / 2) * out_spacing`` mm from the grid centre, which
    sits on input pixel coordinate ``center``; that is input pixel ``center + offset / in_spacing``.
    """
    u = torch.arange(n_out, dtype=torch.float64) - (n_out - 1) / 2.0
    position = center + u * out_spacing / in_spacing
    return ((2.0 * position + 1.0) / n_in - 1.0).to(torch.float32)


def _sample(
    volume: np.ndarray | torch.Tensor,
    grid_y: torch.Tensor,
    grid_x: torch.Tensor,
    mode: Mode,
    padding_mode: Padding,
) -> np.ndarray | torch.Tensor:
    """Sample the last two axes of ``volume`` (``(..., H, W)``) at the separable grid."""
    is_numpy = isinstance(volume, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(volume)) if is_numpy else volume
    in_dtype = tensor.dtype
    lead = tensor.shape[:-2]
    height, width = tensor.shape[-2:]
    flat = tensor.reshape(1, -1, height, width)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.to(torch.float32)
    grid = torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), dim=-1)
    grid = grid.to(work.dtype)[None]
    out = F.grid_sample(work, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    out = out.reshape(*lead, grid_y.shape[0], grid_x.shape[0])
    if out.dtype != in_dtype:
        out = out.round().to(in_dtype) if not in_dtype.is_floating_point else out.to(in_dtype)
    return out.numpy() if is_numpy else out


def resample_inplane(
    volume: np.ndarray | torch.Tensor,
    spacing_yx: tuple[float, float],
    target_spacing: float,
    size: int,
    center_yx: tuple[float, float] | None = None,
    mode: Mode = "bicubic",
    padding_mode: Padding = "zeros",
) -> np.ndarray | torch.Tensor:
    """Resample ``(..., H, W)`` slices to ``(..., size, size)`` at ``target_spacing`` mm per pixel.

    Args:
        volume: native slices, e.g. ``(Z, Y, X)`` or ``(T, Z, Y, X)``; numpy or torch. Integer
            inputs (label maps) are sampled as float and rounded back; use ``mode="nearest"``.
        spacing_yx: native in-plane spacing in mm ``(row, column)``.
        target_spacing: output spacing in mm (both axes).
        size: output height and width in pixels.
        center_yx: native pixel coordinate ``(y, x)`` placed at the output grid centre
            (default: the native image centre ``((H-1)/2, (W-1)/2)``).
        mode: ``grid_sample`` interpolation.
        padding_mode: value outside the native grid (``zeros`` for images at ingest).

    Returns:
        ``(..., size, size)`` of the input's type and dtype.
    """
    height, width = volume.shape[-2:]
    cy, cx = center_yx if center_yx is not None else ((height - 1) / 2.0, (width - 1) / 2.0)
    grid_y = _normalised_coords(size, target_spacing, spacing_yx[0], cy, height)
    grid_x = _normalised_coords(size, target_spacing, spacing_yx[1], cx, width)
    return _sample(volume, grid_y, grid_x, mode, padding_mode)


def inverse_resample_inplane(
    scores: np.ndarray | torch.Tensor,
    native_shape_yx: tuple[int, int],
    spacing_yx: tuple[float, float],
    target_spacing: float,
    center_yx: tuple[float, float] | None = None,
    mode: Mode = "bicubic",
    padding_mode: Padding = "border",
) -> np.ndarray | torch.Tensor:
    """Map ``(..., S, S)`` values on a :func:`resample_inplane` grid back to ``(..., H, W)`` native.

    Args:
        scores: e.g. per-class logits ``(C, Z, S, S)`` (float; numpy or torch).
        native_shape_yx: ``(H, W)`` of the native grid.
        spacing_yx: native in-plane spacing in mm.
        target_spacing: spacing of the model grid in mm.
        center_yx: the native pixel the forward resampling centred on (default: image centre).
        mode: interpolation (bicubic on scores in method-spec 6; ``nearest`` for label maps).
        padding_mode: ``border`` extends the edge scores to native pixels outside the model grid.

    Returns:
        ``(..., H, W)`` of the input's type.
    """
    height, width = (int(n) for n in native_shape_yx)
    size_y, size_x = scores.shape[-2:]
    cy, cx = center_yx if center_yx is not None else ((height - 1) / 2.0, (width - 1) / 2.0)
    # Native pixel y sits at model pixel (y - cy) * spacing_y / target + (S - 1) / 2.
    ys = (torch.arange(height, dtype=torch.float64) - cy) * spacing_yx[0] / target_spacing
    xs = (torch.arange(width, dtype=torch.float64) - cx) * spacing_yx[1] / target_spacing
    grid_y = ((2.0 * (ys + (size_y - 1) / 2.0) + 1.0) / size_y - 1.0).to(torch.float32)
    grid_x = ((2.0 * (xs + (size_x - 1) / 2.0) + 1.0) / size_x - 1.0).to(torch.float32)
    return _sample(scores, grid_y, grid_x, mode, padding_mode)
