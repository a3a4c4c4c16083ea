"""Procedural short-axis cine CMR phantom: geometry and signal model (pure numpy).

One subject is a beating heart (LV blood pool, LV myocardium, RV blood pool, RV free wall,
papillary muscles, trabeculation, atria and aortic root above the base) inside a static chest
(torso, subcutaneous fat, chest-wall muscle, lungs, descending aorta, spine, liver), imaged as a
stack of oblique short-axis slices with coil shading, k-space truncation (Gibbs ringing), Rician
noise and a vendor-specific intensity profile. See ``docs/phantom.md`` for the model and its
conventions.

Coordinates. Anatomy lives in a *heart frame* in millimetres: ``u`` points to the patient's left
(lateral LV wall), ``v`` anterior, ``z`` along the LV long axis from the ED base (``z = 0``) to the
apex (``z = L``). Voxel indices ``(i, j, k)`` (NIfTI axes 0, 1, 2 = x, y, slice) map to the heart
frame by an in-plane rotation/flip and spacing, and the heart frame maps to patient RAS+ world
coordinates by an oblique rotation; ``SubjectParams.affine`` composes the two. In memory all arrays
are ``(T, Z, Y, X)``: frame, slice (in *stored* order), row ``j``, column ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from datastore.conventions import BACKGROUND, LV, MYO, RV

Vendor = Literal["A", "B", "C", "D"]

#: Vendor letter -> (M&Ms ``VendorName``, M&Ms-2 ``VENDOR``).
VENDOR_NAMES: dict[str, str] = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}


@dataclass(frozen=True)
class VendorProfile:
    """Scanner-like appearance of one vendor.

    Attributes:
        spacing_mm: range of the stored in-plane pixel spacing (mm).
        acq_fraction: range of the acquired fraction of k-space per axis (< 1 gives Gibbs ringing).
        snr_blood: range of blood signal / noise standard deviation.
        coil_d0_mm: range of the surface-coil fall-off distance (smaller = stronger shading).
        n_coils: range of the number of surface coils (inclusive).
        myo_contrast: multiplier of myocardium/muscle signal relative to blood.
        gamma: range of the intensity gamma applied before quantisation.
        gain: range of the global gain (stored max intensity is about ``gain``).
        dtype: stored integer type.
        rectangular: probability that the matrix is rectangular (phase-encode rows cut).
    """

    spacing_mm: tuple[float, float]
    acq_fraction: tuple[float, float]
    snr_blood: tuple[float, float]
    coil_d0_mm: tuple[float, float]
    n_coils: tuple[int, int]
    myo_contrast: float
    gamma: tuple[float, float]
    gain: tuple[float, float]
    dtype: str
    rectangular: float


VENDOR_PROFILES: dict[str, VendorProfile] = {
    "A": VendorProfile(
        spacing_mm=(1.2, 1.9), acq_fraction=(0.65, 0.8), snr_blood=(18.0, 35.0), coil_d0_mm=(110.0, 160.0),
        n_coils=(12, 24), myo_contrast=1.0, gamma=(0.95, 1.05), gain=(600.0, 1500.0), dtype="int16", rectangular=0.5,
    ),
    "B": VendorProfile(
        spacing_mm=(1.0, 1.6), acq_fraction=(0.7, 0.9), snr_blood=(15.0, 30.0), coil_d0_mm=(100.0, 140.0),
        n_coils=(16, 32), myo_contrast=0.9, gamma=(0.85, 1.0), gain=(2500.0, 4000.0), dtype="uint16", rectangular=0.2,
    ),
    "C": VendorProfile(
        spacing_mm=(1.3, 1.9), acq_fraction=(0.6, 0.75), snr_blood=(12.0, 22.0), coil_d0_mm=(120.0, 180.0),
        n_coils=(8, 12), myo_contrast=1.15, gamma=(1.0, 1.2), gain=(200.0, 800.0), dtype="int16", rectangular=0.3,
    ),
    "D": VendorProfile(
        spacing_mm=(0.7, 1.4), acq_fraction=(0.75, 0.95), snr_blood=(20.0, 40.0), coil_d0_mm=(100.0, 150.0),
        n_coils=(8, 16), myo_contrast=1.05, gamma=(0.9, 1.1), gain=(1000.0, 3000.0), dtype="uint16", rectangular=0.0,
    ),
}


@dataclass(frozen=True)
class PathologyPreset:
    """Ranges of the cardiac shape parameters of one pathology group (mm, fractions)."""

    long_axis_mm: tuple[float, float] = (80.0, 100.0)
    lv_radius_mm: tuple[float, float] = (22.0, 28.0)
    wall_mm: tuple[float, float] = (7.0, 10.0)
    septal_asymmetry: tuple[float, float] = (0.0, 0.1)
    lvef: tuple[float, float] = (0.55, 0.70)
    base_descent_mm: tuple[float, float] = (10.0, 16.0)
    rv_half_span_deg: tuple[float, float] = (60.0, 85.0)
    rv_b_mm: tuple[float, float] = (18.0, 28.0)
    rvef: tuple[float, float] = (0.45, 0.65)


_NORMAL = PathologyPreset()
_DCM = PathologyPreset(
    long_axis_mm=(88.0, 110.0), lv_radius_mm=(30.0, 36.0), wall_mm=(6.0, 9.0), lvef=(0.20, 0.40), base_descent_mm=(5.0, 8.0)
)
_HCM = PathologyPreset(lv_radius_mm=(16.0, 22.0), wall_mm=(13.0, 20.0), septal_asymmetry=(0.2, 0.5), lvef=(0.65, 0.80))
_ARV = PathologyPreset(rv_b_mm=(26.0, 38.0), rvef=(0.25, 0.40))

#: Pathology code (M&Ms, M&Ms-2 and ACDC spellings) -> shape preset.
PATHOLOGY_PRESETS: dict[str, PathologyPreset] = {
    "NOR": _NORMAL,
    "Other": _NORMAL,
    "AHS": PathologyPreset(lv_radius_mm=(26.0, 31.0), wall_mm=(9.0, 12.0)),
    "DCM": _DCM,
    "LV": _DCM,
    "IHD": PathologyPreset(lv_radius_mm=(26.0, 32.0), lvef=(0.30, 0.50), base_descent_mm=(6.0, 10.0)),
    "HCM": _HCM,
    "HHD": PathologyPreset(wall_mm=(11.0, 14.0), septal_asymmetry=(0.1, 0.2), lvef=(0.55, 0.75)),
    "ARV": _ARV, "ARR": _ARV, "DRV": _ARV, "FALL": _ARV, "TRI": _ARV, "CIA": _ARV,
    "MINF": PathologyPreset(lv_radius_mm=(26.0, 32.0), lvef=(0.30, 0.50), base_descent_mm=(6.0, 10.0)),
    "RV": _ARV,  # ACDC's abnormal right ventricle group
}


@dataclass(frozen=True)
class SubjectParams:
    """Everything sampled for one subject; ``render`` is a pure function of it.

    Lengths in mm, angles in radians, fractions in [0, 1]; arrays are documented where shaped.
    """

    vendor: str
    pathology: str
    trivial: bool
    # grid
    shape_tzyx: tuple[int, int, int, int]
    spacing_xyz: tuple[float, float, float]
    slice_thickness: float
    slice_depth: np.ndarray  # (Z,) heart-frame depth z of each stored slice centre (mm)
    base_to_apex: bool  # True when stored slice 0 is the most basal slice
    inplane: np.ndarray  # (2, 3): [u, v] = inplane @ [i, j, 1] (mm, heart frame)
    affine: np.ndarray  # (4, 4) voxel (i, j, k) -> RAS+ world (mm)
    # timing
    ed_index: int
    es_index: int
    es_fraction: float
    # LV
    long_axis: float
    lv_radius: float
    wall: float
    apex_wall: float
    septal_asymmetry: float
    lvef: float
    base_descent: float
    ellipticity: float
    ellipse_angle: float
    twist: float
    trab_amp: np.ndarray  # (K,) trabeculation amplitudes (mm)
    trab_k: np.ndarray  # (K,) integer harmonics
    trab_phase: np.ndarray  # (K,)
    papillary_angle: tuple[float, float]
    papillary_radius: float
    # RV
    rv_angle: float
    rv_half_span: float
    rv_b: float
    rv_length_fraction: float
    rvef: float
    rv_wall: float
    # surroundings and signal
    torso_centre: tuple[float, float]
    torso_axes: tuple[float, float]
    fat_mm: float
    pericardial_fat: float
    aorta_centre: tuple[float, float]
    aorta_radius: float
    tissue: dict[str, float] = field(default_factory=dict)
    texture_amp: float = 0.0
    flow_amp: float = 0.0  # depth of dark flow swirls in the cavities during early diastole
    coil_positions: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (Nc, 2) mm
    coil_d0: float = 100.0
    acq_fraction: float = 1.0
    snr_blood: float = np.inf
    gamma: float = 1.0
    gain: float = 1000.0
    dtype: str = "int16"


def _u(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _rotation(axis_angles: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) from three small Euler angles (radians, x then y then z)."""
    ax, ay, az = axis_angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def heart_axes(rng: np.random.Generator) -> np.ndarray:
    """Heart-frame axes in RAS+ world: (3, 3) with columns ``e_u`` (left), ``e_v`` (anterior), ``e_z``.

    ``e_z`` is the LV long axis from base to apex, pointing left, anterior and inferior, jittered.
    """
    long_axis = np.array([-0.6, 0.5, -0.62]) + rng.normal(0.0, 0.08, 3)
    e_z = long_axis / np.linalg.norm(long_axis)
    anterior = np.array([0.0, 1.0, 0.0])
    e_v = anterior - anterior.dot(e_z) * e_z
    e_v /= np.linalg.norm(e_v)
    e_u = np.cross(e_v, e_z)
    if e_u[0] > 0:  # make u point to the patient's left (RAS: -x)
        e_u = -e_u
    return np.stack([e_u, e_v, e_z], axis=1)


def sample_subject(
    rng: np.random.Generator,
    vendor: str,
    pathology: str,
    size: int,
    frames: tuple[int, int],
    slices: tuple[int, int],
    trivial: bool = False,
) -> SubjectParams:
    """Draw one subject's anatomy, acquisition and appearance.

    Args:
        rng: the subject's own generator (from ``SeedSequence(seed).spawn``).
        vendor: ``"A"``..``"D"`` (see ``VENDOR_PROFILES``).
        pathology: a key of ``PATHOLOGY_PRESETS``.
        size: stored matrix columns (X); rows (Y) equal it or are cut to 80-95% for some vendors.
        frames: inclusive range of the number of cine frames T.
        slices: inclusive range of the number of short-axis slices Z.
        trivial: clean images (no confounders, noise, shading, texture, Gibbs) for smoke tests.
    """
    profile = VENDOR_PROFILES[vendor]
    preset = PATHOLOGY_PRESETS[pathology]

    n_frames = int(rng.integers(frames[0], frames[1] + 1))
    n_slices = int(rng.integers(slices[0], slices[1] + 1))
    nx = int(size)
    ny = int(size) if rng.random() >= profile.rectangular else int(round(size * rng.uniform(0.8, 0.95)))

    long_axis = _u(rng, preset.long_axis_mm)
    lv_radius = _u(rng, preset.lv_radius_mm)
    wall = _u(rng, preset.wall_mm)

    # Slice stack: 0-2 slices above the ED base down to about the apex.
    n_above = int(rng.integers(0, 3)) if n_slices >= 6 else 0
    below = rng.uniform(-0.5, 1.0)
    if long_axis / max(n_slices - n_above - 1 - below, 1.0) > 14.0:
        n_above = 0  # short stacks spend their slices on the ventricles first
    spacing_z = float(np.clip(long_axis / max(n_slices - n_above - 1 - below, 1.0), 5.0, 14.0))
    thickness = float(min(spacing_z, rng.uniform(5.0, 10.0)))
    first = -n_above * spacing_z + rng.uniform(-0.3, 0.3) * spacing_z
    depth_base_first = first + spacing_z * np.arange(n_slices)
    base_to_apex = bool(rng.random() < 0.5)
    slice_depth = depth_base_first if base_to_apex else depth_base_first[::-1].copy()

    # In-plane grid: spacing from the vendor range, wide enough to hold the heart.
    heart_extent = 2.0 * (lv_radius + wall) + preset.rv_b_mm[1] * 2.0 + 40.0
    sx = float(np.clip(max(_u(rng, profile.spacing_mm), heart_extent / min(nx, ny)), 0.7, 1.9))
    sy = sx
    psi = rng.uniform(-np.pi / 6, np.pi / 6)
    if rng.random() < 0.15:
        psi += np.pi / 2
    flip = -1.0 if rng.random() < 0.15 else 1.0
    rot = np.array([[np.cos(psi), -np.sin(psi)], [np.sin(psi), np.cos(psi)]])
    lin = rot @ np.diag([flip * sx, sy])
    # Put the point between LV and RV near the image centre, +/- 8% of the FOV.
    centre_uv = np.array([-0.35 * (lv_radius + wall), 0.1 * lv_radius]) + rng.uniform(-0.08, 0.08, 2) * min(nx, ny) * sx
    centre_ij = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    offset = centre_uv - lin @ centre_ij
    inplane = np.concatenate([lin, offset[:, None]], axis=1)

    axes = heart_axes(rng)
    origin = np.array([-20.0, 10.0, 30.0]) + rng.normal(0.0, 15.0, 3)
    k_step = spacing_z if base_to_apex else -spacing_z
    vox_to_heart = np.array([
        [lin[0, 0], lin[0, 1], 0.0, offset[0]],
        [lin[1, 0], lin[1, 1], 0.0, offset[1]],
        [0.0, 0.0, k_step, slice_depth[0]],
    ])
    affine = np.eye(4)
    affine[:3, :3] = axes @ vox_to_heart[:, :3]
    affine[:3, 3] = origin + axes @ vox_to_heart[:, 3]

    # ES at 30-40% of the cycle, snapped to a frame so that phi(ES) = 1 exactly.
    es_steps = max(1, int(round(rng.uniform(0.30, 0.40) * n_frames)))
    es_fraction = es_steps / n_frames
    r = rng.random()
    ed_index = 0 if r < 0.75 else (1 if r < 0.9 else n_frames - 1)
    es_index = (ed_index + es_steps) % n_frames

    n_trab = 4
    trab_amp = rng.uniform(0.5, 1.5, n_trab) / np.sqrt(n_trab)
    if trivial:
        trab_amp = trab_amp * 0.0

    sig = rng.uniform(0.85, 1.15, 8)
    tissue = {
        "blood": 1.0,
        "myo": float(np.clip(0.35 * sig[0] * profile.myo_contrast, 0.25, 0.5)),
        "fat": float(np.clip(0.88 * sig[1], 0.8, 0.98)),
        "liver": float(np.clip(0.42 * sig[2], 0.35, 0.5)),
        "lung": float(np.clip(0.05 * sig[3], 0.03, 0.08)),
        "soft": float(0.3 * sig[4]),
        "marrow": float(0.55 * sig[5]),
        "aorta": float(np.clip(0.97 * sig[6], 0.9, 1.05)),
        "inflow": float(rng.uniform(0.05, 0.10)),
    }
    tissue["muscle"] = float(tissue["myo"] * rng.uniform(0.92, 1.08))

    torso_axes = (_u(rng, (150.0, 190.0)), _u(rng, (100.0, 130.0)))
    torso_centre = (-40.0 + rng.normal(0, 8), -(torso_axes[1] - 75.0) + rng.normal(0, 5))
    n_coils = int(rng.integers(profile.n_coils[0], profile.n_coils[1] + 1))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n_coils))
    coil_positions = np.stack([
        torso_centre[0] + (torso_axes[0] + 15.0) * np.cos(angles),
        torso_centre[1] + (torso_axes[1] + 15.0) * np.sin(angles),
    ], axis=1)

    return SubjectParams(
        vendor=vendor,
        pathology=pathology,
        trivial=trivial,
        shape_tzyx=(n_frames, n_slices, ny, nx),
        spacing_xyz=(sx, sy, spacing_z),
        slice_thickness=thickness,
        slice_depth=slice_depth,
        base_to_apex=base_to_apex,
        inplane=inplane,
        affine=affine,
        ed_index=ed_index,
        es_index=es_index,
        es_fraction=float(es_fraction),
        long_axis=long_axis,
        lv_radius=lv_radius,
        wall=wall,
        apex_wall=0.7 * wall,
        septal_asymmetry=_u(rng, preset.septal_asymmetry),
        lvef=_u(rng, preset.lvef),
        base_descent=_u(rng, preset.base_descent_mm),
        ellipticity=_u(rng, (1.0, 1.15)),
        ellipse_angle=_u(rng, (0.0, np.pi)),
        twist=np.deg2rad(_u(rng, (5.0, 15.0))),
        trab_amp=trab_amp,
        trab_k=rng.integers(6, 13, n_trab),
        trab_phase=rng.uniform(0, 2 * np.pi, n_trab),
        papillary_angle=(np.deg2rad(45.0 + rng.normal(0, 10)), np.deg2rad(-115.0 + rng.normal(0, 10))),
        papillary_radius=_u(rng, (3.0, 6.0)),
        rv_angle=np.deg2rad(160.0 + rng.normal(0, 8)),
        rv_half_span=np.deg2rad(_u(rng, preset.rv_half_span_deg)),
        rv_b=_u(rng, preset.rv_b_mm),
        rv_length_fraction=_u(rng, (0.75, 0.9)),
        rvef=_u(rng, preset.rvef),
        rv_wall=_u(rng, (3.0, 4.0)),
        torso_centre=torso_centre,
        torso_axes=torso_axes,
        fat_mm=_u(rng, (5.0, 25.0)),
        pericardial_fat=_u(rng, (1.0, 3.0)),
        aorta_centre=(-5.0 + rng.normal(0, 5), -(lv_radius + wall) - 35.0 + rng.normal(0, 5)),
        aorta_radius=_u(rng, (10.0, 14.0)),
        tissue=tissue,
        texture_amp=0.0 if trivial else _u(rng, (0.05, 0.10)),
        flow_amp=0.0 if trivial or rng.random() < 0.5 else _u(rng, (0.1, 0.25)),
        coil_positions=coil_positions,
        coil_d0=_u(rng, profile.coil_d0_mm),
        acq_fraction=1.0 if trivial else _u(rng, profile.acq_fraction),
        snr_blood=np.inf if trivial else _u(rng, profile.snr_blood),
        gamma=1.0 if trivial else _u(rng, profile.gamma),
        gain=_u(rng, profile.gain),
        dtype=profile.dtype,
    )


def contraction(n_frames: int, ed_index: int, es_fraction: float) -> np.ndarray:
    """Normalised contraction ``phi`` per frame, shape (T,): 0 at ED, 1 at ES.

    Systole is a half cosine up to ES; diastole recovers 70% in the next 25% of the cycle (rapid
    filling), then slowly (diastasis) and the rest in the last 15% (atrial kick).
    """
    tau = ((np.arange(n_frames) - ed_index) % n_frames) / n_frames  # cycle time in [0, 1)
    ts = es_fraction
    phi = np.empty(n_frames)
    sys = tau <= ts
    phi[sys] = 0.5 * (1 - np.cos(np.pi * tau[sys] / ts))
    t_fill, t_kick = min(ts + 0.25, 0.8), 0.85
    fill = (tau > ts) & (tau <= t_fill)
    phi[fill] = 1 - 0.7 * 0.5 * (1 - np.cos(np.pi * (tau[fill] - ts) / (t_fill - ts)))
    dia = (tau > t_fill) & (tau <= t_kick)
    phi[dia] = 0.3 - 0.1 * (tau[dia] - t_fill) / (t_kick - t_fill)
    kick = tau > t_kick
    phi[kick] = 0.2 * 0.5 * (1 + np.cos(np.pi * (tau[kick] - t_kick) / (1 - t_kick)))
    return phi


@dataclass
class PhantomVolume:
    """A rendered subject.

    Attributes:
        image: float32 (T, Z, Y, X) relative magnitude (blood about 1) before quantisation.
        labels: uint8 (T, Z, Y, X) labels of every frame (0 bg, 1 LV, 2 MYO, 3 RV).
        stored: (T, Z, Y, X) scanner integers (``params.dtype``).
    """

    params: SubjectParams
    image: np.ndarray
    labels: np.ndarray
    stored: np.ndarray


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Boolean mask of points inside an ellipse with semi-axes ``a`` (along ``angle``) and ``b``."""
    du, dv = u - cu, v - cv
    c, s = np.cos(angle), np.sin(angle)
    p, q = du * c + dv * s, -du * s + dv * c
    return (p / a) ** 2 + (q / b) ** 2 < 1.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian random field, smoothed in the last two axes with a Gaussian (pixels)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    ky = np.fft.fftfreq(shape[-2])[:, None]
    kx = np.fft.rfftfreq(shape[-1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma_px) ** 2 * (kx**2 + ky**2)).astype(np.float32)
    out = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape[-2:]).astype(np.float32)
    out /= out.std() + 1e-8
    return out


@dataclass(frozen=True)
class HeartState:
    """Closed-form heart geometry at every (frame, stored slice); lengths in mm.

    Attributes:
        phi: (T,) contraction, 0 at ED and 1 at ES.
        zeta: (T, Z) relative LV depth of each slice centre (0 base, 1 endocardial apex; < 0 above
            the base: atria and aortic root).
        zeta_epi: (T, Z) relative depth w.r.t. the epicardial apex.
        r_endo: (T, Z) mean endocardial radius (the cavity is an area-preserving ellipse, so its
            area is ``pi * r_endo**2`` before trabeculation).
        myo_area: (T, Z) myocardial ring area / pi (mm^2), conserved volume along the cycle.
        rv_depth: (T, Z) RV radial depth at the RV centre angle (0 where the RV is absent).
        rv_half_span: (T, Z) RV half angle around the LV (rad).
    """

    phi: np.ndarray
    zeta: np.ndarray
    zeta_epi: np.ndarray
    r_endo: np.ndarray
    myo_area: np.ndarray
    rv_depth: np.ndarray
    rv_half_span: np.ndarray


def heart_state(p: SubjectParams) -> HeartState:
    """Evaluate the kinematic model for every frame and stored slice.

    The base descends by ``base_descent * phi`` toward a fixed apex; the cavity radius scales by
    ``k(t)`` with ``k^2 = (1 - EF * phi) / l(t)`` so the cavity volume follows the EF; the RV
    shortens and its free wall moves toward the septum.
    """
    n_t = p.shape_tzyx[0]
    phi = contraction(n_t, p.ed_index, p.es_fraction)
    ph = phi[:, None]  # (T, 1)
    depth = p.slice_depth[None, :]  # (1, Z)
    L = p.long_axis
    base_t = p.base_descent * ph
    zeta = (depth - base_t) / (L - base_t)
    length_factor = 1.0 - p.base_descent * ph / L
    k2 = (1.0 - p.lvef * ph) / length_factor
    in_lv = zeta >= 0.0
    endo_ed = np.where(in_lv, p.lv_radius * np.sqrt(np.clip(1.0 - zeta**2, 0.0, None)), 0.0)
    r_endo = np.sqrt(k2) * endo_ed
    zeta_epi = (depth - base_t) / (L + p.apex_wall - base_t)
    epi_ed = (p.lv_radius + p.wall) * np.sqrt(np.clip(1.0 - zeta_epi**2, 0.0, None))
    myo_area = np.where(in_lv, np.clip(epi_ed**2 - endo_ed**2, 0.0, None) / length_factor, 0.0)

    rv_len = p.rv_length_fraction * L * (1.0 - 0.1 * ph)
    zeta_rv = (depth - base_t) / (rv_len - base_t)
    in_rv = (zeta_rv >= 0.0) & (zeta_rv < 1.0)
    taper = np.sqrt(np.clip(1.0 - zeta_rv**2, 0.0, None)) * in_rv
    rv_depth = p.rv_b * (1.0 - (p.rvef - 0.1) * ph) * taper
    rv_half_span = p.rv_half_span * (1.0 - 0.08 * ph) * np.sqrt(taper)
    return HeartState(phi, zeta, zeta_epi, r_endo, myo_area, rv_depth, rv_half_span)


@dataclass(frozen=True)
class HeartMasks:
    """Boolean masks (T, Z, h, w) of the heart on the crop ``window`` of the (Y, X) grid."""

    window: tuple[slice, slice]
    lv_blood: np.ndarray
    lv_epi: np.ndarray
    papillary: np.ndarray
    rv_blood: np.ndarray
    rv_wall: np.ndarray
    halo: np.ndarray  # epicardial / pericardial fat rim (outside the heart)


def _heart_window(p: SubjectParams, u: np.ndarray, v: np.ndarray) -> tuple[slice, slice]:
    """Smallest (Y, X) crop that holds the LV, the RV and the fat rim at every phase."""
    reach = (p.lv_radius + p.wall) * (1.0 + p.septal_asymmetry) * np.sqrt(p.ellipticity) * 1.6
    reach += p.rv_b + p.rv_wall + p.pericardial_fat + 4.0 * max(p.spacing_xyz[:2])
    inside = u**2 + v**2 < reach**2
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def rasterise_heart(p: SubjectParams, hs: HeartState, u: np.ndarray, v: np.ndarray) -> HeartMasks:
    """Rasterise LV cavity, papillary muscles, LV myocardium, RV cavity and RV free wall.

    Args:
        hs: ``heart_state(p)``.
        u, v: float32 (Y, X) heart-frame coordinates (mm) of the pixel centres.
    """
    f32 = np.float32
    window = _heart_window(p, u, v)
    u, v = u[window], v[window]

    def tz(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=f32)[:, :, None, None]

    # LV polar coordinates: area-preserving ellipse, static in time.
    ca, sa = np.cos(p.ellipse_angle), np.sin(p.ellipse_angle)
    up, vp = u * ca + v * sa, -u * sa + v * ca
    rho = np.sqrt(up**2 / p.ellipticity + vp**2 * p.ellipticity).astype(f32)  # (h, w)
    theta = np.arctan2(v, u).astype(f32)
    trab = np.zeros_like(rho)
    for amp, k, ph in zip(p.trab_amp, p.trab_k, p.trab_phase, strict=True):
        trab += f32(amp) * np.cos(k * theta + ph).astype(f32)
    # HCM: thicker septum; the factor scales the myocardial ring area per angle.
    thick = p.lv_radius + p.wall * (1.0 + p.septal_asymmetry * np.cos(theta - p.rv_angle))
    wall_factor = ((thick**2 - p.lv_radius**2) / ((p.lv_radius + p.wall) ** 2 - p.lv_radius**2)).astype(f32)

    r_endo = hs.r_endo
    lv_blood = rho < tz(r_endo) + trab * tz(np.clip(r_endo / 5.0, 0.0, 1.0))
    epi2 = tz(r_endo**2) + tz(hs.myo_area) * wall_factor
    lv_epi = rho * rho < epi2
    epi = np.sqrt(epi2)

    # Papillary muscles: myocardium signal, LV label, mid-ventricle, thicker in systole, twisting.
    papillary = np.zeros_like(lv_blood)
    mid = (hs.zeta > 0.2) & (hs.zeta < 0.75) & (r_endo > 2.5 * p.papillary_radius)
    t_idx, z_idx = np.nonzero(mid)
    if t_idx.size:
        phi = hs.phi[t_idx]
        rp2 = (p.papillary_radius * (1.0 + 0.3 * phi)) ** 2
        dist = r_endo[t_idx, z_idx] - 0.9 * p.papillary_radius
        hit = np.zeros((t_idx.size,) + u.shape, dtype=bool)
        for angle in p.papillary_angle:
            ang = angle - p.twist * phi * hs.zeta[t_idx, z_idx]
            pu, pv = (dist * np.cos(ang))[:, None, None], (dist * np.sin(ang))[:, None, None]
            hit |= (u - pu.astype(f32)) ** 2 + (v - pv.astype(f32)) ** 2 < rp2[:, None, None].astype(f32)
        papillary[t_idx, z_idx] = hit & lv_blood[t_idx, z_idx]

    # RV: a crescent hugging the LV epicardium around the septal direction. Its radial depth is
    # b * sqrt(1 - (angle / half_span)^2), so it ends in pointed insertion points; systole moves
    # the free wall toward the septum (bellows) and shortens the RV.
    dtheta = np.abs(np.angle(np.exp(1j * (theta - p.rv_angle)))).astype(f32)  # (h, w) in [0, pi]
    b4, span4 = tz(hs.rv_depth), tz(np.maximum(hs.rv_half_span, 1e-3))
    w = f32(p.rv_wall)
    rv_depth = b4 * np.sqrt(np.clip(1.0 - (dtheta / span4) ** 2, 0.0, None))
    wall_span = span4 + w / (tz(r_endo) + f32(p.wall + 1.0))
    wall_depth = (b4 + w) * np.sqrt(np.clip(1.0 - (dtheta / wall_span) ** 2, 0.0, None)) * (b4 > 0)
    beyond = rho - epi  # radial distance outside the LV epicardium (mm, elliptical)
    outside_lv = beyond >= 0
    rv_blood = outside_lv & (beyond < rv_depth)
    rv_wall = outside_lv & (beyond < wall_depth) & ~rv_blood

    peri = f32(p.pericardial_fat)
    present = tz((hs.zeta >= 0.0) & (hs.zeta_epi < 1.0))
    halo = ((beyond < peri) & (present > 0)) | ((beyond < wall_depth + peri) & (wall_depth > 0))
    halo &= ~(lv_epi | rv_blood | rv_wall)
    return HeartMasks(window, lv_blood, lv_epi, papillary, rv_blood, rv_wall, halo)


def render(params: SubjectParams, rng: np.random.Generator) -> PhantomVolume:
    """Rasterise the subject on its stored grid (centre plane of each slice) and form the image.

    ``rng`` draws the noise and texture only, so the geometry is a function of ``params``.
    """
    p = params
    n_t, n_z, n_y, n_x = p.shape_tzyx
    tis = p.tissue
    f32 = np.float32

    jj, ii = np.meshgrid(np.arange(n_y, dtype=f32), np.arange(n_x, dtype=f32), indexing="ij")
    u = (p.inplane[0, 0] * ii + p.inplane[0, 1] * jj + p.inplane[0, 2]).astype(f32)  # (Y, X) mm
    v = (p.inplane[1, 0] * ii + p.inplane[1, 1] * jj + p.inplane[1, 2]).astype(f32)
    hs = heart_state(p)
    m = rasterise_heart(p, hs, u, v)
    win = (slice(None), slice(None), *m.window)

    labels = np.full((n_t, n_z, n_y, n_x), BACKGROUND, dtype=np.uint8)
    crop = labels[win]
    np.copyto(crop, np.uint8(RV), where=m.rv_blood)
    np.copyto(crop, np.uint8(MYO), where=m.lv_epi)
    np.copyto(crop, np.uint8(LV), where=m.lv_blood)

    image = np.zeros((n_t, n_z, n_y, n_x), dtype=f32)
    if not p.trivial:
        image[:] = _surroundings(p, u, v)[None]
        _paint_above_base(image, p, u, v, (hs.zeta < 0.0)[:, :, None, None])
    heart = image[win]
    if not p.trivial:
        np.copyto(heart, f32(tis["fat"]), where=m.halo)
    myo = f32(tis["myo"])
    np.copyto(heart, myo, where=m.rv_wall | m.lv_epi)
    inflow = 1.0 + tis["inflow"] * np.clip(1.0 - hs.zeta / 0.3, 0.0, 1.0)  # (T, Z) brighter base
    np.copyto(heart, inflow.astype(f32)[:, :, None, None], where=m.rv_blood | m.lv_blood)
    np.copyto(heart, myo, where=m.papillary)

    if p.flow_amp > 0:
        _flow_swirls(heart, m.lv_blood | m.rv_blood, hs, p, rng)
    if not p.trivial:
        image *= 1.0 + f32(p.texture_amp) * _smooth_field(rng, (1, n_z, n_y, n_x), 1.5 / p.spacing_xyz[0] + 0.8)
        image *= _coil_shading(p, u, v)[None, None]
        image = _truncate_kspace(image, p.acq_fraction)
        image = add_rician_noise(image, 1.0 / p.snr_blood, rng)
    image = np.maximum(image, 0.0).astype(f32, copy=False)
    stored = quantise(image, p)
    return PhantomVolume(params=p, image=image, labels=labels, stored=stored)


def _flow_swirls(heart: np.ndarray, blood: np.ndarray, hs: HeartState, p: SubjectParams, rng: np.random.Generator) -> None:
    """Darken blood in blobs during rapid filling (inflow jets and vortices), in place.

    Args:
        heart: float32 (T, Z, h, w) image crop; blood: its bool blood-pool mask.
    """
    n_t = heart.shape[0]
    cycle = ((np.arange(n_t) - p.ed_index) % n_t) / n_t
    frames = np.flatnonzero((cycle > p.es_fraction) & (hs.phi > 0.25))
    if frames.size == 0:
        return
    sigma_px = 4.0 / p.spacing_xyz[0] + 1.0
    blobs = np.clip(_smooth_field(rng, (frames.size, heart.shape[1]) + heart.shape[2:], sigma_px), 0.0, None)
    scale = 1.0 - np.float32(p.flow_amp) * np.minimum(blobs, 2.0) / 2.0
    sub = heart[frames]
    np.copyto(sub, sub * scale, where=blood[frames])
    heart[frames] = sub


def _paint_above_base(image: np.ndarray, p: SubjectParams, u: np.ndarray, v: np.ndarray, above: np.ndarray) -> None:
    """Paint left/right atria and the aortic root (bright blood, unlabelled) where ``above`` (T, Z, 1, 1)."""
    tis = p.tissue
    la_r = 0.85 * p.lv_radius
    la_d2 = u**2 + (v + 0.2 * p.lv_radius) ** 2
    cr, sr = np.cos(p.rv_angle), np.sin(p.rv_angle)
    ra_c = (p.lv_radius + p.wall + 0.6 * p.rv_b) * np.array([cr, sr])
    ra_a = 0.8 * (p.lv_radius + p.wall + p.rv_b) * np.sin(p.rv_half_span)
    ra_angle = p.rv_angle + np.pi / 2
    ao_c = 0.75 * (p.lv_radius + p.wall) * np.array([np.cos(np.deg2rad(110)), np.sin(np.deg2rad(110))])
    ao_d2 = (u - ao_c[0]) ** 2 + (v - ao_c[1]) ** 2
    ao_r = 0.45 * p.lv_radius
    walls = (la_d2 < (la_r + 2.5) ** 2) | (ao_d2 < (ao_r + 2.0) ** 2)
    walls |= _ellipse(u, v, ra_c[0], ra_c[1], ra_a + 2.5, 0.9 * p.rv_b + 2.5, ra_angle)
    ra = _ellipse(u, v, ra_c[0], ra_c[1], ra_a, 0.9 * p.rv_b, ra_angle)
    bright = (la_d2 < la_r**2) | (ao_d2 < ao_r**2)
    np.copyto(image, np.float32(tis["myo"]), where=above & walls[None, None])
    np.copyto(image, np.float32(tis["blood"]), where=above & ra[None, None])
    np.copyto(image, np.float32(tis["blood"] * (1.0 + tis["inflow"])), where=above & bright[None, None])


def _surroundings(p: SubjectParams, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Static chest around the heart per slice, float32 (Z, Y, X) relative signal.

    Painter's order: air, torso soft tissue, subcutaneous fat ring, chest-wall muscle, lungs,
    spine and paraspinal muscle, descending aorta, liver (inferior slices).
    """
    tis = p.tissue
    n_z = len(p.slice_depth)
    out = np.zeros((n_z,) + u.shape, dtype=np.float32)
    for k, depth in enumerate(p.slice_depth):
        drift = 0.15 * depth  # oblique slices cut the chest at a drifting position
        tu, tv = p.torso_centre[0] - drift, p.torso_centre[1] + 0.5 * drift
        ta, tb = p.torso_axes
        img = out[k]
        torso = _ellipse(u, v, tu, tv, ta, tb)
        img[torso] = tis["fat"]
        inner = _ellipse(u, v, tu, tv, ta - p.fat_mm, tb - p.fat_mm)
        img[inner] = tis["muscle"]
        viscera = _ellipse(u, v, tu, tv, ta - p.fat_mm - 12.0, tb - p.fat_mm - 12.0)
        img[viscera] = tis["soft"]
        lungs = ((tu + 0.45 * ta, tv + 5.0, 0.33 * ta, 0.62 * tb, 0.2), (tu - 0.42 * ta, tv + 5.0, 0.35 * ta, 0.65 * tb, -0.2))
        for cu, cv, a, b, ang in lungs:
            img[_ellipse(u, v, cu, cv, a, b, ang) & viscera] = tis["lung"]
        spine_c = (tu + 5.0, tv - tb + p.fat_mm + 38.0)
        img[_ellipse(u, v, spine_c[0], spine_c[1] - 25.0, 45.0, 22.0)] = tis["muscle"]
        img[_ellipse(u, v, spine_c[0], spine_c[1], 18.0, 16.0)] = tis["lung"]  # dark cortex
        img[_ellipse(u, v, spine_c[0], spine_c[1], 15.0, 13.0)] = tis["marrow"]
        au, av, ar = p.aorta_centre[0] - 0.1 * drift, p.aorta_centre[1], p.aorta_radius
        img[_ellipse(u, v, au, av, ar + 1.5, ar + 1.5)] = tis["fat"]
        img[_ellipse(u, v, au, av, ar, ar)] = tis["aorta"]
        liver_grow = np.clip((depth - 0.35 * p.long_axis) / (0.5 * p.long_axis), 0.0, 1.0)
        if liver_grow > 0:
            liver = _ellipse(u, v, -75.0, -35.0, 20.0 + 60.0 * liver_grow, 15.0 + 45.0 * liver_grow, -0.5) & viscera
            img[liver] = tis["liver"]
        # Stomach below the apex on the left: bright fluid with a dark gas cap.
        stomach_grow = np.clip((depth - 0.7 * p.long_axis) / (0.4 * p.long_axis), 0.0, 1.0)
        if stomach_grow > 0:
            su, sv, sr = 55.0, -45.0, 10.0 + 25.0 * stomach_grow
            img[_ellipse(u, v, su, sv, sr + 3.0, 0.8 * sr + 3.0) & viscera] = tis["muscle"]
            img[_ellipse(u, v, su, sv, sr, 0.8 * sr) & viscera] = tis["fat"]
            img[_ellipse(u, v, su, sv, sr, 0.8 * sr) & (v > sv + 0.35 * sr) & viscera] = 0.0
    return out


def _coil_shading(p: SubjectParams, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares surface-coil sensitivity, float32 (Y, X), normalised to 1 at the LV.

    Each coil's magnitude falls off as ``(1 + (d / d0)^2)^(-3/2)`` with in-plane distance ``d``.
    """
    d2 = (u[None] - p.coil_positions[:, 0, None, None]) ** 2 + (v[None] - p.coil_positions[:, 1, None, None]) ** 2
    sens = (1.0 + d2 / p.coil_d0**2) ** -1.5
    rss = np.sqrt((sens**2).sum(axis=0))
    centre = np.unravel_index(np.argmin(u**2 + v**2), u.shape)
    return (rss / rss[centre]).astype(np.float32)


def add_rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (std ``sigma`` per channel): Rician.

    Args:
        image: float32 (...) non-negative magnitude.
        sigma: noise standard deviation of the real and imaginary channels (image units).
    """
    s = np.float32(sigma)
    real = image + s * rng.standard_normal(image.shape, dtype=np.float32)
    imag = s * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _lowpass_matrix(n: int, fraction: float) -> np.ndarray:
    """Real (n, n) matrix that keeps the central ``fraction`` of the DFT frequencies of a length-n axis."""
    keep = (np.abs(np.fft.fftfreq(n)) <= 0.5 * fraction).astype(float)
    eye = np.eye(n)
    return np.real(np.fft.ifft(np.fft.fft(eye, axis=0) * keep[:, None], axis=0)).astype(np.float32)


def _truncate_kspace(image: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the central ``fraction`` of k-space in both in-plane axes (Gibbs ringing), (..., Y, X).

    The mask is separable, so it is applied as two real matrix products (faster than 2D FFTs).
    """
    if fraction >= 1.0:
        return image
    n_y, n_x = image.shape[-2:]
    lead = image.shape[:-2]
    rows = image.reshape(-1, n_x) @ np.ascontiguousarray(_lowpass_matrix(n_x, fraction).T)
    out = np.matmul(_lowpass_matrix(n_y, fraction), rows.reshape(*lead, n_y, n_x))
    return out.astype(np.float32, copy=False)


def quantise(image: np.ndarray, p: SubjectParams) -> np.ndarray:
    """Relative magnitude -> scanner integers: gamma, global gain, clip to the dtype range."""
    info = np.iinfo(p.dtype)
    scaled = image if p.gamma == 1.0 else np.power(image, np.float32(p.gamma))
    scaled = scaled * np.float32(p.gain / 1.2)
    return np.clip(np.rint(scaled), 0, info.max).astype(p.dtype)
