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

Where each part lives: one case's files (reading, checks, label remapping, crop) in
:mod:`dataset_conversion.cases`, the splits and the unpaired selection in
:mod:`dataset_conversion.splits`, the all-or-nothing write in :mod:`dataset_conversion.staging`;
this module finds the files, chooses which case goes where, writes dataset.json and holds the
command line every converter shares.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from dataset_conversion.cases import FILE_ENDING, CaseJob, CaseResult, LabelScheme, SourceCase, run_case_jobs
from dataset_conversion.errors import ConversionError, ConversionWarning
from dataset_conversion.splits import (DEFAULT_SEED, SPLIT_CHOICES, check_splits_cover_modalities, make_patient_splits,
                                       select_unpaired)
from dataset_conversion.staging import (StagedDataset, check_output_free, claim_dataset_id, dataset_folder_name,
                                        resolve_output_root, stale_preprocessed_message, write_json)
from nnunetv2_csa.errors import UserInputError, first_few
from nnunetv2_csa.image_files import LOOKS_LIKE_IMAGE
from nnunetv2_csa.modality import (CASE_PATIENT_KEY, CONVERSION_KEY, OTHER_MODALITY_IMAGES, OTHER_MODALITY_KEY,
                                   OTHER_MODALITY_LABELS, ModalityTags)
from nnunetv2_csa.tools.commands import sigterm_unwinds
from nnunetv2_csa.tools.inputs import integer_at_least
from dataset_conversion.phantom_marker import read_phantom_marker




# ---------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------
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
        skipped += [f"{os.path.join(root, d)!r} (a folder)" for d in dirs if LOOKS_LIKE_IMAGE.search(d)]
        for name in sorted(files):
            match = filename_pattern.fullmatch(name)
            if match:
                found.append((match, os.path.join(root, name)))
            elif LOOKS_LIKE_IMAGE.search(name):
                skipped.append(repr(os.path.join(root, name)))
    if skipped:
        # a near miss ("Case3002_C0 (1).nii.gz", a trailing space) is data the user meant to convert
        shown = first_few(skipped, 10)
        warnings.warn(f"{len(skipped)} image-like name(s) under {input_folder} do not follow the dataset's file "
                      f"naming (NIfTI, .nii or .nii.gz, named as the release names them) and were skipped: {shown}; "
                      f"rename them, or convert other formats (.mha, .nrrd, ...) to NIfTI, if they belong to the "
                      f"dataset",
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
# The whole conversion
# ---------------------------------------------------------------------------------------


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
    crop_yx = _checked_crop(crop)
    # the id is claimed from the check that it is free until the dataset is in place
    with claim_dataset_id(output_root, dataset_id):
        existing = check_output_free(output_root, dataset_id, folder_name, overwrite, preprocessed_root)
        chosen = choose_cases(cases, modalities, source_folder, unpaired, unlabelled_to_imagesTs, seed)
        case_patient = {c.case_id: c.patient for c in chosen.training}
        case_modality = {c.case_id: c.modality for c in chosen.training}
        splits = make_patient_splits(case_patient, split, seed, case_modality)
        check_splits_cover_modalities(splits, case_modality, modalities, split)

        with StagedDataset(output_root, folder_name, preprocessed_root, dataset_id, existing) as staged:
            results = run_case_jobs(_case_jobs(chosen, staged.folder, scheme, orientation, crop_yx), num_processes)
            _warn_about_results(results, case_patient, scheme, folder_name, check_spacing)
            conversion = {"converter": converter, "source": os.path.abspath(source_folder),
                          "modalities": list(modalities), "split": split, "seed": seed, "unpaired": unpaired,
                          "crop": list(crop_yx) if crop_yx else None, "orientation": orientation,
                          "unlabelled_to_imagesTs": unlabelled_to_imagesTs, **dict(options or {}),
                          "phantom": read_phantom_marker(source_folder)}
            dataset_json = _dataset_json(chosen, modalities, scheme, name, description, reference, licence,
                                         conversion)
            write_json(dataset_json, os.path.join(staged.folder, "dataset.json"))
            write_json(splits, os.path.join(staged.folder, "splits_final.json"))
            staged.stage_preprocessed_splits(splits)
            staged.commit()

    stale = stale_preprocessed_message(preprocessed_root, folder_name, dataset_json, dataset_id)
    if stale:
        warnings.warn(stale, ConversionWarning, stacklevel=2)
    print_summary(staged.final_folder, chosen.training, chosen.unlabelled, modalities, splits, staged.splits_written,
                  chosen.other_modality)
    return staged.final_folder


#: the largest --crop side: a larger box is padded in memory (gigabytes per image), far beyond any scanner's matrix
MAX_CROP = 2048


def _checked_crop(crop: Sequence[int] | None) -> tuple[int, int] | None:
    if crop is None:
        return None
    if len(crop) != 2 or any(not 1 <= int(v) <= MAX_CROP for v in crop):
        raise ConversionError(f"--crop takes two sizes H W from 1 to {MAX_CROP} pixels, got {list(crop)}")
    return int(crop[0]), int(crop[1])


@dataclass
class ChosenCases:
    """Which found images go where: imagesTr, imagesTs, or the other-modality test folder."""
    training: list[SourceCase]
    unlabelled: list[SourceCase]  # written to imagesTs, or empty
    other_modality: list[SourceCase]  # left out of training by --unpaired


def choose_cases(cases: Sequence[SourceCase], modalities: Sequence[str], source_folder: str, unpaired: bool,
                 unlabelled_to_imagesTs: bool, seed: int) -> ChosenCases:
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
                      f"{', '.join(c.image for c in unlabelled)}", ConversionWarning, stacklevel=3)
    other_modality: list[SourceCase] = []
    if unpaired:
        selected = select_unpaired(labelled, list(modalities), seed)
        # The images --unpaired leaves out are still test material: for a patient held out of
        # training, its other modality is as unseen as the held-out case itself. Kept apart
        # from imagesTr so that nnU-Net never trains on them.
        selected_ids = {c.case_id for c in selected}
        other_modality = sorted((c for c in labelled if c.case_id not in selected_ids), key=lambda c: c.case_id)
        labelled = selected
    return ChosenCases(sorted(labelled, key=lambda c: c.case_id), unlabelled if unlabelled_to_imagesTs else [],
                       other_modality)


def _case_jobs(chosen: ChosenCases, folder: str, scheme: LabelScheme, orientation: str | None,
               crop_yx: tuple[int, int] | None) -> list[CaseJob]:
    jobs = []
    for cases, images, labels in ((chosen.training, "imagesTr", "labelsTr"),
                                  (chosen.other_modality, OTHER_MODALITY_IMAGES, OTHER_MODALITY_LABELS),
                                  (chosen.unlabelled, "imagesTs", None)):
        if not cases:
            continue
        for sub in (images, labels):
            if sub:
                os.makedirs(os.path.join(folder, sub))
        for c in cases:
            jobs.append(CaseJob(c.case_id, c.image, c.label if labels else None,
                                os.path.join(folder, images, f"{c.case_id}_0000{FILE_ENDING}"),
                                os.path.join(folder, labels, f"{c.case_id}{FILE_ENDING}") if labels else None,
                                scheme, orientation, crop_yx))
    return jobs


def _warn_about_results(results: Sequence[CaseResult], case_patient: Mapping[str, str], scheme: LabelScheme,
                        folder_name: str, check_spacing) -> None:
    for result in results:
        for message in result.warnings:
            warnings.warn(message, ConversionWarning, stacklevel=3)
    training_results = [r for r in results if r.case_id in case_patient]
    present = set().union(*(r.classes_present for r in training_results))
    missing = [scheme.class_names[i] for i in range(1, len(scheme.class_names)) if i not in present]
    if missing:
        warnings.warn(f"class(es) {missing} appear in no label of {folder_name}; nnU-Net will train them "
                      f"without a single example. Check the input and the label options", ConversionWarning,
                      stacklevel=3)
    if check_spacing is not None:
        for message in check_spacing(training_results):
            warnings.warn(message, ConversionWarning, stacklevel=3)


def _dataset_json(chosen: ChosenCases, modalities: Sequence[str], scheme: LabelScheme, name: str, description: str,
                  reference: str, licence: str, conversion: dict) -> dict:
    tags = ModalityTags(tuple(modalities), {c.case_id: c.modality for c in chosen.training})
    dataset_json = {
        "name": name,
        "description": (f"SYNTHETIC phantom in the {conversion['converter']} layout (nnUNetv2_csa_phantom), not real "
                        f"images; the layout's dataset: {description}") if conversion["phantom"] else description,
        "reference": reference,
        "licence": licence,
        # One channel shared by all modalities, z-score normalised per image. Not "CT":
        # nnU-Net's CT normalisation clips and scales with one intensity window computed
        # over the whole dataset, which would apply CT statistics to the MR images too.
        "channel_names": {"0": "zscore"},
        "labels": scheme.dataset_json_labels(),
        "numTraining": len(chosen.training),
        "file_ending": FILE_ENDING,
        **tags.to_dataset_json_entries(),
        CASE_PATIENT_KEY: dict(sorted((c.case_id, c.patient) for c in chosen.training)),
        CONVERSION_KEY: conversion,
    }
    if chosen.other_modality:
        dataset_json[OTHER_MODALITY_KEY] = {c.case_id: {"modality": c.modality, "patient": c.patient}
                                            for c in chosen.other_modality}
    return dataset_json


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
    parser.add_argument("--crop", nargs=2, type=integer_at_least(1), metavar=("H", "W"), default=None,
                        help="crop every image and label to H x W pixels in-plane, centred on the bounding box of "
                             "the labelled heart (all slices), padding with the image minimum where needed. It "
                             "uses the labels, so it is an evaluation protocol (the paper's 224 224), not "
                             "something a deployed model can rely on; it also cuts CPU cost several-fold")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="5-fold",
                        help="splits_final.json: nnU-Net's 5 folds, or the paper's single 80/20 split; always "
                             "grouped by patient (default: 5-fold)")
    parser.add_argument("--seed", type=integer_at_least(0), default=DEFAULT_SEED,
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
    parser.add_argument("-np", "--num-processes", type=integer_at_least(1), default=default_num_processes,
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

    # a terminated conversion unwinds, so that no hidden .Dataset*.incomplete-* folder is left behind
    with warnings.catch_warnings(), sigterm_unwinds():
        warnings.simplefilter("always", ConversionWarning)
        warnings.showwarning = show
        try:
            convert(**kwargs)
        except UserInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0
