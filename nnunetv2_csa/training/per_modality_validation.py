"""Validation per modality, for every trainer that sees several modalities (Joint and the
rows with modality-specific norms).

- Each validation batch runs nnU-Net's own ``validation_step`` once per modality's
  sub-batch, so that the pseudo Dice is logged per modality (``Pseudo dice per modality``
  in the log, ``progress_modalities.png``); the totals equal one pass over the whole batch.
- nnU-Net's final validation runs once over all cases, and
  ``validation/summary_per_modality.json`` gives each modality's Dice. A trainer with
  modality-specific norms routes the network to each case's modality as nnU-Net loads the
  case (``CaseRouting``, which stops the validation if nnU-Net ever predicts out of order).
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from contextlib import contextmanager
from typing import List

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json, save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunetv2_csa.modality import (CASE_MODALITY_KEY, MODALITIES_KEY, ModalityTags,
                                   modality_tags_from_dataset_json)
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


class CaseRoutingError(RuntimeError):
    """nnU-Net's final validation no longer predicts each case right after loading it."""


class CaseRouting:
    """Routes a trainer's network to each validation case's modality as nnU-Net loads the case.

    This holds because nnU-Net (2.8.1, ``perform_actual_validation``) loads a case and predicts
    it before it loads the next one, in the process and thread that own the network. Should a
    later nnU-Net prefetch cases, or load them elsewhere, a case could meet another modality's
    norms: every forward pass and every load is checked against that order, and a break of it
    stops the validation with ``CaseRoutingError`` instead of scoring wrong predictions.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.thread = threading.get_ident()
        self.case: str | None = None
        self.forwards_of_case = 0
        #: how the order was broken where the exception may not reach the validation (another thread)
        self.broken: str | None = None

    def dataset_class(self, base: type) -> type:
        """``base`` (nnU-Net's dataset class) whose ``load_case`` routes the network."""
        routing = self

        class CaseRoutingDataset(base):
            def load_case(self, identifier):
                loaded = super().load_case(identifier)
                routing.loaded(identifier)
                return loaded

        return CaseRoutingDataset

    def _refuse(self, what: str):
        raise CaseRoutingError(f"nnU-Net's final validation {what}, so routing each case to its modality's norms "
                               f"is not safe with this nnU-Net version; nnunetv2_csa needs the order of nnU-Net "
                               f"2.8.1 (load a case, predict it, then load the next)")

    def loaded(self, case: str) -> None:
        if threading.get_ident() != self.thread:
            self.broken = f"loaded {case} in another thread than its own"
            self._refuse(self.broken)
        if self.case is not None and self.forwards_of_case == 0:
            self._refuse(f"loaded {case} before it predicted {self.case}")
        self.trainer._route(self.trainer.modality_tags.index_of_case(case))
        self.case, self.forwards_of_case = case, 0

    def before_forward(self, module, args) -> None:
        if self.broken:
            self._refuse(self.broken)
        if self.case is None:
            self._refuse("predicted a case that it did not load in the predicting process")
        self.forwards_of_case += 1

    def check_finished(self) -> None:
        if self.broken:
            self._refuse(self.broken)
        if self.case is not None and self.forwards_of_case == 0:
            self._refuse(f"never predicted {self.case}, the last case it loaded")


@contextmanager
def _no_buffer_sync_in_forward(network):
    """nnU-Net's final validation predicts with the DDP-wrapped network, and DDP broadcasts the
    network's buffers (BatchNorm's running statistics: the ``_BN`` rows) at a forward pass that
    follows a training step or starts a process, a collective every rank must join. nnU-Net
    splits the validation cases over the ranks, so under ``nnUNetv2_train ... --val`` a rank
    without a case never joins and the others wait until the timeout. The buffers are equal on every rank already (broadcast at every
    training step, or loaded from one checkpoint) and inference does not change them, so the
    final validation runs without that broadcast."""
    if not isinstance(network, DistributedDataParallel):
        yield
        return
    attribute = next((a for a in ("forward_sync_buffers", "broadcast_buffers") if hasattr(network, a)), None)
    if attribute is None:
        raise RuntimeError("torch's DistributedDataParallel has neither forward_sync_buffers nor broadcast_buffers: "
                           "the final validation of the _BN rows under DDP needs another way to skip the buffer "
                           "broadcast (nnunetv2_csa/training/per_modality_validation.py)")
    saved = getattr(network, attribute)
    setattr(network, attribute, False)
    try:
        yield
    finally:
        setattr(network, attribute, saved)


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
        self._warn_if_tagged_again_since_preprocessing(dataset_json)

    def _warn_if_tagged_again_since_preprocessing(self, dataset_json: dict) -> None:
        """nnU-Net trains on the dataset.json its preprocessing copied; tags written into the raw dataset.json
        after that (nnUNetv2_csa_tag_modalities) do not reach the training until it is preprocessed again."""
        raw_root = os.environ.get("nnUNet_raw")
        raw_file = join(raw_root, self.plans_manager.dataset_name, "dataset.json") if raw_root else ""
        if not isfile(raw_file):
            return
        try:
            raw = load_json(raw_file)
        except (OSError, ValueError):
            return  # the raw folder is not this training's input; its own commands report it
        keys = (MODALITIES_KEY, CASE_MODALITY_KEY)
        if isinstance(raw, dict) and any(raw.get(k) != dataset_json.get(k) for k in keys):
            message = (f"{raw_file} tags the cases otherwise than the preprocessed copy this training reads "
                       f"({join(self.preprocessed_dataset_folder_base, 'dataset.json')}): the dataset was tagged again "
                       f"after preprocessing, and this training uses the old tags. Run nnUNetv2_preprocess (or "
                       f"nnUNetv2_plan_and_preprocess) for it again to train on the new ones")
            warnings.warn(message, stacklevel=2)
            self.print_to_log_file(f"WARNING: {message}")

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
    @contextmanager
    def _rank_local_dice(self):
        """Under DDP, nnU-Net's Dice loss all-gathers each call's per-sample sums: one collective per
        call, with the call's batch size. The sub-batches of a rank's validation batch differ from rank
        to rank in number and size (nnU-Net's own loader draws any mix of modalities), which would
        mismatch the ranks' collectives; so the validation's Dice is computed per rank, as it is
        per sub-batch in one process. Training steps keep nnU-Net's gathered Dice."""
        if not self.is_ddp:
            yield
            return
        dice_losses = [m for m in self.loss.modules() if hasattr(m, "ddp") and hasattr(m, "batch_dice")]
        if not dice_losses:
            raise RuntimeError("nnU-Net's Dice loss no longer has the 'ddp' switch that nnunetv2_csa turns off for "
                               "the per-modality validation under DDP; this nnU-Net version is not supported")
        saved = [m.ddp for m in dice_losses]
        for m in dice_losses:
            m.ddp = False
        try:
            yield
        finally:
            for m, value in zip(dice_losses, saved):
                m.ddp = value

    def validation_step(self, batch: dict) -> dict:
        modality = self._sample_modalities(batch)
        n_modalities = len(self.modality_tags.modalities)
        per_modality = []
        with self._rank_local_dice():
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
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation, one pass over all cases; a trainer with modality-specific
        norms routes the network to each case's modality right after nnU-Net loads the case
        (``CaseRouting``), then writes ``summary_per_modality.json``."""
        with _no_buffer_sync_in_forward(self.network):
            self._final_validation(save_probabilities)
        if self.local_rank == 0:
            self._write_validation_summary_per_modality()

    def _final_validation(self, save_probabilities: bool):
        if type(self)._route is PerModalityValidationMixin._route:  # shared norms: nothing to route
            super().perform_actual_validation(save_probabilities)
        else:
            routing = CaseRouting(self)
            original = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
            # nnU-Net builds its validation dataset from this attribute; only validation sees the subclass
            self.dataset_class = routing.dataset_class(original)
            hook = self.network.register_forward_pre_hook(routing.before_forward)
            try:
                super().perform_actual_validation(save_probabilities)
                routing.check_finished()
            finally:
                hook.remove()
                self.dataset_class = original

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
