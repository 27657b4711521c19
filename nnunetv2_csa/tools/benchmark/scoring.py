"""The test cases of a fold (held-out cases, and the other modality of held-out patients of an
``--unpaired`` conversion), where each row's prediction of them lies, and their scores.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import pandas as pd
from tqdm import tqdm

from nnunetv2_csa.modality import OTHER_MODALITY_IMAGES, OTHER_MODALITY_KEY, OTHER_MODALITY_LABELS, other_modality_cases
from nnunetv2_csa.tools.benchmark.common import BenchmarkError, log_stage
from nnunetv2_csa.tools.benchmark.rows import Model, RowResult
from nnunetv2_csa.tools.evaluation import evaluate_case
from nnunetv2_csa.tools.inputs import read_json_file


RESULT_COLUMNS = ("row", "trainer", "fold", "modality", "patient", "case", "source", "class_name", "label", "dice",
                  "hd", "hd95", "assd", "n_ref_voxels", "n_pred_voxels", "flag")
#: ``source`` of a test case: a validation case of the fold, or the other modality of a held-out patient
VALIDATION_SOURCE = "validation"
OTHER_MODALITY_SOURCE = "other_modality"


def model_for(row: RowResult, modality: str) -> Model:
    models = [m for m in row.models if m.modality in (None, modality)]
    if not models:
        raise FileNotFoundError(f"row {row.row} has no model for modality {modality}")
    return models[0]


def prediction_file(row: RowResult, case: str, modality: str, file_ending: str,
                    other_modality_cases: Collection[str] = ()) -> str:
    model = model_for(row, modality)
    folder = model.other_modality_predictions if case in other_modality_cases else model.validation_folder
    return os.path.join(folder, case + file_ending)


@dataclass
class TestSet:
    """The cases a fold's models are scored on, with their modality, patient and reference."""
    case_modality: dict[str, str]
    case_patient: dict[str, str]
    references: dict[str, str]  # case -> reference segmentation file
    other_modality_images: dict[str, str] = field(default_factory=dict)  # case -> image, to predict

    @property
    def cases(self) -> list[str]:
        return sorted(self.case_modality)

    def source(self, case: str) -> str:
        return OTHER_MODALITY_SOURCE if case in self.other_modality_images else VALIDATION_SOURCE

    @property
    def validation_cases(self) -> list[str]:
        return [c for c in self.cases if c not in self.other_modality_images]


def fold_test_set(validation_cases: Sequence[str], case_modality: Mapping[str, str],
                  case_patient: Mapping[str, str], gt_folder: str, raw_dataset_folder: str | None,
                  file_ending: str) -> TestSet:
    """The fold's validation cases, plus (for an ``--unpaired`` conversion) the other-modality
    images of the same patients: never trained on, since the whole patient is held out."""
    validation_cases = sorted(validation_cases)
    modality = {c: case_modality[c] for c in validation_cases}
    patient = {c: case_patient.get(c, c) for c in validation_cases}
    references = {c: os.path.join(gt_folder, c + file_ending) for c in validation_cases}
    images = {}
    raw_json = os.path.join(raw_dataset_folder, "dataset.json") if raw_dataset_folder else ""
    if os.path.isfile(raw_json):
        other = other_modality_cases(read_json_file(raw_json, "convert the dataset again"), raw_json)
        held_out = set(patient.values())
        for case, tag in sorted(other.items()):
            if tag["patient"] not in held_out or case in modality:
                continue
            modality[case], patient[case] = tag["modality"], tag["patient"]
            references[case] = os.path.join(raw_dataset_folder, OTHER_MODALITY_LABELS, case + file_ending)
            images[case] = os.path.join(raw_dataset_folder, OTHER_MODALITY_IMAGES, f"{case}_0000{file_ending}")
            for path in (references[case], images[case]):
                if not os.path.isfile(path):
                    raise BenchmarkError(f"{path} is listed under '{OTHER_MODALITY_KEY}' in {raw_json} but missing: "
                                         f"convert the dataset again (with --overwrite)")
    return TestSet(modality, patient, references, images)


def evaluate_rows(rows: Sequence[RowResult], test_set: TestSet, labels: dict, file_ending: str) -> pd.DataFrame:
    """Per case, class and row: Dice, HD, HD95, ASSD. A row with a missing or unreadable
    prediction fails as a whole (a partial row would bias its means)."""
    records = []
    test_cases, case_modality = test_set.cases, test_set.case_modality
    for row in rows:
        if row.failed:
            continue
        row_records = []
        try:
            for case in tqdm(test_cases, desc=f"evaluate {row.row}", leave=False, file=sys.stderr):
                modality = case_modality[case]
                predicted = prediction_file(row, case, modality, file_ending, test_set.other_modality_images)
                if not os.path.isfile(predicted):
                    raise FileNotFoundError(f"prediction {predicted} is missing")
                model = model_for(row, modality)
                for record in evaluate_case(predicted, test_set.references[case], labels, file_ending):
                    record.update(row=row.row, trainer=model.trainer, fold=model.fold, modality=modality,
                                  patient=test_set.case_patient[case], source=test_set.source(case))
                    row_records.append(record)
        except (OSError, ValueError, RuntimeError) as e:
            row.fail(f"evaluation: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            log_stage(f"{row.row}: FAILED in evaluation ({row.error})")
            continue
        row.status = "ok"
        records.extend(row_records)
    return pd.DataFrame(records, columns=list(RESULT_COLUMNS))


def merge_test_sets(test_sets: Sequence[TestSet]) -> TestSet:
    """The test cases of all folds together; every held-out patient belongs to one fold."""
    merged = TestSet({}, {}, {}, {})
    for test_set in test_sets:
        for name in ("case_modality", "case_patient", "references", "other_modality_images"):
            overlap = set(getattr(merged, name)) & set(getattr(test_set, name))
            if overlap:
                raise BenchmarkError(f"cases {sorted(overlap)[:5]} are held out by more than one of the chosen "
                                     f"folds: splits_final.json is not a cross-validation")
            getattr(merged, name).update(getattr(test_set, name))
    return merged



@dataclass
class FoldRun:
    """One fold of the benchmark: its test cases, its rows' models, their scores."""
    fold: int
    test_set: TestSet
    rows: list[RowResult]
    training_cases: list[str]
    results: pd.DataFrame | None = None
