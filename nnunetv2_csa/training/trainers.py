"""Every trainer of nnunetv2_csa, derived from the row table (``training/rows.py``, whose lines name
them): each row's trainer and its ``_BN`` twin (BatchNorm, the paper's norm), and, made on demand
by the module's ``__getattr__`` (nnU-Net's trainer search asks with ``hasattr``; pickle looks a class
up by name the same way), their short-budget variants ``<trainer>_<E>epochs_<I>its`` for any E and
I. The one module the ``nnUNet_extTrainer`` shim imports."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN

from nnunetv2_csa.errors import install_one_line_errors
from nnunetv2_csa.training.baselines import nnUNetTrainerJoint, nnUNetTrainerJoint_BN, single_modality_trainer
from nnunetv2_csa.training.nnUNetTrainerCSA import nnUNetTrainerCSA, nnUNetTrainerCSA_BN
from nnunetv2_csa.training.rows import MAX_SINGLE_MODALITIES, ROW_TABLE, Row
from nnunetv2_csa.training.short_budget import parse_short_budget_name, short_budget_variant

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
    """The trainer classes of a row, in the order its line names them: its InstanceNorm trainer and
    its BatchNorm twin (for Single, that pair for each modality index)."""
    if row.kind == "joint":
        trainers = [nnUNetTrainerJoint, nnUNetTrainerJoint_BN]
    elif row.kind == "single":
        trainers = [single_modality_trainer(index, base, suffix, __name__) for index in range(MAX_SINGLE_MODALITIES)
                    for base, suffix in ((nnUNetTrainer, ""), (nnUNetTrainerBN, BN_SUFFIX))]
    elif row.trainer_template == nnUNetTrainerCSA.__name__:
        trainers = [nnUNetTrainerCSA, nnUNetTrainerCSA_BN]
    else:
        trainers = [_csa_row_trainer(row, nnUNetTrainerCSA, ""), _csa_row_trainer(row, nnUNetTrainerCSA_BN, BN_SUFFIX)]
    made = tuple(trainer.__name__ for trainer in trainers)
    if made != row.trainers:
        raise ValueError(f"row {row.name} names the classes {row.trainers}, but makes {made}")
    return trainers


BASE_TRAINERS = tuple(trainer for row in ROW_TABLE for trainer in row_trainers(row))
_BY_NAME = {trainer.__name__: trainer for trainer in BASE_TRAINERS}
globals().update(_BY_NAME)
__all__ = list(_BY_NAME)


def __getattr__(name: str) -> type:
    """A short-budget variant of one of the trainers above, made on first use and kept (so that
    every lookup of the name, pickle's included, gives the same class)."""
    parsed = parse_short_budget_name(name)
    if parsed is None or parsed[0] not in _BY_NAME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    variant = short_budget_variant(_BY_NAME[parsed[0]], parsed[1], parsed[2], __name__)
    globals()[name] = variant
    return variant
