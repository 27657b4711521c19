"""The plain network inside the wrappers nnU-Net puts around it."""
from __future__ import annotations

from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside torch.compile's ``OptimizedModule`` (``_orig_mod``) and
    (Distributed)DataParallel (``.module``), however deeply nested: nnU-Net compiles the
    network and, with several GPUs, wraps the compiled network in DDP."""
    while True:
        if hasattr(network, "_orig_mod") and isinstance(network._orig_mod, nn.Module):
            network = network._orig_mod
        elif isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        else:
            return network
