r"""Class-specific affinity (CSA) consistency loss of Chen et al., MICCAI 2020, and its
whole-feature-map variant (the paper's "Affinity" row).

Plain torch; nothing here imports nnU-Net.

Notation (paper, Sec. 2.3-2.4). For one sample, a feature map ``F(l)`` of layer ``l`` with
``M`` channels and ``F(k)`` of layer ``k`` with ``N`` channels, both of spatial size
``H x W``, and a class ``c``:

.. math::

    M^c &= \mathrm{resize}_{nearest}(\mathbb{1}[y = c],\ H \times W)           \\
    F^c(l) &= F(l) \odot M^c                                                   \quad (2) \\
    a^c_{m,n} &= \frac{1}{S_c} \cos\big(F^c_m(l), F^c_n(k)\big)
              = \frac{1}{S_c} \frac{\langle F^c_m(l), F^c_n(k) \rangle}
                {\max(\|F^c_m(l)\|, \epsilon)\,\max(\|F^c_n(k)\|, \epsilon)}  \quad (3)

The cosine runs over the ``H*W`` spatial positions; ``A^c = [a^c_{m,n}]`` is ``M x N``.
For 3D feature maps ``(B, channels, D, H, W)`` (nnU-Net's 3d configurations; the paper's
stated future work) the same equations run over all ``D*H*W`` positions.
``A^{c,j}`` is the mean of the per-sample ``A^c`` over the samples of modality ``j`` in
which class ``c`` is present (``M^c`` non-empty at the feature resolution). The loss is

.. math::

    L_{CSA} = \frac{1}{C'} \sum_{c \in \mathcal{C}'} \frac{1}{P} \sum_{i=1}^{P}
              \big(A^{c,1}_i - A^{c,2}_i\big)^2 ,\qquad P = MN   \quad (4')

with ``C'`` the classes present in both modalities' sub-batches.

Where the paper is ambiguous (the project's design brief, "The CSA term"):

* Eq. (4) prints the square *outside* the entry sum,
  :math:`\| \frac{1}{P}\sum_i (A^{c,1}_i - A^{c,2}_i) \|_2^2`, which compares only the
  means of the two matrices. Its text ("invariant to the number of feature channels")
  describes the mean of squared entry differences (4'). ``reading="mean_squared"``
  (default) implements (4'); ``reading="literal"`` implements the printed (4).
* ``S_c``, "the size of the region of interest": ``area_normalization="none"``
  (``S_c = 1``, the default: it trained best on MyoPS 2020, see documentation/trainers.md), ``"pixels"``
  (pixel count of ``M^c`` at the feature resolution; makes the term tiny) or
  ``"fraction"`` (that count divided by ``H*W``, so that ``S_c`` lies in (0, 1] whatever
  the feature resolution; it inflates the term of small classes by 1/fraction^2).
* With more than two modalities in a batch, the loss is the mean over the modality pairs
  that share at least one class of the per-pair loss (4').
* Classes absent from either modality are left out; if nothing is left (one modality in
  the batch, or no shared class) the loss is a zero that is still connected to the graph.

The affinity is computed in float32 even under ``torch.autocast``.
"""
from __future__ import annotations

import math

from typing import Optional, Sequence

import torch
from torch import Tensor

from nnunetv2_csa.losses.masks_and_pairs import (average_over_pairs_and_classes, class_masks, connected_zero,
                                                 float32_math, group_by_modality, modality_pairs, resize_labels)

AREA_NORMALIZATIONS = ("none", "pixels", "fraction")
#: the one default of S_c, for the losses and the trainers alike
DEFAULT_AREA_NORMALIZATION = "none"
READINGS = ("mean_squared", "literal")

#: class key used by :meth:`ClassSpecificAffinityLoss.affinity_matrices` for the single
#: all-ones mask of the whole-feature-map variant (``class_specific=False``).
WHOLE_MAP = -1


# ----------------------------------------------------------------------------- losses

class ClassSpecificAffinityLoss(torch.nn.Module):
    """Class-specific affinity consistency between modalities (Chen et al., MICCAI 2020,
    Eqs. 2-4); see the module docstring for the equations and the choices made where the
    paper is ambiguous.

    Args:
        num_classes: number of segmentation classes ``C`` (background included); label
            values ``0..C-1`` define the class masks, other values belong to no class.
        area_normalization: ``S_c`` of Eq. (3): ``"none"`` (1), ``"pixels"`` (mask pixel
            count at the feature resolution) or ``"fraction"`` (count / ``H*W``). The
            default ``"none"`` is the one that trained best on real data (documentation/trainers.md).
        reading: ``"mean_squared"`` (default): per class, the mean over the ``P = MN``
            entries of the squared difference, Eq. (4'). ``"literal"``: the square of the
            mean entry difference, Eq. (4) as printed.
        include_background: whether class 0 takes part.
        class_specific: ``False`` replaces the class masks by one all-ones mask (the
            paper's "Affinity" row: consistency of whole-feature-map affinities).
        eps: lower bound of each channel's norm in the cosine (a zero vector gives a
            cosine of 0), as in :func:`torch.nn.functional.cosine_similarity`.

    Example::

        loss_fn = ClassSpecificAffinityLoss(num_classes=4)
        loss = loss_fn(features_l, features_k, target, modality)   # scalar float32
    """

    def __init__(self, num_classes: int, area_normalization: str = DEFAULT_AREA_NORMALIZATION,
                 reading: str = "mean_squared", include_background: bool = True,
                 class_specific: bool = True, eps: float = 1e-8):
        super().__init__()
        if area_normalization not in AREA_NORMALIZATIONS:
            raise ValueError(f"area_normalization must be one of {AREA_NORMALIZATIONS}, got {area_normalization!r}")
        if reading not in READINGS:
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
        # eps is squared internally (the norm is clamped before its square root, so that
        # the gradient of a zero vector's norm is 0 rather than NaN): eps^2 must be a
        # normal float32.
        if not eps ** 2 >= torch.finfo(torch.float32).tiny:
            raise ValueError(f"eps must be at least 1.1e-19 (its square must be a normal float32), got {eps}")
        self.area_normalization = area_normalization
        self.reading = reading
        self.include_background = include_background
        self.class_specific = class_specific
        self.eps = float(eps)
        if class_specific:
            if int(num_classes) != num_classes or num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
            first = 0 if include_background else 1
            self.classes: tuple[int, ...] = tuple(range(first, int(num_classes)))
            if not self.classes:
                raise ValueError(
                    f"no class left to compare: num_classes={num_classes} with include_background=False")
        else:
            self.classes = (WHOLE_MAP,)
        self.num_classes = num_classes
        # not persistent: the loss adds nothing to a checkpoint's state_dict
        self.register_buffer("_class_ids", torch.tensor(self.classes, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return (f"classes={list(self.classes)}, area_normalization={self.area_normalization!r}, "
                f"reading={self.reading!r}, eps={self.eps}")

    # ------------------------------------------------------------------ building blocks
    def _check_features(self, features_l: Tensor, features_k: Tensor) -> None:
        if features_l.ndim not in (4, 5) or features_k.ndim != features_l.ndim:
            raise ValueError(
                f"features must be (B, channels, H, W) or, in 3D, (B, channels, D, H, W); got "
                f"{tuple(features_l.shape)} and {tuple(features_k.shape)}")
        if features_l.shape[0] != features_k.shape[0] or features_l.shape[2:] != features_k.shape[2:]:
            raise ValueError(
                "features_l and features_k must share batch size and spatial size (take two layers of one "
                f"stage); got {tuple(features_l.shape)} and {tuple(features_k.shape)}")

    def _masks(self, labels: Optional[Tensor], batch_size: int, size: Sequence[int],
               device: torch.device) -> Tensor:
        """``(B, K, positions)`` float32 masks ``M^c`` at the feature resolution."""
        if not self.class_specific:
            return torch.ones(batch_size, 1, math.prod(size), device=device)
        if labels is None:
            raise ValueError("labels are required for the class-specific affinity (class_specific=True)")
        if labels.shape[0] != batch_size:
            raise ValueError(f"labels hold {labels.shape[0]} samples but the features hold {batch_size}")
        return class_masks(resize_labels(labels.to(device), size), self._class_ids.to(device))

    def sample_affinities(self, features_l: Tensor, features_k: Tensor,
                          labels: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-sample affinity matrices of Eq. (3).

        Returns:
            ``affinities`` ``(B, K, M, N)`` float32 with ``K = len(self.classes)``
            (zero where a class is absent), and ``present`` ``(B, K)`` bool.
        """
        self._check_features(features_l, features_k)
        with float32_math(features_l.device):
            f_l = features_l.float()
            f_k = features_k.float()
            batch, m_channels, *spatial = f_l.shape
            n_channels = f_k.shape[1]
            positions = math.prod(spatial)  # H*W, or D*H*W in 3D: the same equations over all positions
            f_l = f_l.reshape(batch, m_channels, positions)
            f_k = f_k.reshape(batch, n_channels, positions)
            masks = self._masks(labels, batch, spatial, f_l.device)  # (B, K, P)
            num_masks = masks.shape[1]
            pixel_counts = masks.sum(-1)  # (B, K)
            present = pixel_counts > 0

            # <F^c_m(l), F^c_n(k)> = sum_p F_m(l)[p] M^c[p] F_n(k)[p] (M^c is binary), for all
            # classes in one bmm: (B, K*M, P) x (B, P, N)
            masked_l = (f_l[:, None] * masks[:, :, None]).reshape(batch, num_masks * m_channels, positions)
            inner = torch.bmm(masked_l, f_k.transpose(1, 2)).reshape(batch, num_masks, m_channels, n_channels)
            # ||F^c_m||^2 = sum_p F_m[p]^2 M^c[p], clamped at eps^2 before the root
            eps_sq = self.eps ** 2
            norm_l = torch.bmm(masks, (f_l * f_l).transpose(1, 2)).clamp_min(eps_sq).sqrt()  # (B, K, M)
            norm_k = torch.bmm(masks, (f_k * f_k).transpose(1, 2)).clamp_min(eps_sq).sqrt()  # (B, K, N)
            cosine = inner / (norm_l[..., :, None] * norm_k[..., None, :])

            if self.area_normalization == "none":
                return cosine, present
            # an absent class has cosine 0 and is never used; clamping keeps 0/0 out
            region_size = pixel_counts.clamp_min(1)
            if self.area_normalization == "fraction":
                region_size = region_size / positions
            return cosine / region_size[..., None, None], present

    def _modality_affinities(self, features_l: Tensor, features_k: Tensor, labels: Optional[Tensor],
                             membership: Tensor) -> tuple[Tensor, Tensor]:
        """``A^{c,j}`` ``(J, K, M, N)`` and the number of samples averaged ``(J, K)``, from
        the ``(B, J)`` modality membership of :func:`group_by_modality`."""
        affinities, present = self.sample_affinities(features_l, features_k, labels)
        # weight[j, c, b] = 1 if sample b is of modality j and contains class c
        weights = membership.T[:, None, :] * present.T[None].float()  # (J, K, B)
        num_samples = weights.sum(-1)  # (J, K)
        weights = weights / num_samples.clamp_min(1)[..., None]
        modality_affinities = torch.einsum("jkb,bkmn->jkmn", weights, affinities)
        return modality_affinities, num_samples

    def affinity_matrices(self, features_l: Tensor, features_k: Tensor, labels: Optional[Tensor],
                          modality: Tensor) -> dict[tuple[int, int], Tensor]:
        """``{(modality index, class): A^{c,j}}`` (``M x N``, float32) for every modality in
        the batch and every class present in at least one of its samples. For
        ``class_specific=False`` the class key is :data:`WHOLE_MAP` (-1)."""
        with float32_math(features_l.device):
            modality_ids, membership = group_by_modality(modality, features_l.shape[0], features_l.device)
            matrices, num_samples = self._modality_affinities(features_l, features_k, labels, membership)
        result = {}
        for j, modality_id in enumerate(modality_ids.tolist()):
            for c, class_id in enumerate(self.classes):
                if num_samples[j, c] > 0:
                    result[(modality_id, class_id)] = matrices[j, c]
        return result

    # ------------------------------------------------------------------ the loss
    def forward(self, features_l: Tensor, features_k: Tensor, labels: Optional[Tensor],
                modality: Tensor) -> Tensor:
        """
        Args:
            features_l: ``(B, M, H, W)`` feature map of layer ``l`` (3D: ``(B, M, D, H, W)``).
            features_k: ``(B, N, H, W)`` feature map of layer ``k`` (same spatial size).
            labels: ``(B, 1, h, w)`` or ``(B, h, w)`` integer label map at any resolution
                (3D: ``(B, 1, d, h, w)`` or ``(B, d, h, w)``; nearest-neighbour resized to the
                features' size); unused (may be ``None``) when
                ``class_specific=False``.
            modality: ``(B,)`` integer modality index of each sample, on any device; on the
                host (as the unpaired sampler gives it) the loss makes no host read of the GPU.

        Returns:
            scalar float32 loss, Eq. (4') (or (4) with ``reading="literal"``).
        """
        with float32_math(features_l.device):
            self._check_features(features_l, features_k)
            modality_ids, membership = group_by_modality(modality, features_l.shape[0], features_l.device)
            if modality_ids.numel() < 2:
                # one modality only: nothing to be consistent with
                return connected_zero(features_l, features_k)
            matrices, num_samples = self._modality_affinities(features_l, features_k, labels, membership)
            first, second = modality_pairs(matrices.shape[0], matrices.device)
            difference = matrices[first] - matrices[second]  # (Q, K, M, N)
            if self.reading == "mean_squared":
                per_class = difference.pow(2).mean(dim=(-2, -1))
            else:
                per_class = difference.mean(dim=(-2, -1)).pow(2)
            shared = (num_samples[first] > 0) & (num_samples[second] > 0)  # (Q, K)
            return average_over_pairs_and_classes(per_class, shared)


class AffinityLoss(ClassSpecificAffinityLoss):
    """The paper's "Affinity" row: the same between-modality consistency of
    between-layer affinities, computed on whole feature maps (a single all-ones mask,
    no classes), i.e. Eqs. (3)-(4') with ``M^c = 1`` and ``S_c`` = 1 (``"fraction"``,
    ``"none"``) or ``H*W`` (``"pixels"``).

    ``num_classes`` and ``labels`` are accepted for a uniform call signature and
    ignored.
    """

    def __init__(self, num_classes: Optional[int] = None, area_normalization: str = DEFAULT_AREA_NORMALIZATION,
                 reading: str = "mean_squared", include_background: bool = True,
                 class_specific: bool = False, eps: float = 1e-8):
        if class_specific:
            raise ValueError("AffinityLoss is the whole-map variant; use ClassSpecificAffinityLoss for class masks")
        super().__init__(num_classes=num_classes if num_classes is not None else 1,
                         area_normalization=area_normalization, reading=reading,
                         include_background=True, class_specific=False, eps=eps)

    def forward(self, features_l: Tensor, features_k: Tensor, labels: Optional[Tensor] = None,
                modality: Optional[Tensor] = None) -> Tensor:
        if modality is None:
            raise ValueError("modality (B,) is required")
        return super().forward(features_l, features_k, None, modality)
