"""Which modality ``nnUNetv2_predict`` segments with a model of modality-specific norms.

nnU-Net's predictor builds the network from the plans alone and passes no per-image
information to it, so the modality comes from the environment (one modality per call).
"""
from __future__ import annotations

import os

from nnunetv2_csa.modality import ModalityTagError, modalities_from_plans

#: environment variable naming the modality that ``nnUNetv2_predict`` segments
INFERENCE_MODALITY_ENV = "nnUNet_csa_modality"


def inference_modality_index(plans_manager) -> int:
    """The modality index chosen for inference through ``nnUNet_csa_modality``; refuses an
    unset or unknown modality, so that no image meets another modality's norms silently."""
    modalities = modalities_from_plans(plans_manager.plans)
    name = os.environ.get(INFERENCE_MODALITY_ENV)
    if not name:
        raise ModalityTagError(
            f"this model has modality-specific normalization: tell nnUNetv2_predict which modality the "
            f"images are, e.g. `{INFERENCE_MODALITY_ENV}={modalities[0]} nnUNetv2_predict ...`; "
            f"this model knows {modalities}")
    if name not in modalities:
        raise ModalityTagError(f"{INFERENCE_MODALITY_ENV}={name!r} is not a modality of this model; "
                               f"it knows {modalities}")
    return modalities.index(name)
