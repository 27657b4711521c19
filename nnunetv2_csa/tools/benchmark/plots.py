"""The report's figures: Dice box plots, paired differences, training curves, an overlay.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nnunetv2_csa.modality import modalities_from_plans
from nnunetv2_csa.tools.benchmark.common import FAILED
from nnunetv2_csa.tools.benchmark.rows import PROPOSED_ROW, RowResult
from nnunetv2_csa.tools.benchmark.scoring import prediction_file
from nnunetv2_csa.tools.benchmark.tables import finite
from nnunetv2_csa.tools.statistics import bootstrap_mean_ci
from nnunetv2_csa.training.rows import ROWS_BY_NAME


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
                if finite(low) and finite(high):
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
    axes[0].set_ylabel("train: Dice + CE" + (" + (λ/N) × consistency term" if trains_with_term else "")
                       + "\nvalidation: Dice + CE", fontsize=8)
    axes[1].set_title(f"{row.row}: pseudo Dice (validation patches)", fontsize=10)
    axes[1].set_ylabel("pseudo Dice")
    axes[1].set_ylim(-0.02, 1.02)
    if has_consistency:
        axes[2].set_title(f"{row.row}: consistency term", fontsize=10)
        axes[2].set_ylabel("term, unweighted (before λ/N)", fontsize=8)
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

