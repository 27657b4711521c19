"""Validation per modality, for every trainer that sees several modalities (Joint and the
rows with modality-specific norms).

- Each validation batch runs nnU-Net's own ``validation_step`` once per modality's
  sub-batch, so that the pseudo Dice is logged per modality (``Pseudo dice per modality``
  in the log, ``progress_modalities.png``); the totals equal one pass over the whole batch.
- nnU-Net's final validation runs once per modality on that modality's cases
  (``do_split`` filtered), and ``validation/summary_per_modality.json`` gives each
  modality's Dice. A trainer with modality-specific norms routes the network to that
  modality before any of its cases is predicted (``_route``).
"""
from __future__ import annotations

import math
import os
from typing import List

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunetv2_csa.modality import ModalityTags, modality_tags_from_dataset_json
from nnunetv2_csa.training.progress import PER_MODALITY_DICE, ModalityAwareLocalLogger

SUMMARY_PER_MODALITY = "summary_per_modality.json"
_COUNTS = ("tp_hard", "fp_hard", "fn_hard")


def gathered(trainer, value) -> list:
    """``value`` of every rank (just this rank's without DDP)."""
    if not trainer.is_ddp:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class PerModalityValidationMixin:
    """Put before nnU-Net's trainer class in the bases; needs the dataset's modality tags."""

    #: whether the trainer logs the consistency term's series each epoch (the CSA family)
    logs_consistency = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.modality_tags: ModalityTags = modality_tags_from_dataset_json(dataset_json)
        self.logger.local_logger = ModalityAwareLocalLogger(self.modality_tags.modalities,
                                                            self.logger.local_logger, self.logs_consistency)

    def _route(self, modality) -> None:
        """Select the network's norms of ``modality`` (shared norms: nothing to do)."""

    def _after_validation_sub_batch(self, modality: int, target: torch.Tensor) -> None:
        """Called after each modality's sub-batch of a validation batch has passed the network."""

    def _sample_modalities(self, batch: dict) -> torch.Tensor:
        if "modality" in batch:
            return batch["modality"]
        # nnU-Net's own loader names the cases of a batch
        return torch.as_tensor([self.modality_tags.index_of_case(k) for k in batch["keys"]])

    # ---------------------------------------------------------------- validation batches
    def validation_step(self, batch: dict) -> dict:
        modality = self._sample_modalities(batch)
        n_modalities = len(self.modality_tags.modalities)
        per_modality = []
        for m in range(n_modalities):
            selected = torch.nonzero(modality == m).flatten()
            if len(selected) == 0:
                continue
            target = [t[selected] for t in batch["target"]] if isinstance(batch["target"], list) \
                else batch["target"][selected]
            self._route(m)
            per_modality.append((m, len(selected), super().validation_step({"data": batch["data"][selected],
                                                                            "target": target})))
            self._after_validation_sub_batch(m, target[0] if isinstance(target, list) else target)
        n_total = sum(n for _, n, _ in per_modality)
        shape = per_modality[0][2]["tp_hard"].shape
        result = {"loss": np.float64(sum(n * out["loss"] for _, n, out in per_modality) / n_total)}
        for key in _COUNTS:
            result[key] = sum(out[key] for _, _, out in per_modality)
            per_mod = np.zeros((n_modalities, *shape))
            for m, _, out in per_modality:
                per_mod[m] = out[key]
            result[f"{key}_per_modality"] = per_mod
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        collated = collate_outputs(val_outputs)
        tp, fp, fn = (np.sum(gathered(self, np.sum(collated[f"{k}_per_modality"], 0)), 0) for k in _COUNTS)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = 2 * tp / (2 * tp + fp + fn)
        mean_per_modality = [float(np.nanmean(d)) if np.isfinite(d).any() else math.nan for d in dice]
        self.logger.log(PER_MODALITY_DICE, mean_per_modality, self.current_epoch)

    def on_epoch_end(self):
        dice = self.logger.get_value(PER_MODALITY_DICE, step=-1)
        self.print_to_log_file("Pseudo dice per modality",
                               {n: round(d, 4) for n, d in zip(self.modality_tags.modalities, dice)})
        super().on_epoch_end()

    # ---------------------------------------------------------------- final validation
    #: the modality index whose cases nnU-Net's final validation predicts now (None: all cases)
    _validation_modality: int | None = None

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        if self._validation_modality is not None:
            val_keys = [k for k in val_keys if self.modality_tags.index_of_case(k) == self._validation_modality]
        return tr_keys, val_keys

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation once per modality: the split is filtered to that
        modality's cases (``do_split``) and the network is routed to its norms before nnU-Net
        predicts any of them, so no case can meet another modality's norms, whatever order
        nnU-Net loads cases in. nnU-Net scores the whole validation folder after each pass,
        so the summary.json of the last pass covers every case."""
        _, val_keys = super().do_split()
        try:
            for m, name in enumerate(self.modality_tags.modalities):
                n_cases = sum(self.modality_tags.index_of_case(k) == m for k in val_keys)
                if n_cases == 0:
                    continue
                self.print_to_log_file(f"final validation of modality {name}: {n_cases} case(s)")
                self._validation_modality = m
                self._route(m)
                super().perform_actual_validation(save_probabilities)
        finally:
            self._validation_modality = None
        if self.local_rank == 0:
            self._write_validation_summary_per_modality()

    def _write_validation_summary_per_modality(self):
        summary_file = join(self.output_folder, "validation", "summary.json")
        if not isfile(summary_file):
            return
        summary = load_json(summary_file)
        per_modality = {}
        for name in self.modality_tags.modalities:
            cases = [c for c in summary["metric_per_case"]
                     if self.modality_tags.modality_of_case(os.path.basename(c["reference_file"])
                                                            .removesuffix(self.dataset_json["file_ending"])) == name]
            if not cases:
                continue
            labels = cases[0]["metrics"].keys()
            per_class = {lab: float(np.nanmean([c["metrics"][lab]["Dice"] for c in cases])) for lab in labels}
            per_modality[name] = {"n_cases": len(cases), "Dice_per_class": per_class,
                                  "mean_Dice": float(np.nanmean(list(per_class.values())))}
            self.print_to_log_file(f"Validation Dice {name}: {per_modality[name]['mean_Dice']:.4f} "
                                   f"({len(cases)} cases)")
        save_json(per_modality, join(self.output_folder, "validation", SUMMARY_PER_MODALITY))
