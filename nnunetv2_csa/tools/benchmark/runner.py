"""Running nnU-Net: nnUNetv2_train per model (resumable), nnU-Net's predictor for the
other-modality test cases, and the timing of each trainer in a fresh process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Sequence

from tqdm import tqdm

from nnunetv2_csa.atomic_files import replace_file
from nnunetv2_csa.tools.benchmark.common import BenchmarkError, json_safe, log_stage
from nnunetv2_csa.tools.benchmark.rows import CSA_FAMILY, Model, RowResult
from nnunetv2_csa.tools.benchmark.scoring import TestSet, model_for
from nnunetv2_csa.tools.commands import python_command, run_console
from nnunetv2_csa.tools.inputs import channel_files
from nnunetv2_csa.tools.prediction import predict_folder


#: the report folder's record of each trainer's timing and its date, kept across reruns
TIMING_FILE = "timing.json"


def required_folder(variable: str) -> str:
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


def train_model(model: Model, dataset_id: str, configuration: str, plans: str, fold: int, device: str,
                rerun: bool, env: dict, result: RowResult) -> None:
    """Train one model with the stock ``nnUNetv2_train`` unless it is finished already."""
    if model.is_finished() and not rerun:
        result.reused.append(model.trainer)
        log_stage(f"{model.row}: {model.trainer} is trained and validated already: skipped "
                  f"(--rerun trains it again)")
        return
    arguments = [dataset_id, configuration, fold, "-tr", model.trainer, "-p", plans, "-device", device]
    if rerun:
        # a stale final checkpoint or validation must not pass for the result of this run
        for stale in (model.checkpoint, os.path.join(model.fold_folder, "checkpoint_best.pth")):
            if os.path.isfile(stale):
                os.remove(stale)
        shutil.rmtree(model.validation_folder, ignore_errors=True)
    elif model.has_partial_training():
        arguments.append("--c")
    log_stage(f"{model.row}: training {model.trainer} ({'continuing with --c' if '--c' in arguments else 'new'}), "
              f"log {model.log_file}")
    os.makedirs(os.path.dirname(model.log_file), exist_ok=True)
    start = time.perf_counter()
    with open(model.log_file, "a") as log:
        completed = run_console("nnUNetv2_train", arguments, log, env)
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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prediction_record(model: Model, modality: str) -> str:
    return os.path.join(model.other_modality_predictions, f"predicted_with_{modality}.json")


def _made_by(model: Model, modality: str, cases: Sequence[str], file_ending: str) -> dict:
    """What a modality's other-modality predictions must come from: this checkpoint (by its
    content, so a model trained again never passes for the old one) and these cases."""
    return {"checkpoint": os.path.abspath(model.checkpoint), "checkpoint_sha256": file_sha256(model.checkpoint),
            "modality": modality, "cases": sorted(cases), "file_ending": file_ending}


def _kept_predictions(model: Model, modality: str, made_by: dict) -> bool:
    """True if the predictions in the folder were written by ``made_by`` and are all there."""
    try:
        with open(_prediction_record(model, modality)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    return recorded == made_by and all(
        os.path.isfile(os.path.join(model.other_modality_predictions, case + made_by["file_ending"]))
        for case in made_by["cases"])


def predict_other_modality(result: RowResult, test_set: TestSet, dataset_id: str, configuration: str, plans: str,
                           fold: int, device: str, env: dict, report_folder: str, file_ending: str) -> None:
    """Predict the other-modality test cases with nnU-Net's predictor, once per model and
    modality (the CSA family is told the modality by nnUNet_csa_modality, as for nnUNetv2_predict).
    Predictions a rerun finds from the same checkpoint and cases are kept (adding a row to a
    five-fold report would otherwise predict every other row's cases again); any others are
    deleted before predicting, so a stale prediction never passes for this model's."""
    by_modality: dict[str, list[str]] = {}
    for case in test_set.other_modality_images:
        by_modality.setdefault(test_set.case_modality[case], []).append(case)
    for modality, cases in sorted(by_modality.items()):
        if result.failed:
            return
        try:
            model = model_for(result, modality)
        except FileNotFoundError as e:
            result.fail(str(e))
            return
        made_by = _made_by(model, modality, cases, file_ending)
        if _kept_predictions(model, modality, made_by):
            log_stage(f"{result.row}: {modality} other-modality predictions of {model.trainer} kept (same checkpoint "
                      f"and cases)")
            continue
        os.makedirs(model.other_modality_predictions, exist_ok=True)
        for name in [_prediction_record(model, modality)] + [case + file_ending for case in cases]:
            stale = os.path.join(model.other_modality_predictions, name)
            if os.path.lexists(stale):
                os.remove(stale)
        input_folder = os.path.join(report_folder, "other_modality_inputs", f"fold_{model.fold}", modality)
        # links to exactly this test set's images: one left by an earlier run would be predicted too
        shutil.rmtree(input_folder, ignore_errors=True)
        os.makedirs(input_folder)
        for case in cases:
            for channel in channel_files(test_set.other_modality_images[case], file_ending):
                os.symlink(os.path.abspath(channel), os.path.join(input_folder, os.path.basename(channel)))
        overrides = {"nnUNet_extTrainer": env.get("nnUNet_extTrainer"),
                     "nnUNet_csa_modality": modality if result.row in CSA_FAMILY else None}
        log_file = os.path.join(report_folder, "logs", f"predict_{model.trainer}_{modality}_fold{model.fold}.log")
        with open(log_file, "w") as log:
            error = predict_folder(os.path.dirname(model.fold_folder), model.fold, input_folder,
                                   model.other_modality_predictions, device, overrides, log)
        if error:
            result.fail(f"predicting the {modality} other-modality cases with {model.trainer} failed: {error} "
                        f"(see {log_file})")
            log_stage(f"{result.row}: FAILED ({result.error})")
            return
        with open(_prediction_record(model, modality), "w") as f:
            json.dump(made_by, f, indent=1)


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
    def write_timings(path):
        with open(path, "w") as f:
            json.dump(json_safe(kept), f, indent=1, allow_nan=False)
    replace_file(cache_file, write_timings)  # a run stopped while writing keeps the old record whole
    return timing


def time_trainer(dataset_id: str, configuration: str, plans: str, trainer: str, device: str, iterations: int,
                 fold: int, env: dict, log_file: str) -> dict:
    """``python -m nnunetv2_csa.tools.timing`` in a fresh process (nnU-Net reads settings at import)."""
    command = [*python_command("-m", "nnunetv2_csa.tools.timing"), "-d", str(dataset_id), "-c", configuration,
               "-p", plans, "-tr", trainer, "-f", str(fold), "-device", device, "-n", str(iterations)]
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

