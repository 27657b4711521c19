"""The ordered modality names, recorded inside the network's weights.

A network with modality-specific norms holds one norm per modality *position*; which
modality a position means comes from ``csa_modalities`` in dataset.json / plans.json. If
that list changes order between training and use (a re-conversion with another
``--modalities`` order, a model folder whose plans.json was overwritten), every norm would
silently serve the other modality. So the names are stored in the network as a buffer
(part of ``state_dict``, hence of every nnU-Net checkpoint), and a load-state-dict pre-hook
compares the stored order with the order the network was built for. Every path that puts
trained weights into a network goes through ``load_state_dict``: ``nnUNetv2_train --c``,
``nnUNetv2_predict`` and the export; each stops with :class:`ModalityOrderError` on a
mismatch. Plain torch; nothing here imports nnU-Net.
"""
from __future__ import annotations

import json
import warnings
from typing import Sequence

import torch
from torch import nn

from nnunetv2_csa.modality import ModalityTagError

#: the buffer's name (and its state_dict key at the network's root)
MODALITY_ORDER_BUFFER = "csa_modality_order"


class ModalityOrderError(ModalityTagError):
    """Trained weights were loaded into a network built for another modality order."""


def _encode(names: Sequence[str]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(list(names)).encode("utf-8")), dtype=torch.uint8)


def _decode(buffer: torch.Tensor) -> list[str]:
    return json.loads(bytes(buffer.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))


def recorded_modality_order(network: nn.Module) -> list[str] | None:
    """The names stored in ``network`` (None if it has none)."""
    buffer = getattr(network, MODALITY_ORDER_BUFFER, None)
    return None if buffer is None else _decode(buffer)


def record_modality_order(network: nn.Module, names: Sequence[str]) -> nn.Module:
    """Store ``names`` in ``network`` and check them whenever weights are loaded into it."""
    network.register_buffer(MODALITY_ORDER_BUFFER, _encode(names))
    network.register_load_state_dict_pre_hook(_check_loaded_order)
    return network


def _check_loaded_order(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    key = prefix + MODALITY_ORDER_BUFFER
    expected = recorded_modality_order(module)
    if key not in state_dict:
        # weights written before the order was recorded: loadable, but not verifiable
        warnings.warn(f"these weights do not record their modality order; assuming {expected} (the order of "
                      f"csa_modalities in plans.json). If the model was trained with another order, its norms are "
                      f"swapped", stacklevel=2)
        state_dict[key] = _encode(expected)
        return
    stored = _decode(state_dict[key])
    if stored != expected:
        raise ModalityOrderError(
            f"modality order mismatch: the weights were trained with the modalities in the order {stored}, but the "
            f"network was built for {expected} (csa_modalities of the dataset.json / plans.json in use); loading "
            f"them would swap the modality-specific norms. Convert the dataset again with --modalities "
            f"{' '.join(stored)} (and preprocess it again), or restore the model folder's plans.json with "
            f"\"csa_modalities\": {json.dumps(stored)}")


def without_modality_order(state_dict: dict) -> dict:
    """``state_dict`` without the recorded order (for a stock single-modality network)."""
    return {k: v for k, v in state_dict.items() if k != MODALITY_ORDER_BUFFER}
