"""The report's markdown tables: means per class and modality, per fold, Wilcoxon with bootstrap
intervals and Holm's correction, budgets, timing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from nnunetv2_csa.tools.benchmark.common import FAILED, NOT_AVAILABLE
from nnunetv2_csa.tools.benchmark.rows import (CSA_FAMILY, FULL_BUDGET, PROPOSED_ROW, REFERENCE_ROW, RowResult,
                                               row_budget)
from nnunetv2_csa.tools.benchmark.scoring import FoldRun
from nnunetv2_csa.tools.evaluation import wilcoxon_between_methods
from nnunetv2_csa.tools.statistics import holm_adjust


TABLE_METRICS = (("dice", "Dice", True), ("hd", "HD", False))
SECOND_TABLE_METRICS = (("hd95", "HD95", False), ("assd", "ASSD", False))
#: the metrics of the paired tests of CSA against every other row
TEST_METRICS = (("dice", "Dice"), ("hd", "HD"), ("hd95", "HD95"))


def finite(value) -> bool:
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


def escape_markdown(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def format_table(means: pd.DataFrame, higher_is_better: Mapping[str, bool], stds: pd.DataFrame | None = None,
                 failed: Mapping[str, str] | None = None, decimals: int = 3, first_column: str = "Method",
                 labels: Mapping[str, str] | None = None) -> str:
    """A markdown table, one line per row of ``means`` (index: row names, shown as ``labels`` names
    them), the best value of each column in bold. A value that is not finite is written ``n/a``; a
    row in ``failed`` reads ``FAILED: <error>`` in its first cell and ``FAILED`` in the others.
    ``stds`` adds `` ± std`` where the standard deviation is finite."""
    labels = dict(labels or {})
    failed = dict(failed or {})
    marks = best_marks(means, higher_is_better, decimals, exclude=list(failed))
    lines = ["| " + " | ".join([first_column, *map(escape_markdown, means.columns)]) + " |",
             "|" + "|".join(["---"] + [":---:"] * len(means.columns)) + "|"]
    for row_name in means.index:
        if row_name in failed:
            cells = [f"{FAILED}: {escape_markdown(failed[row_name])}"] + [FAILED] * (len(means.columns) - 1)
        else:
            cells = []
            for column in means.columns:
                value = means.at[row_name, column]
                if not finite(value):
                    cells.append(NOT_AVAILABLE)
                    continue
                text = f"{float(value):.{decimals}f}"
                if marks.at[row_name, column]:
                    text = f"**{text}**"
                if stds is not None and finite(stds.at[row_name, column]):
                    text += f" ± {float(stds.at[row_name, column]):.{decimals}f}"
                cells.append(text)
        lines.append("| " + " | ".join([escape_markdown(labels.get(row_name, row_name)), *cells]) + " |")
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
    if not finite(record.get("p_value")):
        return f"{NOT_AVAILABLE} ({escape_markdown(record.get('reason') or 'no test')})"
    interval = (f" [{record['ci_low']:+.3f}, {record['ci_high']:+.3f}]"
                if finite(record.get("ci_low")) and finite(record.get("ci_high")) else "")
    return (f"{record['p_value']:.3g} (Holm {record['p_holm']:.3g}; n={int(record['n'])}, "
            f"Δ={record['mean_difference']:+.3f}{interval}"
            + (f"; {escape_markdown(record['reason'])}" if record.get("reason") else "") + ")")


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
    return f"{value / 2 ** 20:.1f}" if finite(value) else NOT_AVAILABLE


def _seconds(value: float) -> str:
    """Three significant digits: a GPU's or a tiny network's step (0.0355 s) keeps the precision
    its ratio to Joint is read with, as a 3D step on CPU (21.0 s) does."""
    return f"{value:#.3g}".rstrip(".")


def _ratio(value, reference) -> str:
    if finite(value) and finite(reference) and reference > 0:
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
            lines.append(f"| {label} | {entry['trainer']} | {FAILED}: {escape_markdown(entry['error'])} | "
                         + " | ".join([FAILED] * 5) + f" | {entry.get('measured_at', NOT_AVAILABLE)} |")
            continue
        epoch_end = entry.get("epoch_end_seconds_median")
        median, mean = entry["seconds_per_iteration_median"], entry["seconds_per_iteration_mean"]
        memory = entry["peak_memory_bytes"]
        lines.append(f"| {label} | {entry['trainer']} | {_seconds(median)} | {_seconds(mean)} | "
                     f"{_ratio(median, reference.get('seconds_per_iteration_median'))} | {_mib(memory)} | "
                     f"{_ratio(memory, reference.get('peak_memory_bytes'))} | "
                     f"{f'{epoch_end:.2f}' if finite(epoch_end) else NOT_AVAILABLE} | "
                     f"{entry.get('measured_at', NOT_AVAILABLE)} |")
    return "\n".join(lines)

