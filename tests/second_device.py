"""A second device for the tests, without a GPU: PyTorch's ``"meta"`` device, watched by a dispatch mode.

A CUDA kernel refuses an op whose tensor inputs lie on two devices ("Expected all tensors to be on the
same device"); CPU and meta kernels do not check it. :class:`SecondDevice` runs code with the network
moved to ``"meta"`` and records every such op, as CUDA would refuse it, and every host read of the
device (what stalls a GPU's pipeline: a scalar read, a device-to-host copy, an op whose output shape
depends on the device's data). Meta tensors hold no data, so a read gives zeros (a scalar read ``0``),
and code after it runs on those: it proves where tensors are and when the host waits, not values.

What it leaves unproven (a real GPU shows it): CUDA's own kernels and numerics, autocast (disabled
without CUDA), streams and ``non_blocking`` copies, memory, cuDNN, NCCL.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx.experimental._config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

DEVICE = torch.device("meta")
HOST = torch.device("cpu")

aten = torch.ops.aten
#: ops that move data between devices on purpose (``tensor.to(device)``, ``module.to(device)``): never a
#: mixed-device error
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
           aten._copy_from_and_resize.default, aten._has_compatible_shallow_copy_type.default}
#: ops whose output shape depends on the data: on a GPU the host waits for the result's size
_DATA_DEPENDENT = {aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
                   aten.unique_consecutive.default, aten.masked_select.default,
                   aten.repeat_interleave.Tensor}
#: a tensor's value read as a Python number (``float(t)``, ``t.item()``, ``if t:``)
_SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
#: ops that are data-dependent when indexed by a boolean mask
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}


def _tensors(args, kwargs) -> list:
    flat, _ = tree_flatten((args, kwargs or {}))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _is_host_scalar(tensor: torch.Tensor) -> bool:
    # CUDA kernels take 0-dim CPU tensors as scalars, so they do not count as a second device
    return tensor.device == HOST and tensor.dim() == 0


class SecondDevice(TorchDispatchMode):
    """Inside ``with SecondDevice() as device:``, ``device.mixed`` lists the ops whose tensor inputs lay
    on two devices (op name and devices) and ``device.host_reads`` counts each kind of host read
    of the second device (``"scalar"``, ``"copy to host"``, ``"data-dependent shape: <op>"``)."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []
        self.host_reads: Counter = Counter()
        self._assume_nonzero = None

    def __enter__(self):
        # meta kernels refuse data-dependent shapes (a boolean mask as an index) unless told to assume
        # that every element is non-zero; nnU-Net's Gaussian of the sliding window uses one
        config = torch.fx.experimental._config
        self._assume_nonzero = config.meta_nonzero_assume_all_nonzero
        config.meta_nonzero_assume_all_nonzero = True
        return super().__enter__()

    def __exit__(self, *exc):
        torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = self._assume_nonzero
        return super().__exit__(*exc)

    @property
    def total_host_reads(self) -> int:
        return sum(self.host_reads.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        on_device = [t for t in tensors if t.device == DEVICE]
        if func in _COPIES:
            return self._copy(func, args, kwargs, on_device)
        devices = {t.device for t in tensors if not _is_host_scalar(t)}
        if len(devices) > 1:
            self.mixed.append(f"{func}: {sorted(str(d) for d in devices)}")
        if func in _SCALAR_READS and on_device:
            self.host_reads["scalar"] += 1
            return False if on_device[0].dtype == torch.bool else 0
        if on_device and (func in _DATA_DEPENDENT or func in _INDEXING and any(
                t.dtype == torch.bool for t in tensors[1:])):
            self.host_reads[f"data-dependent shape: {func}"] += 1
        return func(*args, **kwargs)

    def _copy(self, func, args, kwargs, on_device):
        if func is aten._to_copy.default and on_device and kwargs.get("device") == HOST:
            self.host_reads["copy to host"] += 1
            source = args[0]
            return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype, device=HOST)
        if func is aten.copy_.default and args[0].device == HOST and args[1].device == DEVICE:
            self.host_reads["copy to host"] += 1
            return args[0].zero_()
        return func(*args, **kwargs)


def assert_one_device(device: SecondDevice) -> None:
    """Fails with the ops that mixed devices, as CUDA would have refused them."""
    assert not device.mixed, "ops with tensors on two devices (CUDA refuses these):\n" + "\n".join(
        sorted(set(device.mixed)))
