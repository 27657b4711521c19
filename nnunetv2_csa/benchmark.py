"""The paper's comparison as one command: train every row on one fold or on several
(cross-validation), evaluate the held-out cases, time each trainer, and write a report
folder (Table 1 layout, per-fold table, Wilcoxon with bootstrap intervals and Holm's
correction, plots).

Rows (trainer names of this package, found by stock ``nnUNetv2_train -tr``):

====== ===================================================================
Single ``nnUNetTrainerSingleModality{k}``, one model per modality k
Joint  ``nnUNetTrainerJoint`` (stock nnU-Net on both modalities)
MSBN   ``nnUNetTrainerMSBN``
Affinity ``nnUNetTrainerAffinity``
UMMKD  ``nnUNetTrainerUMMKD``
CSA    ``nnUNetTrainerCSA``
====== ===================================================================

``--norm bn`` takes the ``_BN`` twins; ``--budget E I`` the short-budget variants
``<name>_<E>epochs_<I>its``; ``--full-budget`` the plain names (nnU-Net's 1000 x 250).
Ablation rows (not run by default): ``CSA_Lambda0p25``, ``CSA_Lambda1`` and ``UMMKD_Lambda1``
(half and double the paper's weight, in the paper's units), ``CSA_RampUp`` (λ ramped up
linearly over the first quarter of the epochs). ``--single-budget equal-data`` trains Single
for 1/n of the iterations, so that it sees as many slices of its modality as the joint rows.

``--folds 0 1 2 3 4`` (or ``all``) trains every row on every fold (resumable per row and
fold) and scores each held-out patient once, with the models of the fold that holds it out;
means, stds and tests pool all folds, and a per-fold table shows the spread between folds.

Per row: training runs as the stock command in a subprocess, its output in
``logs/train_<trainer>.log`` of the report folder. A model whose ``checkpoint_final.pth``
and ``validation/summary.json`` exist is reused (``--rerun`` trains it again); a model with
an interrupted training (a checkpoint but no final validation) is continued with ``--c``.

Test cases: the held-out (validation) cases of the chosen fold in ``splits_final.json``;
each is scored from the row's own final-validation prediction (nnU-Net's sliding-window
predictor with mirroring), for Single from the model of the case's modality. A dataset
converted with ``--unpaired`` also holds the modality each patient did not contribute
(``imagesOtherModality``); those of the fold's held-out patients are test cases too, as
unseen as the validation cases, and are predicted here with the stock ``nnUNetv2_predict``
(``nnUNet_csa_modality`` set for the CSA family). This doubles the test patients per
modality, which the patient-level Wilcoxon test needs. A row whose training fails or whose
predictions are missing is reported as FAILED with its error; the other rows still run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from nnunetv2_csa.errors import UserInputError, one_line_errors
from nnunetv2_csa.evaluation import DEFAULT_HD95, HD95_DEFINITIONS, evaluate_case, wilcoxon_between_methods
from nnunetv2_csa.statistics import bootstrap_mean_ci, holm_adjust
from nnunetv2_csa.modality import (CASE_PATIENT_KEY, OTHER_MODALITY_IMAGES, OTHER_MODALITY_KEY,
                                   OTHER_MODALITY_LABELS, check_case_name, modalities_from_plans,
                                   modality_tags_from_dataset_json)
from nnunetv2_csa.training.rows import ROWS_BY_NAME, rows_of_group
from nnunetv2_csa.training.short_budget import short_budget_name

#: the paper's rows (the default)
ROWS = rows_of_group("paper")
#: ablations of the consistency weight, in the paper's units (λ = 0.5 is CSA itself), and of its
#: schedule (a linear ramp-up of λ)
LAMBDA_ROWS = rows_of_group("lambda")
ALL_ROWS = ROWS + LAMBDA_ROWS
#: trainer class of each row (Single: ``{index}`` is the modality index); the ``_BN`` twin adds "_BN"
ROW_TRAINERS = {name: ROWS_BY_NAME[name].trainer_template for name in ALL_ROWS}
#: rows whose models have modality-specific norms (nnUNetv2_predict needs nnUNet_csa_modality)
CSA_FAMILY = tuple(name for name in ALL_ROWS if ROWS_BY_NAME[name].modality_specific_norms)
REFERENCE_ROW = "Joint"
PROPOSED_ROW = "CSA"
FULL_BUDGET = (1000, 250)
FAILED = "FAILED"
NOT_AVAILABLE = "n/a"
TABLE_METRICS = (("dice", "Dice", True), ("hd", "HD", False))
SECOND_TABLE_METRICS = (("hd95", "HD95", False), ("assd", "ASSD", False))
RESULT_COLUMNS = ("row", "trainer", "fold", "modality", "patient", "case", "source", "class_name", "label", "dice",
                  "hd", "hd95", "assd", "n_ref_voxels", "n_pred_voxels", "flag")
#: the metrics of the paired tests of CSA against every other row
TEST_METRICS = (("dice", "Dice"), ("hd", "HD"), ("hd95", "HD95"))
#: how Single's budget is chosen: the joint rows' iterations, or the slices of its modality they see
SINGLE_BUDGETS = ("equal-iterations", "equal-data")
#: the report folder's record of each trainer's timing and its date, kept across reruns
TIMING_FILE = "timing.json"
#: ``source`` of a test case: a validation case of the fold, or the other modality of a held-out patient
VALIDATION_SOURCE = "validation"
OTHER_MODALITY_SOURCE = "other_modality"


class BenchmarkError(UserInputError, RuntimeError):
    """The benchmark cannot start (missing folders, unknown row, bad budget)."""


def log_stage(message: str) -> None:
    """One line per stage on stdout (progress bars go to stderr)."""
    tqdm.write(f"[benchmark] {message}", file=sys.stdout)
    sys.stdout.flush()


# --------------------------------------------------------------------------- rows and models

def trainer_name(row: str, norm: str = "instance", budget: tuple[int, int] | None = None,
                 modality_index: int = 0) -> str:
    """The trainer class name of ``row`` (``budget`` None: the full budget, the plain name)."""
    if row not in ROW_TRAINERS:
        raise BenchmarkError(f"unknown row {row!r}; choose from {list(ALL_ROWS)}")
    if norm not in ("instance", "bn"):
        raise BenchmarkError(f"norm must be 'instance' or 'bn', not {norm!r}")
    name = ROW_TRAINERS[row].format(index=modality_index) + ("_BN" if norm == "bn" else "")
    if budget is not None:
        try:
            name = short_budget_name(name, *budget)
        except ValueError as e:
            raise BenchmarkError(str(e)) from None
    return name


def row_budget(row: str, budget: tuple[int, int] | None, n_modalities: int,
               single_budget: str = "equal-iterations") -> tuple[int, int] | None:
    """The (epochs, iterations) a row trains for. ``equal-data`` gives Single 1/n of the
    iterations: the joint rows see B/n slices of each modality per iteration, Single B of its own."""
    if single_budget not in SINGLE_BUDGETS:
        raise BenchmarkError(f"single budget must be one of {list(SINGLE_BUDGETS)}, not {single_budget!r}")
    if row != "Single" or single_budget == "equal-iterations":
        return budget
    if budget is None or budget[1] % n_modalities:
        raise BenchmarkError(f"--single-budget equal-data needs a --budget whose iterations per epoch divide by "
                             f"the {n_modalities} modalities (e.g. --budget 30 20 gives Single 30 x 10)")
    return budget[0], budget[1] // n_modalities


@dataclass
class Model:
    """One trained network of a row (Single has one per modality)."""
    row: str
    trainer: str
    modality: str | None  # the only modality it predicts (Single), None: all
    fold_folder: str
    log_file: str
    other_modality_predictions: str = ""  # where nnUNetv2_predict writes the other-modality test cases
    fold: int = 0

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.fold_folder, "checkpoint_final.pth")

    @property
    def validation_folder(self) -> str:
        return os.path.join(self.fold_folder, "validation")

    def is_finished(self) -> bool:
        return os.path.isfile(self.checkpoint) and os.path.isfile(os.path.join(self.validation_folder,
                                                                               "summary.json"))

    def has_partial_training(self) -> bool:
        return any(os.path.isfile(os.path.join(self.fold_folder, f))
                   for f in ("checkpoint_final.pth", "checkpoint_latest.pth"))


@dataclass
class RowResult:
    row: str
    models: list[Model]
    status: str = "pending"  # "ok" or "failed"
    error: str = ""
    trained: list[str] = field(default_factory=list)  # trainers trained in this run
    reused: list[str] = field(default_factory=list)  # trainers whose finished model was reused
    training_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def fail(self, error: str) -> None:
        if not self.failed:
            self.status, self.error = "failed", error


# --------------------------------------------------------------------------- environment

def _required_folder(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise BenchmarkError(f"{variable} is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results "
                             f"as for nnUNetv2_train")
    if not os.path.isdir(value):
        raise BenchmarkError(f"{variable}={value} is not a folder")
    return value


def _trainer_dir() -> str:
    from nnunetv2_csa.ext_trainers import TRAINER_DIR
    return TRAINER_DIR


def subprocess_environment(device: str) -> dict:
    """The benchmark's environment plus this package's trainer folder; on CPU the data
    augmentation runs in the training process (nnUNet_n_proc_DA=0, unless set already)."""
    env = dict(os.environ)
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if _trainer_dir() not in paths:
        paths.append(_trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(paths)
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "0")
    # training needs no inference modality; a stray value must not leak into the logs' meaning
    env.pop("nnUNet_csa_modality", None)
    return env


def _console_script(name: str) -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(candidate):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise BenchmarkError(f"{name} not found next to {sys.executable} or on PATH: is nnunetv2 installed?")
    return found


def error_from_log(text: str, max_chars: int = 300) -> str:
    """The most telling line of a failed command's output: the last exception line, else
    the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    pattern = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b|AssertionError)")
    for line in reversed(lines):
        if pattern.match(line):
            return line[:max_chars]
    return lines[-1][:max_chars]


# --------------------------------------------------------------------------- training

def train_model(model: Model, dataset_id: str, configuration: str, plans: str, fold: int, device: str,
                rerun: bool, env: dict, result: RowResult) -> None:
    """Train one model with the stock ``nnUNetv2_train`` unless it is finished already."""
    if model.is_finished() and not rerun:
        result.reused.append(model.trainer)
        log_stage(f"{model.row}: {model.trainer} is trained and validated already: skipped "
                  f"(--rerun trains it again)")
        return
    command = [_console_script("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", model.trainer,
               "-p", plans, "-device", device]
    if rerun:
        # a stale final checkpoint or validation must not pass for the result of this run
        for stale in (model.checkpoint, os.path.join(model.fold_folder, "checkpoint_best.pth")):
            if os.path.isfile(stale):
                os.remove(stale)
        shutil.rmtree(model.validation_folder, ignore_errors=True)
    elif model.has_partial_training():
        command.append("--c")
    log_stage(f"{model.row}: training {model.trainer} ({'continuing with --c' if '--c' in command else 'new'}), "
              f"log {model.log_file}")
    os.makedirs(os.path.dirname(model.log_file), exist_ok=True)
    start = time.perf_counter()
    with open(model.log_file, "a") as log:
        log.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')}: {' '.join(command)}\n")
        log.flush()
        completed = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    result.training_seconds[model.trainer] = time.perf_counter() - start
    if completed.returncode != 0:
        with open(model.log_file) as log:
            message = error_from_log(log.read())
        result.fail(f"training {model.trainer} exited {completed.returncode}: {message}")
        log_stage(f"{model.row}: FAILED ({message})")
        return
    result.trained.append(model.trainer)
    if not model.is_finished():
        result.fail(f"training {model.trainer} finished without {model.checkpoint} or a final validation")
        log_stage(f"{model.row}: FAILED (no final checkpoint or validation)")
        return
    log_stage(f"{model.row}: {model.trainer} trained in {result.training_seconds[model.trainer]:.0f} s")


# --------------------------------------------------------------------------- evaluation

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
    other_modality_images: dict[str, str] = field(default_factory=dict)  # case -> image, for nnUNetv2_predict

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
        with open(raw_json) as f:
            other = json.load(f).get(OTHER_MODALITY_KEY, {})
        held_out = set(patient.values())
        for case, tag in sorted(other.items()):
            check_case_name(case, raw_json)
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


def predict_other_modality(result: RowResult, test_set: TestSet, dataset_id: str, configuration: str, plans: str,
                           fold: int, device: str, env: dict, report_folder: str) -> None:
    """Predict the other-modality test cases with the stock ``nnUNetv2_predict``, one call per
    model and modality (the CSA family folds that modality's norms in: nnUNet_csa_modality)."""
    by_modality: dict[str, list[str]] = {}
    for case in test_set.other_modality_images:
        by_modality.setdefault(test_set.case_modality[case], []).append(case)
    for model in result.models:
        # a stale prediction from an earlier model must never pass for this one's
        shutil.rmtree(model.other_modality_predictions, ignore_errors=True)
    for modality, cases in sorted(by_modality.items()):
        if result.failed:
            return
        try:
            model = model_for(result, modality)
        except FileNotFoundError as e:
            result.fail(str(e))
            return
        input_folder = os.path.join(report_folder, "other_modality_inputs", f"fold_{model.fold}", modality)
        os.makedirs(input_folder, exist_ok=True)
        for case in cases:
            link = os.path.join(input_folder, os.path.basename(test_set.other_modality_images[case]))
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(test_set.other_modality_images[case]), link)
        command = [_console_script("nnUNetv2_predict"), "-i", input_folder, "-o", model.other_modality_predictions,
                   "-d", str(dataset_id), "-c", configuration, "-p", plans, "-tr", model.trainer, "-f", str(fold),
                   "-device", device, "-npp", "1", "-nps", "1"]
        call_env = dict(env, nnUNet_csa_modality=modality) if result.row in CSA_FAMILY else env
        log_file = os.path.join(report_folder, "logs", f"predict_{model.trainer}_{modality}_fold{model.fold}.log")
        with open(log_file, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            completed = subprocess.run(command, env=call_env, stdout=log, stderr=subprocess.STDOUT)
        if completed.returncode != 0:
            with open(log_file) as log:
                message = error_from_log(log.read())
            result.fail(f"nnUNetv2_predict of the {modality} other-modality cases with {model.trainer} exited "
                        f"{completed.returncode}: {message}")
            log_stage(f"{result.row}: FAILED ({result.error})")


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


# --------------------------------------------------------------------------- timing

def kept_or_new_timings(to_time: Sequence[tuple[str, str]], cache_file: str, iterations: int, retime: bool,
                        measure) -> dict:
    """The timing of each (row, trainer): the one kept in ``cache_file`` from an earlier run
    of this report (same number of timed iterations, no error), unless ``retime``; else
    ``measure(trainer)``, stamped with its date and kept. A rerun under other load would
    otherwise silently replace the first measurement."""
    kept = {}
    if os.path.isfile(cache_file):
        with open(cache_file) as f:
            kept = json.load(f)
    timing = {}
    for row, trainer in tqdm(to_time, desc="timing", file=sys.stderr):
        entry = kept.get(trainer)
        if not retime and entry and "error" not in entry and entry.get("iterations") == iterations:
            log_stage(f"{row}: timing kept from {entry.get('measured_at', 'an earlier run')} (--retime measures again)")
        else:
            entry = {**measure(trainer), "measured_at": time.strftime("%Y-%m-%d %H:%M")}
            kept[trainer] = entry
            log_stage(f"{row}: timing " + (f"FAILED ({entry['error']})" if "error" in entry else
                                           f"{entry['seconds_per_iteration_median']:.3f} s/iteration"))
        timing[row] = entry
    staging = f"{cache_file}.{os.getpid()}.tmp"
    with open(staging, "w") as f:
        json.dump(_json_safe(kept), f, indent=1, allow_nan=False)
    os.replace(staging, cache_file)  # a run stopped while writing keeps the old record whole
    return timing


def time_trainer(dataset_id: str, configuration: str, plans: str, trainer: str, device: str, iterations: int,
                 fold: int, env: dict, log_file: str) -> dict:
    """``python -m nnunetv2_csa.timing`` in a fresh process (nnU-Net reads settings at import)."""
    command = [sys.executable, "-m", "nnunetv2_csa.timing", "-d", str(dataset_id), "-c", configuration, "-p", plans,
               "-tr", trainer, "-f", str(fold), "-device", device, "-n", str(iterations)]
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    with open(log_file, "w") as log:
        completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    if completed.returncode != 0:
        with open(log_file) as log:
            return {"trainer": trainer, "error": error_from_log(log.read())}
    try:
        return json.loads(completed.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"trainer": trainer, "error": f"no JSON result on stdout: {completed.stdout[-200:]!r}"}


# --------------------------------------------------------------------------- tables

def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.number)) and math.isfinite(float(value))


def best_marks(means: pd.DataFrame, higher_is_better: Mapping[str, bool], decimals: int = 3,
               exclude: Sequence[str] = ()) -> pd.DataFrame:
    """True where a value is the best of its column (max where ``higher_is_better[column]``,
    else min), compared at the displayed precision, so that visible ties are all marked.
    Rows in ``exclude`` (failed rows) and non-finite values never are."""
    marks = pd.DataFrame(False, index=means.index, columns=means.columns)
    for column in means.columns:
        values = pd.to_numeric(means[column], errors="coerce").round(decimals)
        candidates = values[~values.index.isin(exclude) & np.isfinite(values)]
        if candidates.empty:
            continue
        best = candidates.max() if higher_is_better[column] else candidates.min()
        marks.loc[candidates.index[candidates == best], column] = True
    return marks


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def format_table(means: pd.DataFrame, higher_is_better: Mapping[str, bool], stds: pd.DataFrame | None = None,
                 failed: Mapping[str, str] | None = None, decimals: int = 3, first_column: str = "Method") -> str:
    """A markdown table, one line per row of ``means`` (index: row names), the best value of
    each column in bold. A value that is not finite is written ``n/a``; a row in ``failed``
    reads ``FAILED: <error>`` in its first cell and ``FAILED`` in the others. ``stds`` adds
    `` ± std`` where the standard deviation is finite."""
    failed = dict(failed or {})
    marks = best_marks(means, higher_is_better, decimals, exclude=list(failed))
    lines = ["| " + " | ".join([first_column, *map(_escape, means.columns)]) + " |",
             "|" + "|".join(["---"] + [":---:"] * len(means.columns)) + "|"]
    for row_name in means.index:
        if row_name in failed:
            cells = [f"{FAILED}: {_escape(failed[row_name])}"] + [FAILED] * (len(means.columns) - 1)
        else:
            cells = []
            for column in means.columns:
                value = means.at[row_name, column]
                if not _finite(value):
                    cells.append(NOT_AVAILABLE)
                    continue
                text = f"{float(value):.{decimals}f}"
                if marks.at[row_name, column]:
                    text = f"**{text}**"
                if stds is not None and _finite(stds.at[row_name, column]):
                    text += f" ± {float(stds.at[row_name, column]):.{decimals}f}"
                cells.append(text)
        lines.append("| " + " | ".join([_escape(row_name), *cells]) + " |")
    return "\n".join(lines)


def modality_table(results: pd.DataFrame, modality: str, rows: Sequence[RowResult], classes: Sequence[str],
                   metrics: Sequence[tuple[str, str, bool]]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Means and stds over the modality's test cases, one column per metric and class plus the
    mean over classes (per case first). Returns (means, stds, higher_is_better)."""
    columns, higher = [], {}
    for metric, title, higher_better in metrics:
        for class_name in [*classes, "mean"]:
            column = f"{title} {class_name}"
            columns.append(column)
            higher[column] = higher_better
    index = [r.row for r in rows]
    means = pd.DataFrame(np.nan, index=index, columns=columns)
    stds = pd.DataFrame(np.nan, index=index, columns=columns)
    subset = results[results["modality"] == modality]
    for row in rows:
        row_data = subset[subset["row"] == row.row]
        if row.failed or row_data.empty:
            continue
        for metric, title, _ in metrics:
            for class_name in classes:
                values = row_data.loc[row_data["class_name"] == class_name, metric].astype(float)
                means.at[row.row, f"{title} {class_name}"] = values.mean()
                stds.at[row.row, f"{title} {class_name}"] = values.std()
            per_case = row_data.groupby("case")[metric].mean()
            means.at[row.row, f"{title} mean"] = per_case.mean()
            stds.at[row.row, f"{title} mean"] = per_case.std()
    return means, stds, higher


def wilcoxon_table(results: pd.DataFrame, rows: Sequence[RowResult], modalities: Sequence[str]) -> pd.DataFrame:
    """Patient-level paired tests of CSA vs every other row, per modality, for Dice, HD and
    HD95 (mean over classes per case, then per patient): Wilcoxon p, the 95 % bootstrap
    interval of the mean difference, and p adjusted by Holm over every test of the table."""
    records = []
    proposed = next((r for r in rows if r.row == PROPOSED_ROW and not r.failed), None)
    if proposed is None:
        return pd.DataFrame(records)
    csa = results[results["row"] == PROPOSED_ROW]
    for row in rows:
        if row.row == PROPOSED_ROW or row.failed:
            continue
        other = results[results["row"] == row.row]
        for metric, _ in TEST_METRICS:
            test = wilcoxon_between_methods(csa, other, metric=metric, by=("modality",), pair_on="patient")
            for record in test.to_dict("records"):
                if record["modality"] in modalities:
                    records.append(dict(record, comparison=f"{PROPOSED_ROW} vs {row.row}", other=row.row))
    table = pd.DataFrame(records)
    if not table.empty:
        table["p_holm"] = holm_adjust(table["p_value"].to_numpy(dtype=float))
    return table


def smallest_two_sided_p(n: int) -> float:
    """The smallest p an exact two-sided Wilcoxon signed-rank test can give with n pairs: 2 / 2^n."""
    return 2.0 / 2 ** n if n >= 1 else math.nan


def _format_p(record: Mapping) -> str:
    if not _finite(record.get("p_value")):
        return f"{NOT_AVAILABLE} ({_escape(record.get('reason') or 'no test')})"
    interval = (f" [{record['ci_low']:+.3f}, {record['ci_high']:+.3f}]"
                if _finite(record.get("ci_low")) and _finite(record.get("ci_high")) else "")
    return (f"{record['p_value']:.3g} (Holm {record['p_holm']:.3g}; n={int(record['n'])}, "
            f"Δ={record['mean_difference']:+.3f}{interval}"
            + (f"; {_escape(record['reason'])}" if record.get("reason") else "") + ")")


def wilcoxon_markdown(wilcoxon: pd.DataFrame, rows: Sequence[RowResult], modalities: Sequence[str]) -> str:
    if wilcoxon.empty:
        proposed = [r for r in rows if r.row == PROPOSED_ROW]
        reason = ("the CSA row was not run" if not proposed else
                  "the CSA row failed" if proposed[0].failed else "no other row succeeded")
        return f"No test: {reason}."
    columns = [f"{m} {title}" for m in modalities for _, title in TEST_METRICS]
    lines = ["| Comparison | " + " | ".join(columns) + " |", "|---|" + "|".join([":---:"] * len(columns)) + "|"]
    for comparison, group in wilcoxon.groupby("comparison", sort=False):
        cells = []
        for modality in modalities:
            for metric, _ in TEST_METRICS:
                match = group[(group["modality"] == modality) & (group["metric"] == metric)]
                cells.append(_format_p(match.iloc[0].to_dict()) if len(match) else NOT_AVAILABLE)
        lines.append(f"| {comparison} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_fold_table(results: pd.DataFrame, modality: str, rows: Sequence[RowResult], folds: Sequence[int]
                   ) -> tuple[pd.DataFrame, dict]:
    """Mean Dice (over classes per case, then over the fold's test cases of ``modality``), one
    column per fold."""
    columns = [f"fold {f}" for f in folds]
    means = pd.DataFrame(np.nan, index=[r.row for r in rows], columns=columns)
    subset = results[results["modality"] == modality]
    for row in rows:
        for fold in folds:
            data = subset[(subset["row"] == row.row) & (subset["fold"] == fold)]
            if not data.empty:
                means.at[row.row, f"fold {fold}"] = data.groupby("case")["dice"].mean().mean()
    return means, {c: True for c in columns}


def budget_table(rows: Sequence[RowResult], budget, single_budget: str, modalities: Sequence[str],
                 batch_size: int, fold_runs: Sequence[FoldRun], tags) -> list[dict]:
    """Per row: training iterations and the slices of each modality it sees (batch size times
    iterations; unpaired rows draw B/n of each modality, Joint draws cases uniformly, so it
    sees each modality in proportion to its training cases, averaged over the folds)."""
    epochs, iterations = budget if budget else FULL_BUDGET
    n = len(modalities)
    shares = {m: [] for m in modalities}
    for run in fold_runs:
        training = [c for c in run.training_cases if c in tags.case_modality]
        for m in modalities:
            shares[m].append(sum(tags.case_modality[c] == m for c in training) / max(1, len(training)))
    table = []
    for row in rows:
        e, i = row_budget(row.row, (epochs, iterations), n, single_budget)
        entry = {"row": row.row, "iterations": e * i, "slices": {}}
        for m in modalities:
            if row.row == "Single":
                entry["slices"][m] = e * i * batch_size
            elif row.row in CSA_FAMILY:
                entry["slices"][m] = e * i * batch_size / n
            else:
                entry["slices"][m] = e * i * batch_size * float(np.mean(shares[m]))
        table.append(entry)
    return table


def _mib(value) -> str:
    return f"{value / 2 ** 20:.1f}" if _finite(value) else NOT_AVAILABLE


def _ratio(value, reference) -> str:
    if _finite(value) and _finite(reference) and reference > 0:
        return f"{value / reference:.2f}"
    return NOT_AVAILABLE


def timing_markdown(timing: Mapping[str, dict], rows: Sequence[RowResult]) -> str:
    reference = timing.get(REFERENCE_ROW, {})
    lines = ["| Method | trainer timed | s/iteration (median) | s/iteration (mean) | time ratio to Joint "
             "(median) | peak memory (MiB) | memory ratio to Joint | epoch-end overhead (s) | measured |",
             "|---|---|:---:|:---:|:---:|:---:|:---:|:---:|:---:|"]
    names = [r.row for r in rows] + ([REFERENCE_ROW] if REFERENCE_ROW not in [r.row for r in rows]
                                     and REFERENCE_ROW in timing else [])
    for name in names:
        entry = timing.get(name)
        label = name if name in [r.row for r in rows] else f"{name} (reference only)"
        if entry is None:
            lines.append(f"| {label} | {NOT_AVAILABLE} | " + " | ".join(
                [f"{NOT_AVAILABLE} (not measured)"] + [NOT_AVAILABLE] * 6) + " |")
            continue
        if "error" in entry:
            lines.append(f"| {label} | {entry['trainer']} | {FAILED}: {_escape(entry['error'])} | "
                         + " | ".join([FAILED] * 5) + f" | {entry.get('measured_at', NOT_AVAILABLE)} |")
            continue
        epoch_end = entry.get("epoch_end_seconds_median")
        median, mean = entry["seconds_per_iteration_median"], entry["seconds_per_iteration_mean"]
        memory = entry["peak_memory_bytes"]
        lines.append(f"| {label} | {entry['trainer']} | {median:.3f} | {mean:.3f} | "
                     f"{_ratio(median, reference.get('seconds_per_iteration_median'))} | {_mib(memory)} | "
                     f"{_ratio(memory, reference.get('peak_memory_bytes'))} | "
                     f"{f'{epoch_end:.2f}' if _finite(epoch_end) else NOT_AVAILABLE} | "
                     f"{entry.get('measured_at', NOT_AVAILABLE)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    return plt


def _modality_class_grid(modalities: Sequence[str], classes: Sequence[str]):
    """A figure with one panel per modality (rows) and class (columns)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(modalities), len(classes), figsize=(3.2 * len(classes) + 1, 3 * len(modalities)),
                             squeeze=False)
    return plt, fig, axes


def _label_panel(ax, modality: str, class_name: str, ylabel: str | None) -> None:
    ax.set_title(f"{modality}: {class_name}", fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel)


def _save_figure(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dice_boxplots(results: pd.DataFrame, modalities: Sequence[str], classes: Sequence[str],
                       row_names: Sequence[str], path: str) -> None:
    plt, fig, axes = _modality_class_grid(modalities, classes)
    for i, modality in enumerate(modalities):
        for j, class_name in enumerate(classes):
            ax = axes[i][j]
            subset = results[(results["modality"] == modality) & (results["class_name"] == class_name)]
            data = [subset.loc[subset["row"] == r, "dice"].to_numpy(dtype=float) for r in row_names]
            positions = [k for k, d in enumerate(data) if len(d)]
            if positions:
                ax.boxplot([data[k] for k in positions], positions=positions, widths=0.6)
            for k, d in enumerate(data):
                if not len(d):
                    ax.text(k, 0.5, FAILED, rotation=90, ha="center", va="center", fontsize=8, color="red")
            ax.set_xticks(range(len(row_names)))
            ax.set_xticklabels([f"{r} (n={len(d)})" for r, d in zip(row_names, data)], rotation=45, ha="right",
                               fontsize=8)
            ax.set_xlim(-0.5, len(row_names) - 0.5)
            ax.set_ylim(-0.02, 1.02)
            _label_panel(ax, modality, class_name, "Dice" if j == 0 else None)
    _save_figure(plt, fig, path)


def plot_paired_differences(results: pd.DataFrame, modalities: Sequence[str], classes: Sequence[str],
                            rows: Sequence[RowResult], path: str) -> bool:
    """Per modality and class: CSA's Dice minus each other row's, one dot per patient (mean over
    the patient's test cases), and the 95 % bootstrap interval of the mean difference."""
    others = [r.row for r in rows if r.row != PROPOSED_ROW and not r.failed]
    if PROPOSED_ROW not in set(results["row"]) or not others:
        return False
    plt, fig, axes = _modality_class_grid(modalities, classes)
    per_patient = results.groupby(["row", "modality", "class_name", "patient"])["dice"].mean()
    for i, modality in enumerate(modalities):
        for j, class_name in enumerate(classes):
            ax = axes[i][j]
            for k, other in enumerate(others):
                try:
                    a = per_patient.loc[(PROPOSED_ROW, modality, class_name)]
                    b = per_patient.loc[(other, modality, class_name)]
                except KeyError:
                    continue
                differences = (a - b).dropna().to_numpy()
                jitter = np.linspace(-0.15, 0.15, len(differences)) if len(differences) > 1 else [0.0]
                ax.plot(k + np.asarray(jitter), differences, "o", ms=3, alpha=0.6, color="tab:blue")
                low, high = bootstrap_mean_ci(differences)
                if _finite(low) and _finite(high):
                    mean = float(np.mean(differences))
                    ax.errorbar([k + 0.3], [mean], yerr=[[mean - low], [high - mean]], fmt="s", color="black",
                                capsize=3, ms=4)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(range(len(others)))
            ax.set_xticklabels([f"CSA − {o}" for o in others], rotation=45, ha="right", fontsize=8)
            _label_panel(ax, modality, class_name, "Dice difference" if j == 0 else None)
    _save_figure(plt, fig, path)
    return True


def load_training_log(checkpoint: str) -> dict:
    from nnunetv2_csa.checkpoints import load_checkpoint
    return load_checkpoint(checkpoint).get("logging", {})


def _model_modalities(row: RowResult, count: int) -> list[str]:
    """The modality names of a CSA-family model's per-modality series (from its plans.json)."""
    plans_file = os.path.join(os.path.dirname(row.models[0].fold_folder), "plans.json")
    try:
        with open(plans_file) as f:
            names = modalities_from_plans(json.load(f), plans_file)
    except (OSError, ValueError):
        names = []
    return names if len(names) == count else [f"modality {m}" for m in range(count)]


def plot_training_curves(row: RowResult, path: str) -> bool:
    """Loss, pseudo Dice and (when logged) the consistency term per epoch of each of the row's models."""
    logs = {}
    for model in row.models:
        if os.path.isfile(model.checkpoint):
            logs[model.modality or model.trainer] = load_training_log(model.checkpoint)
    if not logs:
        return False
    plt = _pyplot()
    from nnunetv2_csa.training.progress import CONSISTENCY_SERIES
    has_consistency = any(np.isfinite(np.asarray(log.get(series, []), dtype=float)).any()
                          for log in logs.values() for series in CONSISTENCY_SERIES)
    n_panels = 3 if has_consistency else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 3.6))
    for label, log in logs.items():
        prefix = f"{label}: " if len(logs) > 1 else ""
        epochs = np.arange(len(log.get("train_losses", [])))
        axes[0].plot(epochs, log.get("train_losses", []), marker="o", label=f"{prefix}train")
        axes[0].plot(np.arange(len(log.get("val_losses", []))), log.get("val_losses", []), marker="s",
                     ls="--", label=f"{prefix}validation")
        axes[1].plot(np.arange(len(log.get("mean_fg_dice", []))), log.get("mean_fg_dice", []), marker="o",
                     label=f"{prefix}pseudo Dice")
        axes[1].plot(np.arange(len(log.get("ema_fg_dice", []))), log.get("ema_fg_dice", []), ls="--", marker=".",
                     label=f"{prefix}pseudo Dice (EMA)")
        per_modality = np.asarray(log.get("mean_fg_dice_per_modality", []), dtype=float)
        if per_modality.ndim == 2 and np.isfinite(per_modality).any():
            names = _model_modalities(row, per_modality.shape[1])
            for m in range(per_modality.shape[1]):
                axes[1].plot(np.arange(len(per_modality)), per_modality[:, m], ls=":", marker="^",
                             label=f"{prefix}pseudo Dice {names[m]}")
        if has_consistency:
            for series, style, what in zip(CONSISTENCY_SERIES, ("-", ":"), ("training steps", "validation batches")):
                values = np.asarray(log.get(series, []), dtype=float)
                if np.isfinite(values).any():
                    axes[2].plot(np.arange(len(values)), values, marker="o", ls=style, color="m",
                                 label=f"{prefix}{what}")
    # what nnU-Net logs as train_losses is the loss its train_step minimised: for the rows that
    # train with the consistency term (λ > 0) that includes the weighted term; validation never does
    trains_with_term = ROWS_BY_NAME[row.row].trains_with_consistency
    axes[0].set_title(f"{row.row}: loss per epoch", fontsize=10)
    axes[0].set_ylabel("train: Dice + CE" + (" + (λ/2) × consistency term" if trains_with_term else "")
                       + "\nvalidation: Dice + CE", fontsize=8)
    axes[1].set_title(f"{row.row}: pseudo Dice (validation patches)", fontsize=10)
    axes[1].set_ylabel("pseudo Dice")
    axes[1].set_ylim(-0.02, 1.02)
    if has_consistency:
        axes[2].set_title(f"{row.row}: consistency term", fontsize=10)
        axes[2].set_ylabel("term, unweighted (before λ/2)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _read_array(path: str):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def plot_overlay(rows: Sequence[RowResult], test_cases: Sequence[str], case_modality: Mapping[str, str],
                 modalities: Sequence[str], reference_folder: str, image_folder: str, classes: Sequence[tuple],
                 file_ending: str, path: str) -> dict:
    """Like the paper's Fig. 6: for each modality the test case and slice with the largest
    foreground, the image with the ground truth and each row's prediction as contours."""
    plt = _pyplot()
    colours = plt.get_cmap("tab10")
    columns = ["ground truth", *[r.row for r in rows]]
    fig, axes = plt.subplots(len(modalities), len(columns), figsize=(2.6 * len(columns), 3.2 * len(modalities)),
                             squeeze=False)
    chosen = {}
    for i, modality in enumerate(modalities):
        best = None
        for case in (c for c in test_cases if case_modality[c] == modality):
            reference = _read_array(os.path.join(reference_folder, case + file_ending))
            per_slice = (reference > 0).reshape(reference.shape[0], -1).sum(1)
            if best is None or per_slice.max() > best[2]:
                best = (case, reference, int(per_slice.max()), int(per_slice.argmax()))
        if best is None:
            for ax in axes[i]:
                ax.axis("off")
            continue
        case, reference, _, z = best
        chosen[modality] = {"case": case, "slice": z}
        image_file = os.path.join(image_folder, f"{case}_0000{file_ending}")
        image = _read_array(image_file)[z] if os.path.isfile(image_file) else np.zeros(reference.shape[1:])
        for j, column in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(image, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                segmentation = reference[z]
                ax.set_ylabel(f"{modality}\n{case}, slice {z}", fontsize=8)
            else:
                row = rows[j - 1]
                predicted = None if row.failed else prediction_file(row, case, modality, file_ending)
                if predicted is None or not os.path.isfile(predicted):
                    ax.text(0.5, 0.5, FAILED, transform=ax.transAxes, ha="center", va="center", color="red")
                    ax.set_title(column, fontsize=9)
                    continue
                segmentation = _read_array(predicted)[z]
            for k, (class_name, label) in enumerate(classes):
                mask = (segmentation == label).astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=[colours(k % 10)], linewidths=1.2)
            ax.set_title(column, fontsize=9)
    handles = [plt.Line2D([], [], color=colours(k % 10), label=name) for k, (name, _) in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=len(classes), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return chosen


# --------------------------------------------------------------------------- report

def machine_description(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    import torch
    gpu = "none"
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0) + ("" if device == "cuda" else " (not used)")
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": gpu, "device": device,
            "torch": torch.__version__, "nnunetv2": importlib.metadata.version("nnunetv2"),
            "python": platform.python_version(), "platform": platform.platform()}


def plan_description(preprocessed_folder: str, plans: str, configuration: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_file = os.path.join(preprocessed_folder, plans + ".json")
    with open(plans_file) as f:
        manager = PlansManager(json.load(f))
    config = manager.get_configuration(configuration)
    arch = config.network_arch_init_kwargs
    return {"plans_file": plans_file, "configuration": configuration,
            "patch_size": [int(v) for v in config.patch_size], "batch_size": int(config.batch_size),
            "spacing": [float(v) for v in config.spacing], "n_stages": arch.get("n_stages"),
            "features_per_stage": arch.get("features_per_stage"),
            "norm_op": str(arch.get("norm_op")).rsplit(".", 1)[-1]}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def data_source_text(dataset_json: Mapping) -> str:
    """What the data of the report are, from the converter's record in dataset.json: a
    phantom is named as such (it carries a public dataset's names and codes)."""
    conversion = dataset_json.get("csa_conversion") or {}
    phantom = conversion.get("phantom")
    if phantom:
        details = ", ".join(f"{k} {v}" for k, v in phantom.items() if k not in ("generator", "layout"))
        return (f"SYNTHETIC phantom images written by `nnUNetv2_csa_phantom` in the {conversion.get('converter')} "
                f"layout ({details}). These numbers check the pipeline; they say nothing about how the methods "
                f"segment real images.")
    if conversion:
        return (f"{conversion.get('converter')}: {dataset_json.get('description', '')} "
                f"({dataset_json.get('reference', 'no reference given')}), converted from "
                f"`{conversion.get('source')}`.")
    name = dataset_json.get("description") or dataset_json.get("name", "unknown")
    return f"{name} (no converter record in dataset.json)."


def write_report(report_folder: str, *, dataset_name: str, data_source: str, folds: Sequence[int], budget, norm: str,
                 seed,
                 plan: dict, machine: dict, rows: Sequence[RowResult], results: pd.DataFrame, wilcoxon: pd.DataFrame,
                 timing: Mapping[str, dict], modalities: Sequence[str], classes: Sequence[str],
                 test_set: TestSet, figures: Mapping[str, str], overlay_cases: Mapping, timing_iterations: int,
                 budgets: Sequence[dict]) -> str:
    failed = {r.row: r.error for r in rows if r.failed}
    budget_text = (f"{budget[0]} epochs × {budget[1]} training iterations per epoch "
                   f"(validation {max(1, budget[1] // 5)} iterations per epoch; short-budget trainers "
                   f"`_{budget[0]}epochs_{budget[1]}its`)") if budget else \
        f"full: nnU-Net's {FULL_BUDGET[0]} epochs × {FULL_BUDGET[1]} iterations (plain trainer names)"

    def per_modality(cases) -> dict[str, int]:
        return {m: sum(test_set.case_modality[c] == m for c in cases) for m in modalities}

    def count(cases) -> str:
        return ", ".join(f"{n} {m}" for m, n in per_modality(cases).items())

    n_per_modality = per_modality(test_set.cases)
    other = list(test_set.other_modality_images)
    n_patients = len(set(test_set.case_patient.values()))
    fold_text = f"fold {folds[0]}" if len(folds) == 1 else f"folds {', '.join(map(str, folds))}"
    out = [f"# CSA benchmark: {dataset_name}, {fold_text}" + (" (cross-validation, pooled)" if len(folds) > 1
                                                                else ""), ""]
    out += [f"**Data.** {data_source}", ""]
    out += [f"**Test cases.** {len(test_set.cases)} cases ({count(test_set.cases)}) of the {n_patients} patients "
            f"that {fold_text} of `splits_final.json` hold{'s' if len(folds) == 1 else ''} out"
            + (", each scored once, by the models of the fold that holds it out (`results.csv` column `fold`)"
               if len(folds) > 1 else "") + ": their validation cases "
            f"({count(test_set.validation_cases)}), scored from each row's own final-validation predictions"
            + (f", and the other modality of the same patients ({count(other)}; left out of training by the "
               f"converter's `--unpaired`, kept in `{OTHER_MODALITY_IMAGES}`), predicted by this benchmark with "
               f"`nnUNetv2_predict`" if other else "")
            + ". Source per case: `results.csv` column `source`. Both use nnU-Net's predictor (sliding "
              "window with mirroring); CSA-family rows predict each case with its own modality's norms; "
              "Single takes modality k's cases from its model trained on modality k. Metrics are 3D per "
              "volume against the converted labels; distances in mm (see `nnunetv2_csa.evaluation`); HD95: the "
              f"{HD95_DEFINITIONS[DEFAULT_HD95]}. "
              "Empty masks get defined values (Dice 0 and the image diagonal, or Dice 1 and 0), counted "
              "in `results.csv` column `flag`. Values: mean ± sample std over the modality's test cases; "
              "best per column in **bold** (max Dice, min distance).", ""]
    out += ["## Setup", "",
            f"- budget: {budget_text}",
            f"- {fold_text}; split seed (dataset.json `csa_conversion`): "
            f"{seed if seed is not None else NOT_AVAILABLE}",
            "- norm: " + ("modality-specific BatchNorm (`_BN` trainers)" if norm == "bn" else
                          "InstanceNorm (the plan's norm; modality-specific for the CSA family)"),
            f"- plan: `{os.path.basename(plan['plans_file'])}` configuration `{plan['configuration']}`, patch "
            f"{plan['patch_size']}, batch {plan['batch_size']}, spacing {[round(s, 4) for s in plan['spacing']]} mm, "
            f"{plan['n_stages']} stages {plan['features_per_stage']}",
            f"- machine: {machine['cpu']} ({machine['cpu_cores']} cores), GPU: {machine['gpu']}, device "
            f"`{machine['device']}`; torch {machine['torch']}, nnunetv2 {machine['nnunetv2']}, "
            f"Python {machine['python']}",
            "", "| Method | trainer(s) | this run | status |", "|---|---|---|---|"]
    for r in rows:
        done = ", ".join([f"trained {t} ({r.training_seconds.get(t, 0):.0f} s)" for t in r.trained]
                         + [f"reused {t}" for t in r.reused]) or "-"
        status = f"{FAILED}: {_escape(r.error)}" if r.failed else "ok"
        out.append(f"| {r.row} | {', '.join(dict.fromkeys(m.trainer for m in r.models))} | {done} | {status} |")
    out += ["", "Budget per row (per fold): training iterations and the 2D slices of each modality seen "
            "(iterations × batch size; the unpaired rows draw B/n of each modality per batch, Joint draws "
            "cases uniformly, so its share follows the training cases; Single trains on its modality alone"
            + (", here for 1/n of the iterations: equal data" if any(b["row"] == "Single" and b["iterations"] !=
                                                                     budgets[0]["iterations"] for b in budgets)
               else ", here for the same iterations: equal iterations") + ").", "",
            "| Method | iterations | " + " | ".join(f"{m} slices seen" for m in modalities) + " |",
            "|---|:---:|" + ":---:|" * len(modalities)]
    for b in budgets:
        out.append(f"| {b['row']} | {b['iterations']} | "
                   + " | ".join(f"{b['slices'][m]:.0f}" for m in modalities) + " |")
    out.append("")
    out += ["## Results per modality (paper's Table 1 layout)", ""]
    for modality in modalities:
        out += [f"### {modality} ({n_per_modality[modality]} test cases)", "",
                "Dice and Hausdorff distance (HD, mm) per class:", ""]
        means, stds, higher = modality_table(results, modality, rows, classes, TABLE_METRICS)
        out += [format_table(means, higher, stds, failed), "", "HD95 and ASSD (mm) per class:", ""]
        means, stds, higher = modality_table(results, modality, rows, classes, SECOND_TABLE_METRICS)
        out += [format_table(means, higher, stds, failed), ""]
    if len(folds) > 1:
        out += ["## Per fold", "", "Mean Dice over the classes and the fold's test cases, per modality:", ""]
        for modality in modalities:
            means, higher = per_fold_table(results, modality, rows, folds)
            out += [f"{modality}:", "", format_table(means, higher, failed=failed), ""]
    n_pairs = sorted({int(n) for n in wilcoxon["n"]}) if not wilcoxon.empty else []
    n_tests = int(np.isfinite(wilcoxon["p_value"].to_numpy(dtype=float)).sum()) if not wilcoxon.empty else 0
    out += ["## Wilcoxon signed-rank test, CSA vs each other row", "",
            "Patient level: per patient the mean over classes (and over the patient's test cases of the "
            "modality); paired two-sided test (`scipy.stats.wilcoxon`), Δ = mean(CSA) − mean(other) with its "
            "95 % percentile-bootstrap interval (`scipy.stats.bootstrap`, 9999 resamples, seed 0) in brackets. "
            f"Holm: p adjusted by Holm's step-down method over all {n_tests} tests of this table (family-wise "
            "error rate). "
            + ("Smallest p an exact test can reach: " + ", ".join(f"n={n}: {smallest_two_sided_p(n):.2g}"
                                                                  for n in n_pairs) + "." if n_pairs else ""), "",
            wilcoxon_markdown(wilcoxon, rows, modalities), ""]
    out += ["## Training cost", "",
            f"Seconds per training iteration including data loading, {timing_iterations} timed iterations after "
            "2 warm-up iterations, each trainer in a fresh process; Single is timed with its modality-0 model. "
            "A timed iteration is nnU-Net's `train_step` (forward, loss, backward, optimizer step) plus the "
            "loading of its batch; the consistency term is in it only for rows that train with it (λ > 0): MSBN "
            "logs its CSA term on the validation batches, outside the timed step. Epoch-end overhead: the median "
            "wall time of `on_epoch_end` (checkpoint, progress plots, log) over up to 3 epochs (the first "
            "includes the first best-checkpoint save). Measured: when; a rerun of this report keeps each trainer's "
            "first timing (`--retime` measures again). "
            + ("Peak memory: `torch.cuda.max_memory_allocated`." if machine["device"] == "cuda" else
               "Peak memory on CPU: increase of the process' peak RSS over its value before `on_train_start` "
               "(augmentation workers not counted)."), ""]
    out += [timing_markdown(timing, rows) if timing_iterations > 0 else "Not measured (--timing-iterations 0).",
            ""]
    out += ["## Figures", ""]
    for title, file in figures.items():
        out.append(f"- {title}: `{file}`")
    if overlay_cases:
        out.append("- overlay cases: " + ", ".join(f"{m}: {v['case']} slice {v['slice']}"
                                                   for m, v in overlay_cases.items()))
    out += ["", "Per case, class and row: `results.csv`, `results.json`. Training logs: `logs/`.", ""]
    text = "\n".join(out)
    with open(os.path.join(report_folder, "report.md"), "w") as f:
        f.write(text)
    return text


# --------------------------------------------------------------------------- the run

def default_report_folder(results_root: str, dataset_name: str, configuration: str, plans: str,
                          folds: Sequence[int], budget, norm: str) -> str:
    budget_part = f"{budget[0]}epochs_{budget[1]}its" if budget else "full"
    fold_part = f"fold{folds[0]}" if len(folds) == 1 else "folds" + "-".join(map(str, folds))
    return os.path.join(results_root, dataset_name,
                        f"csa_benchmark__{plans}__{configuration}__{fold_part}__{budget_part}__{norm}")


@dataclass
class FoldRun:
    """One fold of the benchmark: its test cases, its rows' models, their scores."""
    fold: int
    test_set: TestSet
    rows: list[RowResult]
    training_cases: list[str]
    results: pd.DataFrame | None = None


def _fold_rows(rows: Sequence[str], fold: int, modalities: Sequence[str], norm: str, budget, single_budget: str,
               results_root: str, dataset_name: str, plans: str, configuration: str, report_folder: str,
               n_folds: int) -> list[RowResult]:
    suffix = "" if n_folds == 1 else f"_fold{fold}"
    row_results = []
    for row in rows:
        models = []
        for k in (range(len(modalities)) if row == "Single" else [0]):
            name = trainer_name(row, norm, row_budget(row, budget, len(modalities), single_budget), k)
            models.append(Model(row, name, modalities[k] if row == "Single" else None,
                                os.path.join(results_root, dataset_name, f"{name}__{plans}__{configuration}",
                                             f"fold_{fold}"),
                                os.path.join(report_folder, "logs", f"train_{name}{suffix}.log"),
                                os.path.join(report_folder, "predictions", *([f"fold_{fold}"] if suffix else []),
                                             name), fold))
        row_results.append(RowResult(row, models))
    return row_results


def merge_fold_rows(fold_runs: Sequence[FoldRun]) -> list[RowResult]:
    """One RowResult per row over all folds: failed if it failed in any fold (a row missing a
    fold would be pooled over other patients than the rest)."""
    if len(fold_runs) == 1:
        return fold_runs[0].rows
    merged = []
    for parts in zip(*(run.rows for run in fold_runs)):
        row = RowResult(parts[0].row, [m for part in parts for m in part.models])
        for run, part in zip(fold_runs, parts):
            row.trained += [f"{t} (fold {run.fold})" for t in part.trained]
            row.reused += [f"{t} (fold {run.fold})" for t in part.reused]
            row.training_seconds.update({f"{t} (fold {run.fold})": v for t, v in part.training_seconds.items()})
        errors = [f"fold {run.fold}: {part.error}" for run, part in zip(fold_runs, parts) if part.failed]
        if errors:
            row.fail("; ".join(errors))
        else:
            row.status = "ok"
        merged.append(row)
    return merged


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


def _parse_folds(folds, n_splits: int, splits_file: str) -> list[int]:
    if folds == "all" or folds == ["all"]:
        return list(range(n_splits))
    folds = [folds] if isinstance(folds, int) else [int(f) for f in folds]
    if not folds:
        raise BenchmarkError("no fold chosen")
    bad = [f for f in folds if not 0 <= f < n_splits]
    if bad:
        raise BenchmarkError(f"fold(s) {bad} not in {splits_file} ({n_splits} folds)")
    return list(dict.fromkeys(folds))


def run_benchmark(dataset_id, configuration: str = "2d", plans: str = "nnUNetPlans", folds=(0,),
                  budget: tuple[int, int] | None = None, rows: Sequence[str] = ROWS, norm: str = "instance",
                  device: str = "cpu", report_folder: str | None = None, rerun: bool = False,
                  timing_iterations: int = 10, single_budget: str = "equal-iterations", retime: bool = False) -> str:
    """Train, evaluate and time ``rows`` on each of ``folds`` (an int, a list, or "all") and
    write the report folder; returns its path.

    ``budget`` (epochs, iterations per epoch) selects the short-budget trainers; None is
    nnU-Net's full budget. With several folds every held-out patient is scored once, by the
    models of the fold that holds it out, and the tables and tests pool all folds.
    ``timing_iterations`` 0 skips the timing; a trainer timed by an earlier run of the same
    report keeps that timing unless ``retime``. Needs nnUNet_raw, nnUNet_preprocessed and
    nnUNet_results in the environment."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    rows = list(dict.fromkeys(rows))
    unknown = [r for r in rows if r not in ALL_ROWS]
    if not rows or unknown:
        raise BenchmarkError(f"unknown rows {unknown}; choose from {list(ALL_ROWS)}" if unknown else "no rows chosen")
    if device not in ("cpu", "cuda"):
        raise BenchmarkError(f"device must be 'cpu' or 'cuda', not {device!r}")
    preprocessed_root = _required_folder("nnUNet_preprocessed")
    results_root = _required_folder("nnUNet_results")
    raw_root = os.environ.get("nnUNet_raw", "")
    dataset_name = maybe_convert_to_dataset_name(str(dataset_id))
    preprocessed_folder = os.path.join(preprocessed_root, dataset_name)
    with open(os.path.join(preprocessed_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    tags = modality_tags_from_dataset_json(dataset_json, os.path.join(preprocessed_folder, "dataset.json"))
    modalities = list(tags.modalities)
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    labels = dataset_json["labels"]
    classes = [name for name, value in sorted(labels.items(), key=lambda kv: kv[1]) if value != 0]
    splits_file = os.path.join(preprocessed_folder, "splits_final.json")
    if not os.path.isfile(splits_file):
        raise BenchmarkError(f"{splits_file} does not exist: convert the dataset with nnUNetv2_csa_convert_* "
                             f"(it writes the patient-grouped splits), or run nnU-Net once to create them")
    with open(splits_file) as f:
        splits = json.load(f)
    folds = _parse_folds(folds, len(splits), splits_file)
    if budget is not None:
        budget = (int(budget[0]), int(budget[1]))
        trainer_name("Joint", norm, budget)  # validates the budget before anything runs
    for row in rows:  # every trainer name and budget is checked before anything runs
        trainer_name(row, norm, row_budget(row, budget, len(modalities), single_budget))

    report_folder = report_folder or default_report_folder(results_root, dataset_name, configuration, plans,
                                                           folds, budget, norm)
    os.makedirs(os.path.join(report_folder, "logs"), exist_ok=True)
    env = subprocess_environment(device)
    fold_runs = []
    for fold in folds:
        validation_cases = sorted(splits[fold]["val"])
        test_set = fold_test_set(validation_cases, {c: tags.modality_of_case(c) for c in validation_cases},
                                 dataset_json.get(CASE_PATIENT_KEY, {}),
                                 os.path.join(preprocessed_folder, "gt_segmentations"),
                                 os.path.join(raw_root, dataset_name) if raw_root else None, file_ending)
        fold_runs.append(FoldRun(fold, test_set, _fold_rows(rows, fold, modalities, norm, budget, single_budget,
                                                            results_root, dataset_name, plans, configuration,
                                                            report_folder, len(folds)),
                                 list(splits[fold]["train"])))
    test_set = merge_test_sets([run.test_set for run in fold_runs])
    log_stage(f"{dataset_name}, fold(s) {folds}, {len(test_set.cases)} test cases "
              f"({len(test_set.other_modality_images)} of them the other modality of held-out patients), rows {rows}, "
              f"report {report_folder}")

    # 1. training
    log_stage("stage 1/4: training")
    for run in fold_runs:
        for result in tqdm(run.rows, desc=f"rows, fold {run.fold}", file=sys.stderr):
            for model in result.models:
                if result.failed:
                    break
                train_model(model, str(dataset_id), configuration, plans, run.fold, device, rerun, env, result)

    # 2. evaluation
    for run in fold_runs:
        if run.test_set.other_modality_images:
            log_stage(f"stage 2/4: fold {run.fold}: predicting the {len(run.test_set.other_modality_images)} "
                      f"other-modality test cases with nnUNetv2_predict")
            for result in tqdm([r for r in run.rows if not r.failed], desc="predict", file=sys.stderr):
                predict_other_modality(result, run.test_set, str(dataset_id), configuration, plans, run.fold,
                                       device, env, report_folder)
        log_stage(f"stage 2/4: fold {run.fold}: evaluating the predictions of the test cases")
        run.results = evaluate_rows(run.rows, run.test_set, labels, file_ending)
    row_results = merge_fold_rows(fold_runs)
    failed_rows = {r.row for r in row_results if r.failed}
    results = pd.concat([run.results for run in fold_runs], ignore_index=True)
    results = results[~results["row"].isin(failed_rows)].reset_index(drop=True)
    wilcoxon = wilcoxon_table(results, row_results, modalities)

    # 3. timing
    timing = {}
    if timing_iterations > 0:
        log_stage(f"stage 3/4: timing {timing_iterations} training iterations per trainer")
        to_time = [(r.row, r.models[0].trainer) for r in row_results if not r.failed]
        if REFERENCE_ROW not in [r for r, _ in to_time] and REFERENCE_ROW not in [r.row for r in row_results]:
            to_time.append((REFERENCE_ROW, trainer_name(REFERENCE_ROW, norm, budget)))

        def measure(trainer):
            return time_trainer(str(dataset_id), configuration, plans, trainer, device, timing_iterations, folds[0],
                                env, os.path.join(report_folder, "logs", f"timing_{trainer}.log"))

        timing = kept_or_new_timings(to_time, os.path.join(report_folder, TIMING_FILE), timing_iterations, retime,
                                     measure)
    else:
        log_stage("stage 3/4: timing skipped (--timing-iterations 0)")

    # 4. report
    log_stage("stage 4/4: writing the report")
    results.to_csv(os.path.join(report_folder, "results.csv"), index=False)
    figures = {}
    if not results.empty:
        plot_dice_boxplots(results, modalities, classes, [r.row for r in row_results],
                           os.path.join(report_folder, "dice_boxplots.png"))
        figures["Dice box plots per class and modality (n: test cases per box)"] = "dice_boxplots.png"
        if plot_paired_differences(results, modalities, classes, row_results,
                                   os.path.join(report_folder, "paired_differences.png")):
            figures["paired Dice differences, CSA minus each row, one dot per patient, with the 95 % bootstrap "
                    "interval of the mean"] = "paired_differences.png"
    first = fold_runs[0]
    for result in first.rows:
        file = f"training_curves_{result.row}.png"
        if plot_training_curves(result, os.path.join(report_folder, file)):
            figures[f"training curves {result.row}" + (f" (fold {first.fold})" if len(folds) > 1 else "")] = file
    overlay_cases = plot_overlay(first.rows, first.test_set.validation_cases, first.test_set.case_modality,
                                 modalities, os.path.join(preprocessed_folder, "gt_segmentations"),
                                 os.path.join(raw_root, dataset_name, "imagesTr"),
                                 [(n, labels[n]) for n in classes], file_ending,
                                 os.path.join(report_folder, "overlay.png"))
    figures["overlay (ground truth and each row's prediction)"
            + (f", fold {first.fold}" if len(folds) > 1 else "")] = "overlay.png"

    seed = dataset_json.get("csa_conversion", {}).get("seed")
    plan = plan_description(preprocessed_folder, plans, configuration)
    machine = machine_description(device)
    budgets = budget_table(row_results, budget, single_budget, modalities, plan["batch_size"], fold_runs, tags)
    data_source = data_source_text(dataset_json)
    write_report(report_folder, dataset_name=dataset_name, data_source=data_source, folds=folds, budget=budget,
                 norm=norm, seed=seed,
                 plan=plan, machine=machine, rows=row_results, results=results, wilcoxon=wilcoxon, timing=timing,
                 modalities=modalities, classes=classes, test_set=test_set, figures=figures,
                 overlay_cases=overlay_cases, timing_iterations=timing_iterations, budgets=budgets)
    summary = {
        "dataset": dataset_name, "data_source": data_source, "configuration": configuration, "plans": plans,
        "folds": folds,
        "budget": {"epochs": budget[0], "iterations_per_epoch": budget[1]} if budget else
        {"epochs": FULL_BUDGET[0], "iterations_per_epoch": FULL_BUDGET[1], "full": True},
        "single_budget": single_budget, "budgets": budgets,
        "norm": norm, "device": device, "seed": seed, "plan": plan, "machine": machine,
        "test_cases": {"cases": test_set.cases, "case_modality": test_set.case_modality,
                       "case_patient": test_set.case_patient,
                       "case_fold": {c: run.fold for run in fold_runs for c in run.test_set.cases},
                       "case_source": {c: test_set.source(c) for c in test_set.cases},
                       "sources": {VALIDATION_SOURCE: "final-validation predictions of the fold's held-out cases",
                                   OTHER_MODALITY_SOURCE: "nnUNetv2_predict on the other modality of the held-out "
                                                          "patients (left out of training by --unpaired)"}},
        "rows": [{"row": r.row, "status": r.status, "error": r.error, "trainers": sorted({m.trainer for m in r.models}),
                  "trained": r.trained, "reused": r.reused, "training_seconds": r.training_seconds}
                 for r in row_results],
        "timing": timing, "wilcoxon": wilcoxon.to_dict("records"), "cases": results.to_dict("records"),
    }
    with open(os.path.join(report_folder, "results.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
    n_failed = sum(r.failed for r in row_results)
    log_stage(f"done: {os.path.join(report_folder, 'report.md')} ({len(row_results) - n_failed} rows ok, "
              f"{n_failed} failed)")
    return report_folder


def _fold_numbers(values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise BenchmarkError(f"--folds takes fold numbers or 'all', not {' '.join(values)}") from None


@one_line_errors()
def main(argv: Sequence[str] | None = None) -> None:
    """Console script; returns nothing (a console script's return value becomes its exit status)."""
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_csa_benchmark",
        description="Train the paper's rows (Single, Joint, MSBN, Affinity, UMMKD, CSA) with nnUNetv2_train, "
                    "evaluate the fold's held-out cases, time each trainer, and write report.md, results.csv, "
                    "results.json and PNG plots.")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="2d", help="configuration (default 2d)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument("-f", type=int, default=None, help="one fold; with a converter's --split 80-20, fold 0 is "
                                                          "the paper's 80/20 split (default 0)")
    folds.add_argument("--folds", nargs="+", default=None, metavar="FOLD",
                       help="several folds (e.g. 0 1 2 3 4, or 'all'): every held-out patient is scored once and "
                            "the report pools them (means, per-fold table, Wilcoxon, bootstrap intervals, Holm)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", nargs=2, type=int, metavar=("EPOCHS", "ITERATIONS"),
                        help="short budget: the trainers' _<EPOCHS>epochs_<ITERATIONS>its variants")
    budget.add_argument("--full-budget", action="store_true", help="nnU-Net's 1000 epochs x 250 iterations")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ALL_ROWS,
                        help="rows (default the paper's six); the λ ablations (paper units: 0.25, 1; CSA is 0.5) "
                             f"are {', '.join(LAMBDA_ROWS)}")
    parser.add_argument("--norm", default="instance", choices=("instance", "bn"),
                        help="instance: the plan's InstanceNorm; bn: the _BN trainers (default instance)")
    parser.add_argument("-device", default="cuda", choices=("cpu", "cuda"), help="default cuda, as nnUNetv2_train")
    parser.add_argument("-o", default=None, help="report folder (default: $nnUNet_results/<Dataset>/"
                                                 "csa_benchmark__<plans>__<config>__fold<f>__<budget>__<norm>, "
                                                 "folds<a>-<b>-... for several folds)")
    parser.add_argument("--single-budget", default="equal-iterations", choices=SINGLE_BUDGETS,
                        help="Single's budget: the joint rows' iterations (default), or equal-data: as many slices "
                             "of its modality as the joint rows see (1/n of the iterations)")
    parser.add_argument("--rerun", action="store_true", help="train finished rows again")
    parser.add_argument("--timing-iterations", type=int, default=10,
                        help="timed training iterations per trainer (default 10; 0 skips the timing)")
    parser.add_argument("--retime", action="store_true",
                        help="time every trainer again; by default a rerun keeps the first timing (and its date) "
                             "of each trainer, so a rerun under other load does not silently replace it")
    args = parser.parse_args(argv)
    if args.folds is not None:
        folds = "all" if args.folds == ["all"] else _fold_numbers(args.folds)
    else:
        folds = [0 if args.f is None else args.f]
    run_benchmark(args.d, args.c, args.p, folds, None if args.full_budget else tuple(args.budget),
                  args.rows, args.norm, args.device, args.o, args.rerun, args.timing_iterations,
                  single_budget=args.single_budget, retime=args.retime)


if __name__ == "__main__":
    main()
