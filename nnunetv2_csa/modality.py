"""Modality tags: which imaging modality each case of a dataset belongs to.

The converters write two keys into nnU-Net's ``dataset.json`` (nnU-Net ignores keys it
does not know, and copies ``dataset.json`` into every trained model folder, so a model
folder alone is enough to recover the map):

``csa_modalities``
    the ordered list of modality names, e.g. ``["LGE", "C0"]``; a name's position is its
    modality index (the index of its normalization layers and of its half of a batch).
``csa_case_modality``
    ``{case identifier: modality name}`` for every training case, e.g.
    ``{"patient001_LGE": "LGE", "patient001_C0": "C0"}``.
``csa_case_patient``
    ``{case identifier: patient identifier}``; the cases of one patient (its images in
    every modality) always share a fold, and patient-level statistics pair on it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

from nnunetv2_csa.errors import UserInputError

MODALITIES_KEY = "csa_modalities"
CASE_MODALITY_KEY = "csa_case_modality"
CASE_PATIENT_KEY = "csa_case_patient"
#: --unpaired conversions: the modality each patient did not contribute, kept for testing only
#: (case -> {"modality": name, "patient": id}); images in OTHER_MODALITY_IMAGES, labels in OTHER_MODALITY_LABELS
OTHER_MODALITY_KEY = "csa_other_modality_cases"
#: how the tags were made: nnUNetv2_csa_tag_modalities's rules, a converter's settings
TAGGING_KEY = "csa_tagging"
CONVERSION_KEY = "csa_conversion"
OTHER_MODALITY_IMAGES = "imagesOtherModality"
OTHER_MODALITY_LABELS = "labelsOtherModality"


class ModalityTagError(UserInputError, ValueError):
    """A dataset.json or model folder lacks or contradicts the modality tags."""


@dataclass(frozen=True)
class ModalityTags:
    """The case -> modality map of one dataset, with a stable index per modality."""

    modalities: tuple[str, ...]
    case_modality: Mapping[str, str]

    def __post_init__(self):
        if len(self.modalities) == 0:
            raise ModalityTagError("no modality names given")
        if len(set(self.modalities)) != len(self.modalities):
            raise ModalityTagError(f"modality names repeat: {list(self.modalities)}")
        check_modality_names(self.modalities)
        for case in self.case_modality:
            check_case_name(case)
        unknown = sorted({m for m in self.case_modality.values() if m not in self.modalities})
        if unknown:
            raise ModalityTagError(
                f"cases are tagged with modalities {unknown} that are not in {list(self.modalities)}")

    def index_of_modality(self, name: str) -> int:
        if name not in self.modalities:
            raise ModalityTagError(
                f"unknown modality {name!r}; this dataset/model knows {list(self.modalities)}")
        return self.modalities.index(name)

    def modality_of_case(self, case: str) -> str:
        try:
            return self.case_modality[case]
        except KeyError:
            raise ModalityTagError(
                f"case {case!r} has no modality tag in '{CASE_MODALITY_KEY}' of dataset.json; "
                f"re-run the converter, or add the case to that map") from None

    def index_of_case(self, case: str) -> int:
        return self.modalities.index(self.modality_of_case(case))

    def cases_of_modality(self, name: str) -> list[str]:
        self.index_of_modality(name)
        return sorted(c for c, m in self.case_modality.items() if m == name)

    def to_dataset_json_entries(self) -> dict:
        return {MODALITIES_KEY: list(self.modalities),
                CASE_MODALITY_KEY: dict(sorted(self.case_modality.items()))}


#: longest modality name: it becomes a folder name (held-out folders) and part of case names
MAX_MODALITY_NAME = 64
#: longest case name: with a channel suffix and file ending it stays below file systems' 255 bytes
MAX_CASE_NAME = 200


def is_plain_name(name, longest: int) -> bool:
    """Whether ``name`` can be one path component: UTF-8, not empty, no separator, not '.' or '..',
    at most ``longest`` bytes."""
    if not isinstance(name, str):
        return False
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a file name that is not UTF-8 (Python hands it over with surrogates)
        return False
    return name not in ("", ".", "..") and size <= longest and not any(c in name for c in ("/", "\\", "\x00"))


def check_case_name(case: str, source: str = "dataset.json") -> str:
    """A case name is joined into file paths: it must be a plain file name stem, never a path
    (``../x``, ``/abs``, ``a/b``) that would read or write outside the dataset."""
    if not is_plain_name(case, MAX_CASE_NAME):
        raise ModalityTagError(f"case name {case!r} in {source} is not a plain file name (UTF-8, no folders, no "
                               f"'..', not empty, at most {MAX_CASE_NAME} bytes); fix the entry or rename the file, "
                               f"or convert the dataset again")
    return case


def check_modality_names(names, source: str = "dataset.json") -> tuple[str, ...]:
    """Modality names become folder names and parts of case names: each must be a plain file
    name of at most MAX_MODALITY_NAME bytes, and no two may differ only in case (``lge`` and
    ``LGE`` would be two modalities to the trainer and one folder on a case-insensitive disk)."""
    names = tuple(names)
    for name in names:
        if not is_plain_name(name, MAX_MODALITY_NAME):
            raise ModalityTagError(f"modality name {name!r} in {source} is not a plain name (no folders, no '..', "
                                   f"not empty, at most {MAX_MODALITY_NAME} bytes); rename it")
    folded = {}
    for name in names:
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise ModalityTagError(f"modality names {other!r} and {name!r} in {source} differ only in case; "
                                   f"use one spelling for one modality")
    return names


def modality_tags_from_dataset_json(dataset_json: Mapping, source: str = "dataset.json") -> ModalityTags:
    """Read the tags from a loaded dataset.json dict (``source`` names it in errors)."""
    missing = [k for k in (MODALITIES_KEY, CASE_MODALITY_KEY) if k not in dataset_json]
    if missing:
        raise ModalityTagError(
            f"{source} has no {missing} entries: it was not written by an nnunetv2_csa converter. "
            f"Convert the data with nnUNetv2_csa_convert_* or add '{MODALITIES_KEY}' (list of "
            f"names) and '{CASE_MODALITY_KEY}' (case -> name) by hand")
    names, case_modality = dataset_json[MODALITIES_KEY], dataset_json[CASE_MODALITY_KEY]
    case_patient = dataset_json.get(CASE_PATIENT_KEY, {})
    # the shapes first: a hand-edited file may hold null or a list where an object belongs
    if not (isinstance(names, list) and isinstance(case_modality, dict) and isinstance(case_patient, dict)
            and all(isinstance(v, str) for v in [*case_modality.values(), *case_patient.values()])):
        raise ModalityTagError(f"{source}: '{MODALITIES_KEY}' must be a list of names, '{CASE_MODALITY_KEY}' an "
                               f"object case -> modality name and '{CASE_PATIENT_KEY}' (if there) an object case -> "
                               f"patient; convert or tag the dataset again")
    try:
        return ModalityTags(tuple(names), dict(case_modality))
    except ModalityTagError as e:
        raise ModalityTagError(f"{source}: {e}") from None


def other_modality_cases(dataset_json: Mapping, source: str = "dataset.json") -> dict[str, dict]:
    """The images an ``--unpaired`` conversion left out of training (``csa_other_modality_cases``:
    case -> {"modality": name, "patient": id}), their shape and case names checked."""
    other = dataset_json.get(OTHER_MODALITY_KEY, {})
    if not (isinstance(other, dict) and all(isinstance(tag, dict) and isinstance(tag.get("modality"), str)
                                            and isinstance(tag.get("patient"), str) for tag in other.values())):
        raise ModalityTagError(f"{source}: '{OTHER_MODALITY_KEY}' must be an object case -> {{\"modality\": name, "
                               f"\"patient\": id}}; convert the dataset again")
    for case in other:
        check_case_name(case, source)
    return dict(other)


def modalities_from_plans(plans: Mapping, source: str = "plans") -> list[str]:
    """The ordered modality names a trained model's plans record (``csa_modalities``: the
    trainer writes them into the model folder's plans.json when training starts)."""
    if MODALITIES_KEY not in plans:
        raise ModalityTagError(
            f"{source} has no '{MODALITIES_KEY}' entry: this package's trainers write it into the model folder's "
            f"plans.json when training starts; was this model trained with an nnunetv2_csa trainer that has "
            f"modality-specific norms?")
    return list(plans[MODALITIES_KEY])


def read_modality_tags(folder_or_file: str) -> ModalityTags:
    """The modality tags of a raw dataset folder, a preprocessed folder, a trained model
    folder (``.../nnUNetTrainerCSA__nnUNetPlans__2d``) or a ``dataset.json`` path."""
    path = folder_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    if not os.path.isfile(path):
        raise ModalityTagError(f"{path} does not exist: expected an nnU-Net dataset.json "
                               f"(raw, preprocessed or model folder)")
    with open(path) as f:
        return modality_tags_from_dataset_json(json.load(f), source=path)
