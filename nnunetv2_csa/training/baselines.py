"""The stock rows of the paper's comparison as nnU-Net trainers.

- Joint: nnU-Net's own trainer on the mixed dataset (shared norms, nnU-Net's own batches),
  with validation per modality added (pseudo Dice per modality, summary_per_modality.json),
  which changes nothing in its training. Its weights and predictions are those of
  ``nnUNetTrainer``; ``nnUNetTrainerJoint`` is a name of ours, so that its short-budget
  variants exist.
- Single: nnU-Net's own trainer on the cases of one modality only, with the same
  patient-grouped split: the fold's training and validation cases are filtered to that
  modality. The modality is the index into ``csa_modalities`` in the trainer's name
  (``nnUNetTrainerSingleModality0`` trains on the first modality), which gives each
  modality its own model folder.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN

from nnunetv2_csa.modality import ModalityTagError, modality_tags_from_dataset_json
from nnunetv2_csa.training.per_modality_validation import PerModalityValidationMixin
from nnunetv2_csa.training.resume import ReadableCheckpointMixin


class nnUNetTrainerJoint(ReadableCheckpointMixin, PerModalityValidationMixin, nnUNetTrainer):
    """Stock nnU-Net on both modalities (the paper's Joint row)."""


class nnUNetTrainerJoint_BN(ReadableCheckpointMixin, PerModalityValidationMixin, nnUNetTrainerBN):
    """Stock nnU-Net with BatchNorm on both modalities."""


class _SingleModalityMixin:
    #: index into the dataset's csa_modalities
    single_modality_index: int = 0

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        tags = modality_tags_from_dataset_json(self.dataset_json)
        if self.single_modality_index >= len(tags.modalities):
            raise ModalityTagError(f"{type(self).__name__} trains on modality #{self.single_modality_index}, "
                                   f"but this dataset has only {list(tags.modalities)}")
        name = tags.modalities[self.single_modality_index]
        tr_keys = [k for k in tr_keys if tags.modality_of_case(k) == name]
        val_keys = [k for k in val_keys if tags.modality_of_case(k) == name]
        if not tr_keys or not val_keys:
            raise ModalityTagError(f"fold {self.fold} has {len(tr_keys)} training and {len(val_keys)} validation "
                                   f"cases of modality {name}: both must be non-empty")
        self.print_to_log_file(f"Single-modality training on {name}: {len(tr_keys)} training and "
                               f"{len(val_keys)} validation cases")
        return tr_keys, val_keys


def single_modality_trainer(index: int, base: type, suffix: str, module: str) -> type:
    """The Single row's trainer for modality ``index`` on nnU-Net's trainer ``base``, to be bound
    as a global of ``module`` (so that it pickles)."""
    name = f"nnUNetTrainerSingleModality{index}{suffix}"
    return type(name, (ReadableCheckpointMixin, _SingleModalityMixin, base), {
        "single_modality_index": index, "__module__": module, "__qualname__": name,
        "__doc__": f"Stock nnU-Net trained on modality #{index} of csa_modalities only (the paper's Single row)."})
