"""Turn one validated raw subject into the slices, labels and native volumes the store holds.

Per subject (method-spec 1.2, 1.4, 1.5 and 8.4-8.5):

1. canonical orientation ``(T, Z, Y, X)`` with the base at ``Z = 0``, decided from the world
   geometry and cross-checked with the LV cavity (``datastore.geometry.decide_base``);
2. intensity: subtract the 4D cine's minimum, then z-score with the mean and standard deviation
   of the whole 4D cine (all slices, all frames);
3. heart centre: centre of the smallest enclosing circle of every labelled pixel (ED and ES, all
   slices) in canonical ``(y, x)`` pixel coordinates; the image centre when disabled;
4. every slice of every frame is resampled in-plane (bicubic, zero padding) to ``spacing`` mm on a
   ``size x size`` grid centred on that point, then z-scored, so that padding equals the subject's
   z-scored minimum; ED/ES labels are resampled with nearest neighbour on the same grid;
5. the native-resolution canonical ED and ES volumes are kept, z-scored the same way.
"""

from __future__ import annotations

import math

import numpy as np

from datastore.config import IngestConfig
from datastore.conventions import LV, PHASE_ED, PHASE_ES, PHASE_OTHER
from datastore.formats import READER_KEYS, FormatError, RawSubject
from datastore.geometry import NativeGeometry, decide_base, resample_inplane
from datastore.store import SubjectRecord

Circle = tuple[float, float, float]  # (centre y, centre x, radius) in pixels


def _circle_two(a: np.ndarray, b: np.ndarray) -> Circle:
    centre = (a + b) / 2.0
    return float(centre[0]), float(centre[1]), float(np.linalg.norm(a - centre))


def _circle_three(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> Circle | None:
    """Circumcircle of three points, None when they are collinear."""
    (ay, ax), (by, bx), (cy, cx) = a, b, c
    d = 2.0 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by))
    if abs(d) < 1e-12:
        return None
    a2, b2, c2 = ax * ax + ay * ay, bx * bx + by * by, cx * cx + cy * cy
    ux = (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / d
    uy = (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / d
    return float(uy), float(ux), float(math.hypot(ax - ux, ay - uy))


def _inside(circle: Circle, point: np.ndarray, eps: float = 1e-7) -> bool:
    return math.hypot(point[0] - circle[0], point[1] - circle[1]) <= circle[2] * (1 + eps) + eps


def smallest_enclosing_circle(points: np.ndarray, seed: int = 0) -> Circle:
    """Smallest circle containing all ``points`` (``(n, 2)``, any 2D coordinates; n >= 1).

    Welzl's randomised incremental algorithm (expected linear time) on the convex hull.
    Returns ``(centre_0, centre_1, radius)`` in the points' coordinates.
    """
    pts = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)
    if len(pts) >= 3:
        try:
            from scipy.spatial import ConvexHull

            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # noqa: BLE001 - collinear or degenerate: keep all points
            pass
    pts = pts[np.random.default_rng(seed).permutation(len(pts))]
    circle: Circle = (float(pts[0, 0]), float(pts[0, 1]), 0.0)
    for i in range(1, len(pts)):
        if _inside(circle, pts[i]):
            continue
        circle = (float(pts[i, 0]), float(pts[i, 1]), 0.0)
        for j in range(i):
            if _inside(circle, pts[j]):
                continue
            circle = _circle_two(pts[i], pts[j])
            for k in range(j):
                if _inside(circle, pts[k]):
                    continue
                three = _circle_three(pts[i], pts[j], pts[k])
                if three is not None:
                    circle = three
    return circle


def heart_centre(labels: list[np.ndarray]) -> tuple[float, float] | None:
    """Enclosing-circle centre ``(y, x)`` in pixels of all labelled pixels of canonical
    ``(Z, Y, X)`` label volumes, or None when nothing is labelled."""
    union = np.zeros(labels[0].shape[-2:], dtype=bool)
    for label in labels:
        union |= (label > 0).any(axis=0)
    if not union.any():
        return None
    cy, cx, _ = smallest_enclosing_circle(np.argwhere(union))
    return cy, cx


def lv_areas(raw: RawSubject) -> np.ndarray | None:
    """LV voxel count per native slice ``k`` of the ED label (``(Z,)``), or None when unlabelled."""
    if raw.ed is None or raw.ed not in raw.labels:
        return None
    return np.count_nonzero(raw.labels[raw.ed] == LV, axis=(0, 1))


def preprocess(raw: RawSubject, config: IngestConfig) -> SubjectRecord:
    """Canonicalise, z-score, centre, resample and crop one subject (see the module docstring).

    An unlabelled subject (``raw.labels == {}``) keeps every frame and no label or native volume;
    its slices are centred on the image centre.

    Raises:
        FormatError: the cine has no intensity variation (z-score undefined).
    """
    source = raw.source
    decision = decide_base(raw.affine, lv_areas(raw), subject=f"{source.dataset}/{source.subject_id}")
    geometry = NativeGeometry.from_affine(raw.affine, raw.cine.shape, flip_z=decision.flip_z)
    cine = geometry.to_canonical(raw.cine)  # (T, Z, Y, X) float32
    n_frames, n_slices = cine.shape[:2]
    labels = {t: geometry.to_canonical(v) for t, v in raw.labels.items()}  # (Z, Y, X) uint8
    labelled = bool(labels)

    vmin = float(cine.min())
    shifted = cine - np.float32(vmin)
    mean = float(shifted.mean(dtype=np.float64))
    std = float(shifted.std(dtype=np.float64))
    if not std > 0:
        raise FormatError(f"{source.main_file}: constant intensities, cannot z-score")

    centre = heart_centre(list(labels.values())) if config.center_on_heart and labelled else None
    if centre is None:
        centre = ((cine.shape[-2] - 1) / 2.0, (cine.shape[-1] - 1) / 2.0)
    spacing_yx = geometry.spacing_zyx[1:]

    resampled = resample_inplane(
        shifted, spacing_yx, config.spacing, config.size, centre, mode=config.image_interpolation
    )
    images = ((resampled - np.float32(mean)) / np.float32(std)).reshape(-1, config.size, config.size)
    frame, slice_index = np.divmod(np.arange(n_frames * n_slices), n_slices)
    phase = np.full(frame.shape, PHASE_OTHER, np.int8)
    if raw.ed is not None:
        phase[frame == raw.ed] = PHASE_ED
    if raw.es is not None:
        phase[frame == raw.es] = PHASE_ES

    native: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if labelled:
        assert raw.ed is not None and raw.es is not None
        phase_frames = (("ED", raw.ed), ("ES", raw.es))
        label_stack = np.stack([labels[t] for _, t in phase_frames])  # (2, Z, Y, X)
        label_slices = resample_inplane(
            label_stack, spacing_yx, config.spacing, config.size, centre, mode="nearest"
        ).reshape(-1, config.size, config.size)
        label_rows = np.concatenate([t * n_slices + np.arange(n_slices) for _, t in phase_frames])
        native = {
            name: (((shifted[t] - np.float32(mean)) / np.float32(std)).astype(np.float32), labels[t])
            for name, t in phase_frames
        }
    else:
        label_slices = np.zeros((0, config.size, config.size), np.uint8)
        label_rows = np.zeros(0, np.int64)
    info = {
        **{k: v for k, v in source.info.items() if k not in READER_KEYS},
        "labelled": labelled,
        "frames": int(n_frames),
        "slices": int(n_slices),
        "ed": None if raw.ed is None else int(raw.ed),
        "es": None if raw.es is None else int(raw.es),
        "native_shape_zyx": [int(n) for n in geometry.shape_zyx],
        "spacing_zyx": [float(v) for v in geometry.spacing_zyx],
        "affine": geometry.affine.tolist(),
        "flip_z": bool(geometry.flip_z),
        **decision.as_info(),
        "center_yx": [float(centre[0]), float(centre[1])],
        "intensity_min": vmin,
        "intensity_mean": mean,
        "intensity_std": std,
        "sources": dict(sorted(raw.checksums.items())),
        "source_dir": str(source.main_file.parent),
    }
    return SubjectRecord(
        dataset=source.dataset,
        subject_id=source.subject_id,
        images=images.astype(np.float16),
        frame=frame.astype(np.int16),
        slice=slice_index.astype(np.int16),
        slice_count=np.full(frame.shape, n_slices, np.int16),
        phase=phase,
        labels=label_slices.astype(np.uint8),
        label_rows=label_rows.astype(np.int64),
        native=native,
        info=info,
        warnings=[decision.warning] if decision.warning else [],
    )
