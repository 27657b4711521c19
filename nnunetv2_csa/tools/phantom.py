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

from dataset_conversion.phantom_marker import PHANTOM_MARKER
from nnunetv2_csa.errors import first_few
from nnunetv2_csa.tools.inputs import check_output_folder, entries_of_a_folder_not_ours, integer_at_least
from nnunetv2_csa.tools.phantom_anatomy import (AORTA, EDEMA, LA, LABEL_DTYPE, LV, MMWHS_MODALITIES,
                                                MSCMRSEG_SEQUENCES, MYO, MYOPS_SEQUENCES, PULMONARY, RA, RV, SCAR,
                                                draw_short_axis_heart, oblique_direction, origin_for_centre,
                                                render_intensity, render_short_axis, render_whole_heart,
                                                short_axis_label, slice_positions)

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


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _rng(seed: int, layout: str, *keys: int | str) -> np.random.Generator:
    """An independent generator per (seed, layout, keys); strings hash stably via crc32."""
    _check_seed(seed)
    entropy = [int(seed), _LAYOUT_CODES[layout]]
    entropy += [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(entropy)


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
    heart = draw_short_axis_heart(patient_rng, smallest_fov)
    base_rotation, _ = oblique_direction(patient_rng)
    heart_world = patient_rng.normal(0.0, 20.0, 3)

    volumes = {}
    for modality in modalities:
        rng = _rng(seed, "mscmrseg", patient, modality)
        nominal_xy, spacing_z = _MSCMRSEG_SPACING[modality]
        spacing_xy = nominal_xy * rng.uniform(1 - _IN_PLANE_JITTER, 1 + _IN_PLANE_JITTER)
        n_slices = int(rng.integers(_MSCMRSEG_SLICES[modality][0], _MSCMRSEG_SLICES[modality][1] + 1))
        positions = slice_positions(rng, n_slices)
        # The patient moves a little between breath-holds of different sequences.
        pose_offset = tuple(rng.uniform(-0.015, 0.015, 2) * smallest_fov)
        pose_angle = rng.uniform(-0.1, 0.1)
        enhanced_slices = (positions > 0.2) & (positions < 0.7)
        tissue, patch, _ = render_short_axis(heart, in_plane_size, spacing_xy, positions,
                                              pose_offset, pose_angle, pathology_slices=enhanced_slices)
        label = short_axis_label(tissue)
        if modality == "LGE" and heart.has_lge_patch:
            # Bright enhancement inside the myocardium; the MS-CMRSeg labels keep it myocardium.
            tissue[patch] = SCAR
        image = render_intensity(rng, tissue, modality, blur_sigma=(0, 0.6, 0.6), texture_sigma=(0, 5, 5))
        _, direction = oblique_direction(rng, jitter_deg=3.0, base=base_rotation)
        spacing = (spacing_xy, spacing_xy, spacing_z)
        size_xyz = (in_plane_size, in_plane_size, n_slices)
        origin = origin_for_centre(heart_world, direction, spacing, size_xyz)
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
    heart = draw_short_axis_heart(rng, in_plane_size * spacing_xy)
    n_slices = int(rng.integers(_MYOPS_SLICES[0], _MYOPS_SLICES[1] + 1))
    positions = slice_positions(rng, n_slices)
    # Pathology on a contiguous run of mid-ventricular slices (at least one).
    first = int(rng.integers(1, max(2, n_slices // 2)))
    last = min(n_slices - 2, first + int(rng.integers(1, 3)))
    pathology_slices = np.zeros(n_slices, dtype=bool)
    pathology_slices[first:last + 1] = True
    tissue, scar, edema = render_short_axis(heart, in_plane_size, spacing_xy, positions,
                                                           pathology_slices=pathology_slices)
    label = short_axis_label(tissue, scar=scar, edema=edema)
    tissue[edema] = EDEMA
    tissue[scar] = SCAR

    _, direction = oblique_direction(rng)
    spacing = (spacing_xy, spacing_xy, spacing_z)
    origin = origin_for_centre(rng.normal(0.0, 20.0, 3), direction, spacing,
                                (in_plane_size, in_plane_size, n_slices))
    volumes = {}
    for sequence in MYOPS_SEQUENCES:
        sequence_rng = _rng(seed, "myops", case_id, sequence)
        image = render_intensity(sequence_rng, tissue, sequence, blur_sigma=(0, 0.6, 0.6),
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
    tissue = render_whole_heart(rng, size, spacing)
    label = np.zeros(tissue.shape, dtype=LABEL_DTYPE)
    for structure, code in _MMWHS_CODES.items():
        label[tissue == structure] = code
    image = render_intensity(rng, tissue, modality, blur_sigma=0.6, texture_sigma=4)
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
