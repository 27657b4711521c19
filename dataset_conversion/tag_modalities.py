"""Modality tags for a dataset that is already in nnU-Net's raw format (no images copied).

    nnUNetv2_csa_tag_modalities -d 722 --modality CT '^amos_0([0-4][0-9][0-9]|500)$' \\
        --modality MR '^amos_(050[1-9]|05[1-9][0-9]|0[6-9][0-9][0-9])$' --dry-run

adds to ``nnUNet_raw/DatasetXXX/dataset.json`` the keys this package's trainers read
(``csa_modalities``, ``csa_case_modality``, ``csa_case_patient``, see
``nnunetv2_csa.modality``) and writes a patient-grouped, modality-stratified
``splits_final.json`` (raw folder, and ``nnUNet_preprocessed`` when set). The modality of
each training case comes from regular expressions on its name (``--modality NAME REGEX``,
matched against the whole case identifier, in the order given: that order is the modality
index) or from a CSV file (columns ``case``, ``modality``, optional ``patient``). Its
patient comes from ``--patient REGEX`` (the first group of a match on the case name), the
CSV, or is the case itself. A case that matches no modality or two is refused.

Images and labels are never read or rewritten. dataset.json is replaced atomically, and
the first time a copy of the original is kept as ``dataset.json.before_csa_tags``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import warnings
from typing import Mapping, Sequence

from dataset_conversion.common import run_main
from dataset_conversion.errors import ConversionError, ConversionWarning
from dataset_conversion.splits import DEFAULT_SEED, SPLIT_CHOICES, check_splits_cover_modalities, make_patient_splits
from dataset_conversion.staging import stale_preprocessed_message, write_json
from nnunetv2_csa.atomic_files import replace_file
from nnunetv2_csa.errors import first_few
from nnunetv2_csa.image_files import images_not_read
from nnunetv2_csa.modality import (CASE_MODALITY_KEY, CASE_PATIENT_KEY, MODALITIES_KEY, TAGGING_KEY, ModalityTags,
                                   check_case_name, is_plain_name)
from nnunetv2_csa.modality_rules import compile_rules, modalities_from_rules, read_tag_csv
from nnunetv2_csa.modality_rules import some as _some
from nnunetv2_csa.tools.inputs import file_ending_of, integer_at_least, read_json_file


BACKUP_SUFFIX = ".before_csa_tags"


def patients_from_rule(cases: Sequence[str], pattern: str | None) -> dict[str, str]:
    """case -> patient: the first group of ``pattern`` searched in the case name (None: the case itself)."""
    if pattern is None:
        return {case: case for case in cases}
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConversionError(f"--patient {pattern!r} is not a regular expression ({e})") from None
    if compiled.groups < 1:
        raise ConversionError(f"--patient {pattern!r} has no group: put the patient part of the case name in "
                              f"parentheses, e.g. '^(patient[0-9]+)_'")
    patients, unmatched = {}, []
    for case in cases:
        match = compiled.search(case)
        if match is None or not match.group(1):
            unmatched.append(case)
        else:
            patients[case] = match.group(1)
    if unmatched:
        raise ConversionError(f"--patient {pattern!r} finds no patient in {len(unmatched)} case name(s): "
                              f"{_some(unmatched)}; fix the expression (its first group is the patient)")
    return patients


def tags_from_csv(path: str, cases: Sequence[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(case -> modality, case -> patient, modality order of first appearance) from a CSV file
    that lists every training case once."""
    modality, patient, order = read_tag_csv(path)
    missing = [c for c in cases if c not in modality]
    unknown = sorted(set(modality) - set(cases))
    if missing or unknown:
        problems = ([f"{len(missing)} training case(s) are not in it: {_some(missing)}"] if missing else []) + \
                   ([f"{len(unknown)} of its cases are not training cases of the dataset: {_some(unknown)}"]
                    if unknown else [])
        raise ConversionError(f"{path}: {'; '.join(problems)}. List every training case once")
    if len(order) < 2:
        raise ConversionError(f"{path} names one modality only ({order}); a multi-modality dataset needs two or more")
    return modality, patient, order


def raw_dataset(dataset: str, raw_root: str | None) -> tuple[str, dict, list[str]]:
    """(folder, dataset.json, training case identifiers) of a raw dataset given by id or name."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    raw_root = raw_root or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (or give --raw)")
    folder = _find_dataset_folder(raw_root, dataset)
    json_file = os.path.join(folder, "dataset.json")
    if not os.path.isfile(json_file):
        raise ConversionError(f"{json_file} does not exist: {folder} is not an nnU-Net raw dataset")
    dataset_json = read_json_file(json_file, "fix it or restore it from a backup")
    # the case names only: nnU-Net's get_filenames_of_train_images_and_targets also lists every
    # channel's file, in a pool of 12 forked workers, which can hang a small command like this one
    images = os.path.join(folder, "imagesTr")
    if "dataset" in dataset_json:
        if not isinstance(dataset_json["dataset"], dict):
            raise ConversionError(f"{json_file}: 'dataset' must be an object case -> its files; fix it")
        cases = sorted(dataset_json["dataset"])
    elif "file_ending" not in dataset_json:
        raise ConversionError(f"{json_file} has no file_ending: it is not an nnU-Net v2 dataset.json")
    elif not os.path.isdir(images):
        raise ConversionError(f"{folder} has no imagesTr folder: it is not an nnU-Net raw dataset (its training "
                              f"images belong in imagesTr/CASE_0000{dataset_json['file_ending']})")
    else:
        ending = file_ending_of(dataset_json, json_file)
        skipped = images_not_read(os.listdir(images), ending)
        if skipped:
            warnings.warn(f"{len(skipped)} image file(s) in {images} do not end in the dataset's file_ending "
                          f"{ending!r}, so neither this command nor nnU-Net sees them: {first_few(skipped, 10)}; "
                          f"convert or rename them", ConversionWarning, stacklevel=2)
        cases = sorted(get_identifiers_from_splitted_dataset_folder(images, ending))
    if not cases:
        raise ConversionError(f"{folder} has no training cases (imagesTr is empty): nothing to tag")
    for case in cases:
        check_case_name(case, source=json_file)
    return folder, dataset_json, cases


def _find_dataset_folder(raw_root: str, dataset: str) -> str:
    if dataset.isdigit():
        prefix = f"Dataset{int(dataset):03d}_"
        found = sorted(d for d in os.listdir(raw_root) if d.startswith(prefix)
                       and os.path.isdir(os.path.join(raw_root, d))) if os.path.isdir(raw_root) else []
        if len(found) != 1:
            raise ConversionError(f"{'no' if not found else 'more than one'} folder {prefix}* in {raw_root} "
                                  f"({found}); give -d the dataset's id or full folder name")
        return os.path.join(raw_root, found[0])
    if not is_plain_name(dataset, 255):
        raise ConversionError(f"-d {dataset!r} is neither a dataset id nor a folder name (no '/', no '..'); give "
                              f"the dataset's id or its folder name in {raw_root}")
    folder = os.path.join(raw_root, dataset)
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} does not exist; give -d the dataset's id or its folder name in {raw_root}")
    return folder


def tag_dataset(dataset: str, *, rules: Sequence[Sequence[str]] = (), patient_pattern: str | None = None,
                csv_file: str | None = None, split: str = "5-fold", seed: int = DEFAULT_SEED,
                overwrite: bool = False, dry_run: bool = False, raw_root: str | None = None,
                preprocessed_root: str | None = None) -> dict:
    """Tag a raw dataset; returns the dataset.json it wrote (or would write, ``dry_run``)."""
    if bool(rules) == bool(csv_file):
        raise ConversionError("give the modalities either as --modality NAME REGEX (two or more) or as --csv FILE")
    if split not in SPLIT_CHOICES:
        raise ConversionError(f"unknown split {split!r}; choose one of {list(SPLIT_CHOICES)}")
    folder, dataset_json, cases = raw_dataset(dataset, raw_root)
    json_file = os.path.join(folder, "dataset.json")
    if MODALITIES_KEY in dataset_json and not overwrite and not dry_run:
        raise ConversionError(f"{json_file} has modality tags already ({dataset_json[MODALITIES_KEY]}); add "
                              f"--overwrite to replace them (the split is replaced too)")
    if csv_file:
        case_modality, case_patient, modalities = tags_from_csv(csv_file, cases)
        if patient_pattern is not None:
            case_patient = patients_from_rule(cases, patient_pattern)
    else:
        compiled = compile_rules(rules)
        modalities = [name for name, _ in compiled]
        case_modality = modalities_from_rules(cases, compiled)
        case_patient = patients_from_rule(cases, patient_pattern)
    empty = [m for m in modalities if m not in case_modality.values()]
    if empty:
        raise ConversionError(f"no training case is {'/'.join(empty)}; drop that modality or fix its rule")
    tags = ModalityTags(tuple(modalities), case_modality)
    splits = make_patient_splits(case_patient, split, seed, case_modality)
    check_splits_cover_modalities(splits, case_modality, modalities, split)
    tagged = {key: value for key, value in dataset_json.items()
              if key not in (MODALITIES_KEY, CASE_MODALITY_KEY, CASE_PATIENT_KEY, TAGGING_KEY)}
    tagged.update(tags.to_dataset_json_entries())
    tagged[CASE_PATIENT_KEY] = dict(sorted(case_patient.items()))
    tagged[TAGGING_KEY] = {"rules": [list(r) for r in rules], "patient": patient_pattern,
                           "csv": os.path.abspath(csv_file) if csv_file else None, "split": split, "seed": seed}
    _print_assignment(folder, tags, case_patient, splits)
    if dry_run:
        print("dry run: nothing written")
        return tagged
    _commit(folder, tagged, splits, preprocessed_root if preprocessed_root is not None
            else os.environ.get("nnUNet_preprocessed"))
    return tagged


def _print_assignment(folder: str, tags: ModalityTags, case_patient: Mapping[str, str], splits: list) -> None:
    print(f"{os.path.basename(folder)}: {len(tags.case_modality)} training cases, "
          f"{len(set(case_patient.values()))} patients")
    for name in tags.modalities:
        cases = tags.cases_of_modality(name)
        print(f"  {name} (index {tags.index_of_modality(name)}): {len(cases)} cases, e.g. {_some(cases)}")
    for k, fold in enumerate(splits):
        counts = {m: sum(tags.modality_of_case(c) == m for c in fold["val"]) for m in tags.modalities}
        print(f"  fold {k}: {len(fold['train'])} training, {len(fold['val'])} validation cases {counts}")
    for case in sorted(tags.case_modality):
        print(f"    {case}\t{tags.modality_of_case(case)}\tpatient {case_patient[case]}")


def _replace_file(content, target: str) -> None:
    """``content`` (bytes as they are, anything else as JSON) into ``target``, atomically."""
    if isinstance(content, bytes):
        replace_file(target, lambda path: pathlib.Path(path).write_bytes(content))
    else:
        replace_file(target, lambda path: write_json(content, path))


def _content_or_none(path: str) -> bytes | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _commit(folder: str, dataset_json: dict, splits: list, preprocessed_root: str | None) -> None:
    json_file = os.path.join(folder, "dataset.json")
    targets = [os.path.join(folder, "splits_final.json")]
    if preprocessed_root:
        preprocessed = os.path.join(preprocessed_root, os.path.basename(folder))
        if os.path.isdir(preprocessed):
            # nnU-Net reads the split of the preprocessed folder; an older one there would win
            targets.append(os.path.join(preprocessed, "splits_final.json"))
    for path in [json_file, *targets]:
        if (os.path.exists(path) and not os.access(path, os.W_OK)) or not os.access(os.path.dirname(path), os.W_OK):
            raise ConversionError(f"cannot write {path}: make it writable; nothing was changed")
    backup = json_file + BACKUP_SUFFIX
    old_splits = {target: _content_or_none(target) for target in targets}
    try:
        if not os.path.exists(backup):
            shutil.copy2(json_file, backup)
        # the split first: a new split without the tags is refused by every trainer of this package,
        # tags without their split would train on nnU-Net's random, ungrouped one
        for target in targets:
            _replace_file(splits, target)
        _replace_file(dataset_json, json_file)
    except BaseException as error:
        # failed or interrupted (SIGTERM, Ctrl-C) before the tags were written: the old split comes
        # back, so that a new split never stands beside the old tags
        for target, content in old_splits.items():
            if content is None:
                if os.path.exists(target):
                    os.remove(target)
            else:
                _replace_file(content, target)
        if isinstance(error, OSError):
            raise ConversionError(f"could not write the tags into {folder} ({error}); nothing was changed (the "
                                  f"original dataset.json is in {backup}): fix the cause and run the command "
                                  f"again") from None
        raise
    print(f"tags written to {json_file} (original kept as {os.path.basename(backup)}); split: "
          f"{', '.join(targets)}")
    dataset_id = int(os.path.basename(folder)[len("Dataset"):].split("_")[0])
    stale = stale_preprocessed_message(preprocessed_root, os.path.basename(folder), dataset_json, dataset_id)
    if stale:
        warnings.warn(stale, ConversionWarning, stacklevel=2)
    print(f"next: nnUNetv2_plan_and_preprocess -d {dataset_id} -c 2d, then "
          f"nnUNetv2_train {dataset_id} 2d 0 -tr nnUNetTrainerCSA")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_tag_modalities",
        description="Add modality tags and a patient-grouped, modality-stratified splits_final.json to a dataset "
                    "already in nnU-Net's raw format, so that nnUNetTrainerCSA and its rows can train on it. "
                    "Images are never read or rewritten.")
    parser.add_argument("-d", required=True, help="dataset id (e.g. 722) or folder name in nnUNet_raw")
    parser.add_argument("--modality", nargs=2, action="append", default=[], metavar=("NAME", "REGEX"),
                        help="a modality and the regular expression its case names match in full (Python re "
                             "syntax); once per modality, in the order that gives the modality index")
    parser.add_argument("--csv", help="CSV file with the columns case, modality and optionally patient "
                                      "(instead of --modality)")
    parser.add_argument("--patient", help="regular expression whose first group, searched in a case name, is its "
                                          "patient (cases of a patient share a fold); default: each case its own")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="5-fold", help="default: %(default)s")
    parser.add_argument("--seed", type=integer_at_least(0), default=DEFAULT_SEED,
                        help="seed of the split (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing modality tags and split")
    parser.add_argument("--dry-run", action="store_true", help="print the assignment and the split, write nothing")
    parser.add_argument("--raw", help="nnUNet_raw folder (default: the nnUNet_raw variable)")
    args = parser.parse_args(argv)
    return run_main(tag_dataset, args, dataset=args.d, rules=args.modality, patient_pattern=args.patient,
                    csv_file=args.csv, split=args.split, seed=args.seed, overwrite=args.overwrite,
                    dry_run=args.dry_run, raw_root=args.raw)


if __name__ == "__main__":
    raise SystemExit(main())
