"""What the console commands check of their inputs before they act, each in one place: numbers on
the command line, JSON files that must hold an object, the dataset an id names.

Every check ends in a :class:`~nnunetv2_csa.errors.UserInputError` (or argparse's own usage
error), never in a traceback: see ``tests/test_malformed_options.py``, which walks every command.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile

from nnunetv2_csa.errors import UserInputError


class InputFileError(UserInputError, ValueError):
    """A file the command reads is missing, unreadable or not what it must be; the message names it."""


class DatasetNotFound(UserInputError, ValueError):
    """A dataset id or name that names no dataset (or one not yet preprocessed)."""


def integer_at_least(minimum: int):
    """An argparse ``type``: a whole number of at least ``minimum`` (a seed, a count, a process
    number), so that ``--seed -1`` or ``-np 0`` is a usage error naming the option, not a
    traceback deep inside."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed value, {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its message
    return parse


def read_json_file(path: str, fix: str, holds: type = dict):
    """The JSON value in ``path``, which must be a ``holds`` (an object: dataset.json, plans; a
    list: splits_final.json); a missing, unreadable or malformed file, or one holding anything
    else (``null``), is an :class:`InputFileError` naming it and ``fix``."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputFileError(f"cannot read {path} ({e}); {fix}") from None
    if not isinstance(content, holds):
        expected = {dict: "a JSON object", list: "a JSON list"}.get(holds, holds.__name__)
        found = "null" if content is None else type(content).__name__
        raise InputFileError(f"{path} holds {found}, not {expected}; {fix}")
    return content


def read_splits(path: str, fix: str) -> list[dict]:
    """nnU-Net's splits_final.json: a list of folds, each {"train": [cases], "val": [cases]}; any
    other content is an :class:`InputFileError` naming the file and ``fix``."""
    splits = read_json_file(path, fix, holds=list)
    for fold in splits:
        if not (isinstance(fold, dict) and all(isinstance(fold.get(part), list) and
                                               all(isinstance(case, str) for case in fold[part])
                                               for part in ("train", "val"))):
            raise InputFileError(f"{path} is not a split: each fold must be {{\"train\": [cases], \"val\": [cases]}}; "
                                 f"{fix}")
    return splits


def file_ending_of(dataset_json: dict, source: str) -> str:
    """nnU-Net's ``file_ending`` of a dataset.json (.nii.gz where it has none): a name ending such as
    ".nii.gz", or an :class:`InputFileError` naming ``source``."""
    ending = dataset_json.get("file_ending", ".nii.gz")
    if not (isinstance(ending, str) and ending.startswith(".") and "/" not in ending and len(ending) <= 16):
        raise InputFileError(f"{source}: file_ending {ending!r} is not a file name ending such as '.nii.gz'; fix it "
                             f"or convert the dataset again")
    return ending


def dataset_name(dataset_id) -> str:
    """nnU-Net's folder name (DatasetXXX_Name) of a dataset id or name, looked up as nnU-Net does."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset_id))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetNotFound(f"no dataset {dataset_id!r} in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
                              f"({first}); give -d an existing dataset id or its DatasetXXX_Name") from None


def dataset_folder(root_variable: str, dataset_id, fix: str) -> str:
    """``$root_variable/DatasetXXX_Name`` of ``dataset_id``, which must exist (``fix`` says how
    to make it, e.g. run nnUNetv2_plan_and_preprocess)."""
    root = os.environ.get(root_variable)
    if not root:
        raise DatasetNotFound(f"{root_variable} is not set: export it as for nnUNetv2_train")
    if not os.path.isdir(root):
        raise DatasetNotFound(f"{root_variable}={root} is not a folder: check the variable (a typo?)")
    folder = os.path.join(root, dataset_name(dataset_id))
    if not os.path.isdir(folder):
        raise DatasetNotFound(f"{folder} does not exist: {fix}")
    return folder


def nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists: where a new folder at ``path`` would be made."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_folder(folder: str, option: str) -> None:
    """Before any work is done: ``folder`` is a folder, or can be made one, that this process can
    write into (tried, not judged from permission bits, which do not bind root). ``option``
    names where the folder came from (``-o``)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputFileError(f"{option} {folder} is a file; give a folder")
    nearest = nearest_existing(folder)
    if not os.path.isdir(nearest):
        raise InputFileError(f"{nearest} is a file, so {option} {folder} cannot be made below it; give a folder")
    try:
        tempfile.TemporaryDirectory(dir=nearest, prefix=".write_test_").cleanup()
    except OSError as e:
        raise InputFileError(f"cannot write into {nearest} ({e.strerror}); choose a writable {option}") from None


def entries_of_a_folder_not_ours(folder: str, marker: str) -> list[str]:
    """The entries of ``folder`` when it exists without ``marker`` (the file or folder a command
    leaves to know the folder as its own): what the command must not replace or mix with. Empty
    for a new or empty folder and for one with the marker."""
    if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, marker)):
        return []
    return sorted(os.listdir(folder))


def channel_count(dataset_json: dict, source: str) -> int:
    """The image files per case: one per entry of nnU-Net's ``channel_names`` ("modality" in older
    dataset.json files), or an :class:`InputFileError` naming ``source``."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {"0": "single"}))
    if not (isinstance(channels, dict) and channels):
        raise InputFileError(f"{source}: channel_names must be an object channel -> name, e.g. {{\"0\": \"MRI\"}}; "
                             f"fix it or convert the dataset again")
    return len(channels)


def check_case_images(case: str, files: list[str], n_channels: int, file_ending: str) -> None:
    """The one input check before nnU-Net reads a case: exactly the files ``<case>_0000 ..
    <case>_{n-1}`` of the model's ``n_channels`` channels, each a complete image SimpleITK reads
    (``image_files.check_file_complete``: not empty, not text, not 4D). Anything else is one
    :class:`InputFileError` naming the file, before anything is written: nnU-Net itself would stop
    inside its workers with a traceback, or predict from the wrong channels."""
    from nnunetv2_csa.image_files import check_file_complete

    expected = [f"{case}_{channel:04d}{file_ending}" for channel in range(n_channels)]
    names = sorted(os.path.basename(f) for f in files)
    if names != expected:
        extra = sorted(set(names) - set(expected))
        missing = sorted(set(expected) - set(names))
        found = f"it has {' '.join(extra)}" if extra else f"{' '.join(missing)} is missing"
        raise InputFileError(f"case {case} must have one image per channel of the model ({n_channels}: "
                             f"{' '.join(expected)}), but {found}; give each case exactly these files")
    for path in files:
        check_file_complete(path)


def channel_files(first_channel: str, file_ending: str) -> list[str]:
    """Every channel's file of the case whose ``_0000`` file is ``first_channel`` (``_0001``, ...):
    nnU-Net's predictor needs them all."""
    stem = first_channel[:-len(f"0000{file_ending}")]
    return sorted(glob.glob(glob.escape(stem) + f"[0-9][0-9][0-9][0-9]{glob.escape(file_ending)}"))


#: nnU-Net's image file name: the case, an underscore and a 4-digit channel index
_CHANNEL_SUFFIX_DIGITS = 4


def cases_in_folder(folder: str, names: list[str], file_ending: str) -> dict[str, list[str]]:
    """case -> the paths of its image files, for the ``names`` in ``folder`` that end in ``file_ending``,
    grouped as nnU-Net's predictor groups them (the case is the name without ``_XXXX`` and the ending).
    A name without a proper channel suffix (``p3_LGE_000.nii.gz``: nnU-Net would make it a case ``p3_LG``
    with no file) is an :class:`InputFileError` naming it."""
    cases: dict[str, list[str]] = {}
    for name in sorted(names):
        if not name.endswith(file_ending):
            continue
        stem = name[:-len(file_ending)]
        case, underscore, channel = stem[:-_CHANNEL_SUFFIX_DIGITS - 1], stem[-_CHANNEL_SUFFIX_DIGITS - 1], \
            stem[-_CHANNEL_SUFFIX_DIGITS:]
        if not (case and underscore == "_" and channel.isascii() and channel.isdigit()):
            raise InputFileError(f"{os.path.join(folder, name)} is not named CASE_XXXX{file_ending} (XXXX: the "
                                 f"4-digit channel, _0000 for the first); rename it as nnU-Net's imagesTs are named")
        cases.setdefault(case, []).append(os.path.join(folder, name))
    return cases
