"""The benchmark's rows (from the package's row table), their trainer names and budgets, and the
models each row trains (Single: one per modality).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from nnunetv2_csa.tools.benchmark.common import BenchmarkError
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
#: rows whose models have modality-specific norms (nnU-Net's predictor needs nnUNet_csa_modality)
CSA_FAMILY = tuple(name for name in ALL_ROWS if ROWS_BY_NAME[name].modality_specific_norms)
REFERENCE_ROW = "Joint"
PROPOSED_ROW = "CSA"
FULL_BUDGET = (1000, 250)
#: how Single's budget is chosen: the joint rows' iterations, or the slices of its modality they see
SINGLE_BUDGETS = ("equal-iterations", "equal-data")


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


def norm_of_row(row: str, norm: str) -> str:
    """The normalization of a row's models as the report names it: IN (the plan's InstanceNorm) or BN
    (``--norm bn``: the ``_BN`` trainers), one per modality for the CSA family, shared by the modalities
    for Joint; Single's models see one modality each."""
    if norm not in ("instance", "bn"):
        raise BenchmarkError(f"norm must be 'instance' or 'bn', not {norm!r}")
    kind = "BN" if norm == "bn" else "IN"
    if row in CSA_FAMILY:
        return f"{kind} per modality"
    return kind if row == "Single" else f"{kind} shared"


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
    other_modality_predictions: str = ""  # where the other-modality test cases are predicted to
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

