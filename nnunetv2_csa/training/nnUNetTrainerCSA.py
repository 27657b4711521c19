"""nnUNetTrainerCSA: the trainer of the paper's method and of the rows derived from it.

The trainer only wires pieces together; each piece lives in its own module:

- modality-specific norms: ``nnunetv2_csa.modality_norm``
- unpaired, modality-balanced batches: ``nnunetv2_csa.sampler``
- features of two layers by forward hooks: ``nnunetv2_csa.feature_taps``
- the consistency losses (CSA, Affinity, UMMKD): ``nnunetv2_csa.losses``; their weight and
  how they join nnU-Net's loss (λ/N on top of it for the paper's λ and N modalities):
  ``training/consistency.py``
- validation per modality: ``training/per_modality_validation.py``
- the modality of ``nnUNetv2_predict``: ``training/inference_modality.py``
- the rows (MSBN, Affinity, UMMKD, λ ablations, the ``_BN`` twins): ``training/rows.py``

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
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
from typing import List

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_csa.feature_taps import FeatureTap, consecutive_conv_layers
from nnunetv2_csa.losses import DEFAULT_AREA_NORMALIZATION
from nnunetv2_csa.modality import MODALITIES_KEY, ModalityTagError, modalities_from_plans
from nnunetv2_csa.modality_norm import convert_to_modality_specific_norms, set_modality
from nnunetv2_csa.modality_order import record_modality_order
from nnunetv2_csa.sampler import UnpairedModalityDataLoader
from nnunetv2_csa.training.consistency import (FEATURE_KINDS, OUTPUT_KINDS, ConsistencyRegularizedLoss,
                                               FeatureConsistency, OutputConsistency, consistency_term,
                                               lambda_rampup, weight_on_nnunet_loss)
from nnunetv2_csa.training.inference_modality import inference_modality_index
from nnunetv2_csa.training.per_modality_validation import PerModalityValidationMixin, gathered
from nnunetv2_csa.training.resume import ReadableCheckpointMixin
from nnunetv2_csa.training.rows import PAPER_LAMBDA


#: true while a trainer's own initialize builds its network; any other call of build_network_architecture
#: is nnU-Net's predictor's
_TRAINER_BUILDS_ITS_NETWORK = ContextVar("nnunetv2_csa_trainer_builds_its_network", default=False)


def _gathered_nanmean(trainer: nnUNetTrainer, values) -> float:
    """The mean of the finite values of all ranks (NaN if there is none)."""
    values = np.concatenate(gathered(trainer, np.asarray(values, dtype=np.float64)))
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


class nnUNetTrainerCSA(ReadableCheckpointMixin, PerModalityValidationMixin, nnUNetTrainer):
    """Shared convolutions, modality-specific norms, unpaired batches and the class-specific
    affinity (CSA) consistency of Chen et al., MICCAI 2020.

    Class attributes select the row of the paper; the rows of ``training/rows.py`` change only these.
    """

    #: "csa", "affinity", "ummkd" or "none"
    consistency_kind = "csa"
    #: λ of Eq. 5 in the paper's units (its loss sums the modalities' Dice + CE)
    paper_lambda = PAPER_LAMBDA
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
    #: the stock trainer that predicts one exported modality (nnunetv2_csa.tools.export)
    stock_trainer_name = "nnUNetTrainer"
    logs_consistency = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # the model folder's plans.json must name the modalities, because nnU-Net's
        # predictor builds the network from the plans alone
        self.plans_manager.plans[MODALITIES_KEY] = list(self.modality_tags.modalities)
        self.feature_tap: FeatureTap | None = None
        self.consistency_term: nn.Module | None = None
        self._tapped_validation_features: list = []

    @property
    def consistency_weight(self) -> float:
        """The weight of the consistency term on top of nnU-Net's loss: λ/N for N modalities."""
        return weight_on_nnunet_loss(self.paper_lambda, len(self.modality_tags.modalities))

    # ---------------------------------------------------------------- network
    @classmethod
    def build_plain_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision) -> nn.Module:
        """The network of the stock trainer whose norm type this row uses."""
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    @classmethod
    def build_modality_network(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                               num_input_channels: int, num_output_channels: int,
                               enable_deep_supervision: bool = True) -> nn.Module:
        """The row's network with one norm per modality of the plans' ``csa_modalities``, not routed
        to any modality yet (:func:`nnunetv2_csa.modality_norm.set_modality` does that)."""
        network = cls.build_plain_network(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision)
        modalities = modalities_from_plans(plans_manager.plans)
        convert_to_modality_specific_norms(network, len(modalities))
        # the weights carry the order; loading them into a network built for another stops
        record_modality_order(network, modalities)
        return network

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's hook, which nnU-Net calls in two places: the trainer's ``initialize`` (which
        routes every batch itself, and says so) and its predictor (``nnUNetv2_predict`` and
        relatives), which passes nothing about the images: that network is routed to the
        modality of ``nnUNet_csa_modality`` here, whatever ``enable_deep_supervision`` says."""
        network = cls.build_modality_network(plans_manager, configuration_manager, num_input_channels,
                                             num_output_channels, enable_deep_supervision)
        if not _TRAINER_BUILDS_ITS_NETWORK.get():
            set_modality(network, inference_modality_index(plans_manager))
        return network

    def batch_size_per_rank(self) -> list[int]:
        """The plan's batch size as nnU-Net splits it over the GPUs (``_set_batch_size_and_oversample``:
        the first ``global % world_size`` ranks take one sample more); one entry without DDP."""
        global_batch = self.configuration_manager.batch_size
        if not self.is_ddp:
            return [global_batch]
        world_size = dist.get_world_size()
        return [global_batch // world_size + (rank < global_batch % world_size) for rank in range(world_size)]

    def _check_every_rank_holds_every_modality(self) -> None:
        # on every rank alike, before nnU-Net's own split and before any collective: a rank refusing alone
        # would leave the others waiting; and refused here, not in an augmentation worker, where nnU-Net
        # would only report that its background workers died
        modalities = list(self.modality_tags.modalities)
        per_rank = self.batch_size_per_rank()
        if min(per_rank) >= len(modalities):
            return
        if not self.is_ddp:
            raise ModalityTagError(
                f"batch size {per_rank[0]} is smaller than the number of modalities ({len(modalities)}: "
                f"{modalities}): an unpaired batch needs at least one sample of each modality. Plan with a larger "
                f"batch size (nnUNetv2_plan_experiment -gpu_memory_target ...)")
        raise ModalityTagError(
            f"batch size {self.configuration_manager.batch_size} over {len(per_rank)} GPUs gives {per_rank} per GPU, "
            f"but every GPU's unpaired batch needs at least one sample of each modality ({len(modalities)}: "
            f"{modalities}). Plan a batch size of at least {len(modalities) * len(per_rank)} "
            f"(nnUNetv2_plan_experiment -gpu_memory_target ...) or train on fewer GPUs (-num_gpus)")

    def _refuse_regions(self) -> None:
        # the consistency terms (and the affinity monitored in validation) mask features by the classes of a
        # label map; region-based targets are overlapping channels, which they would misread silently
        if self.label_manager.has_regions:
            raise ModalityTagError(
                f"dataset {self.plans_manager.dataset_name} is region-based (regions_class_order "
                f"{self.label_manager.regions_class_order} in its dataset.json): {type(self).__name__} compares "
                f"classes of a label map and supports label-based datasets only. Convert the dataset with plain "
                f"labels (no regions in dataset.json), or train the stock rows (nnUNetTrainerJoint)")

    def initialize(self):
        self._refuse_regions()
        self._check_every_rank_holds_every_modality()
        token = _TRAINER_BUILDS_ITS_NETWORK.set(True)
        try:
            super().initialize()
        finally:
            _TRAINER_BUILDS_ITS_NETWORK.reset(token)
        if self.consistency_kind in FEATURE_KINDS:
            part, stage = self.affinity_layers
            layers = consecutive_conv_layers(self.network, part, stage)
            self.feature_tap = FeatureTap(self.network, layers)
            # the network exists only now, after nnU-Net's initialize has built the loss
            self.loss.consistency = FeatureConsistency(self.consistency_term, self.feature_tap)
            self.print_to_log_file(f"{self.consistency_kind} consistency between layers {layers}, "
                                   f"λ = {self.paper_lambda} in the paper's units, N = "
                                   f"{len(self.modality_tags.modalities)} modalities, weight λ/N = "
                                   f"{self.consistency_weight} on nnU-Net's loss")

    # ---------------------------------------------------------------- loss
    def _build_loss(self):
        segmentation_loss = super()._build_loss()
        self.consistency_term = consistency_term(self.consistency_kind, self.label_manager.num_segmentation_heads,
                                                 self.area_normalization, self.affinity_reading,
                                                 self.distillation_temperature)
        if self.consistency_term is None:
            return ConsistencyRegularizedLoss(segmentation_loss, None, 0.0)
        # a feature kind's term gets the tap once initialize has installed it on the network
        consistency = OutputConsistency(self.consistency_term) if self.consistency_kind in OUTPUT_KINDS else None
        return ConsistencyRegularizedLoss(segmentation_loss, consistency, self.consistency_weight)

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
        """nnU-Net's step with the batch routed to its modalities. The modality tensor stays on the
        host (the sampler's): the routing and the consistency term group the batch by modality
        there, so the step reads nothing back from the GPU but nnU-Net's own loss at its end.
        ``consistency_loss`` is the step's term, detached on the device (NaN when none was computed)."""
        self._route(batch["modality"])
        with self.loss.for_batch(batch["modality"]):
            result = super().train_step(batch)
        if self.feature_tap is not None:
            self.feature_tap.clear()  # a row with λ = 0 never reads them: free the activations
        result["consistency_loss"] = self.loss.last_consistency
        return result

    def on_train_epoch_end(self, train_outputs: List[dict]):
        # the epoch's terms are read back from the device at once, here (see train_step); nnU-Net's
        # collate_outputs takes no tensors, so they leave the outputs before it sees them
        terms = [t for t in (o.pop("consistency_loss") for o in train_outputs) if isinstance(t, torch.Tensor)]
        super().on_train_epoch_end(train_outputs)
        values = torch.stack(terms).float().cpu().numpy() if terms else [math.nan]
        self.logger.log("train_consistency_losses", _gathered_nanmean(self, values), self.current_epoch)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.loss.active = False

    def _monitors_affinity(self) -> bool:
        return self.monitor_consistency and self.feature_tap is not None

    def validation_step(self, batch: dict) -> dict:
        """The per-modality validation step; the affinity term of the batch is computed from
        the same forward passes (no extra pass)."""
        self._tapped_validation_features = []
        result = super().validation_step(batch)
        result["consistency_loss"] = np.float64(self._affinity_of_sub_batches(self._tapped_validation_features))
        self._tapped_validation_features = []
        return result

    def _after_validation_sub_batch(self, modality: int, target: torch.Tensor) -> None:
        if self._monitors_affinity():
            self._tapped_validation_features.append((modality, *self.feature_tap.features(), target))
            self.feature_tap.clear()

    def _affinity_of_sub_batches(self, tapped) -> float:
        """The consistency term of the modalities' sub-batches taken together (NaN when not monitored)."""
        if len(tapped) < 2:
            return math.nan
        features_l = torch.cat([t[1] for t in tapped])
        features_k = torch.cat([t[2] for t in tapped])
        target = torch.cat([t[3].to(self.device, non_blocking=True) for t in tapped])
        # on the host, where the term groups the batch by modality without waiting for the device
        modality = torch.cat([torch.full((len(t[1]),), t[0], dtype=torch.long) for t in tapped])
        with torch.no_grad():
            return float(self.consistency_term(features_l, features_k, target, modality))

    def perform_actual_validation(self, save_probabilities: bool = False):
        # nnU-Net predicts whole cases here and nothing reads the taps
        with self.feature_tap.paused() if self.feature_tap is not None else nullcontext():
            super().perform_actual_validation(save_probabilities)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        terms = [o["consistency_loss"] for o in val_outputs]
        self.logger.log("val_consistency_losses", _gathered_nanmean(self, terms), self.current_epoch)

    def on_epoch_end(self):
        for phase in ("train", "val"):
            value = self.logger.get_value(f"{phase}_consistency_losses", step=-1)
            if np.isfinite(value):
                self.print_to_log_file(f"{phase}_consistency_loss", np.round(value, decimals=6))
        super().on_epoch_end()


class nnUNetTrainerCSA_BN(nnUNetTrainerCSA):
    """The paper's norm: modality-specific BatchNorm (affine and running statistics)."""
    stock_trainer_name = "nnUNetTrainerBN"

    @classmethod
    def build_plain_network(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision) -> nn.Module:
        return nnUNetTrainerBN.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                          num_output_channels, enable_deep_supervision)
