"""The benchmark's top function: check the inputs, then the four stages it prints (training,
evaluation, timing, report).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
from tqdm import tqdm

from nnunetv2_csa.errors import first_few
from nnunetv2_csa.modality import (CASE_PATIENT_KEY, MAX_CASE_NAME, ModalityTags, is_plain_name,
                                   modality_tags_from_dataset_json)
from nnunetv2_csa.tools.benchmark.common import BenchmarkError, json_safe, log_stage
from nnunetv2_csa.tools.benchmark.plots import (plot_dice_boxplots, plot_overlay, plot_paired_differences,
                                                plot_training_curves)
from nnunetv2_csa.tools.benchmark.report import (data_source_text, default_report_folder, machine_description,
                                                 plan_description, write_report)
from nnunetv2_csa.tools.benchmark.rows import (ALL_ROWS, FULL_BUDGET, REFERENCE_ROW, ROWS, Model, RowResult, row_budget,
                                               trainer_name)
from nnunetv2_csa.tools.benchmark.runner import (TIMING_FILE, kept_or_new_timings, predict_other_modality,
                                                 required_folder, subprocess_environment, time_trainer, train_model)
from nnunetv2_csa.tools.benchmark.scoring import (OTHER_MODALITY_SOURCE, VALIDATION_SOURCE, FoldRun, TestSet,
                                                  evaluate_rows, fold_test_set, merge_test_sets)
from nnunetv2_csa.tools.benchmark.tables import budget_table, wilcoxon_table
from nnunetv2_csa.tools.evaluation import foreground_classes
from nnunetv2_csa.tools.inputs import (channel_count, channel_files, check_case_images, check_output_folder,
                                      dataset_folder, entries_of_a_folder_not_ours, file_ending_of, read_json_file,
                                      read_splits)


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


def _check_report_folder(folder: str) -> None:
    """The report folder can be written, and is new or a report folder (its ``logs`` made by an
    earlier run): the report's files never replace a user's results.csv or report.md. A folder
    seeded with only ``predictions/`` to reuse is fine: nothing in it is replaced."""
    check_output_folder(folder, "-o")
    replaced = [name for name in entries_of_a_folder_not_ours(folder, "logs")
                if name in ("report.md", "results.csv", "results.json", TIMING_FILE) or name.endswith(".png")]
    if replaced:
        raise BenchmarkError(f"-o {folder} holds {first_few(replaced, 5)}, which the benchmark did not write and its "
                             f"report would replace; give -o a new folder, or one an earlier benchmark run wrote")


@dataclass
class Benchmark:
    """What a run was asked for, checked before anything runs, and its folds."""
    dataset_id: str
    dataset_name: str
    configuration: str
    plans: str
    device: str
    norm: str
    budget: tuple[int, int] | None
    single_budget: str
    folds: list[int]
    rows: list[str]
    dataset_json: dict
    tags: ModalityTags
    preprocessed_folder: str
    raw_folder: str | None
    report_folder: str
    env: dict
    fold_runs: list[FoldRun] = field(default_factory=list)
    test_set: TestSet | None = None  # every fold's test cases; set (and checked for overlaps) by prepare

    @property
    def modalities(self) -> list[str]:
        return list(self.tags.modalities)

    @property
    def labels(self) -> dict:
        return self.dataset_json["labels"]

    @property
    def classes(self) -> list[str]:
        return [name for name, value in sorted(self.labels.items(), key=lambda kv: kv[1]) if value != 0]

    @property
    def file_ending(self) -> str:
        return file_ending_of(self.dataset_json, os.path.join(self.preprocessed_folder, "dataset.json"))

    def log_folder(self, *parts: str) -> str:
        return os.path.join(self.report_folder, "logs", *parts)


def prepare(dataset_id, configuration: str, plans: str, folds, budget: tuple[int, int] | None,
            rows: Sequence[str], norm: str, device: str, report_folder: str | None,
            single_budget: str) -> Benchmark:
    """Check every input (rows, budget, trainer names, folders, tags, splits) and lay out the
    folds' test sets and models; nothing is trained or written but the report's log folder."""
    rows = list(dict.fromkeys(rows))
    unknown = [r for r in rows if r not in ALL_ROWS]
    if not rows or unknown:
        raise BenchmarkError(f"unknown rows {unknown}; choose from {list(ALL_ROWS)}" if unknown else "no rows chosen")
    if device not in ("cpu", "cuda"):
        raise BenchmarkError(f"device must be 'cpu' or 'cuda', not {device!r}")
    for option, value in (("-c", configuration), ("-p", plans)):
        if not is_plain_name(value, MAX_CASE_NAME):
            raise BenchmarkError(f"{option} {value!r} is not a plain name (no folders, no '..', not empty, at most "
                                 f"{MAX_CASE_NAME} bytes): it becomes part of the model's folder name")
    results_root = required_folder("nnUNet_results")
    raw_root = os.environ.get("nnUNet_raw", "")
    preprocessed_folder = dataset_folder("nnUNet_preprocessed", dataset_id,
                                         f"the dataset is not preprocessed yet: run nnUNetv2_plan_and_preprocess -d "
                                         f"{dataset_id} -c {configuration} first")
    dataset_name = os.path.basename(preprocessed_folder)
    dataset_json = read_json_file(os.path.join(preprocessed_folder, "dataset.json"),
                                  f"run nnUNetv2_plan_and_preprocess -d {dataset_id} again")
    tags = modality_tags_from_dataset_json(dataset_json, os.path.join(preprocessed_folder, "dataset.json"))
    file_ending_of(dataset_json, os.path.join(preprocessed_folder, "dataset.json"))  # checked before any write
    try:
        foreground_classes(dataset_json.get("labels"))
    except ValueError as e:
        raise BenchmarkError(f"{os.path.join(preprocessed_folder, 'dataset.json')}: {e}") from None
    plans_file = os.path.join(preprocessed_folder, plans + ".json")
    if not os.path.isfile(plans_file):
        raise BenchmarkError(f"{plans_file} does not exist: check -p (the plans of this dataset: "
                             f"{sorted(f[:-5] for f in os.listdir(preprocessed_folder) if f.endswith('Plans.json'))})")
    configurations = read_json_file(plans_file, f"run nnUNetv2_plan_and_preprocess -d {dataset_id} again"
                                    ).get("configurations", {})
    if configuration not in configurations:
        raise BenchmarkError(f"configuration {configuration!r} is not in {plans_file}; choose one of "
                             f"{sorted(configurations)} with -c")
    data_identifier = configurations[configuration].get("data_identifier")  # absent where a configuration inherits
    data_folder = os.path.join(preprocessed_folder, data_identifier or "")
    if data_identifier and not os.path.isdir(data_folder):
        raise BenchmarkError(f"{data_folder} does not exist: the {configuration} configuration is not preprocessed "
                             f"yet; run nnUNetv2_preprocess -d {dataset_id} -c {configuration} -plans_name {plans} "
                             f"first")
    splits_file = os.path.join(preprocessed_folder, "splits_final.json")
    if not os.path.isfile(splits_file):
        raise BenchmarkError(f"{splits_file} does not exist: convert the dataset with nnUNetv2_csa_convert_* "
                             f"(it writes the patient-grouped splits), or run nnU-Net once to create them")
    splits = read_splits(splits_file, "convert or tag the dataset again")
    folds = _parse_folds(folds, len(splits), splits_file)
    if budget is not None:
        budget = (int(budget[0]), int(budget[1]))
        trainer_name("Joint", norm, budget)  # validates the budget before anything runs
    for row in rows:  # every trainer name and budget is checked before anything runs
        trainer_name(row, norm, row_budget(row, budget, len(tags.modalities), single_budget))

    report_folder = report_folder or default_report_folder(results_root, dataset_name, configuration, plans,
                                                           folds, budget, norm)
    benchmark = Benchmark(str(dataset_id), dataset_name, configuration, plans, device, norm, budget, single_budget,
                          folds, rows, dataset_json, tags, preprocessed_folder,
                          os.path.join(raw_root, dataset_name) if raw_root else None, report_folder,
                          subprocess_environment(device))
    for fold in folds:
        validation_cases = sorted(splits[fold]["val"])
        test_set = fold_test_set(validation_cases, {c: tags.modality_of_case(c) for c in validation_cases},
                                 dataset_json.get(CASE_PATIENT_KEY, {}),
                                 os.path.join(preprocessed_folder, "gt_segmentations"), benchmark.raw_folder,
                                 benchmark.file_ending)
        benchmark.fold_runs.append(FoldRun(fold, test_set, _fold_rows(rows, fold, benchmark.modalities, norm, budget,
                                                                      single_budget, results_root, dataset_name,
                                                                      plans, configuration, report_folder,
                                                                      len(folds)),
                                           list(splits[fold]["train"])))
    benchmark.test_set = merge_test_sets([run.test_set for run in benchmark.fold_runs])
    # the images nnUNetv2_predict will read, checked before the report folder is made
    n_channels = channel_count(dataset_json, os.path.join(preprocessed_folder, "dataset.json"))
    for case, first_channel in sorted(benchmark.test_set.other_modality_images.items()):
        check_case_images(case, channel_files(first_channel, benchmark.file_ending), n_channels, benchmark.file_ending)
    _check_report_folder(report_folder)
    os.makedirs(benchmark.log_folder(), exist_ok=True)
    return benchmark


def train_rows(benchmark: Benchmark, rerun: bool) -> None:
    """Stage 1: every model of every row and fold, with the stock nnUNetv2_train."""
    log_stage("stage 1/4: training")
    for run in benchmark.fold_runs:
        for result in tqdm(run.rows, desc=f"rows, fold {run.fold}", file=sys.stderr):
            for model in result.models:
                if result.failed:
                    break
                train_model(model, benchmark.dataset_id, benchmark.configuration, benchmark.plans, run.fold,
                            benchmark.device, rerun, benchmark.env, result)


def evaluate(benchmark: Benchmark) -> tuple[list[RowResult], pd.DataFrame, pd.DataFrame]:
    """Stage 2: predict the other-modality test cases, score every test case; returns the rows
    merged over folds, the scores of the rows that did not fail, and the Wilcoxon table."""
    for run in benchmark.fold_runs:
        if run.test_set.other_modality_images:
            log_stage(f"stage 2/4: fold {run.fold}: predicting the {len(run.test_set.other_modality_images)} "
                      f"other-modality test cases with nnU-Net's predictor")
            for result in tqdm([r for r in run.rows if not r.failed], desc="predict", file=sys.stderr):
                predict_other_modality(result, run.test_set, benchmark.dataset_id, benchmark.configuration,
                                       benchmark.plans, run.fold, benchmark.device, benchmark.env,
                                       benchmark.report_folder, benchmark.file_ending)
        log_stage(f"stage 2/4: fold {run.fold}: evaluating the predictions of the test cases")
        run.results = evaluate_rows(run.rows, run.test_set, benchmark.labels, benchmark.file_ending)
    row_results = merge_fold_rows(benchmark.fold_runs)
    failed_rows = {r.row for r in row_results if r.failed}
    results = pd.concat([run.results for run in benchmark.fold_runs], ignore_index=True)
    results = results[~results["row"].isin(failed_rows)].reset_index(drop=True)
    return row_results, results, wilcoxon_table(results, row_results, benchmark.modalities)


def time_rows(benchmark: Benchmark, row_results: Sequence[RowResult], iterations: int, retime: bool) -> dict:
    """Stage 3: seconds per training iteration of each row's trainer (and Joint's, the reference)."""
    if iterations <= 0:
        log_stage("stage 3/4: timing skipped (--timing-iterations 0)")
        return {}
    log_stage(f"stage 3/4: timing {iterations} training iterations per trainer")
    to_time = [(r.row, r.models[0].trainer) for r in row_results if not r.failed]
    if REFERENCE_ROW not in [r for r, _ in to_time] and REFERENCE_ROW not in [r.row for r in row_results]:
        to_time.append((REFERENCE_ROW, trainer_name(REFERENCE_ROW, benchmark.norm, benchmark.budget)))

    def measure(trainer):
        return time_trainer(benchmark.dataset_id, benchmark.configuration, benchmark.plans, trainer,
                            benchmark.device, iterations, benchmark.folds[0], benchmark.env,
                            benchmark.log_folder(f"timing_{trainer}.log"))

    return kept_or_new_timings(to_time, os.path.join(benchmark.report_folder, TIMING_FILE), iterations, retime,
                               measure)


def draw_figures(benchmark: Benchmark, row_results: Sequence[RowResult], results: pd.DataFrame
                 ) -> tuple[dict[str, str], dict]:
    """The report's figures (caption -> file) and the cases the overlay shows."""
    folder, modalities, classes = benchmark.report_folder, benchmark.modalities, benchmark.classes
    figures = {}
    if not results.empty:
        plot_dice_boxplots(results, modalities, classes, [r.row for r in row_results],
                           os.path.join(folder, "dice_boxplots.png"))
        figures["Dice box plots per class and modality (n: test cases per box)"] = "dice_boxplots.png"
        if plot_paired_differences(results, modalities, classes, row_results,
                                   os.path.join(folder, "paired_differences.png")):
            figures["paired Dice differences, CSA minus each row, one dot per patient, with the 95 % bootstrap "
                    "interval of the mean"] = "paired_differences.png"
    first = benchmark.fold_runs[0]
    several = len(benchmark.folds) > 1
    for result in first.rows:
        file = f"training_curves_{result.row}.png"
        if plot_training_curves(result, os.path.join(folder, file)):
            figures[f"training curves {result.row}" + (f" (fold {first.fold})" if several else "")] = file
    overlay_cases = plot_overlay(first.rows, first.test_set.validation_cases, first.test_set.case_modality,
                                 modalities, os.path.join(benchmark.preprocessed_folder, "gt_segmentations"),
                                 os.path.join(benchmark.raw_folder or "", "imagesTr"),
                                 [(n, benchmark.labels[n]) for n in classes], benchmark.file_ending,
                                 os.path.join(folder, "overlay.png"))
    figures["overlay (ground truth and each row's prediction)" + (f", fold {first.fold}" if several else "")] = \
        "overlay.png"
    return figures, overlay_cases


def write_outputs(benchmark: Benchmark, row_results: Sequence[RowResult], results: pd.DataFrame,
                  wilcoxon: pd.DataFrame, timing: dict, timing_iterations: int) -> None:
    """Stage 4: results.csv, the figures, report.md and results.json."""
    log_stage("stage 4/4: writing the report")
    folder, budget, test_set = benchmark.report_folder, benchmark.budget, benchmark.test_set
    results.to_csv(os.path.join(folder, "results.csv"), index=False)
    figures, overlay_cases = draw_figures(benchmark, row_results, results)
    seed = benchmark.dataset_json.get("csa_conversion", {}).get("seed")
    plan = plan_description(benchmark.preprocessed_folder, benchmark.plans, benchmark.configuration)
    machine = machine_description(benchmark.device)
    budgets = budget_table(row_results, budget, benchmark.single_budget, benchmark.modalities, plan["batch_size"],
                           benchmark.fold_runs, benchmark.tags)
    data_source = data_source_text(benchmark.dataset_json)
    write_report(folder, dataset_name=benchmark.dataset_name, data_source=data_source, folds=benchmark.folds,
                 budget=budget, norm=benchmark.norm, seed=seed, plan=plan, machine=machine, rows=row_results,
                 results=results, wilcoxon=wilcoxon, timing=timing, modalities=benchmark.modalities,
                 classes=benchmark.classes, test_set=test_set, figures=figures, overlay_cases=overlay_cases,
                 timing_iterations=timing_iterations, budgets=budgets, single_budget=benchmark.single_budget)
    summary = {
        "dataset": benchmark.dataset_name, "data_source": data_source, "configuration": benchmark.configuration,
        "plans": benchmark.plans, "folds": benchmark.folds,
        "budget": {"epochs": budget[0], "iterations_per_epoch": budget[1]} if budget else
        {"epochs": FULL_BUDGET[0], "iterations_per_epoch": FULL_BUDGET[1], "full": True},
        "single_budget": benchmark.single_budget, "budgets": budgets,
        "norm": benchmark.norm, "device": benchmark.device, "seed": seed, "plan": plan, "machine": machine,
        "test_cases": {"cases": test_set.cases, "case_modality": test_set.case_modality,
                       "case_patient": test_set.case_patient,
                       "case_fold": {c: run.fold for run in benchmark.fold_runs for c in run.test_set.cases},
                       "case_source": {c: test_set.source(c) for c in test_set.cases},
                       "sources": {VALIDATION_SOURCE: "final-validation predictions of the fold's held-out cases",
                                   OTHER_MODALITY_SOURCE: "nnU-Net's predictor (nnUNetv2_predict's defaults) on the "
                                                          "other modality of the held-out patients (left out of "
                                                          "training by --unpaired)"}},
        "rows": [{"row": r.row, "status": r.status, "error": r.error, "trainers": sorted({m.trainer for m in r.models}),
                  "trained": r.trained, "reused": r.reused, "training_seconds": r.training_seconds}
                 for r in row_results],
        "timing": timing, "wilcoxon": wilcoxon.to_dict("records"), "cases": results.to_dict("records"),
    }
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=1, allow_nan=False)


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
    benchmark = prepare(dataset_id, configuration, plans, folds, budget, rows, norm, device, report_folder,
                        single_budget)
    test_set = benchmark.test_set
    log_stage(f"{benchmark.dataset_name}, fold(s) {benchmark.folds}, {len(test_set.cases)} test cases "
              f"({len(test_set.other_modality_images)} of them the other modality of held-out patients), rows "
              f"{benchmark.rows}, report {benchmark.report_folder}")
    train_rows(benchmark, rerun)
    row_results, results, wilcoxon = evaluate(benchmark)
    timing = time_rows(benchmark, row_results, timing_iterations, retime)
    write_outputs(benchmark, row_results, results, wilcoxon, timing, timing_iterations)
    n_failed = sum(r.failed for r in row_results)
    log_stage(f"done: {os.path.join(benchmark.report_folder, 'report.md')} ({len(row_results) - n_failed} rows ok, "
              f"{n_failed} failed)")
    return benchmark.report_folder
