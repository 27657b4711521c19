"""Short-budget variants of every trainer of this package, in the spirit of nnU-Net's
``nnUNetTrainer_Xepochs``, but with few iterations per epoch as well: nnU-Net's 250
iterations per epoch are far too many for CPU runs and tests.

Names: ``<trainer>_<E>epochs_<I>its`` with E in EPOCHS and I in ITERATIONS, e.g.
``nnUNetTrainerCSA_2epochs_5its``. Validation runs max(1, I // 5) iterations per epoch.
"""
from __future__ import annotations

EPOCHS = (1, 2, 5, 10, 20, 30, 50, 100)
ITERATIONS = (5, 10, 20, 50)


def short_budget_name(base_name: str, epochs: int, iterations: int) -> str:
    if epochs not in EPOCHS or iterations not in ITERATIONS:
        raise ValueError(f"no short-budget variant for {epochs} epochs x {iterations} iterations; "
                         f"epochs one of {EPOCHS}, iterations one of {ITERATIONS}")
    return f"{base_name}_{epochs}epochs_{iterations}its"


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


def short_budget_variants(base: type, module: str) -> dict[str, type]:
    """Variant classes of ``base``, to be bound as globals of ``module`` (so they pickle)."""
    variants = {}
    for epochs in EPOCHS:
        for iterations in ITERATIONS:
            name = short_budget_name(base.__name__, epochs, iterations)
            variants[name] = type(name, (base,), {
                "__init__": _budget_init(base, epochs, iterations), "__module__": module, "__qualname__": name,
                "__doc__": f"{base.__name__} for {epochs} epochs of {iterations} iterations."})
    return variants
