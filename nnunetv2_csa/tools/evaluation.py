"""Evaluation for the paper's tables: Dice and surface distances per case, class and modality,
and a patient-level Wilcoxon signed-rank test between two methods.

Inputs are nnU-Net folders: ``{case}{file_ending}`` (``.nii.gz`` by default) in a prediction
folder and in a reference folder, label maps with the values of dataset.json ``"labels"``
(``{"background": 0, "myocardium": 1, ...}``). Every foreground label is one class.

Metrics (per case and foreground class)
---------------------------------------
* ``dice`` = 2|P ∩ R| / (|P| + |R|) on voxels.
* Surfaces: the voxels of a mask that have a face neighbour (6-connectivity in 3D,
  4 in 2D) outside the mask, from ``sitk.LabelContour(fullyConnected=False)``. The image
  border counts as outside, as in MedPy and MONAI, so a structure cut by the field of view
  has a surface there. An axis of length 1 (a single-slice image stored in 3D) is not
  padded: such an image is evaluated as the 2D image it is.
* Surface distances in millimetres, using the image spacing: for each surface voxel of
  one mask, the Euclidean distance to the nearest surface voxel of the other mask, read
  from ``sitk.SignedMaurerDistanceMap(other surface, useImageSpacing=True)`` (0 on the
  surface itself). The map is of the surface voxels rather than of the mask because the
  zero level of a mask's map is ITK's fully connected contour, a superset of the
  face-connected surface. Taking both directions gives the pooled symmetric set
  ``D = d(∂P -> ∂R) ∪ d(∂R -> ∂P)``; a test checks it against brute-force pairwise distances.
* ``hd`` = max(D), the symmetric Hausdorff distance.
* ``hd95`` (default, ``hd95="directed"``) = max(P95(d(∂P -> ∂R)), P95(d(∂R -> ∂P))), the
  larger of the two directed 95th percentiles (numpy's linear interpolation): the
  definition of MONAI's ``compute_hausdorff_distance(percentile=95)`` and DeepMind's
  surface-distance, which nnU-Net's maintainers point users to, so that tables made here
  compare with papers that used them. ``hd95="pooled"`` gives MedPy's ``hd95``, the 95th
  percentile of the pooled set D, which came out 17 % lower on average on real predictions.
* ``assd`` = mean(D) = (Σ d(∂P -> ∂R) + Σ d(∂R -> ∂P)) / (|∂P| + |∂R|), the pooled
  average symmetric surface distance of Heimann et al. 2009 and MONAI (MedPy averages
  the two directed means instead).

All metrics are **3D, per volume**, with the true 3D spacing, as nnU-Net reports them
(the paper trains on 2D slices but reports volume Dice and surface distances).

Empty-mask conventions (column ``flag``; counted in ``summary.json`` under ``"flags"``)
--------------------------------------------------------------------------------------
* ``both_empty``: the class is absent from prediction and reference: Dice = 1,
  HD = HD95 = ASSD = 0 (a correct "not there"). A class that is both_empty in every case
  is listed under ``"absent_classes"`` in ``summary.json`` (and named by the command): its
  Dice 1 is this convention, not a result, and lifts the means.
* ``pred_empty`` / ``ref_empty``: exactly one of the two is empty: Dice = 0, and
  HD = HD95 = ASSD = the physical diagonal of the image, ``sqrt(Σ (size_i * spacing_i)^2)``
  in mm, which is at least every distance two voxels of the image can have: the worst
  possible value, finite, so that means never become NaN or infinite.
* ``none``: both masks hold the class.

Geometry: prediction and reference must share one voxel grid
(``nnunetv2_csa.image_files.grid_differences``, the converters' check too); otherwise a
``ValueError`` names both files.

Statistics: ``summarize`` gives mean, sample standard deviation (ddof=1; NaN, written as
``null`` in JSON, for a single case), median and n per modality, class and metric.
``mean_over_classes`` first averages a case's classes, then summarizes over cases (the
case is the unit, as in the Wilcoxon test). Without modality tags every case belongs to
the modality ``"all"``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import stats
from tqdm import tqdm

from nnunetv2_csa.atomic_files import replace_file
from nnunetv2_csa.errors import first_few, one_line_errors
from nnunetv2_csa.image_files import check_file_complete, check_name_encoding, grid_differences, images_not_read
from nnunetv2_csa.tools.commands import sigterm_unwinds
from nnunetv2_csa.tools.inputs import check_output_folder, file_ending_of, integer_at_least, read_json_file
from nnunetv2_csa.tools.statistics import bootstrap_mean_ci

METRICS = ("dice", "hd", "hd95", "assd")
ALL_MODALITIES = "all"
MEAN_OVER_CLASSES = "mean_over_classes"
FLAG_NONE = "none"
FLAGS = ("both_empty", "pred_empty", "ref_empty")
HD_PERCENTILE = 95.0
#: the definitions of HD95 (see the module docstring), as the reports state them
HD95_DEFINITIONS = {
    "directed": "max of the two directed 95th percentiles of the surface distances (MONAI, DeepMind surface-distance)",
    "pooled": "95th percentile of the pooled surface distances of both directions (MedPy)",
}
DEFAULT_HD95 = "directed"

ROW_COLUMNS = ("case", "class_name", "label", "dice", "hd", "hd95", "assd",
               "n_ref_voxels", "n_pred_voxels", "flag")


# --------------------------------------------------------------------------- one case

def _read_label_map(path: str, labels: Mapping[str, int], role: str) -> sitk.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{role} file {path} does not exist")
    check_file_complete(path)  # a truncated file would be read as zeros and scored
    image = sitk.ReadImage(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{role} file {path} has {image.GetNumberOfComponentsPerPixel()} components "
                         f"per voxel; expected a single-channel label map")
    values = np.unique(sitk.GetArrayViewFromImage(image))
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"{role} file {path} holds non-integer values "
                         f"{values[np.mod(values, 1) != 0][:5].tolist()}: expected a label map")
    unknown = sorted(set(values.astype(np.int64).tolist()) - set(labels.values()))
    if unknown:
        raise ValueError(f"{role} file {path} holds label values {unknown} that are not in the labels "
                         f"{dict(labels)}; pass the dataset.json of this dataset, or remap the file")
    return image


def _check_same_geometry(prediction: sitk.Image, reference: sitk.Image,
                         prediction_file: str, reference_file: str) -> None:
    problems = grid_differences(prediction, reference)
    if problems:
        raise ValueError(
            f"prediction {prediction_file} and reference {reference_file} do not share a geometry "
            f"({'; '.join(problems)}). Predictions must be written on the reference's grid "
            f"(nnU-Net's export does this); check that the two folders belong together")


def _physical_diagonal_mm(image: sitk.Image) -> float:
    extent = np.asarray(image.GetSize(), dtype=float) * np.asarray(image.GetSpacing(), dtype=float)
    return float(np.sqrt(np.sum(extent ** 2)))


def _surface_mask_and_distance(mask: np.ndarray, spacing_zyx: Sequence[float],
                               pad_axes: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Surface voxels of ``mask`` and the unsigned distance (mm) of every voxel to that surface.

    Both are returned on the padded grid (one background voxel on each side of every axis
    in ``pad_axes``): the padding makes the image border count as outside."""
    pad = [(1, 1) if p else (0, 0) for p in pad_axes]
    image = sitk.GetImageFromArray(np.pad(mask, pad).astype(np.uint8))
    image.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    surface_image = sitk.LabelContour(image, fullyConnected=False, backgroundValue=0)
    surface = sitk.GetArrayFromImage(surface_image) > 0
    # The map is taken of the surface voxels, not of the mask: outside a set, Maurer's value is the
    # exact distance to the set's nearest voxel, whereas the zero level of the mask's own map is
    # ITK's fully connected contour, which holds more voxels than the face-connected surface.
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        surface_image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True, backgroundValue=0))
    return surface, np.where(surface, 0.0, distance)


def symmetric_surface_distances(prediction_mask: np.ndarray, reference_mask: np.ndarray,
                                spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm (prediction -> reference, reference -> prediction).

    ``spacing_zyx`` is in numpy axis order (SimpleITK's spacing reversed). Both masks must be
    non-empty. Work is done on the bounding box of the union of the masks (plus one voxel),
    which gives the same distances as the full image and is much faster on large volumes."""
    if prediction_mask.shape != reference_mask.shape:
        raise ValueError(f"mask shapes differ: {prediction_mask.shape} vs {reference_mask.shape}")
    if not prediction_mask.any() or not reference_mask.any():
        raise ValueError("surface distances need two non-empty masks")
    union = prediction_mask | reference_mask
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        box.append(slice(max(present[0] - 1, 0), min(present[-1] + 2, union.shape[axis])))
    box = tuple(box)
    # pad every axis the image extends along (length > 1), also where the box is cut to one voxel
    pad_axes = [n > 1 for n in union.shape]
    pred_surface, pred_distance = _surface_mask_and_distance(prediction_mask[box], spacing_zyx, pad_axes)
    ref_surface, ref_distance = _surface_mask_and_distance(reference_mask[box], spacing_zyx, pad_axes)
    return ref_distance[pred_surface].astype(np.float64), pred_distance[ref_surface].astype(np.float64)


def _class_row(prediction_mask: np.ndarray, reference_mask: np.ndarray, spacing_zyx: Sequence[float],
               diagonal_mm: float, hd95: str = DEFAULT_HD95) -> dict:
    n_pred = int(prediction_mask.sum())
    n_ref = int(reference_mask.sum())
    if n_pred == 0 and n_ref == 0:
        return dict(dice=1.0, hd=0.0, hd95=0.0, assd=0.0, n_ref_voxels=0, n_pred_voxels=0, flag="both_empty")
    if n_pred == 0 or n_ref == 0:
        return dict(dice=0.0, hd=diagonal_mm, hd95=diagonal_mm, assd=diagonal_mm,
                    n_ref_voxels=n_ref, n_pred_voxels=n_pred,
                    flag="pred_empty" if n_pred == 0 else "ref_empty")
    intersection = int(np.count_nonzero(prediction_mask & reference_mask))
    pred_to_ref, ref_to_pred = symmetric_surface_distances(prediction_mask, reference_mask, spacing_zyx)
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    if hd95 == "pooled":
        hd95_value = np.percentile(pooled, HD_PERCENTILE)
    else:
        hd95_value = max(np.percentile(pred_to_ref, HD_PERCENTILE), np.percentile(ref_to_pred, HD_PERCENTILE))
    return dict(dice=2.0 * intersection / (n_pred + n_ref), hd=float(pooled.max()),
                hd95=float(hd95_value), assd=float(pooled.mean()),
                n_ref_voxels=n_ref, n_pred_voxels=n_pred, flag=FLAG_NONE)


def foreground_classes(labels: Mapping[str, int]) -> list[tuple[str, int]]:
    """(name, value) of each foreground class, sorted by value; a ValueError for labels this
    evaluation cannot score (none, regions, an ignore label, repeated values, not an object)."""
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"labels {labels!r}: give dataset.json 'labels' as an object name -> integer, e.g. "
                         f"{{'background': 0, 'myo': 1}}")
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ValueError(f"label {name!r} is a region {value}: region-based labels are not supported "
                             f"by this evaluation; give one integer per class")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"label {name!r} has value {value!r}; expected an integer")
    if "ignore" in labels:
        raise ValueError("labels contain an 'ignore' label: ignore regions are not supported by this "
                         "evaluation; remove it from the labels passed here")
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise ValueError(f"label values repeat: {dict(labels)}")
    return sorted(((n, int(v)) for n, v in labels.items() if int(v) != 0), key=lambda nv: nv[1])


def _case_name(path: str, file_ending: str) -> str:
    name = os.path.basename(path)
    return name[:-len(file_ending)] if name.endswith(file_ending) else os.path.splitext(name)[0]


def evaluate_case(prediction_file: str, reference_file: str, labels: dict[str, int],
                  file_ending: str = ".nii.gz", hd95: str = DEFAULT_HD95) -> list[dict]:
    """One row per foreground class of ``labels``: case, class_name, label, dice, hd, hd95, assd
    (distances in mm), n_ref_voxels, n_pred_voxels, flag. ``hd95``: "directed" or "pooled".
    See the module docstring."""
    if hd95 not in HD95_DEFINITIONS:
        raise ValueError(f"hd95 must be one of {list(HD95_DEFINITIONS)}, not {hd95!r}")
    classes = foreground_classes(labels)
    prediction = _read_label_map(prediction_file, labels, "prediction")
    reference = _read_label_map(reference_file, labels, "reference")
    _check_same_geometry(prediction, reference, prediction_file, reference_file)
    prediction_array = sitk.GetArrayViewFromImage(prediction)
    reference_array = sitk.GetArrayViewFromImage(reference)
    spacing_zyx = tuple(reversed(reference.GetSpacing()))
    diagonal_mm = _physical_diagonal_mm(reference)
    case = _case_name(reference_file, file_ending)
    rows = []
    for class_name, label in classes:
        row = dict(case=case, class_name=class_name, label=label)
        row.update(_class_row(prediction_array == label, reference_array == label, spacing_zyx, diagonal_mm,
                              hd95))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- a folder

def _cases_in(folder: str, file_ending: str, role: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{role} folder {folder} does not exist")
    files = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
    for name in files:  # before a name reaches a message or SimpleITK, which aborts on a name that is not UTF-8
        check_name_encoding(os.path.join(folder, name))
    skipped = images_not_read(files, file_ending)
    if skipped:
        # another format (.mha, .nrrd) or another spelling (.NII.GZ) is a case the user meant to score
        warnings.warn(f"{len(skipped)} image file(s) in the {role} folder {folder} do not end in {file_ending!r} "
                      f"and were not evaluated: {first_few(skipped, 10)}; convert or rename them", stacklevel=3)
    return {name[:-len(file_ending)]: os.path.join(folder, name) for name in files if name.endswith(file_ending)}


#: the files the evaluation writes into its output folder
OUTPUT_FILES = ("metrics.csv", "summary.json")


def _check_output_folder(folder: str) -> None:
    """``folder`` can be written, and holds no metrics.csv or summary.json but the evaluation's own
    (nnU-Net writes a summary.json of its own into a prediction folder)."""
    check_output_folder(folder, "-o")
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            ours = "definitions" in json.load(f)
    except (OSError, ValueError, TypeError):
        ours = False
    present = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(folder, name))]
    if present and not ours:
        raise ValueError(f"{folder} holds {' and '.join(present)} that nnUNetv2_csa_evaluate did not write (nnU-Net's "
                         f"own summary.json?); give -o a new folder, or one this command wrote before")


def _evaluate_case_star(args) -> list[dict]:
    return evaluate_case(*args)


def _number_or_none(value):
    value = float(value)
    return None if math.isnan(value) else value


def evaluate_folder(prediction_folder: str, reference_folder: str, labels: dict[str, int],
                    case_modality: dict[str, str] | None = None, output_folder: str | None = None,
                    num_processes: int = 1, allow_missing: bool = False,
                    case_patient: dict[str, str] | None = None,
                    file_ending: str = ".nii.gz", hd95: str = DEFAULT_HD95,
                    cases: Sequence[str] | None = None) -> pd.DataFrame:
    """Evaluate every reference case (or only ``cases``, whose references must exist) against its
    prediction; one row per case and class.

    ``case_modality`` ({case: modality}) adds a ``modality`` column, ``case_patient`` a
    ``patient`` column (needed for ``wilcoxon_between_methods(pair_on="patient")``); a case
    missing from a given map is an error. A reference case without prediction is an error
    unless ``allow_missing``, which evaluates the cases present in both folders and warns
    about (and records in ``summary.json`` and ``df.attrs["skipped"]``) the rest. With
    ``output_folder`` writes ``metrics.csv`` and ``summary.json`` there; it is checked before any
    case is scored."""
    if os.path.realpath(prediction_folder) == os.path.realpath(reference_folder):
        raise ValueError(f"the prediction and the reference folder are both {prediction_folder}: every case would "
                         f"be scored against itself (Dice 1); give -pred the predictions and -ref the references")
    if output_folder is not None:
        _check_output_folder(output_folder)
    predictions = _cases_in(prediction_folder, file_ending, "prediction")
    references = _cases_in(reference_folder, file_ending, "reference")
    if cases is not None:
        unknown = sorted(set(cases) - set(references))
        if unknown:
            raise FileNotFoundError(f"{len(unknown)} case(s) to score have no reference in {reference_folder}: "
                                    f"{first_few(unknown, 10)}")
        references = {c: references[c] for c in cases}
        predictions = {c: f for c, f in predictions.items() if c in references}
    if case_modality is not None:
        # a reference folder of several modalities (labelsTr) against the predictions of one:
        # compare the references of the predictions' modalities only, and say so
        predicted = {case_modality[c] for c in predictions if c in case_modality}
        other = sorted(c for c in references if c in case_modality and case_modality[c] not in predicted)
        if predicted and other:
            references = {c: f for c, f in references.items() if c not in other}
            print(f"comparing the {sorted(predicted)} reference cases of {reference_folder} (the modalities of the "
                  f"predictions); {len(other)} reference case(s) of other modalities left aside", file=sys.stderr)
    missing_prediction = sorted(set(references) - set(predictions))
    missing_reference = sorted(set(predictions) - set(references))
    if (missing_prediction or missing_reference) and not allow_missing:
        parts = []
        if missing_prediction:
            parts.append(f"{len(missing_prediction)} reference case(s) of {reference_folder} have no "
                         f"prediction in {prediction_folder}: {missing_prediction}")
        if missing_reference:
            parts.append(f"{len(missing_reference)} prediction(s) in {prediction_folder} have no "
                         f"reference in {reference_folder}: {missing_reference}")
        raise FileNotFoundError("; ".join(parts) + ". Pass allow_missing=True (--allow-missing) to "
                                "evaluate only the cases present in both folders")
    cases = sorted(set(references) & set(predictions))
    if not cases:
        raise FileNotFoundError(f"no case has both a prediction in {prediction_folder} and a reference in "
                                f"{reference_folder} (files ending in {file_ending!r})")
    if missing_prediction or missing_reference:
        warnings.warn(f"evaluating {len(cases)} case(s) present in both folders; skipped "
                      f"{len(missing_prediction)} without prediction {missing_prediction} and "
                      f"{len(missing_reference)} without reference {missing_reference}", stacklevel=2)
    for name, plural, mapping in (("modality", "modalities", case_modality), ("patient", "patients", case_patient)):
        if mapping is not None:
            untagged = [c for c in cases if c not in mapping]
            if untagged:
                raise ValueError(f"{len(untagged)} case(s) have no {name} in the given case -> {name} map "
                                 f"(dataset.json 'csa_case_{name}'): {untagged}; add them to the map, or "
                                 f"evaluate without {plural} (--no-modality)")
    foreground_classes(labels)  # fail before starting workers

    jobs = [(predictions[c], references[c], labels, file_ending, hd95) for c in cases]
    # the bar is closed (its line ended) also when a case fails, so that the error gets a line of its own
    per_case = []
    with tqdm(total=len(jobs), desc="evaluating") as bar, contextlib.ExitStack() as stack:
        if num_processes > 1 and len(jobs) > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))))
            results = pool.imap(_evaluate_case_star, jobs)
        else:
            results = (evaluate_case(*job) for job in jobs)
        for rows in results:
            per_case.append(rows)
            bar.update()

    df = pd.DataFrame([row for rows in per_case for row in rows], columns=list(ROW_COLUMNS))
    if case_modality is not None:
        df.insert(1, "modality", df["case"].map(case_modality))
    if case_patient is not None:
        df.insert(1, "patient", df["case"].map(case_patient))
    df.attrs["skipped"] = {"missing_prediction": missing_prediction, "missing_reference": missing_reference}

    if output_folder is not None:
        os.makedirs(output_folder, exist_ok=True)
        summary = _summary_json(df, {c: (predictions[c], references[c]) for c in cases}, hd95)

        def write_summary(path):
            with open(path, "w") as f:
                json.dump(summary, f, indent=2, sort_keys=False)
        # each file whole or not at all; summary.json first, since it marks the folder as this
        # command's (_check_output_folder): a run stopped between the two can be run again
        replace_file(os.path.join(output_folder, "summary.json"), write_summary)
        replace_file(os.path.join(output_folder, "metrics.csv"), lambda path: df.to_csv(path, index=False))
    return df


#: what summary.json says each of its numbers is; HD95's entry comes from HD95_DEFINITIONS, the
#: table the computation itself chooses its definition from
DEFINITIONS = {
    "distances": "3D per volume, millimetres, surfaces = face-connected contour voxels (image border counts as "
                 "outside)",
    "hd": "max of the pooled symmetric surface distances",
    "assd": "mean of the pooled symmetric surface distances",
    "both_empty": "dice 1, distances 0; such rows count in every mean",
    "pred_empty/ref_empty": "dice 0, distances = physical image diagonal in mm",
    "absent_classes": "classes in no prediction and no reference of any case: their dice 1 and distances 0 are the "
                      "both_empty convention, not a result, and lift mean and foreground_mean",
    "std": "sample standard deviation over cases (ddof=1), null for a single case",
    "mean_over_classes": "per case mean over classes, then statistics over cases",
}


def summary_definitions(hd95: str) -> dict[str, str]:
    """The definitions summary.json states, for the HD95 definition ``hd95`` its values were computed with."""
    return {**DEFINITIONS, "hd95": f"{HD95_DEFINITIONS[hd95]} (--hd95 {hd95})"}


def absent_classes(df: pd.DataFrame) -> list[str]:
    """The classes that no case holds in its prediction or its reference (all rows both_empty)."""
    return [name for name, rows in df.groupby("class_name", sort=False) if (rows["flag"] == "both_empty").all()]


def _summary_json(df: pd.DataFrame, files: Mapping[str, tuple[str, str]], hd95: str) -> dict:
    per_case = []
    for case, rows in df.groupby("case", sort=True):
        entry = {"case": case}
        for key in ("modality", "patient"):
            if key in rows:
                entry[key] = rows[key].iloc[0]
        entry["prediction_file"], entry["reference_file"] = files[case]
        entry["metrics"] = {
            r.class_name: {**{m: float(getattr(r, m)) for m in METRICS},
                           "n_ref_voxels": int(r.n_ref_voxels), "n_pred_voxels": int(r.n_pred_voxels),
                           "flag": r.flag}
            for r in rows.itertuples()}
        per_case.append(entry)

    mean = {name: {m: float(rows[m].mean()) for m in METRICS}
            for name, rows in df.groupby("class_name", sort=False)}
    foreground_mean = {m: float(df.groupby("case")[m].mean().mean()) for m in METRICS}

    table = summarize(df)
    per_modality = {}
    for (modality, class_name), rows in table.groupby(["modality", "class_name"], sort=False):
        per_modality.setdefault(modality, {})[class_name] = {
            r.metric: {"mean": _number_or_none(r.mean), "std": _number_or_none(r.std),
                       "median": _number_or_none(r.median), "n": int(r.n)} for r in rows.itertuples()}

    modalities = df["modality"] if "modality" in df else pd.Series(ALL_MODALITIES, index=df.index)
    flags = {}
    for (modality, class_name), rows in df.assign(modality=modalities).groupby(["modality", "class_name"],
                                                                               sort=False):
        flags.setdefault(modality, {})[class_name] = {f: int((rows["flag"] == f).sum()) for f in FLAGS}

    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean,
            "per_modality": per_modality, "flags": flags, "skipped": df.attrs.get("skipped", {}),
            "absent_classes": absent_classes(df), "definitions": summary_definitions(hd95)}


# --------------------------------------------------------------------------- statistics

def _with_modality(df: pd.DataFrame) -> pd.DataFrame:
    return df if "modality" in df else df.assign(modality=ALL_MODALITIES)


def summarize(df: pd.DataFrame, include_mean_over_classes: bool = True) -> pd.DataFrame:
    """Mean, std (ddof=1), median and n per modality, class and metric, as a long table with
    columns modality, class_name, metric, mean, std, median, n. ``mean_over_classes`` rows
    summarize each case's mean over its classes (see the module docstring)."""
    df = _with_modality(df)
    missing = [c for c in ("case", "class_name", *METRICS) if c not in df]
    if missing:
        raise ValueError(f"the table lacks columns {missing}: pass the output of evaluate_folder")
    long = df.melt(id_vars=["modality", "case", "class_name"], value_vars=list(METRICS),
                   var_name="metric", value_name="value")
    if include_mean_over_classes:
        per_case = long.groupby(["modality", "case", "metric"], sort=False, as_index=False)["value"].mean()
        long = pd.concat([long, per_case.assign(class_name=MEAN_OVER_CLASSES)], ignore_index=True)
    table = (long.groupby(["modality", "class_name", "metric"], sort=False)["value"]
             .agg(mean="mean", std="std", median="median", n="count").reset_index())
    return table


def wilcoxon_between_methods(df_a: pd.DataFrame, df_b: pd.DataFrame, metric: str = "dice",
                             by: Sequence[str] = ("modality",), pair_on: str = "case") -> pd.DataFrame:
    """Paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, its defaults: two-sided,
    zero differences dropped) of ``metric`` between method A and method B, per group of ``by``.

    The unit is a patient's case: the metric is averaged over classes per case (only over
    the (case, class) rows that both tables hold; ``n_unmatched`` counts the others), and with
    ``pair_on="patient"`` further over a patient's cases within the group; the two methods are
    paired on ``pair_on``. Returns one row per group: n, statistic, p_value, mean_a, mean_b,
    mean_difference (A - B), ci_low, ci_high (95 % percentile-bootstrap interval of the mean
    difference, ``nnunetv2_csa.tools.statistics``), n_unmatched, reason. Degenerate groups do not raise:
    n < 2 gives statistic and p_value NaN with a reason; all differences zero gives
    statistic 0 and p_value 1.0 (no evidence of a difference) with a reason."""
    by = list(by)
    if pair_on not in ("case", "patient"):
        raise ValueError(f"pair_on must be 'case' or 'patient', not {pair_on!r}")
    for name, df in (("df_a", df_a), ("df_b", df_b)):
        needed = sorted({"case", "class_name", metric, pair_on, *by} - set(df.columns))
        if needed:
            hint = (" (evaluate_folder adds 'patient' when given case_patient, 'modality' when given "
                    "case_modality)")
            raise ValueError(f"{name} lacks columns {needed}{hint}")
    keys = list(dict.fromkeys(["case", "class_name", pair_on, *by]))
    a = df_a[keys + [metric]].rename(columns={metric: "a"})
    b = df_b[keys + [metric]].rename(columns={metric: "b"})
    merged = a.merge(b, on=keys, how="outer", indicator=True)
    results = []
    groups = merged.groupby(by, sort=True) if by else [((), merged)]
    for group_key, rows in groups:
        group_key = group_key if isinstance(group_key, tuple) else (group_key,)
        both = rows[rows["_merge"] == "both"]
        n_unmatched = int((rows["_merge"] != "both").sum())
        # mean over classes per case, then over a patient's cases (a no-op when pair_on="case")
        per_case = both.groupby(list(dict.fromkeys([pair_on, "case"])), sort=True)[["a", "b"]].mean()
        paired = per_case.groupby(level=0, sort=True).mean()
        differences = (paired["a"] - paired["b"]).to_numpy()
        n = len(paired)
        row = dict(zip(by, group_key))
        row.update(metric=metric, n=n, statistic=np.nan, p_value=np.nan,
                   mean_a=float(paired["a"].mean()) if n else np.nan,
                   mean_b=float(paired["b"].mean()) if n else np.nan,
                   mean_difference=float(differences.mean()) if n else np.nan,
                   n_unmatched=n_unmatched, reason="")
        row["ci_low"], row["ci_high"] = bootstrap_mean_ci(differences)
        if n < 2:
            row["reason"] = f"fewer than 2 pairs (n={n}): no test"
        elif np.all(differences == 0):
            row.update(statistic=0.0, p_value=1.0, reason="all differences are zero: p set to 1.0")
        else:
            result = stats.wilcoxon(paired["a"].to_numpy(), paired["b"].to_numpy())
            row.update(statistic=float(result.statistic), p_value=float(result.pvalue))
        results.append(row)
    return pd.DataFrame(results, columns=by + ["metric", "n", "statistic", "p_value", "mean_a", "mean_b",
                                               "mean_difference", "ci_low", "ci_high", "n_unmatched", "reason"])


# --------------------------------------------------------------------------- command line

def _labels_from_arguments(values: Iterable[str]) -> dict[str, int]:
    labels = {"background": 0}
    for value in values:
        name, sep, number = value.rpartition("=")
        if not sep:
            name, number = f"label_{value}", value
        try:
            labels[name] = int(number)
        except ValueError:
            raise ValueError(f"-l expects integers or name=integer, got {value!r}") from None
    return labels


def _read_dataset_json(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    return read_json_file(path, "give -djfile the dataset.json of the dataset")


def run_cli(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """The command line of ``nnUNetv2_csa_evaluate``; returns the per case/class table."""
    from nnunetv2_csa.modality import (CASE_MODALITY_KEY, CASE_PATIENT_KEY, MODALITIES_KEY,
                                       modality_tags_from_dataset_json, other_modality_cases)

    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_evaluate",
        description="Dice, HD, HD95 and ASSD (mm, 3D per volume) per case, class and modality. "
                    "Writes metrics.csv and summary.json.")
    parser.add_argument("-pred", required=True, help="folder of predictions ({case}.nii.gz)")
    parser.add_argument("-ref", required=True, help="folder of reference label maps ({case}.nii.gz)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-djfile", help="dataset.json (or its folder): labels, file ending and modality tags")
    source.add_argument("-l", nargs="+", metavar="LABEL",
                        help="foreground labels as integers or name=integer (no modality tags)")
    parser.add_argument("-o", default=None,
                        help="output folder for metrics.csv and summary.json (default: PRED/csa_evaluation; "
                             "nnU-Net's own PRED/summary.json is left alone)")
    parser.add_argument("-np", type=integer_at_least(1), default=1, help="worker processes (default 1)")
    parser.add_argument("--hd95", choices=list(HD95_DEFINITIONS), default=DEFAULT_HD95,
                        help="directed (default): max of the two directed 95th percentiles, as MONAI and DeepMind's "
                             "surface-distance; pooled: MedPy's 95th percentile of both directions together")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate only the cases present in both folders instead of failing")
    parser.add_argument("--no-modality", action="store_true",
                        help="ignore the modality tags of dataset.json (e.g. for untagged test cases)")
    args = parser.parse_args(argv)

    case_modality = case_patient = None
    file_ending = ".nii.gz"
    if args.djfile is not None:
        dataset_json = _read_dataset_json(args.djfile)
        if "labels" not in dataset_json:
            raise ValueError(f"{args.djfile} has no 'labels' entry; give -djfile the dataset.json of the dataset")
        labels = dataset_json["labels"]
        file_ending = file_ending_of(dataset_json, args.djfile)
        has_tags = MODALITIES_KEY in dataset_json or CASE_MODALITY_KEY in dataset_json
        if has_tags and not args.no_modality:
            case_modality = dict(modality_tags_from_dataset_json(dataset_json, args.djfile).case_modality)
            case_patient = dict(dataset_json.get(CASE_PATIENT_KEY, {}))
            # the images an --unpaired conversion left out (imagesOtherModality) are tagged too
            for case, tag in other_modality_cases(dataset_json, args.djfile).items():
                case_modality[case] = tag["modality"]
                case_patient[case] = tag["patient"]
            case_patient = case_patient or None
        elif not has_tags:
            print(f"{args.djfile} has no modality tags: evaluating without modality", file=sys.stderr)
    else:
        labels = _labels_from_arguments(args.l)

    output_folder = args.o if args.o is not None else os.path.join(args.pred, "csa_evaluation")
    df = evaluate_folder(args.pred, args.ref, labels, case_modality=case_modality,
                         output_folder=output_folder, num_processes=args.np,
                         allow_missing=args.allow_missing, case_patient=case_patient,
                         file_ending=file_ending, hd95=args.hd95)
    table = summarize(df)
    wide = table[table["metric"].isin(METRICS)].pivot_table(
        index=["modality", "class_name"], columns="metric", values="mean", sort=False)[list(METRICS)]
    wide["n"] = table.groupby(["modality", "class_name"], sort=False)["n"].first()
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 120):
        print(wide.to_string())
    absent = absent_classes(df)
    if absent:
        print(f"class(es) {absent} appear in no prediction and no reference: their Dice 1 is the both_empty "
              f"convention, not a result, and lifts the means", file=sys.stderr)
    counts = df["flag"].value_counts()
    flagged = {f: int(counts.get(f, 0)) for f in FLAGS if counts.get(f, 0)}
    if flagged:
        print(f"empty-mask rows (see module docstring for their values): {flagged}")
    print(f"wrote {os.path.join(output_folder, 'metrics.csv')} and {os.path.join(output_folder, 'summary.json')}")
    return df


@one_line_errors(ValueError, OSError)  # bad input: files, labels, geometry; the message names the file
def main(argv: Sequence[str] | None = None) -> None:
    # a console script's return value becomes its exit status: return nothing on success
    with sigterm_unwinds():  # a terminated run leaves no temporary file behind
        run_cli(argv)


if __name__ == "__main__":
    main()
