"""Short-budget variants of every trainer of this package, in the spirit of nnU-Net's
``nnUNetTrainer_Xepochs``, but with few iterations per epoch as well: nnU-Net's 250
iterations per epoch are far too many for CPU runs and tests.

Names: ``<trainer>_<E>epochs_<I>its`` for any whole E, I >= 1, e.g.
``nnUNetTrainerCSA_2epochs_5its``. Validation runs max(1, I // 5) iterations per epoch. The
classes are made on demand, when nnU-Net (or pickle) asks ``training/trainers.py`` for the name.
"""
from __future__ import annotations

import re

_NAME = re.compile(r"(?P<base>\w+?)_(?P<epochs>[1-9][0-9]*)epochs_(?P<iterations>[1-9][0-9]*)its")


def short_budget_name(base_name: str, epochs: int, iterations: int) -> str:
    if not (isinstance(epochs, int) and isinstance(iterations, int) and epochs >= 1 and iterations >= 1):
        raise ValueError(f"no short-budget variant for {epochs} epochs x {iterations} iterations; epochs and "
                         f"iterations are whole numbers of at least 1")
    return f"{base_name}_{epochs}epochs_{iterations}its"


def parse_short_budget_name(name: str) -> tuple[str, int, int] | None:
    """(base trainer name, epochs, iterations) of a short-budget name, or None."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return match["base"], int(match["epochs"]), int(match["iterations"])


def _budget_init(base: type, epochs: int, iterations: int):
    # torch only here: the benchmark's --help imports this module for the names alone
    import torch

    # the signature must stay nnU-Net's own: the trainer records its __init__ parameters
    # by name to re-create itself from a checkpoint
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: "torch.device" = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations
        self.num_val_iterations_per_epoch = max(1, iterations // 5)
    return __init__


def short_budget_variant(base: type, epochs: int, iterations: int, module: str) -> type:
    """The variant class of ``base``, to be bound as a global of ``module`` (so that it pickles)."""
    name = short_budget_name(base.__name__, epochs, iterations)
    return type(name, (base,), {
        "__init__": _budget_init(base, epochs, iterations), "__module__": module, "__qualname__": name,
        "__doc__": f"{base.__name__} for {epochs} epochs of {iterations} iterations."})
