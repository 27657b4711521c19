"""nnUNetTrainerCSA and its comparison rows (MSBN, Affinity, UMMKD).

The trainers only wire pieces together; each piece lives in its own module:

- modality-specific norms: ``nnunetv2_csa.modality_norm``
- unpaired, modality-balanced batches: ``nnunetv2_csa.sampler``
- features of two layers by forward hooks: ``nnunetv2_csa.feature_taps``
- the consistency losses (CSA, Affinity, UMMKD): ``nnunetv2_csa.losses``

Loss, per training step (paper Eq. 5, α = β = 1):
``L_paper = (Dice¹ + CE¹) + (Dice² + CE²) + λ · L_consistency``, with the paper's λ = 0.5.
nnU-Net's deep-supervised Dice + CE over a batch of B/2 samples of each modality is the
*mean* of the two modalities' losses, not their sum (CE is a mean over the pixels of both
halves; the batch Dice pools both halves), so ``L_paper = 2 · [nnU-Net's loss + (λ/2) ·
L_consistency]``: the term is added with the weight ``λ/2`` (0.25 for the paper's 0.5) on
top of nnU-Net's loss, which gives the paper's balance between the segmentation loss and
the consistency term. ``paper_lambda`` is the row's λ in the paper's units;
``consistency_weight`` is the weight actually applied. The ``_Lambda1`` variants keep the
weighting of this package's first version (0.5 on nnU-Net's loss, λ = 1 in the paper's units).
The consistency term is added once per step and only in training mode, so nnU-Net's
validation loss stays comparable between all rows.

DDP (``-num_gpus``): every rank draws its own unpaired batch with B_rank/2 samples per
modality (the sampler refuses a per-rank batch smaller than the number of modalities),
so every rank always runs every modality's norms. nnU-Net converts BatchNorm to
SyncBatchNorm under DDP; the per-modality BatchNorms inside ModalitySpecificNorm are
converted too and synchronise the statistics of one modality across ranks (all ranks
call them in the same order, because all ranks hold every modality). InstanceNorm
needs no synchronisation. The consistency term is computed per rank on its local batch
and its gradient is averaged by DDP like nnU-Net's own loss.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from functools import partial
from typing import Callable, List

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json, isfile
from torch import nn

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_csa.feature_taps import FeatureTap, consecutive_conv_layers
from nnunetv2_csa.losses import (DEFAULT_AREA_NORMALIZATION, AffinityLoss, ClassSpecificAffinityLoss,
                                 UnpairedKnowledgeDistillationLoss)
from nnunetv2_csa.modality import (MODALITIES_KEY, ModalityTagError, ModalityTags, modalities_from_plans,
                                   modality_tags_from_dataset_json)
from nnunetv2_csa.modality_norm import convert_to_modality_specific_norms, set_modality
from nnunetv2_csa.modality_order import record_modality_order
from nnunetv2_csa.sampler import UnpairedModalityDataLoader
from nnunetv2_csa.training.progress import ModalityAwareLocalLogger
from nnunetv2_csa.training.resume import ReadableCheckpointMixin

#: environment variable naming the modality that ``nnUNetv2_predict`` segments
INFERENCE_MODALITY_ENV = "nnUNet_csa_modality"


def inference_modality_index(plans_manager: PlansManager) -> int:
    """The modality index chosen for inference through ``nnUNet_csa_modality``."""
    modalities = plans_modalities(plans_manager)
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


def weight_on_nnunet_loss(paper_lambda: float) -> float:
    """The weight on top of nnU-Net's Dice + CE that gives the paper's λ (see the module
    docstring): nnU-Net's loss is the mean of the two modalities' losses, the paper's their sum."""
    return paper_lambda / 2


def lambda_rampup(epoch: int, num_epochs: int, fraction: float) -> float:
    """The factor on λ at ``epoch``: linear from 0 at epoch 0 to 1 at ``fraction`` of the
    epochs, 1 after (a common schedule for consistency terms, which are unreliable while the
    network's features are still random)."""
    ramp_epochs = fraction * num_epochs
    return 1.0 if ramp_epochs <= 0 else min(1.0, epoch / ramp_epochs)


def plans_modalities(plans_manager: PlansManager) -> list[str]:
    return modalities_from_plans(plans_manager.plans)


class ConsistencyRegularizedLoss(nn.Module):
    """nnU-Net's segmentation loss plus ``weight`` times a consistency term.

    ``consistency(output, target)`` returns the term; it is evaluated only in training
    mode (``active``, which follows the trainer's epoch phase) and only when ``weight`` is
    not 0, so a row that does not minimise the term (MSBN) pays nothing for it in its
    training step. Its last value is kept for logging.
    """

    def __init__(self, segmentation_loss: nn.Module, consistency: Callable, weight: float):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.consistency = consistency
        self.weight = float(weight)
        self.active = False
        self.last_consistency = math.nan

    def forward(self, output, target):
        loss = self.segmentation_loss(output, target)
        if not self.active or self.weight == 0:
            return loss
        term = self.consistency(output, target)
        self.last_consistency = float(term.detach())
        return loss + self.weight * term


def _gathered_nanmean(trainer: nnUNetTrainer, values) -> float:
    """The mean of the finite values of all ranks (NaN if there is none)."""
    values = np.asarray(values, dtype=np.float64)
    if trainer.is_ddp:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        values = np.concatenate(gathered)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


class nnUNetTrainerCSA(ReadableCheckpointMixin, nnUNetTrainer):
    """Shared convolutions, modality-specific norms, unpaired batches and the class-specific
    affinity (CSA) consistency of Chen et al., MICCAI 2020.

    Class attributes select the row of the paper; subclasses change only these.
    """

    #: "csa", "affinity", "ummkd" or "none"
    consistency_kind = "csa"
    #: λ of Eq. 5 in the paper's units (its loss sums the modalities' Dice + CE)
    paper_lambda = 0.5
    #: λ grows linearly from 0 to its value over this fraction of the epochs (0: constant λ)
    lambda_rampup_fraction = 0.0
    #: log the affinity term of every validation batch (also for λ = 0, the MSBN row, so that
    #: its curve can be compared with the rows that minimise it; outside the training step)
    monitor_consistency = True
    #: S_c of Eq. 3: "none", "pixels" or "fraction" (see ClassSpecificAffinityLoss)
    area_normalization = DEFAULT_AREA_NORMALIZATION
    #: "mean_squared" (the text's reading of Eq. 4) or "literal" (the printed formula)
    affinity_reading = "mean_squared"
    #: where the two consecutive layers are: ("encoder" | "decoder", stage index or None for the middle)
    affinity_layers = ("encoder", None)
    #: UMMKD temperature
    distillation_temperature = 2.0
    #: the stock trainer that predicts one exported modality (nnunetv2_csa.export)
    stock_trainer_name = "nnUNetTrainer"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.modality_tags: ModalityTags = modality_tags_from_dataset_json(dataset_json)
        # the model folder's plans.json must name the modalities, because nnU-Net's
        # predictor builds the network from the plans alone
        self.plans_manager.plans[MODALITIES_KEY] = list(self.modality_tags.modalities)
        self.logger.local_logger = ModalityAwareLocalLogger(self.modality_tags.modalities,
                                                            self.logger.local_logger)
        self.feature_tap: FeatureTap | None = None
        self.consistency_term: nn.Module | None = None
        self._batch_modality: torch.Tensor | None = None

    @property
    def consistency_weight(self) -> float:
        """The weight of the consistency term on top of nnU-Net's loss."""
        return weight_on_nnunet_loss(self.paper_lambda)

    # ---------------------------------------------------------------- network
    @classmethod
    def build_plain_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision) -> nn.Module:
        """The network of the stock trainer whose norm type this row uses."""
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = cls.build_plain_network(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision)
        modalities = plans_modalities(plans_manager)
        convert_to_modality_specific_norms(network, len(modalities))
        # the weights carry the order; loading them into a network built for another stops
        record_modality_order(network, modalities)
        if not enable_deep_supervision:
            # nnU-Net builds the inference network without deep supervision; the
            # trainer itself always trains with it and routes every batch explicitly
            set_modality(network, inference_modality_index(plans_manager))
        return network

    def initialize(self):
        super().initialize()
        n_modalities = len(self.modality_tags.modalities)
        if self.batch_size < n_modalities:
            # refused here, not in an augmentation worker, where nnU-Net would only report
            # that its background workers died
            raise ModalityTagError(
                f"batch size {self.batch_size}{' per GPU' if self.is_ddp else ''} is smaller than the number of "
                f"modalities ({n_modalities}: {list(self.modality_tags.modalities)}): an unpaired batch needs at "
                f"least one sample of each modality. Plan with a larger batch size (nnUNetv2_plan_experiment "
                f"-gpu_memory_target ...){' or train on fewer GPUs' if self.is_ddp else ''}")
        if self.consistency_kind in ("csa", "affinity"):
            part, stage = self.affinity_layers
            layers = consecutive_conv_layers(self.network, part, stage)
            self.feature_tap = FeatureTap(self.network, layers)
            self.print_to_log_file(f"{self.consistency_kind} consistency between layers {layers}, "
                                   f"λ = {self.paper_lambda} in the paper's units, weight {self.consistency_weight} "
                                   f"on nnU-Net's loss")

    # ---------------------------------------------------------------- loss
    def _build_loss(self):
        segmentation_loss = super()._build_loss()
        num_classes = self.label_manager.num_segmentation_heads
        if self.consistency_kind == "csa":
            term = ClassSpecificAffinityLoss(num_classes, area_normalization=self.area_normalization,
                                             reading=self.affinity_reading)
            consistency = partial(self._affinity_consistency, term)
        elif self.consistency_kind == "affinity":
            term = AffinityLoss(num_classes, area_normalization=self.area_normalization,
                                reading=self.affinity_reading)
            consistency = partial(self._affinity_consistency, term)
        elif self.consistency_kind == "ummkd":
            term = UnpairedKnowledgeDistillationLoss(num_classes, temperature=self.distillation_temperature)
            consistency = partial(self._distillation_consistency, term)
        elif self.consistency_kind == "none":
            return ConsistencyRegularizedLoss(segmentation_loss, lambda o, t: None, 0.0)
        else:
            raise ValueError(f"unknown consistency_kind {self.consistency_kind!r}")
        self.consistency_term = term
        return ConsistencyRegularizedLoss(segmentation_loss, consistency, self.consistency_weight)

    @staticmethod
    def _full_resolution(output, target):
        # with deep supervision nnU-Net hands lists, highest resolution first
        if isinstance(output, (list, tuple)):
            output, target = output[0], target[0]
        return output, target

    def _affinity_consistency(self, term, output, target):
        _, target = self._full_resolution(output, target)
        features_l, features_k = self.feature_tap.features()
        try:
            return term(features_l, features_k, target, self._batch_modality)
        finally:
            self.feature_tap.clear()

    def _distillation_consistency(self, term, output, target):
        output, target = self._full_resolution(output, target)
        return term(output, target, self._batch_modality)

    # ---------------------------------------------------------------- data
    @contextmanager
    def _unpaired_data_loaders(self):
        # nnU-Net's get_dataloaders builds nnUNetDataLoader by name and offers no hook for
        # the loader class. Swapping the name for the duration of that one call keeps all of
        # nnU-Net's pipeline (transforms, oversampling, augmentation workers) without copying it.
        original = nnunet_trainer_module.nnUNetDataLoader
        nnunet_trainer_module.nnUNetDataLoader = partial(UnpairedModalityDataLoader,
                                                         modality_tags=self.modality_tags)
        try:
            yield
        finally:
            nnunet_trainer_module.nnUNetDataLoader = original

    def get_dataloaders(self):
        with self._unpaired_data_loaders():
            return super().get_dataloaders()

    def _route(self, modality) -> None:
        set_modality(self.network, modality)

    # ---------------------------------------------------------------- training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.loss.active = True
        if self.lambda_rampup_fraction > 0:
            self.loss.weight = self.consistency_weight * lambda_rampup(self.current_epoch, self.num_epochs,
                                                                       self.lambda_rampup_fraction)
            self.print_to_log_file(f"consistency weight (ramp-up): {self.loss.weight:.4g}")

    def train_step(self, batch: dict) -> dict:
        # routing reads the modality on the host: handing it the CPU tensor avoids a device sync
        self._route(batch["modality"])
        self._batch_modality = batch["modality"].to(self.device, non_blocking=True)
        self.loss.last_consistency = math.nan
        result = super().train_step(batch)
        if self.feature_tap is not None:
            self.feature_tap.clear()  # a row with λ = 0 never reads them: free the activations
        result["consistency_loss"] = np.float64(self.loss.last_consistency)
        return result

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        terms = [o["consistency_loss"] for o in train_outputs]
        self.logger.log("train_consistency_losses", _gathered_nanmean(self, terms), self.current_epoch)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.loss.active = False

    def _monitors_affinity(self) -> bool:
        return self.monitor_consistency and self.feature_tap is not None

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step on each modality's sub-batch, so that the pseudo Dice
        can be reported per modality; the totals equal one pass over the whole batch. The
        affinity term of the batch is computed from the same forward passes (no extra pass)."""
        modality = batch["modality"]
        n_modalities = len(self.modality_tags.modalities)
        per_modality, tapped = [], []
        for m in range(n_modalities):
            selected = torch.nonzero(modality == m).flatten()
            if len(selected) == 0:
                continue
            target = [t[selected] for t in batch["target"]] if isinstance(batch["target"], list) \
                else batch["target"][selected]
            self._route(m)
            per_modality.append((m, len(selected), super().validation_step({"data": batch["data"][selected],
                                                                            "target": target})))
            if self._monitors_affinity():
                tapped.append((m, *self.feature_tap.features(), target[0] if isinstance(target, list) else target))
                self.feature_tap.clear()
        n_total = sum(n for _, n, _ in per_modality)
        shape = per_modality[0][2]["tp_hard"].shape
        result = {"loss": np.float64(sum(n * out["loss"] for _, n, out in per_modality) / n_total),
                  "consistency_loss": np.float64(self._affinity_of_sub_batches(tapped))}
        for key in ("tp_hard", "fp_hard", "fn_hard"):
            result[key] = sum(out[key] for _, _, out in per_modality)
            per_mod = np.zeros((n_modalities, *shape))
            for m, _, out in per_modality:
                per_mod[m] = out[key]
            result[f"{key}_per_modality"] = per_mod
        return result

    def _affinity_of_sub_batches(self, tapped) -> float:
        """The consistency term of the modalities' sub-batches taken together (NaN when not monitored)."""
        if len(tapped) < 2:
            return math.nan
        features_l = torch.cat([t[1] for t in tapped])
        features_k = torch.cat([t[2] for t in tapped])
        target = torch.cat([t[3].to(self.device, non_blocking=True) for t in tapped])
        modality = torch.cat([torch.full((len(t[1]),), t[0], dtype=torch.long) for t in tapped]).to(self.device)
        with torch.no_grad():
            return float(self.consistency_term(features_l, features_k, target, modality))

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        collated = collate_outputs(val_outputs)
        counts = [np.sum(collated[f"{k}_per_modality"], 0) for k in ("tp_hard", "fp_hard", "fn_hard")]
        if self.is_ddp:
            for i, c in enumerate(counts):
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, c)
                counts[i] = np.sum(gathered, 0)
        tp, fp, fn = counts
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = 2 * tp / (2 * tp + fp + fn)
        mean_per_modality = [float(np.nanmean(d)) if np.isfinite(d).any() else math.nan for d in dice]
        self.logger.log("mean_fg_dice_per_modality", mean_per_modality, self.current_epoch)
        terms = [o["consistency_loss"] for o in val_outputs]
        self.logger.log("val_consistency_losses", _gathered_nanmean(self, terms), self.current_epoch)

    def on_epoch_end(self):
        names = self.modality_tags.modalities
        dice = self.logger.get_value("mean_fg_dice_per_modality", step=-1)
        self.print_to_log_file("Pseudo dice per modality", {n: round(d, 4) for n, d in zip(names, dice)})
        for phase in ("train", "val"):
            value = self.logger.get_value(f"{phase}_consistency_losses", step=-1)
            if np.isfinite(value):
                self.print_to_log_file(f"{phase}_consistency_loss", np.round(value, decimals=6))
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
        save_json(per_modality, join(self.output_folder, "validation", "summary_per_modality.json"))


class nnUNetTrainerCSA_BN(nnUNetTrainerCSA):
    """The paper's norm: modality-specific BatchNorm (affine and running statistics)."""
    stock_trainer_name = "nnUNetTrainerBN"

    @classmethod
    def build_plain_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision) -> nn.Module:
        return nnUNetTrainerBN.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                          num_output_channels, enable_deep_supervision)


class nnUNetTrainerMSBN(nnUNetTrainerCSA):
    """Modality-specific norms and unpaired batches only (λ = 0); the CSA term is logged."""
    paper_lambda = 0.0


class nnUNetTrainerMSBN_BN(nnUNetTrainerCSA_BN):
    paper_lambda = 0.0


class nnUNetTrainerAffinity(nnUNetTrainerCSA):
    """Affinity consistency on whole feature maps (no class masks)."""
    consistency_kind = "affinity"


class nnUNetTrainerAffinity_BN(nnUNetTrainerCSA_BN):
    consistency_kind = "affinity"


class nnUNetTrainerUMMKD(nnUNetTrainerCSA):
    """Dou et al. 2020 knowledge distillation between the modalities' class-wise logits."""
    consistency_kind = "ummkd"


class nnUNetTrainerUMMKD_BN(nnUNetTrainerCSA_BN):
    consistency_kind = "ummkd"


class nnUNetTrainerCSA_Lambda1(nnUNetTrainerCSA):
    """CSA with λ = 1 in the paper's units (0.5 on nnU-Net's loss): twice the paper's weight,
    the default of this package's first version."""
    paper_lambda = 1.0


class nnUNetTrainerCSA_Lambda0p25(nnUNetTrainerCSA):
    """CSA with λ = 0.25 in the paper's units (0.125 on nnU-Net's loss): half the paper's weight."""
    paper_lambda = 0.25


class nnUNetTrainerCSA_RampUp(nnUNetTrainerCSA):
    """CSA with the paper's λ reached by a linear ramp-up over the first quarter of the epochs."""
    lambda_rampup_fraction = 0.25


class nnUNetTrainerUMMKD_Lambda1(nnUNetTrainerUMMKD):
    """UMMKD with weight 1 in the paper's units (0.5 on nnU-Net's loss), the default of this
    package's first version."""
    paper_lambda = 1.0


class nnUNetTrainerCSA_AreaPixels(nnUNetTrainerCSA):
    """Ablation of Eq. 3: the affinity divided by the class region's pixel count."""
    area_normalization = "pixels"


class nnUNetTrainerCSA_AreaFraction(nnUNetTrainerCSA):
    """Ablation of Eq. 3: the affinity divided by the class region's fraction of the image."""
    area_normalization = "fraction"


class nnUNetTrainerCSA_Literal(nnUNetTrainerCSA):
    """Ablation of Eq. 4 as printed: the square of the mean entry difference."""
    affinity_reading = "literal"
