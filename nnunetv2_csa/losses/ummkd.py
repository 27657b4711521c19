r"""Unpaired multi-modal knowledge distillation (UMMKD) loss of Dou, Liu, Heng and Glocker,
"Unpaired multi-modal segmentation via knowledge distillation", IEEE TMI 2020: the
comparison row "UMMKD" of Chen et al., MICCAI 2020.

Plain torch; nothing here imports nnU-Net.

For each modality ``j`` and class ``c`` (background included), the logits ``z`` are
averaged over the ground-truth mask of ``c`` across all samples of that modality's
sub-batch, giving one vector of ``C`` logits, softened at temperature ``T``:

.. math::

    \bar z^{c,j} = \frac{\sum_{b \in j} \sum_p z_b[:, p]\, M^c_b[p]}
                        {\sum_{b \in j} \sum_p M^c_b[p]}, \qquad
    q^{c,j} = \mathrm{softmax}\big(\bar z^{c,j} / T\big)

and the loss is the symmetric Kullback-Leibler divergence between the two modalities,
averaged over the classes ``C'`` present in both sub-batches:

.. math::

    L_{KD} = \frac{1}{|C'|} \sum_{c \in C'} \frac{1}{2}
             \Big( D_{KL}(q^{c,1} \| q^{c,2}) + D_{KL}(q^{c,2} \| q^{c,1}) \Big),
    \qquad D_{KL}(p \| q) = \sum_i p_i \log \frac{p_i}{q_i}.

No ``T^2`` factor is applied (the row's weight, 0.5 in the paper's units, scales the term).
A class absent from either sub-batch is skipped; with more than two modalities the loss
is the mean over the modality pairs that share a class; with nothing to compare it is a
zero connected to the graph. Computed in float32 even under ``torch.autocast``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nnunetv2_csa.losses.masks_and_pairs import (average_over_pairs_and_classes, class_masks, connected_zero,
                                                 float32_math, group_by_modality, modality_pairs, resize_labels)


class UnpairedKnowledgeDistillationLoss(torch.nn.Module):
    """Dou et al. (TMI 2020) class-wise knowledge distillation between modalities; see the
    module docstring for the equations.

    Args:
        num_classes: number of classes ``C`` (the logits' channel count); label values
            ``0..C-1`` define the class masks, other values belong to no class.
        temperature: softmax temperature ``T`` (2 in Dou et al.).

    Example::

        kd = UnpairedKnowledgeDistillationLoss(num_classes=4)
        loss = kd(logits, target, modality)   # logits (B, 4, H, W), target (B, 1, h, w)
    """

    def __init__(self, num_classes: int, temperature: float = 2.0):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.register_buffer("_class_ids", torch.arange(self.num_classes), persistent=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, temperature={self.temperature}"

    def class_mean_logits(self, logits: Tensor, labels: Tensor, modality: Tensor
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """``z̄^{c,j}``: ``(J, C, C)`` float32 (modality, class mask, logit channel), the
        pixel count of each class per modality ``(J, C)``, and the modality ids ``(J,)``."""
        if logits.ndim not in (4, 5) or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must be (B, {self.num_classes}, H, W) or (B, {self.num_classes}, D, H, W) "
                f"(num_classes={self.num_classes}), got {tuple(logits.shape)}")
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels hold {labels.shape[0]} samples but the logits hold {logits.shape[0]}")
        with float32_math(logits.device):
            logits = logits.float()
            batch, channels, *spatial = logits.shape
            modality_ids, membership = group_by_modality(modality, batch, logits.device)
            masks = class_masks(resize_labels(labels.to(logits.device), spatial),
                                self._class_ids.to(logits.device))  # (B, C, P)
            sums = torch.bmm(masks, logits.reshape(batch, channels, -1).transpose(1, 2))  # (B, C, C)
            sums = torch.einsum("bj,bck->jck", membership, sums)
            pixel_counts = membership.T @ masks.sum(-1)  # (J, C)
            return sums / pixel_counts.clamp_min(1)[..., None], pixel_counts, modality_ids

    def forward(self, logits: Tensor, labels: Tensor, modality: Tensor) -> Tensor:
        """
        Args:
            logits: ``(B, C, H, W)`` network output (before softmax); 3D: ``(B, C, D, H, W)``.
            labels: ``(B, 1, h, w)`` or ``(B, h, w)`` integer label map at any resolution
                (nearest-neighbour resized to ``H, W``).
            modality: ``(B,)`` integer modality index of each sample, on any device; on the
                host (as the unpaired sampler gives it) the loss makes no host read of the GPU.

        Returns:
            scalar float32 loss.
        """
        with float32_math(logits.device):
            mean_logits, pixel_counts, modality_ids = self.class_mean_logits(logits, labels, modality)
            if modality_ids.numel() < 2:
                return connected_zero(logits)
            log_q = F.log_softmax(mean_logits / self.temperature, dim=-1)  # (J, C, C)
            first, second = modality_pairs(modality_ids.numel(), log_q.device)
            log_p1, log_p2 = log_q[first], log_q[second]  # (Q, C, C)
            # 0.5 * (KL(p1||p2) + KL(p2||p1)) = 0.5 * sum_i (p1_i - p2_i)(log p1_i - log p2_i)
            symmetric_kl = 0.5 * ((log_p1.exp() - log_p2.exp()) * (log_p1 - log_p2)).sum(-1)  # (Q, C)
            shared = (pixel_counts[first] > 0) & (pixel_counts[second] > 0)
            return average_over_pairs_and_classes(symmetric_kl, shared)


def ummkd_loss(logits: Tensor, labels: Tensor, modality: Tensor, temperature: float = 2.0) -> Tensor:
    """Functional form of :class:`UnpairedKnowledgeDistillationLoss` (``C`` taken from
    ``logits.shape[1]``)."""
    return UnpairedKnowledgeDistillationLoss(logits.shape[1], temperature).to(logits.device)(
        logits, labels, modality)
