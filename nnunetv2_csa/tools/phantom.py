"""Synthetic cardiac-like volumes in the exact file layouts of the public datasets.

The converters, the demo and the tests need data that look like MS-CMRSeg 2019, MM-WHS 2017
and MyoPS 2020 without the real (licensed) releases. This module draws small seeded phantoms
and writes them with SimpleITK as ``.nii.gz`` under the same names, label codes, dtypes and
geometry conventions as the real files:

``write_mscmrseg_phantom``
    ``patient{N}_{C0,LGE,T2}.nii.gz`` and ``patient{N}_{SEQ}_manual.nii.gz``; codes 200 myocardium,
    500 LV blood, 600 RV blood. The sequences of one patient show the same heart but are not
    co-registered (own spacing, slice count, small pose change between breath-holds), as in
    the real release.
``write_mmwhs_phantom``
    ``{ct,mr}_train_{ID}_image.nii.gz`` / ``_label.nii.gz``; 3D whole-heart volumes with all
    seven codes 205, 420, 500, 550, 600, 820, 850. CT and MR of one ID are different subjects
    (MM-WHS is unpaired).
``write_myops_phantom``
    ``Case{ID}/Case{ID}_{C0,LGE,T2}.nii.gz`` and one ``Case{ID}/Case{ID}_gd.nii.gz`` on one
    shared grid; codes 200, 500, 600, 1220 edema and 2221 scar (both inside the myocardium).

Data types. The real MyoPS 2020 files (checked with SimpleITK on Case3001..3030) store every
sequence *and* the label as 16-bit signed integers with an oblique direction matrix and a
scanner-space origin, and so do these phantoms. All labels of all three layouts are int16:
it holds every code (the largest is 2221), it is what the one real release we can inspect uses,
and every nnU-Net reader accepts it. MR images are int16 and non-negative (magnitude images);
MM-WHS CT is int16 in Hounsfield units (air -1000, blood ~300), MM-WHS MR is int16.

Geometry. Images and labels of one case are written from the same spacing, origin and direction
values, so they read back identical. Short-axis stacks use the real in-plane spacings (C0 ~1.25,
LGE ~0.75, T2 ~1.35 mm; MyoPS ~0.73 mm) and slice spacings (10, 5, 12 mm; MyoPS 10-16 mm) but a
small in-plane matrix (``in_plane_size``) to keep files tiny; the heart is therefore scaled (in
mm) to fit the smallest field of view of the dataset, the same for every sequence of a patient,
so physical sizes stay consistent across sequences. Each stack covers the ventricles from base
to near the apex whatever its slice count, as clinical short-axis stacks are planned. MM-WHS
volumes use a realistic heart size in mm and a roughly isotropic spacing of field of view /
``size`` (about 2.5 mm at ``size=64``; the real CT is ~0.4 mm, MR ~1-2 mm, which a 64^3 matrix
cannot hold), with an identity direction.

Appearance. Every voxel first gets a tissue class (air, body, lung, liver, fat, myocardium,
blood pools, edema, scar...), then a per-modality intensity with a per-case jitter, a smooth
background texture, partial-volume blur, a smooth multiplicative bias field (MR only: CT is
calibrated in HU), a per-case gain (MR) and noise (Rician for MR magnitude, Gaussian for CT).
Contrasts follow the real sequences: bSSFP/C0 bright blood with grey myocardium, LGE grey blood
with nulled (black) myocardium and bright scar (in MS-CMRSeg LGE some patients have bright
patches that stay labelled myocardium, as in the real labels), T2 dark blood with brighter
myocardium and bright edema, CT bright contrast blood on soft tissue, whole-heart MR another
contrast. A model trained on one modality therefore does worse on another.

Randomness. Every patient draws from its own generator seeded by (seed, layout, patient), so a
patient's volumes do not depend on ``n_patients`` or on which other sequences are written.
All rendering is vectorized numpy/scipy; a 20-case dataset takes a few seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from nnunetv2_csa.errors import first_few
from nnunetv2_csa.tools.inputs import check_output_folder, entries_of_a_folder_not_ours, integer_at_least

# ----------------------------------------------------------------------------- label codes
MSCMRSEG_LABELS = {"myocardium": 200, "lv_blood": 500, "rv_blood": 600}
MYOPS_LABELS = {"myocardium": 200, "lv_blood": 500, "rv_blood": 600, "edema": 1220, "scar": 2221}
MMWHS_LABELS = {"lv_myocardium": 205, "left_atrium": 420, "lv_blood": 500, "right_atrium": 550,
                "rv_blood": 600, "ascending_aorta": 820, "pulmonary_artery": 850}
MSCMRSEG_SEQUENCES = ("C0", "LGE", "T2")
MYOPS_SEQUENCES = ("C0", "LGE", "T2")
MMWHS_MODALITIES = ("ct", "mr")
LABEL_DTYPE = np.int16
IMAGE_DTYPE = np.int16

# --------------------------------------------------------------------------- tissue classes
# Rendering first assigns a tissue to each voxel; labels and intensities both derive from it.
AIR, BODY, LUNG, LIVER, FAT, MYO, LV, RV, EDEMA, SCAR, LA, RA, AORTA, PULMONARY, RV_WALL = range(15)
N_TISSUES = 15

# Mean intensity of each tissue per modality (MR arbitrary units near the real MyoPS ranges,
# CT in HU). Order: air body lung liver fat myo lv rv edema scar la ra aorta pulmonary.
_TISSUE_INTENSITY = {
    "C0": [5, 330, 50, 300, 900, 400, 1300, 1200, 520, 470, 1250, 1150, 1300, 1200],
    "LGE": [5, 380, 40, 300, 600, 60, 450, 420, 140, 950, 450, 420, 450, 420],
    "T2": [5, 220, 30, 110, 600, 250, 80, 90, 430, 340, 80, 90, 80, 90],
    "ct": [-1000, 40, -820, 60, -100, 110, 320, 250, 110, 110, 330, 230, 350, 260],
    "mr": [3, 300, 50, 380, 700, 340, 900, 850, 340, 340, 880, 820, 950, 870],
}
for _means in _TISSUE_INTENSITY.values():
    _means.append(_means[MYO])  # the RV free wall is muscle too, but unlabelled in every release
# Rician / Gaussian noise level: a fraction of the LV blood intensity (MR) or HU (CT).
_NOISE_FRACTION = {"C0": 0.04, "LGE": 0.07, "T2": 0.05, "mr": 0.04}
_CT_NOISE_HU = 20.0
# Standard deviation of the bias-field polynomial coefficients (log scale).
_BIAS_STRENGTH = {"C0": 0.15, "LGE": 0.2, "T2": 0.2, "mr": 0.2}

# Nominal (in-plane, slice) spacing in mm and slice-count range of the short-axis stacks.
_MSCMRSEG_SPACING = {"C0": (1.25, 10.0), "LGE": (0.75, 5.0), "T2": (1.35, 12.0)}
_MSCMRSEG_SLICES = {"C0": (8, 12), "LGE": (10, 15), "T2": (4, 7)}
_IN_PLANE_JITTER = 0.04  # relative, per sequence and patient
_MYOPS_IN_PLANE_SPACING = (0.70, 0.76)
_MYOPS_SLICE_SPACINGS = (10.0, 12.0, 14.0, 16.0)
_MYOPS_SLICES = (4, 7)

_MIN_IN_PLANE_SIZE = 48  # below this the myocardial ring gets thinner than a pixel
_MIN_VOLUME_SIZE = 32
# above these a phantom needs gigabytes while drawn (and is larger than the real matrices)
_MAX_IN_PLANE_SIZE = 512
_MAX_VOLUME_SIZE = 256

_LAYOUT_CODES = {"mscmrseg": 1, "mmwhs": 2, "myops": 3}


@dataclass(frozen=True)
class PhantomVolume:
    """One image with its label and geometry; arrays are (z, y, x) as SimpleITK returns them."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]  # (x, y, z) mm, SimpleITK order
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, SimpleITK order



#: written beside every phantom, so that a converter records (and every report can say) that
#: the data are synthetic, even though they carry a public dataset's names and codes
PHANTOM_MARKER = "nnunetv2_csa_phantom.json"


def _check_output_folder(out_dir: str, overwrite: bool) -> None:
    """The phantom writes into a new or empty folder, or into one it wrote before (its marker is
    there): it never replaces a user's files with synthetic ones, nor labels them synthetic with
    its marker, unless ``overwrite``."""
    check_output_folder(out_dir, "-o")
    present = [] if overwrite else entries_of_a_folder_not_ours(out_dir, PHANTOM_MARKER)
    if present:
        raise ValueError(f"{out_dir} holds files the phantom did not write ({first_few(present, 5)}); they could be "
                         f"replaced by synthetic ones and its marker would label them synthetic: choose a new or "
                         f"empty folder, or add --overwrite")


def _write_marker(out_dir: str, layout: str, overwrite: bool, **parameters) -> None:
    """Checks the folder (see :func:`_check_output_folder`) and marks it, before any image is written."""
    _check_output_folder(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, PHANTOM_MARKER), "w") as f:
        json.dump({"generator": "nnunetv2_csa.tools.phantom", "layout": layout, **parameters}, f, indent=1)


def read_phantom_marker(folder: str) -> dict | None:
    """What the phantom generator recorded in ``folder`` or below it (the converters search
    their input tree too): layout, seed, counts; None for data it did not write."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if PHANTOM_MARKER in files:
            with open(os.path.join(root, PHANTOM_MARKER)) as f:
                return json.load(f)
    return None


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _rng(seed: int, layout: str, *keys: int | str) -> np.random.Generator:
    """An independent generator per (seed, layout, keys); strings hash stably via crc32."""
    _check_seed(seed)
    entropy = [int(seed), _LAYOUT_CODES[layout]]
    entropy += [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(entropy)


# ======================================================================== short-axis stacks
@dataclass(frozen=True)
class _ShortAxisHeart:
    """Patient anatomy in mm; u points from the LV centre towards the RV in the heart frame."""

    fov: float  # the field of view the anatomy is scaled to
    lv_radius: float  # LV blood semi-major axis at the base
    lv_ellipticity: float  # minor / major, kept near 1 so the ring stays >= its thickness
    lv_ellipse_angle: float
    myo_thickness: float
    rv_distance: float  # LV centre -> RV centre, in units of the outer LV radius
    rv_along: float  # RV semi-axis along u, in units of the outer LV radius
    rv_across: float  # RV semi-axis across u
    rv_end: float  # long-axis position (0 base, 1 apex) where the RV ends
    rv_wall: float
    heart_angle: float  # in-plane angle of u
    heart_offset: tuple[float, float]
    drift: tuple[float, float]  # in-plane shift of the long axis from base to apex
    body_axes: tuple[float, float]
    body_angle: float
    fat_thickness: float
    patch_angle: float  # centre of the bright LGE patch or of the MyoPS pathology
    patch_width: float  # half-width (rad) of the scar sector
    edema_width: float  # half-width (rad) of the edema sector (> patch_width)
    patch_depth: float  # transmurality of the scar, fraction of the wall from the endocardium
    has_lge_patch: bool


def _draw_short_axis_heart(rng: np.random.Generator, fov: float) -> _ShortAxisHeart:
    """Anatomy scaled to `fov` (mm), the smallest field of view the heart must fit in."""
    return _ShortAxisHeart(
        fov=fov,
        lv_radius=fov * rng.uniform(0.10, 0.13),
        lv_ellipticity=rng.uniform(0.85, 1.0),
        lv_ellipse_angle=rng.uniform(0, np.pi),
        myo_thickness=fov * rng.uniform(0.06, 0.075),
        rv_distance=rng.uniform(1.25, 1.4),
        rv_along=rng.uniform(0.8, 0.95),
        rv_across=rng.uniform(1.2, 1.4),
        rv_end=rng.uniform(0.7, 0.85),
        rv_wall=fov * 0.03,
        heart_angle=np.deg2rad(200.0) + rng.uniform(-0.5, 0.5),
        heart_offset=tuple(rng.uniform(-0.04, 0.04, size=2) * fov),
        drift=tuple(rng.uniform(-0.025, 0.025, size=2) * fov),
        body_axes=(fov * rng.uniform(0.8, 0.95), fov * rng.uniform(0.6, 0.7)),
        body_angle=rng.uniform(-0.2, 0.2),
        fat_thickness=fov * rng.uniform(0.04, 0.07),
        patch_angle=rng.uniform(-np.pi, np.pi),
        patch_width=np.deg2rad(rng.uniform(30, 50)),
        edema_width=np.deg2rad(rng.uniform(65, 90)),
        patch_depth=rng.uniform(0.5, 0.9),
        has_lge_patch=bool(rng.uniform() < 0.7),
    )


def _ellipse_inside(x, y, cx, cy, a, b, angle):
    """(x, y) inside the ellipse of semi-axes a, b rotated by `angle` around (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    p, q = c * dx + s * dy, -s * dx + c * dy
    return (p / a) ** 2 + (q / b) ** 2 <= 1.0


def _ellipse_radius(phi, a, b):
    """Distance from an ellipse's centre to its boundary in direction phi (ellipse frame)."""
    return a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)


def _render_short_axis(heart: _ShortAxisHeart, n_in_plane: int, spacing_xy: float,
                       slice_positions: np.ndarray, pose_offset=(0.0, 0.0), pose_angle: float = 0.0,
                       pathology_slices: np.ndarray | None = None):
    """Tissue map (z, y, x) of a short-axis stack, plus a pathology mask for the scar sector.

    `slice_positions` are long-axis positions in [0, 1) (0 base, 1 apex), one per slice.
    Returns (tissue, scar, edema) where scar/edema are boolean sectors inside the myocardium.
    """
    nz = len(slice_positions)
    coords = (np.arange(n_in_plane) - (n_in_plane - 1) / 2.0) * spacing_xy
    x = coords[None, None, :]
    y = coords[None, :, None]
    t = np.asarray(slice_positions, dtype=float)[:, None, None]
    shape = (nz, n_in_plane, n_in_plane)

    # Body, subcutaneous fat, lungs and liver (background tissues, the heart is drawn on top).
    ox, oy = heart.heart_offset[0] + pose_offset[0], heart.heart_offset[1] + pose_offset[1]
    tissue = np.full(shape, AIR, dtype=np.int8)
    ba, bb = heart.body_axes
    body = np.broadcast_to(_ellipse_inside(x, y, 0.3 * ox, 0.3 * oy, ba, bb, heart.body_angle), shape)
    inner_body = np.broadcast_to(_ellipse_inside(x, y, 0.3 * ox, 0.3 * oy, ba - heart.fat_thickness,
                                                 bb - heart.fat_thickness, heart.body_angle), shape)
    tissue[body] = FAT
    tissue[inner_body] = BODY
    fov = heart.fov
    for side in (-1.0, 1.0):
        lung = _ellipse_inside(x, y, side * 0.5 * fov, -0.15 * fov, 0.17 * fov, 0.3 * fov, side * 0.3)
        tissue[np.broadcast_to(lung, shape) & inner_body] = LUNG
    liver = _ellipse_inside(x, y, -0.4 * fov, 0.45 * fov, 0.35 * fov, 0.22 * fov, 0.3) & (t > 0.45)
    tissue[liver & inner_body] = LIVER

    # Heart frame: origin at the heart centre of this slice, u axis from LV towards RV.
    angle = heart.heart_angle + pose_angle
    cx = ox + heart.drift[0] * (t - 0.5)
    cy = oy + heart.drift[1] * (t - 0.5)
    cu, su = np.cos(angle), np.sin(angle)
    u = cu * (x - cx) + su * (y - cy)
    v = -su * (x - cx) + cu * (y - cy)

    shrink = np.sqrt(np.clip(1.0 - t ** 2, 0.0, None))  # ventricles taper towards the apex
    a_in = heart.lv_radius * shrink
    b_in = a_in * heart.lv_ellipticity
    a_out, b_out = a_in + heart.myo_thickness, b_in + heart.myo_thickness
    base_outer = heart.lv_radius + heart.myo_thickness
    lv_u = -0.55 * base_outer  # LV centre in the heart frame; the RV sits on +u
    ce, se = np.cos(heart.lv_ellipse_angle), np.sin(heart.lv_ellipse_angle)
    p = ce * (u - lv_u) + se * v
    q = -se * (u - lv_u) + ce * v
    lv_blood = (p / a_in) ** 2 + (q / b_in) ** 2 <= 1.0
    lv_outer = (p / a_out) ** 2 + (q / b_out) ** 2 <= 1.0
    myocardium = lv_outer & ~lv_blood

    outer_now = (a_in + b_in) / 2 + heart.myo_thickness
    rv_shrink = np.sqrt(np.clip(1.0 - (t / heart.rv_end) ** 2, 0.0, None))
    rv_centre_u = lv_u + heart.rv_distance * outer_now
    rv_a = heart.rv_along * base_outer * rv_shrink + 1e-6
    rv_b = heart.rv_across * base_outer * rv_shrink + 1e-6
    rv_ellipse = ((u - rv_centre_u) / rv_a) ** 2 + (v / rv_b) ** 2 <= 1.0
    rv_wall_ellipse = (((u - rv_centre_u) / (rv_a + heart.rv_wall)) ** 2
                       + (v / (rv_b + heart.rv_wall)) ** 2 <= 1.0) & (rv_shrink > 0)
    rv_blood = rv_ellipse & ~lv_outer & (rv_shrink > 0)
    rv_free_wall = rv_wall_ellipse & ~rv_ellipse & ~lv_outer

    # Sector inside the myocardium (scar, edema): angle around the LV centre and wall depth.
    phi = np.arctan2(q, p)
    radius = np.hypot(p, q)
    r_in = _ellipse_radius(phi, a_in + 1e-6, b_in + 1e-6)
    r_out = _ellipse_radius(phi, a_out, b_out)
    depth = (radius - r_in) / (r_out - r_in)
    angular_distance = np.abs(np.angle(np.exp(1j * (phi - heart.patch_angle))))
    in_slices = np.ones((nz, 1, 1), dtype=bool) if pathology_slices is None else \
        np.asarray(pathology_slices, dtype=bool)[:, None, None]
    scar = myocardium & in_slices & (angular_distance <= heart.patch_width) & (depth <= heart.patch_depth)
    edema = myocardium & in_slices & (angular_distance <= heart.edema_width) & ~scar

    tissue[rv_free_wall] = RV_WALL
    tissue[rv_blood] = RV
    tissue[myocardium] = MYO
    tissue[lv_blood] = LV
    return tissue, scar, edema


def _slice_positions(rng: np.random.Generator, n_slices: int) -> np.ndarray:
    """Long-axis positions from just below the base to near the apex."""
    return np.linspace(rng.uniform(0.0, 0.05), rng.uniform(0.8, 0.88), n_slices)


def _oblique_direction(rng: np.random.Generator, jitter_deg: float = 0.0,
                       base: Rotation | None = None) -> tuple[Rotation, tuple[float, ...]]:
    """A short-axis orientation: oblique to the scanner axes, as in the real releases."""
    if base is None:
        base = Rotation.from_euler("zyx", [rng.uniform(-60, 60), rng.uniform(-40, 40),
                                           rng.uniform(-70, -30)], degrees=True)
    rotation = Rotation.from_euler("zyx", rng.uniform(-jitter_deg, jitter_deg, 3), degrees=True) * base
    return rotation, tuple(float(v) for v in rotation.as_matrix().ravel())


def _origin_for_centre(centre_world: np.ndarray, direction: Sequence[float],
                       spacing: Sequence[float], size_xyz: Sequence[int]) -> tuple[float, float, float]:
    """The origin that puts the middle of the grid at `centre_world` (scanner mm)."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    half_extent = np.asarray(spacing, dtype=float) * (np.asarray(size_xyz, dtype=float) - 1) / 2.0
    return tuple(float(v) for v in centre_world - matrix @ half_extent)


# ================================================================================ appearance
def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(quadratic polynomial) over the normalized grid."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij", sparse=True)
    z, y, x = axes
    terms = [x, y, x * y, x ** 2, y ** 2, z, z * x, z * y]
    coefficients = rng.normal(0.0, strength, len(terms))
    coefficients[5:] *= 0.3  # weaker along the slice axis
    log_field = sum(c * term for c, term in zip(coefficients, terms))
    return np.exp(log_field)


def _render_intensity(rng: np.random.Generator, tissue: np.ndarray, modality: str,
                      blur_sigma, texture_sigma) -> np.ndarray:
    """Image (int16) from a tissue map with the modality's contrast, blur, bias and noise."""
    means = np.asarray(_TISSUE_INTENSITY[modality], dtype=float)
    is_ct = modality == "ct"
    if is_ct:
        per_case = means + rng.normal(0.0, 12.0, N_TISSUES)  # HU stay calibrated: shift, not scale
        per_case[AIR] = -1000.0
    else:
        per_case = means * rng.uniform(0.92, 1.08, N_TISSUES)
    image = per_case[tissue]

    # Background texture so that "not heart" is not a flat colour.
    background = np.isin(tissue, (BODY, LIVER, FAT, LUNG))
    texture = _smooth_texture(rng, tissue.shape, texture_sigma)
    amplitude = 25.0 if is_ct else 0.1
    image = np.where(background, image + amplitude * texture if is_ct else image * (1 + amplitude * texture),
                     image)
    image = gaussian_filter(image, sigma=blur_sigma)  # partial volume

    if is_ct:
        image = image + rng.normal(0.0, _CT_NOISE_HU, image.shape)
        return np.clip(np.rint(image), -1024, 3071).astype(IMAGE_DTYPE)

    image = image * _bias_field(rng, tissue.shape, _BIAS_STRENGTH[modality]) * rng.uniform(0.75, 1.3)
    sigma = _NOISE_FRACTION[modality] * means[LV]
    real = image + rng.normal(0.0, sigma, image.shape)
    imaginary = rng.normal(0.0, sigma, image.shape)
    magnitude = np.hypot(real, imaginary)  # Rician, as MR magnitude images are
    return np.clip(np.rint(magnitude), 0, np.iinfo(IMAGE_DTYPE).max).astype(IMAGE_DTYPE)


def _short_axis_label(tissue: np.ndarray, scar: np.ndarray | None = None,
                      edema: np.ndarray | None = None) -> np.ndarray:
    label = np.zeros(tissue.shape, dtype=LABEL_DTYPE)
    label[tissue == MYO] = MSCMRSEG_LABELS["myocardium"]
    label[tissue == LV] = MSCMRSEG_LABELS["lv_blood"]
    label[tissue == RV] = MSCMRSEG_LABELS["rv_blood"]
    if edema is not None:
        label[edema] = MYOPS_LABELS["edema"]
    if scar is not None:
        label[scar] = MYOPS_LABELS["scar"]
    return label


# ================================================================================ MS-CMRSeg
def _check_in_plane_size(in_plane_size: int) -> None:
    if int(in_plane_size) != in_plane_size or not _MIN_IN_PLANE_SIZE <= in_plane_size <= _MAX_IN_PLANE_SIZE:
        raise ValueError(f"in_plane_size must be an integer from {_MIN_IN_PLANE_SIZE} (thinner grids cannot hold a "
                         f"myocardial ring) to {_MAX_IN_PLANE_SIZE}, got {in_plane_size!r}")


def mscmrseg_patient_volumes(patient: int, modalities: Sequence[str] = MSCMRSEG_SEQUENCES,
                             seed: int = 0, in_plane_size: int = 96) -> dict[str, PhantomVolume]:
    """The MS-CMRSeg-like volumes of one patient, one per sequence (not co-registered)."""
    _check_in_plane_size(in_plane_size)
    unknown = [m for m in modalities if m not in _MSCMRSEG_SPACING]
    if unknown:
        raise ValueError(f"unknown MS-CMRSeg sequences {unknown}; choose from {list(MSCMRSEG_SEQUENCES)}")
    patient_rng = _rng(seed, "mscmrseg", patient)
    # The heart fits the smallest field of view any sequence can have (LGE, jittered down).
    smallest_fov = in_plane_size * min(s for s, _ in _MSCMRSEG_SPACING.values()) * (1 - _IN_PLANE_JITTER)
    heart = _draw_short_axis_heart(patient_rng, smallest_fov)
    base_rotation, _ = _oblique_direction(patient_rng)
    heart_world = patient_rng.normal(0.0, 20.0, 3)

    volumes = {}
    for modality in modalities:
        rng = _rng(seed, "mscmrseg", patient, modality)
        nominal_xy, spacing_z = _MSCMRSEG_SPACING[modality]
        spacing_xy = nominal_xy * rng.uniform(1 - _IN_PLANE_JITTER, 1 + _IN_PLANE_JITTER)
        n_slices = int(rng.integers(_MSCMRSEG_SLICES[modality][0], _MSCMRSEG_SLICES[modality][1] + 1))
        positions = _slice_positions(rng, n_slices)
        # The patient moves a little between breath-holds of different sequences.
        pose_offset = tuple(rng.uniform(-0.015, 0.015, 2) * smallest_fov)
        pose_angle = rng.uniform(-0.1, 0.1)
        enhanced_slices = (positions > 0.2) & (positions < 0.7)
        tissue, patch, _ = _render_short_axis(heart, in_plane_size, spacing_xy, positions,
                                              pose_offset, pose_angle, pathology_slices=enhanced_slices)
        label = _short_axis_label(tissue)
        if modality == "LGE" and heart.has_lge_patch:
            # Bright enhancement inside the myocardium; the MS-CMRSeg labels keep it myocardium.
            tissue[patch] = SCAR
        image = _render_intensity(rng, tissue, modality, blur_sigma=(0, 0.6, 0.6), texture_sigma=(0, 5, 5))
        _, direction = _oblique_direction(rng, jitter_deg=3.0, base=base_rotation)
        spacing = (spacing_xy, spacing_xy, spacing_z)
        size_xyz = (in_plane_size, in_plane_size, n_slices)
        origin = _origin_for_centre(heart_world, direction, spacing, size_xyz)
        volumes[modality] = PhantomVolume(image, label, spacing, origin, direction)
    return volumes


def _write(volume_array: np.ndarray, reference: PhantomVolume, path: str) -> str:
    image = sitk.GetImageFromArray(volume_array)
    image.SetSpacing(tuple(float(s) for s in reference.spacing))
    image.SetOrigin(reference.origin)
    image.SetDirection(reference.direction)
    sitk.WriteImage(image, path, useCompression=True)
    return path


def _check_count(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_mscmrseg_request(n_patients: int, in_plane_size: int) -> None:
    """What :func:`write_mscmrseg_phantom` checks of its patient count and matrix (a ValueError),
    for a caller that checks all its inputs before it writes anything (the demo)."""
    _check_count("n_patients", n_patients)
    _check_in_plane_size(in_plane_size)


def write_mscmrseg_phantom(out_dir: str, n_patients: int = 10, modalities=("C0", "LGE", "T2"),
                           seed: int = 0, unlabelled: dict[str, list[int]] | None = None,
                           in_plane_size: int = 96, overwrite: bool = False) -> list[str]:
    """Write an MS-CMRSeg 2019-like dataset; returns the written paths.

    ``out_dir/patient{N}_{SEQ}.nii.gz`` and ``patient{N}_{SEQ}_manual.nii.gz`` for N = 1..n_patients
    (no zero padding); codes 0, 200 myocardium, 500 LV, 600 RV. ``unlabelled`` maps a sequence to
    patient numbers whose ``_manual`` file is not written (the real release lacks some labels).
    """
    check_mscmrseg_request(n_patients, in_plane_size)
    _check_seed(seed)
    modalities = tuple(modalities)
    if isinstance(modalities, str) or not modalities:
        raise ValueError(f"modalities must be a non-empty sequence of names, got {modalities!r}")
    unlabelled = {k: set(v) for k, v in (unlabelled or {}).items()}
    for sequence, patients in unlabelled.items():
        if sequence not in modalities:
            raise ValueError(f"unlabelled names sequence {sequence!r}, which is not written "
                             f"(modalities={list(modalities)})")
        outside = sorted(p for p in patients if not 1 <= p <= n_patients)
        if outside:
            raise ValueError(f"unlabelled[{sequence!r}] names patients {outside} outside 1..{n_patients}")
    _write_marker(out_dir, "mscmrseg", overwrite, n_patients=n_patients, modalities=list(modalities), seed=seed,
                  in_plane_size=in_plane_size)
    written = []
    for patient in range(1, n_patients + 1):
        for modality, volume in mscmrseg_patient_volumes(patient, modalities, seed, in_plane_size).items():
            stem = os.path.join(out_dir, f"patient{patient}_{modality}")
            written.append(_write(volume.image, volume, stem + ".nii.gz"))
            if patient not in unlabelled.get(modality, ()):
                written.append(_write(volume.label, volume, stem + "_manual.nii.gz"))
    return written


# ==================================================================================== MyoPS
def myops_patient_volumes(case_id: int, seed: int = 0,
                          in_plane_size: int = 96) -> tuple[dict[str, PhantomVolume], np.ndarray]:
    """The three co-registered MyoPS-like sequences of one case and its single label."""
    _check_in_plane_size(in_plane_size)
    rng = _rng(seed, "myops", case_id)
    spacing_xy = rng.uniform(*_MYOPS_IN_PLANE_SPACING)
    spacing_z = float(rng.choice(_MYOPS_SLICE_SPACINGS))
    heart = _draw_short_axis_heart(rng, in_plane_size * spacing_xy)
    n_slices = int(rng.integers(_MYOPS_SLICES[0], _MYOPS_SLICES[1] + 1))
    positions = _slice_positions(rng, n_slices)
    # Pathology on a contiguous run of mid-ventricular slices (at least one).
    first = int(rng.integers(1, max(2, n_slices // 2)))
    last = min(n_slices - 2, first + int(rng.integers(1, 3)))
    pathology_slices = np.zeros(n_slices, dtype=bool)
    pathology_slices[first:last + 1] = True
    tissue, scar, edema = _render_short_axis(heart, in_plane_size, spacing_xy, positions,
                                                           pathology_slices=pathology_slices)
    label = _short_axis_label(tissue, scar=scar, edema=edema)
    tissue[edema] = EDEMA
    tissue[scar] = SCAR

    _, direction = _oblique_direction(rng)
    spacing = (spacing_xy, spacing_xy, spacing_z)
    origin = _origin_for_centre(rng.normal(0.0, 20.0, 3), direction, spacing,
                                (in_plane_size, in_plane_size, n_slices))
    volumes = {}
    for sequence in MYOPS_SEQUENCES:
        sequence_rng = _rng(seed, "myops", case_id, sequence)
        image = _render_intensity(sequence_rng, tissue, sequence, blur_sigma=(0, 0.6, 0.6),
                                  texture_sigma=(0, 5, 5))
        volumes[sequence] = PhantomVolume(image, label, spacing, origin, direction)
    return volumes, label


def write_myops_phantom(out_dir: str, n_patients: int = 5, seed: int = 0, first_id: int = 3001,
                        in_plane_size: int = 96, overwrite: bool = False) -> list[str]:
    """Write a MyoPS 2020-like dataset; returns the written paths.

    ``out_dir/Case{ID}/Case{ID}_{C0,LGE,T2}.nii.gz`` on one shared grid and one
    ``Case{ID}/Case{ID}_gd.nii.gz`` with 200 myocardium, 500 LV, 600 RV, 1220 edema, 2221 scar.
    """
    _check_count("n_patients", n_patients)
    _check_count("first_id", first_id)
    _check_seed(seed)
    _check_in_plane_size(in_plane_size)
    _write_marker(out_dir, "myops", overwrite, n_patients=n_patients, seed=seed, first_id=first_id,
                  in_plane_size=in_plane_size)
    written = []
    for case_id in range(first_id, first_id + n_patients):
        case_dir = os.path.join(out_dir, f"Case{case_id}")
        os.makedirs(case_dir, exist_ok=True)
        volumes, label = myops_patient_volumes(case_id, seed, in_plane_size)
        for sequence, volume in volumes.items():
            written.append(_write(volume.image, volume, os.path.join(case_dir, f"Case{case_id}_{sequence}.nii.gz")))
        written.append(_write(label, volumes["C0"], os.path.join(case_dir, f"Case{case_id}_gd.nii.gz")))
    return written


# =================================================================================== MM-WHS
def _inside_ellipsoid(points, centre, semi_axes, rotation: np.ndarray) -> np.ndarray:
    """points: (x, y, z) arrays in mm; rotation columns are the ellipsoid's axes."""
    relative = [c - float(o) for c, o in zip(points, centre)]
    total = 0.0
    for k in range(3):
        local = sum(relative[j] * float(rotation[j, k]) for j in range(3))
        total = total + (local / float(semi_axes[k])) ** 2
    return total <= 1.0


def _inside_cylinder(points, start, axis, length: float, radius: float) -> np.ndarray:
    """points: (x, y, z) arrays in mm; a solid cylinder from `start` along `axis`."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    relative = [c - float(o) for c, o in zip(points, start)]
    along = sum(r * float(a) for r, a in zip(relative, axis))
    across_squared = sum((r - along * float(a)) ** 2 for r, a in zip(relative, axis))
    return (along >= 0) & (along <= length) & (across_squared <= radius ** 2)


def _render_whole_heart(rng: np.random.Generator, size: int, spacing: np.ndarray):
    """Tissue map (z, y, x) of a whole heart; physical frame x right->left, y ant->post, z inf->sup."""
    centres = [((np.arange(size) - (size - 1) / 2.0) * s).astype(np.float32) for s in spacing]
    zz, yy, xx = np.meshgrid(centres[2], centres[1], centres[0], indexing="ij")

    scale = rng.uniform(1.15, 1.35)  # the canonical heart below is drawn small
    heart_rotation = Rotation.from_euler("zyx", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
    heart_centre = rng.uniform(-6, 6, 3)
    # Heart-frame coordinates (mm of a unit-scale heart): rotate the offsets into the heart axes.
    offsets = (xx - float(heart_centre[0]), yy - float(heart_centre[1]), zz - float(heart_centre[2]))
    heart_points = tuple(sum(offsets[j] * float(heart_rotation[j, k] / scale) for j in range(3))
                         for k in range(3))

    tissue = np.full(xx.shape, AIR, dtype=np.int8)
    fov = size * spacing[0]
    body = (xx / (0.46 * fov)) ** 2 + ((yy - 0.03 * fov) / (0.38 * fov)) ** 2 <= 1.0
    inner = (xx / (0.46 * fov - 8)) ** 2 + ((yy - 0.03 * fov) / (0.38 * fov - 8)) ** 2 <= 1.0
    tissue[body] = FAT
    tissue[inner] = BODY
    for side in (-1.0, 1.0):
        lung = ((xx - side * 0.28 * fov) / (0.16 * fov)) ** 2 + ((yy - 0.06 * fov) / (0.25 * fov)) ** 2 \
            + (zz / (0.45 * fov)) ** 2 <= 1.0
        tissue[lung & inner] = LUNG
    liver = ((xx + 0.12 * fov) / (0.3 * fov)) ** 2 + ((yy - 0.02 * fov) / (0.25 * fov)) ** 2 \
        + ((zz + 0.5 * fov) / (0.18 * fov)) ** 2 <= 1.0
    tissue[liver & inner] = LIVER

    jitter = lambda: rng.uniform(0.9, 1.1, 3)  # noqa: E731  per-structure size variation
    long_axis = Rotation.from_euler("y", 50 + rng.uniform(-8, 8), degrees=True).as_matrix()
    lv_axes = np.array([17.0, 17.0, 30.0]) * jitter()
    wall = rng.uniform(8.0, 11.0)
    lv_centre = np.array([14.0, -4.0, -12.0])
    lv_blood = _inside_ellipsoid(heart_points, lv_centre, lv_axes, long_axis)
    lv_outer = _inside_ellipsoid(heart_points, lv_centre, lv_axes + wall, long_axis)
    structures = [
        (lv_blood, LV),
        (lv_outer, MYO),
        (_inside_cylinder(heart_points, (4.0, 2.0, 10.0), (-0.1, 0.15, 1.0), 35.0 * rng.uniform(0.9, 1.1),
                          12.0 * rng.uniform(0.9, 1.1)), AORTA),
        (_inside_cylinder(heart_points, (-8.0, -22.0, 12.0), (0.45, 0.55, 0.7), 30.0 * rng.uniform(0.9, 1.1),
                          11.0 * rng.uniform(0.9, 1.1)), PULMONARY),
        (_inside_ellipsoid(heart_points, (12.0, 28.0, 22.0), np.array([22.0, 14.0, 15.0]) * jitter(),
                           np.eye(3)), LA),
        (_inside_ellipsoid(heart_points, (-26.0, 12.0, 14.0), np.array([17.0, 17.0, 21.0]) * jitter(),
                           np.eye(3)), RA),
        (_inside_ellipsoid(heart_points, (-14.0, -20.0, -10.0), np.array([24.0, 16.0, 34.0]) * jitter(),
                           long_axis), RV),
    ]
    in_heart = np.zeros(tissue.shape, dtype=bool)
    for mask, structure in structures:  # first drawn wins where shapes overlap
        new = mask & ~in_heart
        tissue[new] = structure
        in_heart |= new
    return tissue


def _check_volume_size(size: int) -> None:
    if int(size) != size or not _MIN_VOLUME_SIZE <= size <= _MAX_VOLUME_SIZE:
        raise ValueError(f"size must be an integer from {_MIN_VOLUME_SIZE} (smaller cubes lose the thin structures) "
                         f"to {_MAX_VOLUME_SIZE}, got {size!r}")


_MMWHS_CODES = {LV: 500, MYO: 205, AORTA: 820, PULMONARY: 850, LA: 420, RA: 550, RV: 600}


def mmwhs_case_volume(modality: str, case_id: int, seed: int = 0, size: int = 64) -> PhantomVolume:
    """One MM-WHS-like whole-heart volume (CT in HU, or MR) with its label."""
    if modality not in MMWHS_MODALITIES:
        raise ValueError(f"unknown MM-WHS modality {modality!r}; choose from {list(MMWHS_MODALITIES)}")
    _check_volume_size(size)
    rng = _rng(seed, "mmwhs", modality, case_id)
    fov = rng.uniform(160.0, 180.0) if modality == "ct" else rng.uniform(170.0, 195.0)
    in_plane = fov / size
    slice_factor = rng.uniform(1.0, 1.25) if modality == "ct" else rng.uniform(0.9, 1.15)
    spacing = np.array([in_plane, in_plane, in_plane * slice_factor])
    tissue = _render_whole_heart(rng, size, spacing)
    label = np.zeros(tissue.shape, dtype=LABEL_DTYPE)
    for structure, code in _MMWHS_CODES.items():
        label[tissue == structure] = code
    image = _render_intensity(rng, tissue, modality, blur_sigma=0.6, texture_sigma=4)
    direction = tuple(float(v) for v in np.eye(3).ravel())
    origin = tuple(float(v) for v in -(spacing * (size - 1) / 2.0) + rng.normal(0.0, 10.0, 3))
    return PhantomVolume(image, label, tuple(float(s) for s in spacing), origin, direction)


def write_mmwhs_phantom(out_dir: str, n_per_modality: int = 5, seed: int = 0, first_id: int = 1001,
                        size: int = 64, overwrite: bool = False) -> list[str]:
    """Write an MM-WHS 2017-like dataset; returns the written paths.

    ``out_dir/{ct,mr}_train_{ID}_image.nii.gz`` and ``_label.nii.gz`` for IDs first_id..; codes 205,
    420, 500, 550, 600, 820, 850, all present in every label.
    """
    _check_count("n_per_modality", n_per_modality)
    _check_count("first_id", first_id)
    _check_seed(seed)
    _check_volume_size(size)
    _write_marker(out_dir, "mmwhs", overwrite, n_per_modality=n_per_modality, seed=seed, first_id=first_id,
                  size=size)
    written = []
    for modality in MMWHS_MODALITIES:
        for case_id in range(first_id, first_id + n_per_modality):
            volume = mmwhs_case_volume(modality, case_id, seed, size)
            stem = os.path.join(out_dir, f"{modality}_train_{case_id}")
            written.append(_write(volume.image, volume, stem + "_image.nii.gz"))
            written.append(_write(volume.label, volume, stem + "_label.nii.gz"))
    return written


# ====================================================================================== CLI
_DEFAULT_COUNTS = {"mscmrseg": 10, "mmwhs": 5, "myops": 5}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_phantom",
        description="Write a small synthetic cardiac dataset in the exact file layout of MS-CMRSeg 2019, "
                    "MM-WHS 2017 or MyoPS 2020 (names, label codes, dtypes, geometry), for tests and demos.")
    parser.add_argument("--layout", required=True, choices=sorted(_DEFAULT_COUNTS),
                        help="which public dataset's layout to imitate")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder (created if missing); a folder that holds other files is refused "
                             "unless --overwrite")
    parser.add_argument("-n", type=integer_at_least(1), default=None,
                        help="number of patients (mscmrseg, myops) or of cases per modality (mmwhs); "
                             f"default {_DEFAULT_COUNTS}")
    parser.add_argument("--seed", type=integer_at_least(0), default=0,
                        help="random seed (same seed, same files); default 0")
    parser.add_argument("--size", type=int, default=None,
                        help="in-plane matrix (mscmrseg, myops; default 96) or cube edge (mmwhs; default 64)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder that holds files the phantom did not write (they may be replaced, "
                             "and the folder is marked synthetic)")
    parser.add_argument("--modalities", nargs="+", default=list(MSCMRSEG_SEQUENCES),
                        choices=list(MSCMRSEG_SEQUENCES), help="mscmrseg only: sequences to write")
    args = parser.parse_args(argv)
    count = _DEFAULT_COUNTS[args.layout] if args.n is None else args.n
    try:
        if args.layout == "mscmrseg":
            paths = write_mscmrseg_phantom(args.output, count, tuple(args.modalities), args.seed,
                                           in_plane_size=args.size or 96, overwrite=args.overwrite)
        elif args.layout == "mmwhs":
            paths = write_mmwhs_phantom(args.output, count, args.seed, size=args.size or 64, overwrite=args.overwrite)
        else:
            paths = write_myops_phantom(args.output, count, args.seed, in_plane_size=args.size or 96,
                                        overwrite=args.overwrite)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {len(paths)} files ({args.layout} layout) to {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
