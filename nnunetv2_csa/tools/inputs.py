"""What the console commands check of their inputs before they act, each in one place: numbers on
the command line, JSON files that must hold an object, the dataset an id names.

Every check ends in a :class:`~nnunetv2_csa.errors.UserInputError` (or argparse's own usage
error), never in a traceback: see ``tests/test_malformed_options.py``, which walks every command.
"""
from __future__ import annotations

import argparse
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
