"""Trainers of the test suite, found by nnU-Net's commands through ``nnUNet_extTrainer``
(``tests/conftest.py``, ``with_test_trainers``). nnU-Net imports this module as a top-level
module: absolute imports only."""
import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring)

from nnunetv2_csa.modality_norm import ModalitySpecificNorm
from nnunetv2_csa.training.trainers import nnUNetTrainerCSA_1epochs_5its, nnUNetTrainerCSA_2epochs_5its


def mark_modalities_apart(network: torch.nn.Module) -> torch.nn.Module:
    """Modality k's norms get the weight 1 + k/2 and the bias k/2 in every layer, so that a case
    routed to another modality's norms is segmented differently (a few training steps leave the
    copies nearly as they started otherwise: equal)."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, ModalitySpecificNorm):
                for k, norm in enumerate(module.norms):
                    norm.weight.fill_(1.0 + 0.5 * k)
                    norm.bias.fill_(0.5 * k)
    return network


class _DistinctNorms:
    """A trainer whose modalities' norms start apart: the negative control of the tests that
    compare predictions made with each modality's norms."""

    def initialize(self):
        super().initialize()
        mark_modalities_apart(self.network)


class nnUNetTrainerCSA_2epochs_5its_DistinctNorms(_DistinctNorms, nnUNetTrainerCSA_2epochs_5its):
    pass


class nnUNetTrainerCSA_1epochs_5its_DistinctNorms_NoMirroring(_DistinctNorms, nnUNetTrainerNoMirroring,
                                                               nnUNetTrainerCSA_1epochs_5its):
    """The lifecycle tests' model (tests/test_lifecycle.py): five folds of one epoch, predicted many
    times; nnU-Net's own variant without mirroring, so that its validations and predictions run a
    quarter of the forward passes."""
