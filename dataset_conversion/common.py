"""Shared machinery of the dataset converters.

A converter only knows its challenge's file layout and label codes: it finds the files
(:func:`scan_input`, :func:`index_unique`), describes each case as a :class:`SourceCase`,
names its :class:`LabelScheme` and hands everything to :func:`run_conversion`, which

* checks every file (readable, complete, 3D, label codes known, label on the image's grid),
* remaps the label codes to nnU-Net's consecutive classes 0..C-1,
* optionally reorients (MM-WHS coronal slicing) and crops around the labelled heart (this
  uses the labels, so it is an evaluation protocol -- the paper's 224 x 224 -- not something
  a deployed model can do),
* writes ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``, ``dataset.json`` with
  the modality tags of :mod:`nnunetv2_csa.modality`, and a patient-grouped
  ``splits_final.json``,

all inside a temporary folder next to the output that is renamed into place only when
everything succeeded: a failed conversion leaves nothing behind, and source files are only
ever read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import multiprocessing
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_csa.errors import UserInputError
from nnunetv2_csa.image_files import (IncompleteFileError, check_file_complete, count_non_finite_voxels,
                                      grid_differences)
from nnunetv2_csa.tools.phantom import read_phantom_marker
from nnunetv2_csa.modality import (CASE_MODALITY_KEY, CASE_PATIENT_KEY, MODALITIES_KEY, OTHER_MODALITY_IMAGES,
                                   OTHER_MODALITY_KEY, OTHER_MODALITY_LABELS, ModalityTags)

FILE_ENDING = ".nii.gz"
DEFAULT_SEED = 12345  # the seed nnU-Net uses for its own 5-fold split
SPLIT_CHOICES = ("5-fold", "80-20")
CONVERSION_KEY = "csa_conversion"


class ConversionError(UserInputError):
    """Bad input or a bad request: the message names the file and the fix."""


class ConversionWarning(UserWarning):
    """Something the user should know about, but that does not stop the conversion."""


# ---------------------------------------------------------------------------------------
# What a converter describes
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelScheme:
    """How one challenge's label codes become nnU-Net classes.

    ``class_names[i]`` is the name of class ``i`` (``class_names[0]`` is the background);
    ``code_to_class`` maps every code that may appear in a label file (0 included) to its
    class; codes in ``tolerated_codes`` are mapped too but each file that contains one gets a
    warning with the given text (a known quirk of a public release). Any other code is an
    error naming the file.
    """

    class_names: tuple[str, ...]
    code_to_class: Mapping[int, int]
    tolerated_codes: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.class_names[0] != "background":
            raise ValueError("class 0 must be the background")
        classes = set(self.code_to_class.values())
        if not classes <= set(range(len(self.class_names))):
            raise ValueError(f"codes map to classes {sorted(classes)} outside 0..{len(self.class_names) - 1}")
        if self.code_to_class.get(0) != 0:
            raise ValueError("code 0 must map to the background")
        if not set(self.tolerated_codes) <= set(self.code_to_class):
            raise ValueError("every tolerated code needs a class in code_to_class")

    def dataset_json_labels(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}


@dataclass(frozen=True)
class SourceCase:
    """One image of one patient in one modality, with its label file (None: unlabelled)."""

    patient: str
    modality: str
    image: str
    label: str | None

    @property
    def case_id(self) -> str:
        # the modality is part of the name, so that the cases of one patient never collide
        # and a file name alone tells the modality
        return f"{self.patient}_{self.modality}"


# ---------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------
_LOOKS_LIKE_IMAGE = re.compile(r"\.nii(\.gz)?\s*$", re.IGNORECASE)


def first_few(items: Sequence[str], limit: int) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are: what a message
    about many files or cases names."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def scan_input(input_folder: str, filename_pattern: re.Pattern) -> list[tuple[re.Match, str]]:
    """Every file under ``input_folder`` (recursively, sorted) whose name matches."""
    if not os.path.isdir(input_folder):
        raise ConversionError(f"input folder {input_folder} does not exist or is not a folder; "
                              f"point -i/--input at the folder that holds the challenge's files")
    found, skipped = [], []
    visited = {os.path.realpath(input_folder)}
    # symbolic links are followed (data folders are often linked in), each real folder once
    for root, dirs, files in os.walk(input_folder, followlinks=True):
        real = [os.path.realpath(os.path.join(root, d)) for d in dirs]
        dirs[:] = sorted(d for d, r in zip(dirs, real) if r not in visited)
        visited.update(real)
        skipped += [f"{os.path.join(root, d)!r} (a folder)" for d in dirs if _LOOKS_LIKE_IMAGE.search(d)]
        for name in sorted(files):
            match = filename_pattern.fullmatch(name)
            if match:
                found.append((match, os.path.join(root, name)))
            elif _LOOKS_LIKE_IMAGE.search(name):
                skipped.append(repr(os.path.join(root, name)))
    if skipped:
        # a near miss ("Case3002_C0 (1).nii.gz", a trailing space) is data the user meant to convert
        shown = first_few(skipped, 10)
        warnings.warn(f"{len(skipped)} image-like name(s) under {input_folder} do not follow the dataset's file "
                      f"naming and were skipped: {shown}; rename them if they belong to the dataset",
                      ConversionWarning, stacklevel=2)
    return found


def index_unique(items: Iterable[tuple[object, str]], what: Callable[[object], str]) -> dict:
    """``{key: path}`` from ``(key, path)`` pairs; the same key at two paths is an error
    (``what(key)`` says in words what the key is, e.g. "patient 3, LGE image")."""
    index: dict = {}
    for key, path in items:
        if key in index:
            raise ConversionError(
                f"{what(key)} found twice: {index[key]} and {path}. The same patient id in two "
                f"folders (or as .nii and .nii.gz) would silently mix two patients; remove or "
                f"rename one copy, or point -i/--input at only one of the folders")
        index[key] = path
    return index


def parse_modalities(requested: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """The requested modality names, validated, in the order given (= modality index)."""
    requested = tuple(requested)
    if len(requested) == 0:
        raise ConversionError(f"no modality chosen; choose at least one of {list(allowed)} with --modalities")
    unknown = [m for m in requested if m not in allowed]
    if unknown:
        raise ConversionError(f"unknown modality {unknown}; this dataset has {list(allowed)} "
                              f"(names are case-sensitive)")
    if len(set(requested)) != len(requested):
        raise ConversionError(f"modality given twice in {list(requested)}; name each once")
    return requested


# ---------------------------------------------------------------------------------------
# Checking and converting one case (runs in worker processes: plain data in and out)
# ---------------------------------------------------------------------------------------
def read_image(path: str) -> sitk.Image:
    """A complete, readable, single-component 3D image, or a ConversionError naming the file."""
    try:
        check_file_complete(path)
    except IncompleteFileError as e:
        raise ConversionError(str(e)) from None
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise ConversionError(f"cannot read {path}: {reason}. Is it a complete NIfTI file? "
                              f"Download or copy it again") from None
    if image.GetDimension() != 3:
        raise ConversionError(f"{path} is a {image.GetDimension()}D image; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                              f"expected a scalar (grey-value or label) volume")
    return image


def check_same_geometry(image: sitk.Image, label: sitk.Image, image_path: str, label_path: str) -> None:
    """The label must lie on the image's voxel grid (``nnunetv2_csa.image_files.grid_differences``)."""
    problems = grid_differences(image, label)
    if problems:
        raise ConversionError(
            f"image {image_path} and label {label_path} do not share one voxel grid: "
            f"{'; '.join(problems)}. Check that they belong to the same case; if they do, resample the "
            f"label onto the image grid (nearest neighbour) or fix the header, then convert again")


def remap_labels(label_array: np.ndarray, scheme: LabelScheme, label_path: str) -> tuple[np.ndarray, list[str]]:
    """Source codes -> classes 0..C-1 (uint8), strictly: an unknown code is an error naming
    the file and the codes. Returns the class array and warnings (tolerated codes)."""
    if np.issubdtype(label_array.dtype, np.floating):
        if not np.all(np.isfinite(label_array)) or not np.array_equal(label_array, np.round(label_array)):
            raise ConversionError(f"label {label_path} holds non-integer values; a label file must hold "
                                  f"integer codes {sorted(scheme.code_to_class)}")
    classes = np.zeros(label_array.shape, dtype=np.uint8)
    known = np.zeros(label_array.shape, dtype=bool)
    messages = []
    for code, cls in scheme.code_to_class.items():
        is_code = label_array == code
        if code in scheme.tolerated_codes and is_code.any():
            messages.append(f"{label_path}: {scheme.tolerated_codes[code]}")
        classes[is_code] = cls
        known |= is_code
    if not known.all():
        unexpected = np.unique(label_array[~known])
        shown = [int(c) if float(c).is_integer() else float(c) for c in unexpected[:20]]
        raise ConversionError(
            f"label {label_path} contains codes {shown} (in {int((~known).sum())} voxels) outside the expected "
            f"set {sorted(scheme.code_to_class)}; is it a label file of this dataset? Fix or remove the file")
    return classes, messages


def crop_box(foreground_yx: np.ndarray | None, size_yx: tuple[int, int], crop_yx: tuple[int, int]
             ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Start indices (y, x) of a ``crop_yx`` box centred on the bounding box of
    ``foreground_yx`` (on the image centre when it is None or empty), and the bounding box
    size. The start may be negative or the box may run past the image: the caller pads."""
    if foreground_yx is not None and foreground_yx.any():
        rows = np.flatnonzero(foreground_yx.any(axis=1))
        cols = np.flatnonzero(foreground_yx.any(axis=0))
        lo, hi = np.array([rows[0], cols[0]]), np.array([rows[-1], cols[-1]]) + 1
    else:
        lo, hi = np.zeros(2, dtype=int), np.array(size_yx)
    centre = (lo + hi) // 2
    start = centre - np.array(crop_yx) // 2
    return (int(start[0]), int(start[1])), (int(hi[0] - lo[0]), int(hi[1] - lo[1]))


def crop_in_plane(image: sitk.Image, start_yx: tuple[int, int], crop_yx: tuple[int, int], pad_value: float
                  ) -> sitk.Image:
    """The in-plane box (sitk index axes x and y; every slice of axis z kept), padded with
    ``pad_value`` where it leaves the image. ConstantPad and slicing keep the physical
    position of every voxel (the origin moves with the box)."""
    start = np.array([start_yx[1], start_yx[0]])  # sitk index order is (x, y, z)
    stop = start + np.array([crop_yx[1], crop_yx[0]])
    size = np.array(image.GetSize()[:2])
    pad_lower = np.maximum(0, -start)
    pad_upper = np.maximum(0, stop - size)
    if pad_lower.any() or pad_upper.any():
        image = sitk.ConstantPad(image, [int(v) for v in pad_lower] + [0], [int(v) for v in pad_upper] + [0],
                                 pad_value)
    x0, y0 = (start + pad_lower).tolist()
    return image[x0:x0 + crop_yx[1], y0:y0 + crop_yx[0], :]


@dataclass(frozen=True)
class CaseJob:
    case_id: str
    image_path: str
    label_path: str | None
    out_image: str
    out_label: str | None
    scheme: LabelScheme
    orientation: str | None = None   # sitk.DICOMOrient code, e.g. "LIP"
    crop_yx: tuple[int, int] | None = None


@dataclass
class CaseResult:
    case_id: str
    classes_present: tuple[int, ...]
    spacing_xyz: tuple[float, float, float]
    warnings: list[str]


def convert_case(job: CaseJob) -> CaseResult:
    """Check, remap, reorient, crop and write one case."""
    messages: list[str] = []
    image = read_image(job.image_path)
    n_bad = count_non_finite_voxels(job.image_path)
    if n_bad:
        raise ConversionError(f"{job.image_path} holds {n_bad} NaN/Inf voxel(s): they would reach nnU-Net (its "
                              f"normalisation then makes the whole image NaN); repair the file (or leave the case out)")
    label_classes = None
    label_is_empty = False
    if job.label_path is not None:
        label = read_image(job.label_path)
        check_same_geometry(image, label, job.image_path, job.label_path)
        classes, found = remap_labels(sitk.GetArrayViewFromImage(label), job.scheme, job.label_path)
        messages += found
        label_is_empty = not classes.any()
        if label_is_empty:
            messages.append(f"{job.label_path} holds no foreground at all: {job.case_id} trains as background "
                            f"only; check the file, or leave the case out")
        label_classes = sitk.GetImageFromArray(classes)
        # the label takes the image's exact header, so nnU-Net's exact comparisons pass
        label_classes.CopyInformation(image)

    transformed = False
    if job.orientation is not None:
        image = sitk.DICOMOrient(image, job.orientation)
        if label_classes is not None:
            label_classes = sitk.DICOMOrient(label_classes, job.orientation)
        transformed = True
    if job.crop_yx is not None:
        size_yx = (image.GetSize()[1], image.GetSize()[0])
        foreground = None
        if label_classes is not None:
            foreground = sitk.GetArrayViewFromImage(label_classes).any(axis=0)
        else:
            messages.append(f"{job.image_path} has no label: cropped around the image centre")
        start, heart_size = crop_box(foreground, size_yx, job.crop_yx)
        if label_is_empty:
            messages.append(f"{job.label_path} is empty: {job.case_id} cropped around the image centre")
        elif heart_size[0] > job.crop_yx[0] or heart_size[1] > job.crop_yx[1]:
            messages.append(f"{job.case_id}: the labelled heart ({heart_size[0]} x {heart_size[1]} pixels) is "
                            f"larger than the crop {job.crop_yx[0]} x {job.crop_yx[1]}; part of it is cut off")
        minimum = float(sitk.GetArrayViewFromImage(image).min())
        image = crop_in_plane(image, start, job.crop_yx, minimum)
        if label_classes is not None:
            label_classes = crop_in_plane(label_classes, start, job.crop_yx, 0)
        transformed = True

    if not transformed and job.image_path.endswith(FILE_ENDING):
        # unchanged image: a byte copy is exact and several times faster than re-encoding
        shutil.copyfile(job.image_path, job.out_image)
    else:
        sitk.WriteImage(image, job.out_image, useCompression=True)
    present: tuple[int, ...] = ()
    if label_classes is not None:
        sitk.WriteImage(label_classes, job.out_label, useCompression=True)
        counts = np.bincount(sitk.GetArrayViewFromImage(label_classes).ravel(),
                             minlength=len(job.scheme.class_names))
        present = tuple(int(i) for i in np.flatnonzero(counts))
    return CaseResult(job.case_id, present, tuple(image.GetSpacing()), messages)


def _run_jobs(jobs: list[CaseJob], num_processes: int) -> list[CaseResult]:
    # the bar is closed (its line ended) before an error message is printed
    with tqdm(total=len(jobs), desc="converting", unit="case", file=sys.stderr) as progress:
        if num_processes <= 1 or len(jobs) < 2:
            results = []
            for job in jobs:
                results.append(convert_case(job))
                progress.update()
            return results
        # spawn, as nnU-Net does: forking a process that may already run torch threads can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(num_processes, len(jobs)), mp_context=context) as pool:
            futures = [pool.submit(convert_case, job) for job in jobs]
            results = []
            try:
                for future in futures:
                    results.append(future.result())
                    progress.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results


# ---------------------------------------------------------------------------------------
# Splits and unpaired selection
# ---------------------------------------------------------------------------------------
def make_patient_splits(case_patient: Mapping[str, str], split: str = "5-fold", seed: int = DEFAULT_SEED,
                        case_modality: Mapping[str, str] | None = None) -> list[dict[str, list[str]]]:
    """nnU-Net ``splits_final.json`` content with all cases of a patient in one fold,
    stratified by modality.

    Patients are grouped into strata by the set of modalities they contribute (with
    ``--unpaired``: one modality each; with partial labels, e.g. MS-CMRSeg's LGE: the few
    patients labelled in that modality form a stratum of their own); within a stratum the
    order is a seeded permutation. Strata of patients with more modalities come first, then
    the rarer ones. Without ``case_modality`` all patients form one stratum.

    ``"5-fold"``: the strata are dealt one after the other over the 5 folds, the dealing
    position carrying on from one stratum to the next, so that every fold holds each
    stratum as evenly as the counts allow and the folds differ in size by at most one.
    ``"80-20"``: one fold; validation takes 20 % of the patients (at least one), drawn
    from the strata in turn, the paper's protocol; a few more if that is what it takes for
    every modality to be in validation (e.g. 2 of 5 patients with ``--unpaired``).
    """
    patients = sorted(set(case_patient.values()))
    if split == "5-fold":
        if len(patients) < 5:
            raise ConversionError(f"a 5-fold split needs at least 5 patients, the input has {len(patients)} "
                                  f"({patients}); use --split 80-20 or convert more patients")
    elif split == "80-20":
        if len(patients) < 2:
            raise ConversionError(f"an 80/20 split needs at least 2 patients, the input has {len(patients)}")
    else:
        raise ConversionError(f"unknown split {split!r}; choose one of {list(SPLIT_CHOICES)}")
    strata = _patient_strata(case_patient, case_modality or {}, seed)
    if split == "5-fold":
        dealt = [patient for _, stratum in strata for patient in stratum]
        val_sets = [set(dealt[k::5]) for k in range(5)]
    else:
        in_turn = [(signature, stratum[i]) for i in range(max(len(s) for _, s in strata))
                   for signature, stratum in strata if i < len(stratum)]
        n_val = max(1, int(round(0.2 * len(patients))))
        # a validation part without one of the modalities is of no use to the multi-modality
        # trainers: take further patients in turn while one is missing and training keeps one
        while n_val < len(in_turn) - 1:
            in_val = set().union(*(sig for sig, _ in in_turn[:n_val]))
            in_train = set().union(*(sig for sig, _ in in_turn[n_val + 1:]))
            candidate = in_turn[n_val][0]
            if not (set(candidate) - in_val) or not set(candidate) <= in_train:
                break
            n_val += 1
        val_sets = [{patient for _, patient in in_turn[:n_val]}]
    return [{"train": sorted(c for c, p in case_patient.items() if p not in val_p),
             "val": sorted(c for c, p in case_patient.items() if p in val_p)} for val_p in val_sets]


def _patient_strata(case_patient: Mapping[str, str], case_modality: Mapping[str, str],
                    seed: int) -> list[tuple[tuple, list[str]]]:
    """(modalities, patients) per group of patients that contribute the same modalities,
    the patients in a seeded order; groups with more modalities first, then the smaller ones."""
    signature: dict[str, set] = {}
    for case, patient in case_patient.items():
        signature.setdefault(patient, set()).add(case_modality.get(case))
    strata: dict[tuple, list[str]] = {}
    for patient in sorted(signature):
        strata.setdefault(tuple(sorted(signature[patient], key=str)), []).append(patient)
    rng = np.random.RandomState(seed)
    keys = sorted(strata, key=lambda k: (-len(k), len(strata[k]), tuple(map(str, k))))
    return [(key, [str(p) for p in rng.permutation(strata[key])]) for key in keys]


def check_splits_cover_modalities(splits: Sequence[Mapping[str, Sequence[str]]], case_modality: Mapping[str, str],
                                  modalities: Sequence[str], split: str) -> None:
    """Refuses splits whose training or validation part of a fold lacks a modality: the
    multi-modality trainers need every modality in both (unpaired batches, per-modality
    validation). Names the folds and the counts that make it impossible."""
    if len(modalities) < 2:
        return
    problems = []
    for k, fold in enumerate(splits):
        for part in ("train", "val"):
            present = {case_modality[c] for c in fold[part]}
            missing = [m for m in modalities if m not in present]
            if missing:
                part_name = "training" if part == "train" else "validation"
                problems.append(f"fold {k} {part_name} has no {'/'.join(missing)}")
    if problems:
        patients_per_modality = {m: len({c for c, cm in case_modality.items() if cm == m}) for m in modalities}
        raise ConversionError(
            f"the {split} split cannot give every fold all modalities: {'; '.join(problems)} "
            f"(labelled cases per modality: {patients_per_modality}; each fold needs at least one in training and "
            f"one in validation). {'Use --split 80-20, c' if split == '5-fold' else 'C'}onvert more patients, or "
            f"drop the rare modality from --modalities")


def select_unpaired(cases: Sequence[SourceCase], modalities: Sequence[str], seed: int) -> list[SourceCase]:
    """One modality per patient: patients in a seeded random order, each given the modality
    (among those it has) that has the fewest patients so far, ties broken by modality order.
    With complete data this alternates, so the modalities get equally many patients (+-1)."""
    if len(modalities) < 2:
        raise ConversionError("--unpaired needs at least two modalities (each patient keeps only one)")
    by_patient: dict[str, dict[str, SourceCase]] = {}
    for case in cases:
        by_patient.setdefault(case.patient, {})[case.modality] = case
    counts = {m: 0 for m in modalities}
    chosen = []
    for patient in np.random.RandomState(seed).permutation(sorted(by_patient)):
        available = [m for m in modalities if m in by_patient[patient]]
        modality = min(available, key=lambda m: (counts[m], modalities.index(m)))
        counts[modality] += 1
        chosen.append(by_patient[patient][modality])
    return sorted(chosen, key=lambda c: c.case_id)


# ---------------------------------------------------------------------------------------
# Output folders and the all-or-nothing transaction
# ---------------------------------------------------------------------------------------
def resolve_output_root(output_root: str | None) -> str:
    output_root = output_root or os.environ.get("nnUNet_raw")
    if not output_root:
        raise ConversionError("no output folder: give -o/--output or set the nnUNet_raw environment variable "
                              "(nnU-Net's raw data folder)")
    return os.path.abspath(output_root)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id {dataset_id} is outside 1..999 (nnU-Net names datasets DatasetXXX_Name)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ConversionError(f"dataset name {name!r} must be letters, digits, '_' or '-' (it becomes a folder name)")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _same_id_folders(root: str | None, dataset_id: int) -> list[str]:
    if not root or not os.path.isdir(root):
        return []
    prefix = f"Dataset{int(dataset_id):03d}_"
    return sorted(os.path.join(root, d) for d in os.listdir(root)
                  if d.startswith(prefix) and os.path.isdir(os.path.join(root, d)))


def check_output_free(output_root: str, dataset_id: int, folder_name: str, overwrite: bool,
                      preprocessed_root: str | None) -> list[str]:
    """The existing raw folders for this id (to replace with --overwrite); errors when one
    exists without --overwrite, or when preprocessed/results folders carry another name
    for the id (nnU-Net then refuses the id as ambiguous)."""
    nearest = _nearest_existing(output_root)  # where the new folders would be created
    if not os.path.isdir(nearest):
        raise ConversionError(f"{nearest} is a file, not a folder, so the output folder {output_root} cannot be "
                              f"there: choose a folder with -o/--output (or nnUNet_raw)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write into {nearest}: choose a writable -o/--output (or nnUNet_raw)")
    target = os.path.join(output_root, folder_name)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConversionError(f"{target} exists and is not a folder: remove or rename it, or choose another "
                              f"-d/--dataset-id or --name")
    existing = _same_id_folders(output_root, dataset_id)
    if existing and not overwrite:
        raise ConversionError(f"dataset id {dataset_id} already exists: {', '.join(existing)}. Choose another "
                              f"-d/--dataset-id, or add --overwrite to replace it once the new one is complete")
    for variable, root in (("nnUNet_preprocessed", preprocessed_root),
                           ("nnUNet_results", os.environ.get("nnUNet_results"))):
        others = [f for f in _same_id_folders(root, dataset_id) if os.path.basename(f) != folder_name]
        if others:
            raise ConversionError(
                f"{variable} holds {', '.join(others)} for dataset id {dataset_id} under another name than "
                f"{folder_name}; nnU-Net would then find two names for one id and refuse it. Remove that folder, "
                f"convert with --name {os.path.basename(others[0]).split('_', 1)[1]}, or choose another -d")
    return existing


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _missing_ancestors(path: str) -> list[str]:
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------
def _staged_splits_prefix() -> str:
    return f".splits_final.{os.getpid()}."


def _remove_leftovers(folder: str, prefix: str) -> None:
    """Removes this process' temporary files and folders (named ``prefix``...) in ``folder``."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


@dataclass
class _StagedSplits:
    """``splits_final.json`` for nnUNet_preprocessed, written next to its target, not yet in place."""

    temporary: str
    target: str
    created_dirs: list[str]

    def discard(self) -> None:
        if self.temporary and os.path.exists(self.temporary):
            os.remove(self.temporary)
        for d in self.created_dirs:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break


def _stage_preprocessed_splits(preprocessed_root: str, folder_name: str, splits: list,
                               dataset_id: int) -> _StagedSplits:
    """nnU-Net's trainer reads the split from the preprocessed folder; its planner copies the
    raw one there only when none exists and otherwise asserts that both agree, so a split
    left from an earlier conversion of this id must be replaced, not kept."""
    preprocessed_folder = os.path.join(preprocessed_root, folder_name)
    target = os.path.join(preprocessed_folder, "splits_final.json")
    if os.path.isfile(target):
        try:
            with open(target) as f:
                previous = json.load(f)
        except (ValueError, OSError) as e:
            previous, reason = None, f"it was not a readable split ({type(e).__name__}: {e})"
        else:
            reason = "it came from an earlier conversion"
        if previous != splits:
            warnings.warn(f"replaced {target}: {reason}; preprocessed data in {preprocessed_folder} may be stale: "
                          f"rerun nnUNetv2_plan_and_preprocess -d {int(dataset_id)} --clean", ConversionWarning,
                          stacklevel=3)
    staged = _StagedSplits("", target, _missing_ancestors(preprocessed_folder))
    try:
        os.makedirs(preprocessed_folder, exist_ok=True)
        handle, staged.temporary = tempfile.mkstemp(prefix=_staged_splits_prefix(), suffix=".incomplete",
                                                    dir=preprocessed_folder)
        os.close(handle)
        write_json(splits, staged.temporary)
        os.chmod(staged.temporary, 0o666 & ~current_umask())
    except OSError as e:
        staged.discard()
        raise ConversionError(f"cannot write {target} ({e.strerror or e}): make {preprocessed_folder} writable, "
                              f"or unset nnUNet_preprocessed (the split is also written to the raw dataset)") from None
    return staged


def run_conversion(cases: Sequence[SourceCase], *, converter: str, source_folder: str, dataset_id: int,
                   name: str, modalities: Sequence[str], scheme: LabelScheme, output_root: str | None = None,
                   description: str = "", reference: str = "", licence: str = "see the challenge's terms",
                   orientation: str | None = None, crop: Sequence[int] | None = None, split: str = "5-fold",
                   seed: int = DEFAULT_SEED, unpaired: bool = False, unlabelled_to_imagesTs: bool = False,
                   overwrite: bool = False, num_processes: int = 1, preprocessed_root: str | None = None,
                   options: Mapping | None = None, check_spacing: Callable[[list[CaseResult]], list[str]] | None = None
                   ) -> str:
    """Write the nnU-Net raw dataset for ``cases`` and return its folder.

    ``cases`` holds every image found (label None: unlabelled) of the chosen ``modalities``.
    ``options`` are the converter's own options, recorded with the common ones under
    ``csa_conversion`` in dataset.json. ``check_spacing`` may inspect the written spacings
    and return warnings (MM-WHS coronal slicing). ``preprocessed_root`` defaults to the
    nnUNet_preprocessed variable; when set, ``splits_final.json`` is written there too.
    """
    output_root = resolve_output_root(output_root)
    folder_name = dataset_folder_name(dataset_id, name)
    if preprocessed_root is None:
        preprocessed_root = os.environ.get("nnUNet_preprocessed") or None
    if split not in SPLIT_CHOICES:
        raise ConversionError(f"unknown split {split!r}; choose one of {list(SPLIT_CHOICES)}")
    crop_yx = None
    if crop is not None:
        if len(crop) != 2 or any(int(v) < 1 for v in crop):
            raise ConversionError(f"--crop takes two positive sizes H W in pixels, got {list(crop)}")
        crop_yx = (int(crop[0]), int(crop[1]))
    existing = check_output_free(output_root, dataset_id, folder_name, overwrite, preprocessed_root)

    if not cases:
        raise ConversionError(f"no image of the modalities {list(modalities)} found under {source_folder}; "
                              f"check -i/--input and --modalities")
    labelled = [c for c in cases if c.label is not None]
    unlabelled = sorted((c for c in cases if c.label is None), key=lambda c: c.case_id)
    for modality in modalities:
        if not any(c.modality == modality for c in labelled):
            raise ConversionError(f"no labelled {modality} image found under {source_folder}; check the input "
                                  f"folder, or leave {modality} out of --modalities")
    if unlabelled:
        fate = ("written to imagesTs" if unlabelled_to_imagesTs
                else "left out (add --unlabelled-to-imagesTs to write them to imagesTs)")
        warnings.warn(f"{len(unlabelled)} image(s) without a label file, {fate}: "
                      f"{', '.join(c.image for c in unlabelled)}", ConversionWarning, stacklevel=2)
    if not unlabelled_to_imagesTs:
        unlabelled = []
    other_modality: list[SourceCase] = []
    if unpaired:
        selected = select_unpaired(labelled, list(modalities), seed)
        # The images --unpaired leaves out are still test material: for a patient held out of
        # training, its other modality is as unseen as the held-out case itself. Kept apart
        # from imagesTr so that nnU-Net never trains on them.
        selected_ids = {c.case_id for c in selected}
        other_modality = sorted((c for c in labelled if c.case_id not in selected_ids), key=lambda c: c.case_id)
        labelled = selected
    labelled = sorted(labelled, key=lambda c: c.case_id)
    case_patient = {c.case_id: c.patient for c in labelled}
    case_modality = {c.case_id: c.modality for c in labelled}
    splits = make_patient_splits(case_patient, split, seed, case_modality)
    check_splits_cover_modalities(splits, case_modality, modalities, split)

    final_folder = os.path.join(output_root, folder_name)
    created_dirs = _missing_ancestors(output_root)
    try:
        os.makedirs(output_root, exist_ok=True)
    except OSError as e:  # what os.access cannot foresee: a read-only file system, a full disk
        raise ConversionError(f"cannot create the output folder {output_root} ({e.strerror}): choose a writable "
                              f"-o/--output (or nnUNet_raw)") from None
    # the process id in the temporary names lets the cleanup find them even when a signal
    # interrupts their creation before their names are known here
    temp_prefix = f".{folder_name}.incomplete-{os.getpid()}-"
    committed = False
    staged_splits = None
    try:
        try:
            temp_folder = tempfile.mkdtemp(prefix=temp_prefix, dir=output_root)
        except OSError as e:
            raise ConversionError(f"cannot write into {output_root} ({e.strerror}): choose a writable "
                                  f"-o/--output (or nnUNet_raw)") from None
        os.chmod(temp_folder, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        jobs = []
        for sub in (("imagesTr", "labelsTr") + (("imagesTs",) if unlabelled else ())
                    + ((OTHER_MODALITY_IMAGES, OTHER_MODALITY_LABELS) if other_modality else ())):
            os.makedirs(os.path.join(temp_folder, sub))
        for group, images, labels in ((labelled, "imagesTr", "labelsTr"),
                                      (other_modality, OTHER_MODALITY_IMAGES, OTHER_MODALITY_LABELS)):
            for c in group:
                jobs.append(CaseJob(c.case_id, c.image, c.label,
                                    os.path.join(temp_folder, images, f"{c.case_id}_0000{FILE_ENDING}"),
                                    os.path.join(temp_folder, labels, f"{c.case_id}{FILE_ENDING}"),
                                    scheme, orientation, crop_yx))
        for c in unlabelled:
            jobs.append(CaseJob(c.case_id, c.image, None,
                                os.path.join(temp_folder, "imagesTs", f"{c.case_id}_0000{FILE_ENDING}"),
                                None, scheme, orientation, crop_yx))
        results = _run_jobs(jobs, num_processes)

        for result in results:
            for message in result.warnings:
                warnings.warn(message, ConversionWarning, stacklevel=2)
        training_results = [r for r in results if r.case_id in case_patient]
        present = set().union(*(r.classes_present for r in training_results))
        missing = [scheme.class_names[i] for i in range(1, len(scheme.class_names)) if i not in present]
        if missing:
            warnings.warn(f"class(es) {missing} appear in no label of {folder_name}; nnU-Net will train them "
                          f"without a single example. Check the input and the label options", ConversionWarning,
                          stacklevel=2)
        if check_spacing is not None:
            for message in check_spacing(training_results):
                warnings.warn(message, ConversionWarning, stacklevel=2)

        tags = ModalityTags(tuple(modalities), {c.case_id: c.modality for c in labelled})
        conversion = {"converter": converter, "source": os.path.abspath(source_folder),
                      "modalities": list(modalities), "split": split, "seed": seed, "unpaired": unpaired,
                      "crop": list(crop_yx) if crop_yx else None, "orientation": orientation,
                      "unlabelled_to_imagesTs": unlabelled_to_imagesTs, **dict(options or {}),
                      "phantom": read_phantom_marker(source_folder)}
        dataset_json = {
            "name": name,
            "description": (f"SYNTHETIC phantom in the {converter} layout (nnUNetv2_csa_phantom), not real images; "
                            f"the layout's dataset: {description}") if conversion["phantom"] else description,
            "reference": reference,
            "licence": licence,
            # One channel shared by all modalities, z-score normalised per image. Not "CT":
            # nnU-Net's CT normalisation clips and scales with one intensity window computed
            # over the whole dataset, which would apply CT statistics to the MR images too.
            "channel_names": {"0": "zscore"},
            "labels": scheme.dataset_json_labels(),
            "numTraining": len(labelled),
            "file_ending": FILE_ENDING,
            **tags.to_dataset_json_entries(),
            CASE_PATIENT_KEY: dict(sorted(case_patient.items())),
            CONVERSION_KEY: conversion,
        }
        if other_modality:
            dataset_json[OTHER_MODALITY_KEY] = {c.case_id: {"modality": c.modality, "patient": c.patient}
                                                for c in other_modality}
        write_json(dataset_json, os.path.join(temp_folder, "dataset.json"))
        write_json(splits, os.path.join(temp_folder, "splits_final.json"))

        # the split for nnU-Net_preprocessed is staged too: raw dataset and split land together or not at all
        if preprocessed_root:
            staged_splits = _stage_preprocessed_splits(preprocessed_root, folder_name, splits, dataset_id)

        # commit: the old dataset (if --overwrite) moves aside only now that the new one is complete
        set_aside = []
        moved = False
        try:
            for old in existing:
                aside = tempfile.mkdtemp(prefix=f".{os.path.basename(old)}.replaced-", dir=output_root)
                os.replace(old, os.path.join(aside, "old"))
                set_aside.append((old, aside))
            os.replace(temp_folder, final_folder)
            moved = True
            if staged_splits is not None:
                os.replace(staged_splits.temporary, staged_splits.target)
            committed = True
        except OSError as e:
            if moved:
                os.replace(final_folder, temp_folder)
            for old, aside in set_aside:
                os.replace(os.path.join(aside, "old"), old)
                os.rmdir(aside)
            raise ConversionError(f"could not move the converted dataset into place ({e}); nothing was "
                                  f"changed") from None
        for _, aside in set_aside:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if not committed:
            _remove_leftovers(output_root, temp_prefix)
            if staged_splits is not None:
                staged_splits.discard()
            elif preprocessed_root:
                _remove_leftovers(os.path.join(preprocessed_root, folder_name), _staged_splits_prefix())
            for d in created_dirs:  # deepest first
                try:
                    os.rmdir(d)
                except OSError:
                    break

    stale = stale_preprocessed_message(preprocessed_root, folder_name, dataset_json, dataset_id)
    if stale:
        warnings.warn(stale, ConversionWarning, stacklevel=2)
    splits_written = [os.path.join(final_folder, "splits_final.json")]
    if staged_splits is not None:
        splits_written.append(staged_splits.target)

    print_summary(final_folder, labelled, unlabelled, modalities, splits, splits_written, other_modality)
    return final_folder


#: what nnU-Net's preprocessed copy of dataset.json must agree on with the raw one
_PREPROCESSED_AGREES_ON = ("labels", "numTraining", MODALITIES_KEY, CASE_MODALITY_KEY)


def stale_preprocessed_message(preprocessed_root: str | None, folder_name: str, dataset_json: dict,
                               dataset_id: int) -> str | None:
    """A warning when ``nnUNet_preprocessed`` holds a dataset.json of an earlier conversion
    (e.g. replaced with --overwrite) that differs from the new one in labels, cases or
    modalities: nnU-Net trains from the preprocessed copy until the dataset is preprocessed again."""
    path = os.path.join(preprocessed_root, folder_name, "dataset.json") if preprocessed_root else None
    if path is None or not os.path.isfile(path):
        return None
    rerun = f"run nnUNetv2_plan_and_preprocess -d {dataset_id} again before training"
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return f"{path} is not readable JSON: {rerun}"
    differing = [key for key in _PREPROCESSED_AGREES_ON if old.get(key) != dataset_json.get(key)]
    if not differing:
        return None
    return (f"{path} is nnU-Net's preprocessed copy of an earlier conversion and differs from the new dataset in "
            f"{', '.join(differing)}; nnU-Net trains from the preprocessed data, so {rerun}")


def print_summary(folder: str, labelled: Sequence[SourceCase], unlabelled: Sequence[SourceCase],
                  modalities: Sequence[str], splits: list, splits_written: list[str],
                  other_modality: Sequence[SourceCase] = ()) -> None:
    print(f"cases per modality ({len({c.patient for c in labelled})} patients):")
    for modality in modalities:
        n_train = sum(c.modality == modality for c in labelled)
        n_test = sum(c.modality == modality for c in unlabelled)
        n_other = sum(c.modality == modality for c in other_modality)
        extra = f", {n_test} unlabelled in imagesTs" if n_test else ""
        if n_other:
            extra += (f", {n_other} left out by --unpaired in {OTHER_MODALITY_IMAGES} (test cases for the patients "
                      f"a fold holds out; never train on them)")
        print(f"  {modality}: {n_train} training cases{extra}")
    print(f"splits: {len(splits)} fold(s), grouped by patient, in {' and '.join(splits_written)}")
    print(f"dataset written to {folder}")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser, modality_choices: Sequence[str],
                         default_modalities: Sequence[str], default_name: str, default_num_processes: int = 1
                         ) -> None:
    parser.add_argument("-i", "--input", required=True,
                        help="folder with the challenge's files (searched recursively)")
    parser.add_argument("-o", "--output", default=None,
                        help="nnU-Net raw data folder to write Dataset{ID}_{NAME} into "
                             "(default: the nnUNet_raw environment variable)")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", default=default_name, help=f"dataset name (default: {default_name})")
    parser.add_argument("--modalities", nargs="+", choices=list(modality_choices), default=list(default_modalities),
                        metavar="MODALITY",
                        help=f"modalities to convert, from {list(modality_choices)}; their order is the modality "
                             f"index order (default: {' '.join(default_modalities)})")
    parser.add_argument("--crop", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="crop every image and label to H x W pixels in-plane, centred on the bounding box of "
                             "the labelled heart (all slices), padding with the image minimum where needed. It "
                             "uses the labels, so it is an evaluation protocol (the paper's 224 224), not "
                             "something a deployed model can rely on; it also cuts CPU cost several-fold")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="5-fold",
                        help="splits_final.json: nnU-Net's 5 folds, or the paper's single 80/20 split; always "
                             "grouped by patient (default: 5-fold)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the split and of --unpaired (default: {DEFAULT_SEED}, nnU-Net's)")
    parser.add_argument("--unpaired", action="store_true",
                        help="each patient contributes only one modality (patients shuffled with the seed and "
                             "assigned to the modalities in turn): a truly unpaired set from paired data. The "
                             f"images left out go to {OTHER_MODALITY_IMAGES}/{OTHER_MODALITY_LABELS}, listed "
                             f"under '{OTHER_MODALITY_KEY}' in dataset.json: nnUNetv2_csa_benchmark tests on "
                             "those of the held-out patients")
    parser.add_argument("--unlabelled-to-imagesTs", action="store_true",
                        help="write images without a label to imagesTs (default: report and leave them out)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset with this id, once the new one is complete")
    parser.add_argument("-np", "--num-processes", type=int, default=default_num_processes,
                        help=f"worker processes; more than 1 pays off only for large volumes such as CT, since "
                             f"each worker needs about a second to start (default: {default_num_processes})")


def common_kwargs(args: argparse.Namespace) -> dict:
    return dict(output_root=args.output, dataset_id=args.dataset_id, name=args.name,
                modalities=tuple(args.modalities), crop=args.crop, split=args.split, seed=args.seed,
                unpaired=args.unpaired, unlabelled_to_imagesTs=args.unlabelled_to_imagesTs,
                overwrite=args.overwrite, num_processes=args.num_processes)


def run_main(convert: Callable[..., str], args: argparse.Namespace, **kwargs) -> int:
    """Run a converter from the command line: warnings as one line each, bad input (a
    ConversionError, a ModalityTagError) as ``error: ...`` on stderr with exit code 1."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    def stop(signum, frame):
        # unwinds like Ctrl-C, so that the all-or-nothing cleanup runs: no hidden
        # .Dataset*.incomplete-* folder is left behind by a terminated conversion
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConversionWarning)
        warnings.showwarning = show
        try:
            convert(**kwargs)
        except UserInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0
