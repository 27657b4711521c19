"""The pieces both consistency losses (``affinity.py``, ``ummkd.py``) build on: label maps
at a feature map's resolution, per-class masks, the batch grouped by modality, the pairs of
modalities, and the averages over them."""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def float32_math(device: torch.device) -> ContextManager:
    """Autocast off on ``device``, so that what runs inside computes in the float32 of its inputs
    (the losses cast their inputs with ``.float()``). A device type without autocast (PyTorch's
    ``"meta"`` device, which the tests use as a second device) has nothing to turn off."""
    if not torch.amp.is_autocast_available(device.type):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)`` -> ``(B, *size)`` long, in
    2D (``size`` = ``(H, W)``) or 3D (``(D, H, W)``).

    Resizing uses ``nearest-exact``, the mode nnU-Net's deep-supervision target
    downsampling uses, so that a mask at a decoder resolution matches nnU-Net's own
    target at that resolution. nnU-Net hands labels over as float tensors; they are
    rounded back to integers.
    """
    size = tuple(int(s) for s in size)
    layout = "h, w" if len(size) == 2 else "d, h, w"
    if labels.ndim == len(size) + 2:
        if labels.shape[1] != 1:
            raise ValueError(
                f"labels must be (B, 1, {layout}) or (B, {layout}) integer maps, got shape {tuple(labels.shape)}; "
                "pass the label map, not a one-hot encoding")
        labels = labels[:, 0]
    elif labels.ndim != len(size) + 1:
        raise ValueError(
            f"labels must be (B, 1, {layout}) or (B, {layout}) integer maps for {len(size)}D features, got shape "
            f"{tuple(labels.shape)}")
    if tuple(labels.shape[1:]) != size:
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0]
    if labels.is_floating_point():
        labels = labels.round()
    return labels.long()


def class_masks(labels: Tensor, class_ids: Tensor) -> Tensor:
    """``(B, *spatial)`` label map -> ``(B, K, positions)`` float32 binary masks, one per id in
    ``class_ids``. Label values not in ``class_ids`` (e.g. nnU-Net's ignore label)
    belong to no mask."""
    return (labels.flatten(1)[:, None, :] == class_ids[None, :, None]).float()


def group_by_modality(modality: Tensor, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Modality ids present in the batch (sorted, ``(J,)``, on ``modality``'s device) and the
    membership matrix ``(B, J)`` float32 on ``device`` (row ``b`` is the one-hot of sample
    ``b``'s modality).

    The ids are found where ``modality`` lies: their number decides the shape of everything
    after, so on a GPU it is a host read that waits for the GPU; the trainers hand the
    sampler's modality tensor, which lies on the host, and the loss then reads nothing back."""
    if modality.ndim != 1 or modality.shape[0] != batch_size:
        raise ValueError(
            f"modality must be a (B,) tensor with one modality index per sample (B={batch_size}), "
            f"got shape {tuple(modality.shape)}")
    if modality.is_floating_point() or modality.is_complex():
        raise ValueError(f"modality must hold integer indices, got dtype {modality.dtype}")
    modality_ids, inverse = torch.unique(modality, sorted=True, return_inverse=True)
    membership = F.one_hot(inverse, num_classes=modality_ids.numel()).float().to(device, non_blocking=True)
    return modality_ids, membership


def average_over_pairs_and_classes(values: Tensor, valid: Tensor) -> Tensor:
    """``values``/``valid``: ``(Q, K)`` per modality pair and class. Mean over the valid
    classes of each pair, then mean over the pairs with at least one valid class.
    Nothing valid -> 0, still connected to ``values``' graph (no NaN, no sync)."""
    valid = valid.to(values.dtype)
    per_pair = (values * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    pair_valid = (valid.sum(-1) > 0).to(values.dtype)
    return (per_pair * pair_valid).sum() / pair_valid.sum().clamp_min(1)


def modality_pairs(num_modalities: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Index pairs ``(i < j)`` over the ``J`` modalities present."""
    pairs = torch.triu_indices(num_modalities, num_modalities, offset=1, device=device)
    return pairs[0], pairs[1]


def connected_zero(*tensors: Tensor) -> Tensor:
    """A float32 scalar zero whose graph reaches ``tensors``, so ``backward()`` works
    (and DDP sees every parameter used) when the loss has nothing to compare."""
    return sum(t.float().sum() * 0.0 for t in tensors)
