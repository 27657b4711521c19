"""What a converter describes (its label codes, its cases) and what becomes of one case: its
files read and checked (readable, complete, 3D, label codes known, label on the image's grid),
the labels remapped to nnU-Net's classes, optionally reoriented and cropped, written.

:func:`convert_case` runs in worker processes: plain data in and out.
"""
from __future__ import annotations

import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from dataset_conversion.errors import ConversionError
from nnunetv2_csa.image_files import (IncompleteFileError, NonFiniteVoxelsError, check_file_complete, check_finite,
                                     grid_differences)


FILE_ENDING = ".nii.gz"


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


def read_image(path: str) -> sitk.Image:
    """A complete, readable, single-component 3D image, or a ConversionError naming the file."""
    try:
        check_file_complete(path, dimensions=(3,))
    except IncompleteFileError as e:
        raise ConversionError(str(e)) from None
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:  # the header read, the voxels did not
        reason = str(e).strip().splitlines()[-1]
        raise ConversionError(f"cannot read {path}: {reason}. Download or copy it again") from None


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
    try:
        check_finite(job.image_path)
    except NonFiniteVoxelsError as e:
        raise ConversionError(str(e)) from None
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


def run_case_jobs(jobs: list[CaseJob], num_processes: int) -> list[CaseResult]:
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

