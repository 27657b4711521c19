"""Losses of the method and of its comparison rows, in plain torch (no nnU-Net import).

* :class:`ClassSpecificAffinityLoss`: the CSA consistency term (Chen et al., MICCAI 2020).
* :class:`AffinityLoss`: the same on whole feature maps (the paper's "Affinity" row).
* :class:`UnpairedKnowledgeDistillationLoss` / :func:`ummkd_loss`: Dou et al., TMI 2020
  (the "UMMKD" row).
"""
from nnunetv2_csa.losses.affinity import (AREA_NORMALIZATIONS, DEFAULT_AREA_NORMALIZATION, READINGS, WHOLE_MAP,
                                          AffinityLoss,
                                          ClassSpecificAffinityLoss)
from nnunetv2_csa.losses.ummkd import UnpairedKnowledgeDistillationLoss, ummkd_loss

__all__ = [
    "AREA_NORMALIZATIONS",
    "DEFAULT_AREA_NORMALIZATION",
    "READINGS",
    "WHOLE_MAP",
    "AffinityLoss",
    "ClassSpecificAffinityLoss",
    "UnpairedKnowledgeDistillationLoss",
    "ummkd_loss",
]
