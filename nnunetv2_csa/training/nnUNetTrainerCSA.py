"""nnUNetTrainerCSA and its comparison rows (MSBN, Affinity, UMMKD).

The trainers only wire pieces together; each piece lives in its own module:

- modality-specific norms: ``nnunetv2_csa.modality_norm``
- unpaired, modality-balanced batches: ``nnunetv2_csa.sampler``
- features of two layers by forward hooks: ``nnunetv2_csa.feature_taps``
- the consistency losses (CSA, Affinity, UMMKD): ``nnunetv2_csa.losses``

Loss, per training step (paper Eq. 5):
``L = [nnU-Net's deep-supervised Dice + CE over the whole unpaired batch] + λ · L_consistency``.
nnU-Net's Dice+CE over a batch made of B/2 samples of each modality is the paper's
``α(Dice¹ + Dice²) + β(CE¹ + CE²)`` with α = β = 1 up to a constant factor of one half
(CE is a mean over all pixels of both halves; nnU-Net's batch Dice pools both halves).
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
from nnunetv2_csa.losses import AffinityLoss, ClassSpecificAffinityLoss, UnpairedKnowledgeDistillationLoss
from nnunetv2_csa.modality import MODALITIES_KEY, ModalityTagError, ModalityTags, modality_tags_from_dataset_json
from nnunetv2_csa.modality_norm import convert_to_modality_specific_norms, set_modality
from nnunetv2_csa.sampler import UnpairedModalityDataLoader
from nnunetv2_csa.training.progress import ModalityAwareLocalLogger

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


def plans_modalities(plans_manager: PlansManager) -> list[str]:
    if MODALITIES_KEY not in plans_manager.plans:
        raise ModalityTagError(
            f"plans have no '{MODALITIES_KEY}' entry: the trainer writes it into the model folder's "
            f"plans.json when training starts; was this model trained with an nnunetv2_csa trainer?")
    return list(plans_manager.plans[MODALITIES_KEY])


class ConsistencyRegularizedLoss(nn.Module):
    """nnU-Net's segmentation loss plus ``weight`` times a consistency term.

    ``consistency(output, target)`` returns the term; it is evaluated only in training
    mode (``self.training``, which follows the trainer's network mode via
    ``active``) and its last value is kept for logging.
    """

    def __init__(self, segmentation_loss: nn.Module, consistency: Callable, weight: float, monitor: bool):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.consistency = consistency
        self.weight = float(weight)
        # with weight 0 (the MSBN row) the term is still computed, without gradient, so
        # that its curve can be compared with the rows that minimise it
        self.monitor = monitor
        self.active = False
        self.last_consistency = math.nan

    def forward(self, output, target):
        loss = self.segmentation_loss(output, target)
        if not self.active:
            return loss
        if self.weight != 0:
            term = self.consistency(output, target)
            self.last_consistency = float(term.detach())
            return loss + self.weight * term
        if self.monitor:
            with torch.no_grad():
                self.last_consistency = float(self.consistency(output, target))
        return loss


class nnUNetTrainerCSA(nnUNetTrainer):
    """Shared convolutions, modality-specific norms, unpaired batches and the class-specific
    affinity (CSA) consistency of Chen et al., MICCAI 2020.

    Class attributes select the row of the paper; subclasses change only these.
    """

    #: "csa", "affinity", "ummkd" or "none"
    consistency_kind = "csa"
    #: λ of Eq. 5
    consistency_weight = 0.5
    #: compute the consistency term for the log even when its weight is 0
    monitor_consistency = True
    #: S_c of Eq. 3: "none", "pixels" or "fraction" (see ClassSpecificAffinityLoss)
    area_normalization = "none"
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
        self._batch_modality: torch.Tensor | None = None

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
        convert_to_modality_specific_norms(network, len(plans_modalities(plans_manager)))
        if not enable_deep_supervision:
            # nnU-Net builds the inference network without deep supervision; the
            # trainer itself always trains with it and routes every batch explicitly
            set_modality(network, inference_modality_index(plans_manager))
        return network

    def initialize(self):
        super().initialize()
        if self.consistency_kind in ("csa", "affinity"):
            part, stage = self.affinity_layers
            layers = consecutive_conv_layers(self.network, part, stage)
            self.feature_tap = FeatureTap(self.network, layers)
            self.print_to_log_file(f"{self.consistency_kind} consistency between layers {layers}, "
                                   f"weight {self.consistency_weight}")

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
            return ConsistencyRegularizedLoss(segmentation_loss, lambda o, t: None, 0.0, monitor=False)
        else:
            raise ValueError(f"unknown consistency_kind {self.consistency_kind!r}")
        return ConsistencyRegularizedLoss(segmentation_loss, consistency, self.consistency_weight,
                                          monitor=self.monitor_consistency)

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

    def train_step(self, batch: dict) -> dict:
        # routing reads the modality on the host: handing it the CPU tensor avoids a device sync
        self._route(batch["modality"])
        self._batch_modality = batch["modality"].to(self.device, non_blocking=True)
        self.loss.last_consistency = math.nan
        result = super().train_step(batch)
        result["consistency_loss"] = np.float64(self.loss.last_consistency)
        return result

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        values = np.array([o["consistency_loss"] for o in train_outputs], dtype=np.float64)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        self.logger.log("train_consistency_losses", mean, self.current_epoch)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.loss.active = False

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step on each modality's sub-batch, so that the pseudo Dice
        can be reported per modality; the totals equal one pass over the whole batch."""
        modality = batch["modality"]
        n_modalities = len(self.modality_tags.modalities)
        per_modality = []
        for m in range(n_modalities):
            selected = torch.nonzero(modality == m).flatten()
            if len(selected) == 0:
                continue
            sub_batch = {
                "data": batch["data"][selected],
                "target": [t[selected] for t in batch["target"]] if isinstance(batch["target"], list)
                else batch["target"][selected],
            }
            self._route(m)
            per_modality.append((m, len(selected), super().validation_step(sub_batch)))
        n_total = sum(n for _, n, _ in per_modality)
        shape = per_modality[0][2]["tp_hard"].shape
        result = {"loss": np.float64(sum(n * out["loss"] for _, n, out in per_modality) / n_total)}
        for key in ("tp_hard", "fp_hard", "fn_hard"):
            result[key] = sum(out[key] for _, _, out in per_modality)
            per_mod = np.zeros((n_modalities, *shape))
            for m, _, out in per_modality:
                per_mod[m] = out[key]
            result[f"{key}_per_modality"] = per_mod
        return result

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

    def on_epoch_end(self):
        names = self.modality_tags.modalities
        dice = self.logger.get_value("mean_fg_dice_per_modality", step=-1)
        self.print_to_log_file("Pseudo dice per modality", {n: round(d, 4) for n, d in zip(names, dice)})
        self.print_to_log_file("consistency_loss", np.round(self.logger.get_value("train_consistency_losses",
                                                                                  step=-1), decimals=6))
        super().on_epoch_end()

    # ---------------------------------------------------------------- final validation
    @contextmanager
    def _modality_follows_loaded_case(self):
        # nnU-Net's perform_actual_validation loads each validation case with
        # self.dataset_class(...).load_case(k) right before predicting it; routing the
        # network there predicts every case with its own modality's norms
        original = self.dataset_class
        trainer = self

        def load_case(dataset, identifier):
            trainer._route(trainer.modality_tags.index_of_case(identifier))
            return original.load_case(dataset, identifier)

        self.dataset_class = type(f"{original.__name__}RoutedByModality", (original,), {"load_case": load_case})
        try:
            yield
        finally:
            self.dataset_class = original

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.dataset_class is None:
            self.dataset_class = nnunet_trainer_module.infer_dataset_class(self.preprocessed_dataset_folder)
        with self._modality_follows_loaded_case():
            super().perform_actual_validation(save_probabilities)
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
    consistency_weight = 0.0


class nnUNetTrainerMSBN_BN(nnUNetTrainerCSA_BN):
    consistency_weight = 0.0


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


class nnUNetTrainerCSA_AreaPixels(nnUNetTrainerCSA):
    """Ablation of Eq. 3: the affinity divided by the class region's pixel count."""
    area_normalization = "pixels"


class nnUNetTrainerCSA_AreaFraction(nnUNetTrainerCSA):
    """Ablation of Eq. 3: the affinity divided by the class region's fraction of the image."""
    area_normalization = "fraction"


class nnUNetTrainerCSA_Literal(nnUNetTrainerCSA):
    """Ablation of Eq. 4 as printed: the square of the mean entry difference."""
    affinity_reading = "literal"
