"""Unpaired two-(or more-)modality batches on top of nnU-Net's own 2D slice sampling.

Each batch of B samples holds B/n samples of each of the n modalities, drawn
independently (uniformly with replacement among the cases of that modality, as
nnU-Net draws cases), so there is no pairing and no spatial alignment between the
modalities. Sample order within a batch is grouped by modality (modality 0 first): the
modality-specific norms then route sub-batches by cheap contiguous slices.

Everything else (patch/slice cropping, foreground oversampling, augmentation, deep
supervision targets) is nnU-Net's `nnUNetDataLoader`, which this class subclasses.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunetv2_csa.modality import ModalityTagError, ModalityTags


def samples_per_modality(batch_size: int, n_modalities: int, batch_number: int = 0) -> list[int]:
    """How many samples of each modality a batch holds. With a batch size that n does not
    divide, the extra slots rotate over the modalities from batch to batch, so that over
    time every modality gets the same share."""
    if batch_size < n_modalities:
        raise ValueError(f"batch size {batch_size} is smaller than the number of modalities ({n_modalities}): "
                         f"an unpaired batch needs at least one sample of each modality. Use a plan with a "
                         f"larger batch size (nnUNetv2_plan_experiment -gpu_memory_target ...)")
    counts = [batch_size // n_modalities] * n_modalities
    for extra in range(batch_size % n_modalities):
        counts[(batch_number + extra) % n_modalities] += 1
    return counts


def forced_foreground_per_modality(batch_size: int, oversample_foreground_percent: float,
                                   counts: list[int], batch_number: int = 0) -> list[int]:
    """How many samples of each modality's block are forced to contain foreground: nnU-Net's
    number for the whole batch (``batch_size - round(batch_size * (1 - p))``, what its
    ``_oversample_last_XX_percent`` forces; under DDP ``p`` is the rank's, set by nnU-Net's
    ``_set_batch_size_and_oversample``), spread over the modalities as evenly as their blocks
    allow; a remainder rotates from batch to batch like the blocks' extra samples."""
    forced_total = batch_size - round(batch_size * (1 - oversample_foreground_percent))
    forced = [0] * len(counts)
    modality = batch_number % len(counts)
    while forced_total > 0:
        if forced[modality] < counts[modality]:
            forced[modality] += 1
            forced_total -= 1
        modality = (modality + 1) % len(counts)
    return forced


class UnpairedModalityDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader with unpaired, modality-balanced case selection.

    Foreground oversampling forces as many samples of the batch as nnU-Net's rule does
    (:func:`forced_foreground_per_modality`), the last ones of each modality's block, so that
    every modality gets the same share of the oversampled slices and the batch nnU-Net's
    share of them (also per rank under DDP, and for batches of 2).
    """

    def __init__(self, data, batch_size, *args, modality_tags: ModalityTags, **kwargs):
        super().__init__(data, batch_size, *args, **kwargs)
        self.modality_tags = modality_tags
        self.cases_of_modality = [[] for _ in modality_tags.modalities]
        for case in self.indices:
            self.cases_of_modality[modality_tags.index_of_case(case)].append(case)
        empty = [m for m, cases in zip(modality_tags.modalities, self.cases_of_modality) if len(cases) == 0]
        if empty:
            raise ModalityTagError(
                f"this split has no cases of modality {empty} (modalities {list(modality_tags.modalities)}); "
                f"every modality needs cases in the training and the validation set. Check splits_final.json "
                f"(write it with the nnunetv2_csa converter, which groups by patient)")
        self._batches_drawn = 0
        self._forced: list[bool] = []

    def get_indices(self):
        counts = samples_per_modality(self.batch_size, len(self.cases_of_modality), self._batches_drawn)
        forced = forced_foreground_per_modality(self.batch_size, self.oversample_foreground_percent, counts,
                                                self._batches_drawn)
        self._batches_drawn += 1
        keys, self._forced = [], []
        for cases, count, forced_count in zip(self.cases_of_modality, counts, forced):
            keys.extend(np.random.choice(cases, count, replace=True))
            self._forced.extend(position >= count - forced_count for position in range(count))
        return keys

    def _oversample_last_XX_percent(self, sample_idx: int) -> bool:
        # nnU-Net's rule over the whole batch would force only the last modality's samples
        return self._forced[sample_idx]

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        batch["modality"] = torch.as_tensor([self.modality_tags.index_of_case(k) for k in batch["keys"]],
                                            dtype=torch.long)
        return batch
