"""Every trainer of nnunetv2_csa, derived from the row table (``training/rows.py``): each
row's trainer, its ``_BN`` twin (BatchNorm, the paper's norm) and their short-budget
variants. The one module the ``nnUNet_extTrainer`` shim imports."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN

from nnunetv2_csa.errors import install_one_line_errors
from nnunetv2_csa.training.baselines import nnUNetTrainerJoint, nnUNetTrainerJoint_BN, single_modality_trainer
from nnunetv2_csa.training.nnUNetTrainerCSA import nnUNetTrainerCSA, nnUNetTrainerCSA_BN
from nnunetv2_csa.training.rows import MAX_SINGLE_MODALITIES, ROW_TABLE, Row
from nnunetv2_csa.training.short_budget import short_budget_variants

# nnUNetv2_train and nnUNetv2_predict import this module to find our trainers: this
# package's input errors (a modality missing or unknown, a checkpoint refused) reach the
# user as one line there too
install_one_line_errors()

BN_SUFFIX = "_BN"


def _csa_row_trainer(row: Row, base: type, suffix: str) -> type:
    unknown = [key for key in row.settings if not hasattr(nnUNetTrainerCSA, key)]
    if unknown:
        raise AttributeError(f"row {row.name} sets {unknown}, which nnUNetTrainerCSA does not have")
    name = row.trainer_template + suffix
    doc = row.doc + (" Modality-specific BatchNorm." if suffix == BN_SUFFIX else "")
    return type(name, (base,), {**row.settings, "__module__": __name__, "__qualname__": name, "__doc__": doc})


def row_trainers(row: Row) -> list[type]:
    """The trainer classes of a row: its InstanceNorm trainer and its BatchNorm twin (for
    Single, that pair for each modality index)."""
    if row.kind == "joint":
        return [nnUNetTrainerJoint, nnUNetTrainerJoint_BN]
    if row.kind == "single":
        return [single_modality_trainer(index, base, suffix, __name__) for index in range(MAX_SINGLE_MODALITIES)
                for base, suffix in ((nnUNetTrainer, ""), (nnUNetTrainerBN, BN_SUFFIX))]
    if row.trainer_template == nnUNetTrainerCSA.__name__:
        return [nnUNetTrainerCSA, nnUNetTrainerCSA_BN]
    return [_csa_row_trainer(row, nnUNetTrainerCSA, ""), _csa_row_trainer(row, nnUNetTrainerCSA_BN, BN_SUFFIX)]


BASE_TRAINERS = tuple(trainer for row in ROW_TABLE for trainer in row_trainers(row))
globals().update({trainer.__name__: trainer for trainer in BASE_TRAINERS})
__all__ = [trainer.__name__ for trainer in BASE_TRAINERS]
for _base in BASE_TRAINERS:
    _variants = short_budget_variants(_base, __name__)
    globals().update(_variants)
    __all__.extend(_variants)
