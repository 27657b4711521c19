"""Where a non-finite training loss comes from: the first module whose output is not finite.

The GPU check calls :func:`diagnose_nonfinite_step` at the first training step whose loss
is NaN or inf. It replays that step's batch through a copy of the network (hooks on the
trained network itself would change what ``torch.compile`` guards on, and so the graphs the
check counts), eagerly, once under the training's autocast and once in float32, and
reports whether the weights and the batch were finite and the first module, in the order
they ran, whose output was not.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
from torch import nn

from nnunetv2_csa.modality_norm import ModalitySpecificNorm, set_modality
from nnunetv2_csa.wrappers import unwrap_network


def _all_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def first_nonfinite_module(network: nn.Module, data: torch.Tensor, modality: Optional[torch.Tensor] = None,
                           autocast_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """The name of the first module (in the order the forward runs them; the network itself is "")
    whose output holds a NaN or inf when ``network`` (not changed: a copy runs) predicts ``data``,
    routed by ``modality`` when it has modality-specific norms; None when every output is finite."""
    replica = copy.deepcopy(unwrap_network(network))
    if modality is not None and any(isinstance(m, ModalitySpecificNorm) for m in replica.modules()):
        set_modality(replica, modality)
    found: list[str] = []

    def check(name):
        def hook(module, inputs, output):
            if not found and not _all_finite(output):
                found.append(name)
        return hook

    for name, module in replica.named_modules():
        module.register_forward_hook(check(name))
    device = next(replica.parameters()).device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        replica(data.to(device))
    return found[0] if found else None


def diagnose_nonfinite_step(network: nn.Module, batch: dict, autocast_dtype: Optional[torch.dtype]) -> dict:
    """What the GPU check records about its first non-finite training step (see the module docstring)."""
    modality = batch.get("modality")
    parameters = unwrap_network(network).parameters()
    return {
        "parameters_finite": all(bool(torch.isfinite(p).all()) for p in parameters),
        "batch_finite": _all_finite(batch["data"]),
        "first_nonfinite_module_autocast": first_nonfinite_module(network, batch["data"], modality, autocast_dtype),
        "first_nonfinite_module_float32": first_nonfinite_module(network, batch["data"], modality, None),
    }
