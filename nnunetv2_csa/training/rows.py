"""The rows of the paper's comparison and their ablations, declared once.

Every trainer class of this package (``training/trainers.py``) and the benchmark's row map are
derived from ``ROW_TABLE``: adding a row is one line here, and each line names the classes it
makes (the row's trainer and its ``_BN`` twin, modality-specific BatchNorm), so that a search
for a trainer's name lands on its definition. The table is plain data (no torch), so the
benchmark's ``--help`` and row checks can read it without importing nnU-Net's trainers; that is
why the rows are a table and not class statements (whose settings the benchmark would then need
torch to read). Short budgets, ``<trainer>_<E>epochs_<I>its`` for any E and I, are made on
demand (``short_budget.py``).

A row is one of three kinds:

- ``csa``: ``nnUNetTrainerCSA`` (modality-specific norms, unpaired batches) with some of
  its class attributes changed (``settings``); the row ``CSA`` changes none, and its classes
  are written out in ``nnUNetTrainerCSA.py``.
- ``joint``: nnU-Net's own trainer on the mixed dataset (``training/baselines.py``).
- ``single``: nnU-Net's own trainer on one modality's cases, one class per modality index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

#: λ of Eq. 5 in the paper's units (its loss sums the modalities' Dice + CE)
PAPER_LAMBDA = 0.5
#: the Single row has one trainer class per modality index below this
MAX_SINGLE_MODALITIES = 3
KINDS = ("csa", "joint", "single")
#: ``benchmark``: the paper's rows (the benchmark's default), the ablations of λ and its schedule
#: (on request), or None (a trainer only, e.g. the ablations of Eq. 3 and 4)
BENCHMARK_GROUPS = ("paper", "lambda")


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    doc: str
    #: class attributes of nnUNetTrainerCSA that this row changes (kind "csa" only)
    settings: Mapping[str, object] = field(default_factory=dict)
    benchmark: str | None = None
    #: the classes the row makes, by name: its trainer, then its ``_BN`` twin (Single: that pair for
    #: each modality index, in order)
    trainers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"row {self.name}: kind must be one of {KINDS}, not {self.kind!r}")
        if self.settings and self.kind != "csa":
            raise ValueError(f"row {self.name}: only rows of kind 'csa' change settings")
        if self.benchmark not in (None, *BENCHMARK_GROUPS):
            raise ValueError(f"row {self.name}: benchmark must be one of {BENCHMARK_GROUPS} or None")
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "trainers", tuple(self.trainers))
        if self.trainers != self.expected_trainers:
            raise ValueError(f"row {self.name}: trainers must be {self.expected_trainers}, not {self.trainers}")

    @property
    def trainer_template(self) -> str:
        """The trainer class name; ``{index}`` is the modality index of the Single row."""
        return "nnUNetTrainerSingleModality{index}" if self.kind == "single" else f"nnUNetTrainer{self.name}"

    @property
    def expected_trainers(self) -> tuple[str, ...]:
        """The class names of the naming rule (what ``trainers`` must spell out)."""
        indices = range(MAX_SINGLE_MODALITIES) if self.kind == "single" else (0,)
        return tuple(self.trainer_template.format(index=i) + suffix for i in indices for suffix in ("", "_BN"))

    @property
    def modality_specific_norms(self) -> bool:
        """Whether its models need ``nnUNet_csa_modality`` to predict."""
        return self.kind == "csa"

    @property
    def paper_lambda(self) -> float:
        """The weight of its consistency term in the paper's units (0 for the stock rows)."""
        return float(self.settings.get("paper_lambda", PAPER_LAMBDA)) if self.kind == "csa" else 0.0

    @property
    def trains_with_consistency(self) -> bool:
        return self.kind == "csa" and self.settings.get("consistency_kind", "csa") != "none" \
            and self.paper_lambda != 0


ROW_TABLE = (
    Row("Single", "single", "Stock nnU-Net trained on one modality's cases only.", benchmark="paper",
        trainers=("nnUNetTrainerSingleModality0", "nnUNetTrainerSingleModality0_BN",
                  "nnUNetTrainerSingleModality1", "nnUNetTrainerSingleModality1_BN",
                  "nnUNetTrainerSingleModality2", "nnUNetTrainerSingleModality2_BN")),
    Row("Joint", "joint", "Stock nnU-Net on both modalities mixed (shared norms).", benchmark="paper",
        trainers=("nnUNetTrainerJoint", "nnUNetTrainerJoint_BN")),
    Row("MSBN", "csa", "Modality-specific norms and unpaired batches only (λ = 0); the CSA term is logged.",
        {"paper_lambda": 0.0}, "paper", ("nnUNetTrainerMSBN", "nnUNetTrainerMSBN_BN")),
    Row("Affinity", "csa", "Affinity consistency on whole feature maps (no class masks).",
        {"consistency_kind": "affinity"}, "paper", ("nnUNetTrainerAffinity", "nnUNetTrainerAffinity_BN")),
    Row("UMMKD", "csa", "Dou et al. 2020 knowledge distillation between the modalities' class-wise logits.",
        {"consistency_kind": "ummkd"}, "paper", ("nnUNetTrainerUMMKD", "nnUNetTrainerUMMKD_BN")),
    Row("CSA", "csa", "The paper's method: the class-specific affinity term with the paper's λ.", {}, "paper",
        ("nnUNetTrainerCSA", "nnUNetTrainerCSA_BN")),
    Row("CSA_Lambda0p25", "csa", "CSA with λ = 0.25 in the paper's units: half the paper's weight.",
        {"paper_lambda": 0.25}, "lambda", ("nnUNetTrainerCSA_Lambda0p25", "nnUNetTrainerCSA_Lambda0p25_BN")),
    Row("CSA_Lambda1", "csa", "CSA with λ = 1 in the paper's units: twice the paper's weight, the default of this "
        "package's first version.", {"paper_lambda": 1.0}, "lambda",
        ("nnUNetTrainerCSA_Lambda1", "nnUNetTrainerCSA_Lambda1_BN")),
    Row("UMMKD_Lambda1", "csa", "UMMKD with weight 1 in the paper's units, the default of this package's first "
        "version.", {"consistency_kind": "ummkd", "paper_lambda": 1.0}, "lambda",
        ("nnUNetTrainerUMMKD_Lambda1", "nnUNetTrainerUMMKD_Lambda1_BN")),
    Row("CSA_RampUp", "csa", "CSA with the paper's λ reached by a linear ramp-up over the first quarter of the "
        "epochs.", {"lambda_rampup_fraction": 0.25}, "lambda",
        ("nnUNetTrainerCSA_RampUp", "nnUNetTrainerCSA_RampUp_BN")),
    Row("CSA_AreaPixels", "csa", "Ablation of Eq. 3: the affinity divided by the class region's pixel count.",
        {"area_normalization": "pixels"}, trainers=("nnUNetTrainerCSA_AreaPixels", "nnUNetTrainerCSA_AreaPixels_BN")),
    Row("CSA_AreaFraction", "csa", "Ablation of Eq. 3: the affinity divided by the class region's fraction of the "
        "image.", {"area_normalization": "fraction"},
        trainers=("nnUNetTrainerCSA_AreaFraction", "nnUNetTrainerCSA_AreaFraction_BN")),
    Row("CSA_Literal", "csa", "Ablation of Eq. 4 as printed: the square of the mean entry difference.",
        {"affinity_reading": "literal"}, trainers=("nnUNetTrainerCSA_Literal", "nnUNetTrainerCSA_Literal_BN")),
)
ROWS_BY_NAME = {row.name: row for row in ROW_TABLE}
if len(ROWS_BY_NAME) != len(ROW_TABLE):
    raise ValueError("two rows of ROW_TABLE share a name")


def rows_of_group(group: str) -> tuple[str, ...]:
    """The names of the rows of a benchmark group, in the table's order."""
    return tuple(row.name for row in ROW_TABLE if row.benchmark == group)
