"""Every trainer of nnunetv2_csa, with its short-budget variants: the one module the
``nnUNet_extTrainer`` shim imports."""
from nnunetv2_csa.training.baselines import (nnUNetTrainerJoint, nnUNetTrainerJoint_BN,
                                             nnUNetTrainerSingleModality0, nnUNetTrainerSingleModality0_BN,
                                             nnUNetTrainerSingleModality1, nnUNetTrainerSingleModality1_BN,
                                             nnUNetTrainerSingleModality2, nnUNetTrainerSingleModality2_BN)
from nnunetv2_csa.training.nnUNetTrainerCSA import (nnUNetTrainerAffinity, nnUNetTrainerAffinity_BN,
                                                    nnUNetTrainerCSA, nnUNetTrainerCSA_AreaFraction,
                                                    nnUNetTrainerCSA_AreaPixels, nnUNetTrainerCSA_BN,
                                                    nnUNetTrainerCSA_Lambda0p25, nnUNetTrainerCSA_Lambda1,
                                                    nnUNetTrainerCSA_RampUp,
                                                    nnUNetTrainerUMMKD_Lambda1,
                                                    nnUNetTrainerCSA_Literal, nnUNetTrainerMSBN, nnUNetTrainerMSBN_BN,
                                                    nnUNetTrainerUMMKD, nnUNetTrainerUMMKD_BN)
from nnunetv2_csa.errors import install_one_line_errors
from nnunetv2_csa.training.short_budget import short_budget_variants

# nnUNetv2_train and nnUNetv2_predict import this module to find our trainers: this
# package's input errors (a modality missing or unknown, a checkpoint refused) reach the
# user as one line there too
install_one_line_errors()

BASE_TRAINERS = (nnUNetTrainerCSA, nnUNetTrainerCSA_BN, nnUNetTrainerMSBN, nnUNetTrainerMSBN_BN,
                 nnUNetTrainerAffinity, nnUNetTrainerAffinity_BN, nnUNetTrainerUMMKD, nnUNetTrainerUMMKD_BN,
                 nnUNetTrainerCSA_AreaPixels, nnUNetTrainerCSA_AreaFraction, nnUNetTrainerCSA_Literal,
                 nnUNetTrainerCSA_Lambda1, nnUNetTrainerCSA_Lambda0p25, nnUNetTrainerUMMKD_Lambda1,
                 nnUNetTrainerCSA_RampUp,
                 nnUNetTrainerJoint, nnUNetTrainerJoint_BN,
                 nnUNetTrainerSingleModality0, nnUNetTrainerSingleModality0_BN,
                 nnUNetTrainerSingleModality1, nnUNetTrainerSingleModality1_BN,
                 nnUNetTrainerSingleModality2, nnUNetTrainerSingleModality2_BN)

__all__ = [t.__name__ for t in BASE_TRAINERS]
for _base in BASE_TRAINERS:
    _variants = short_budget_variants(_base, __name__)
    globals().update(_variants)
    __all__.extend(_variants)
