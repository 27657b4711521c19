"""The ordered modality names, recorded inside the network's weights.

A network with modality-specific norms holds one norm per modality *position*; which
modality a position means comes from ``csa_modalities`` in dataset.json / plans.json. If
that list changes order between training and use (a re-conversion with another
``--modalities`` order, a model folder whose plans.json was overwritten), every norm would
silently serve the other modality. So the names are written into the network's
``state_dict`` (hence into every nnU-Net checkpoint) by a state-dict hook, and a
load-state-dict pre-hook compares the stored order with the order the network was built
for. They are deliberately not a buffer: DDP broadcasts a network's buffers before the
first forward pass of a run and before the first one after a training step, a collective
every rank must join, and nnU-Net's final validation gives a rank with no validation case
no forward pass at all, so that rank's collective would never be joined (tests/test_ddp.py).
Every path that puts
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

#: the state_dict key at the network's root
MODALITY_ORDER_KEY = "csa_modality_order"
_ATTRIBUTE = "_csa_modality_order"


class ModalityOrderError(ModalityTagError):
    """Trained weights were loaded into a network built for another modality order."""


def _encode(names: Sequence[str]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(list(names)).encode("utf-8")), dtype=torch.uint8)


def _decode(buffer: torch.Tensor) -> list[str]:
    return json.loads(bytes(buffer.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))


def recorded_modality_order(network: nn.Module) -> list[str] | None:
    """The names recorded for ``network`` (None if it has none)."""
    names = getattr(network, _ATTRIBUTE, None)
    return None if names is None else list(names)


def record_modality_order(network: nn.Module, names: Sequence[str]) -> nn.Module:
    """Write ``names`` into ``network``'s state_dict and check them whenever weights are loaded into it."""
    setattr(network, _ATTRIBUTE, tuple(names))
    network.register_state_dict_post_hook(_write_order)
    network.register_load_state_dict_pre_hook(_check_loaded_order)
    return network


def _write_order(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + MODALITY_ORDER_KEY] = _encode(recorded_modality_order(module))


def _check_loaded_order(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    # state_dict is load_state_dict's own copy: taking the key out of it (it is no parameter or buffer,
    # which strict loading would call unexpected) leaves the caller's weights as they are
    key = prefix + MODALITY_ORDER_KEY
    expected = recorded_modality_order(module)
    if key not in state_dict:
        # weights written before the order was recorded: loadable, but not verifiable
        warnings.warn(f"these weights do not record their modality order; assuming {expected} (the order of "
                      f"csa_modalities in plans.json). If the model was trained with another order, its norms are "
                      f"swapped", stacklevel=2)
        return
    stored = _decode(state_dict.pop(key))
    if stored != expected:
        raise ModalityOrderError(
            f"modality order mismatch: the weights were trained with the modalities in the order {stored}, but the "
            f"network was built for {expected} (csa_modalities of the dataset.json / plans.json in use); loading "
            f"them would swap the modality-specific norms. Convert the dataset again with --modalities "
            f"{' '.join(stored)} (and preprocess it again), or restore the model folder's plans.json with "
            f"\"csa_modalities\": {json.dumps(stored)}")


def without_modality_order(state_dict: dict) -> dict:
    """``state_dict`` without the recorded order (for a stock single-modality network)."""
    return {k: v for k, v in state_dict.items() if k != MODALITY_ORDER_KEY}
