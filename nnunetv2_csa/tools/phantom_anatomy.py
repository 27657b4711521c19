"""How a phantom is drawn (``phantom.py`` writes it in a dataset's layout): the label codes of
the public releases, the tissue classes every voxel gets first, the short-axis heart of
MS-CMRSeg and MyoPS, the whole heart of MM-WHS, and each modality's appearance (intensity per
tissue, texture, bias field, noise). See ``phantom.py``'s docstring for what the phantoms
imitate and why."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

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


def draw_short_axis_heart(rng: np.random.Generator, fov: float) -> _ShortAxisHeart:
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


def render_short_axis(heart: _ShortAxisHeart, n_in_plane: int, spacing_xy: float,
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


def slice_positions(rng: np.random.Generator, n_slices: int) -> np.ndarray:
    """Long-axis positions from just below the base to near the apex."""
    return np.linspace(rng.uniform(0.0, 0.05), rng.uniform(0.8, 0.88), n_slices)


def oblique_direction(rng: np.random.Generator, jitter_deg: float = 0.0,
                       base: Rotation | None = None) -> tuple[Rotation, tuple[float, ...]]:
    """A short-axis orientation: oblique to the scanner axes, as in the real releases."""
    if base is None:
        base = Rotation.from_euler("zyx", [rng.uniform(-60, 60), rng.uniform(-40, 40),
                                           rng.uniform(-70, -30)], degrees=True)
    rotation = Rotation.from_euler("zyx", rng.uniform(-jitter_deg, jitter_deg, 3), degrees=True) * base
    return rotation, tuple(float(v) for v in rotation.as_matrix().ravel())


def origin_for_centre(centre_world: np.ndarray, direction: Sequence[float],
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


def render_intensity(rng: np.random.Generator, tissue: np.ndarray, modality: str,
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


def short_axis_label(tissue: np.ndarray, scar: np.ndarray | None = None,
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


# ======================================================================== whole heart
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


def render_whole_heart(rng: np.random.Generator, size: int, spacing: np.ndarray):
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
