r"""How a consistency term joins nnU-Net's loss: the weight, its schedule, the wrapper.

Loss, per training step (paper Eq. 5, α = β = 1), for N modalities (the paper's N = 2):
``L_paper = Σ_j (Dice^j + CE^j) + λ · L_consistency``, with the paper's λ = 0.5. nnU-Net's
deep-supervised Dice + CE over a batch of B/N samples of each modality is the *mean* of the N
modalities' losses, not their sum (CE is a mean over the pixels of all sub-batches; the batch
Dice pools them), so ``L_paper = N · [nnU-Net's loss + (λ/N) · L_consistency]``: the term is
added with the weight ``λ/N`` (0.25 for the paper's 0.5 and two modalities) on top of nnU-Net's
loss, which gives the paper's balance between the segmentation loss and the consistency term.
A row's ``paper_lambda`` is λ in the paper's units; its ``consistency_weight`` is the weight
actually applied.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from nnunetv2_csa.losses import AffinityLoss, ClassSpecificAffinityLoss, UnpairedKnowledgeDistillationLoss

#: consistency kinds whose term compares the features of two tapped layers
FEATURE_KINDS = ("csa", "affinity")
#: consistency kinds whose term compares the network's output logits
OUTPUT_KINDS = ("ummkd",)
CONSISTENCY_KINDS = (*FEATURE_KINDS, *OUTPUT_KINDS, "none")


def weight_on_nnunet_loss(paper_lambda: float, n_modalities: int) -> float:
    """The weight λ/N on top of nnU-Net's Dice + CE that gives the paper's λ for N modalities (see
    the module docstring): nnU-Net's loss is the mean of the modalities' losses, the paper's their sum."""
    if isinstance(n_modalities, bool) or not isinstance(n_modalities, int) or n_modalities < 1:
        raise ValueError(f"n_modalities must be a positive int, got {n_modalities!r}")
    return paper_lambda / n_modalities


def lambda_rampup(epoch: int, num_epochs: int, fraction: float) -> float:
    """The factor on λ at ``epoch``: linear from 0 at epoch 0 to 1 at ``fraction`` of the
    epochs, 1 after (a common schedule for consistency terms, which are unreliable while the
    network's features are still random)."""
    ramp_epochs = fraction * num_epochs
    return 1.0 if ramp_epochs <= 0 else min(1.0, epoch / ramp_epochs)


def consistency_term(kind: str, num_classes: int, area_normalization: str, affinity_reading: str,
                     temperature: float) -> nn.Module | None:
    """The loss module of a consistency kind (None for "none")."""
    if kind == "csa":
        return ClassSpecificAffinityLoss(num_classes, area_normalization=area_normalization, reading=affinity_reading)
    if kind == "affinity":
        return AffinityLoss(num_classes, area_normalization=area_normalization, reading=affinity_reading)
    if kind == "ummkd":
        return UnpairedKnowledgeDistillationLoss(num_classes, temperature=temperature)
    if kind == "none":
        return None
    raise ValueError(f"unknown consistency_kind {kind!r}; choose from {CONSISTENCY_KINDS}")


def full_resolution(output, target):
    """The highest-resolution output and target: with deep supervision nnU-Net hands lists, highest
    resolution first."""
    if isinstance(output, (list, tuple)):
        return output[0], target[0]
    return output, target


class FeatureConsistency:
    """The term of a feature kind (CSA, Affinity) for one step: ``term`` of the two layers' features
    that ``tap`` kept from the step's forward pass, the full-resolution target and the batch's
    modality; the tap lets go of the features after."""

    def __init__(self, term: nn.Module, tap):
        self.term, self.tap = term, tap

    def __call__(self, output, target, modality):
        _, target = full_resolution(output, target)
        features_l, features_k = self.tap.features()
        try:
            return self.term(features_l, features_k, target, modality)
        finally:
            self.tap.clear()


class OutputConsistency:
    """The term of an output kind (UMMKD) for one step: ``term`` of the full-resolution logits, target
    and the batch's modality."""

    def __init__(self, term: nn.Module):
        self.term = term

    def __call__(self, output, target, modality):
        output, target = full_resolution(output, target)
        return self.term(output, target, modality)


class ConsistencyRegularizedLoss(nn.Module):
    """nnU-Net's segmentation loss plus ``weight`` times a consistency term.

    nnU-Net's ``train_step`` calls ``loss(output, target)``; the batch's per-sample modality is
    handed over for the step by :meth:`for_batch`, a context the trainer opens around the step, and
    the term is ``consistency(output, target, modality)`` (:class:`FeatureConsistency`,
    :class:`OutputConsistency`). It is evaluated only in training mode (``active``, which follows the
    trainer's epoch phase) and only when ``weight`` is not 0, so a row that does not minimise the term
    (MSBN) pays nothing for it in its training step. Its last value is kept for logging, detached and
    on the device: reading it back (``float``) inside the step would make the host wait for the GPU
    before ``backward()`` is queued; the trainer reads all steps' values back once per epoch.
    """

    def __init__(self, segmentation_loss: nn.Module, consistency: Callable | None, weight: float):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.consistency = consistency
        self.weight = float(weight)
        self.active = False
        #: the last term computed (a detached 0-dim tensor), or NaN when the last call computed none
        self.last_consistency: torch.Tensor | float = math.nan
        self._batch_modality: torch.Tensor | None = None

    @contextmanager
    def for_batch(self, modality: torch.Tensor):
        """The loss calls inside are of the batch whose samples have these modalities ((B,), on the host)."""
        self._batch_modality = modality
        try:
            yield self
        finally:
            self._batch_modality = None

    def forward(self, output, target):
        loss = self.segmentation_loss(output, target)
        self.last_consistency = math.nan
        if not self.active or self.weight == 0 or self.consistency is None:
            return loss
        if self._batch_modality is None:
            raise RuntimeError("the consistency term needs the batch's modality: call the loss inside "
                               "loss.for_batch(modality)")
        term = self.consistency(output, target, self._batch_modality)
        self.last_consistency = term.detach()
        return loss + self.weight * term
