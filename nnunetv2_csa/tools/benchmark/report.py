"""The report folder: report.md with what was run on which data and machine, and default paths.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nnunetv2_csa.modality import OTHER_MODALITY_IMAGES
from nnunetv2_csa.tools.benchmark.common import FAILED, NOT_AVAILABLE
from nnunetv2_csa.tools.benchmark.rows import FULL_BUDGET, RowResult, norm_of_row
from nnunetv2_csa.tools.benchmark.scoring import TestSet
from nnunetv2_csa.tools.benchmark.tables import (SECOND_TABLE_METRICS, TABLE_METRICS, escape_markdown, format_table,
                                                 modality_table, per_fold_table, smallest_two_sided_p, timing_markdown,
                                                 wilcoxon_markdown)
from nnunetv2_csa.tools.evaluation import DEFAULT_HD95, HD95_DEFINITIONS


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


def single_budget_clause(single_budget: str) -> str:
    """How Single's budget compares, said from the setting and not from the rows' iterations: a
    report of the Single row alone has no other row to compare with."""
    return (", here for 1/n of the iterations: equal data" if single_budget == "equal-data"
            else ", here for the same iterations: equal iterations")


def write_report(report_folder: str, *, dataset_name: str, data_source: str, folds: Sequence[int], budget, norm: str,
                 seed,
                 plan: dict, machine: dict, rows: Sequence[RowResult], results: pd.DataFrame, wilcoxon: pd.DataFrame,
                 timing: Mapping[str, dict], modalities: Sequence[str], classes: Sequence[str],
                 test_set: TestSet, figures: Mapping[str, str], overlay_cases: Mapping, timing_iterations: int,
                 budgets: Sequence[dict], single_budget: str = "equal-iterations") -> str:
    failed = {r.row: r.error for r in rows if r.failed}
    # every table names each row's normalization (the rows' names alone do not say IN or BN)
    labels = {r.row: f"{r.row} ({norm_of_row(r.row, norm)})" for r in rows}
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
               f"nnU-Net's predictor at the defaults of `nnUNetv2_predict`" if other else "")
            + ". Source per case: `results.csv` column `source`. Both use nnU-Net's predictor (sliding "
              "window with mirroring); CSA-family rows predict each case with its own modality's norms; "
              "Single takes modality k's cases from its model trained on modality k. Metrics are 3D per "
              "volume against the converted labels; distances in mm (see `nnunetv2_csa.tools.evaluation`); HD95: the "
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
        status = f"{FAILED}: {escape_markdown(r.error)}" if r.failed else "ok"
        out.append(f"| {r.row} | {', '.join(dict.fromkeys(m.trainer for m in r.models))} | {done} | {status} |")
    out += ["", "Budget per row (per fold): training iterations and the 2D slices of each modality seen "
            "(iterations × batch size; the unpaired rows draw B/n of each modality per batch, Joint draws "
            "cases uniformly, so its share follows the training cases; Single trains on its modality alone"
            + single_budget_clause(single_budget) + ").", "",
            "| Method | iterations | " + " | ".join(f"{m} slices seen" for m in modalities) + " |",
            "|---|:---:|" + ":---:|" * len(modalities)]
    for b in budgets:
        out.append(f"| {escape_markdown(labels.get(b['row'], b['row']))} | {b['iterations']} | "
                   + " | ".join(f"{b['slices'][m]:.0f}" for m in modalities) + " |")
    out.append("")
    out += ["## Results per modality (paper's Table 1 layout)", ""]
    for modality in modalities:
        out += [f"### {modality} ({n_per_modality[modality]} test cases)", "",
                "Dice and Hausdorff distance (HD, mm) per class:", ""]
        means, stds, higher = modality_table(results, modality, rows, classes, TABLE_METRICS)
        out += [format_table(means, higher, stds, failed, labels=labels), "", "HD95 and ASSD (mm) per class:", ""]
        means, stds, higher = modality_table(results, modality, rows, classes, SECOND_TABLE_METRICS)
        out += [format_table(means, higher, stds, failed, labels=labels), ""]
    if len(folds) > 1:
        out += ["## Per fold", "", "Mean Dice over the classes and the fold's test cases, per modality:", ""]
        for modality in modalities:
            means, higher = per_fold_table(results, modality, rows, folds)
            out += [f"{modality}:", "", format_table(means, higher, failed=failed, labels=labels), ""]
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


def default_report_folder(results_root: str, dataset_name: str, configuration: str, plans: str,
                          folds: Sequence[int], budget, norm: str) -> str:
    budget_part = f"{budget[0]}epochs_{budget[1]}its" if budget else "full"
    fold_part = f"fold{folds[0]}" if len(folds) == 1 else "folds" + "-".join(map(str, folds))
    return os.path.join(results_root, dataset_name,
                        f"csa_benchmark__{plans}__{configuration}__{fold_part}__{budget_part}__{norm}")

