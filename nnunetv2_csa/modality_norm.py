"""Modality-specific normalization (the paper's MSBN, Chen et al. MICCAI 2020, Sec. 2.2).

The convolution kernels of a network stay shared between modalities; every normalization
layer becomes one normalization per modality. A sample of modality ``k`` is normalised by
the ``k``-th copy only: its affine parameters (gamma, beta of Eq. 1) and, for BatchNorm,
its running statistics, which are computed over the modality-``k`` sub-batch alone.

Plain torch; nothing here imports nnU-Net. Typical use::

    network = convert_to_modality_specific_norms(network, n_modalities=2)  # before compile/DDP
    set_modality(network, batch_modality)     # (B,) long tensor, once per training batch
    output = network(images)
    set_modality(network, 1)                  # inference: the whole batch is modality 1,
                                              # persists until changed
    plain = fold_modality(network, 1)         # a stock network (same state_dict keys as
                                              # before conversion) for modality 1 alone

How a batch is routed (chosen once per batch in :func:`set_modality`, not per layer):

* per-sample norms (InstanceNorm without running statistics, GroupNorm): their statistics
  never mix samples, so the whole batch is normalised in one call and the affine
  parameters of all modalities, stacked, are gathered per sample by a modality-index
  tensor. For InstanceNorm this is the very call ``torch.instance_norm`` makes internally
  (a batch norm over a ``(1, B*C, ...)`` view with per-(sample, channel) weights), so it
  equals the per-modality module exactly. The routing these layers read is that tensor
  alone ((B,) per sample, or (1,) for a whole batch of one modality), a plain attribute
  rather than Python values: ``torch.compile`` then builds one graph for every batch
  composition and every inference modality, where guards on Python values (the modality,
  the modalities present) would compile one graph per composition. It is not a buffer on
  purpose: DDP broadcasts buffers from rank 0 before each forward, which would overwrite
  each rank's own routing. It follows the module when the module moves (``.to``,
  ``.cuda``, ``.half``: torch's ``_apply``) as a buffer would: nnU-Net's predictor routes
  the network while it is still on the CPU and moves it to the GPU afterwards, and a CUDA
  kernel refuses a CPU index.
* batch-statistics norms (BatchNorm, InstanceNorm with running statistics): each
  modality's sub-batch goes through its own module. A batch ordered by modality (what the
  unpaired sampler produces) is split into contiguous views without copying; any other
  order is gathered by a stable sort and scattered back. The split sizes are Python values,
  so a compiled network has one graph per batch composition (two in training for an odd
  batch size, whose extra sample alternates between the modalities).

A modality absent from a batch: a batch-statistics norm of it is not called at all (its
parameters get no gradient, ``grad`` stays None, and its running statistics stay as they
are). The affine parameters of a per-sample norm of it take part in the gather and get a
zero gradient, which an optimizer with weight decay or momentum still acts on; the
unpaired sampler puts every modality into every training batch, so in training no
modality is ever absent. Under DDP (without ``find_unused_parameters``) and SyncBatchNorm
every rank's batch must hold every modality, which the unpaired sampler guarantees.
"""
from __future__ import annotations

import copy
import dataclasses
import numbers
import re
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from nnunetv2_csa.wrappers import unwrap_network

SPLITTABLE_NORM_TYPES = (_InstanceNorm, _BatchNorm, nn.GroupNorm)

# Any other module whose class name ends like a normalization layer (LayerNorm, RMSNorm,
# LocalResponseNorm, a custom "LayerNorm2d", ...) is refused rather than silently shared.
_LOOKS_LIKE_NORM = re.compile(r"Norm(\d[dD])?$")

ModalityLike = Union[int, torch.Tensor, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class _Routing:
    """How one batch is spread over the modalities; computed once per batch and shared
    by every ModalitySpecificNorm of the network."""

    modality: Union[int, torch.Tensor]
    # per-sample norms: the modality index of each sample, (B,) long on the norms' device,
    # or (1,) for an int modality (the whole batch, any batch size)
    sample_modality: torch.Tensor
    # the one modality of the whole batch, or None for a mixed batch
    single: Optional[int]
    # the batch size the routing was made for; None for an int modality (any batch size)
    batch_size: Optional[int]
    # modalities present in the batch, ascending, and the number of samples of each
    present: tuple[int, ...] = ()
    split_sizes: tuple[int, ...] = ()
    is_sorted: bool = True
    # unsorted batches only: stable sort by modality and its inverse
    sort_order: Optional[torch.Tensor] = None
    unsort_order: Optional[torch.Tensor] = None

    def moved(self, fn) -> "_Routing":
        """This routing with its index tensors passed through ``fn``, the function torch's
        ``Module._apply`` applies to parameters and buffers; their integer dtype is kept
        (``Module.type`` would cast them), only the device follows."""
        def move(index: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if index is None:
                return None
            applied = fn(index)
            return applied if applied.dtype == index.dtype else index.to(applied.device)
        return dataclasses.replace(self, sample_modality=move(self.sample_modality),
                                   sort_order=move(self.sort_order), unsort_order=move(self.unsort_order))


class ModalitySpecificNorm(nn.Module):
    """One normalization module per modality behind a single module.

    ``norms[k]`` is a deep copy of the original normalization layer, used for modality
    ``k`` only. The modality of the batch is set for the whole network by
    :func:`set_modality`; calling the module before that raises ``RuntimeError``.
    """

    def __init__(self, norm: nn.Module, n_modalities: int):
        super().__init__()
        if not isinstance(norm, SPLITTABLE_NORM_TYPES):
            raise TypeError(
                f"ModalitySpecificNorm supports InstanceNorm, BatchNorm and GroupNorm layers, "
                f"not {type(norm).__name__}")
        _check_n_modalities(n_modalities)
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(n_modalities))
        # Per-sample statistics allow the single-call fast path; decided once here so that
        # a later SyncBatchNorm conversion of the copies keeps the sub-batch path.
        self.per_sample_statistics = isinstance(norm, nn.GroupNorm) or (
            isinstance(norm, _InstanceNorm) and not norm.track_running_stats)
        self._routing: Optional[_Routing] = None
        # what the per-sample path reads (see the module docstring: a tensor, not a buffer)
        self._sample_modality: Optional[torch.Tensor] = None

    @property
    def n_modalities(self) -> int:
        return len(self.norms)

    @property
    def modality(self) -> Union[int, torch.Tensor, None]:
        """The modality set by :func:`set_modality` (an int or a (B,) tensor), or None."""
        return None if self._routing is None else self._routing.modality

    def extra_repr(self) -> str:
        path = "per-sample fast path" if self.per_sample_statistics else "per-modality sub-batches"
        return f"n_modalities={self.n_modalities}, {path}"

    def _apply(self, fn, *args, **kwargs):
        # torch moves and casts parameters and buffers through _apply; the routing tensors are
        # neither (see the module docstring), so they are moved here, once per move, never per forward
        module = super()._apply(fn, *args, **kwargs)
        if self._routing is not None:
            self._routing = self._routing.moved(fn)
            self._sample_modality = self._routing.sample_modality
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the per-sample path reads nothing but the index tensor, so that a compiled network
        # guards on no Python value that changes from batch to batch
        if self.per_sample_statistics:
            return self._forward_per_sample(x, self._sample_index(x))
        routing = self._routing
        if routing is None:
            _refuse_unset()
        if routing.batch_size is not None and x.shape[0] != routing.batch_size:
            _refuse_batch_size(routing.batch_size, x.shape[0])
        if routing.single is not None:
            return self._apply_norm(routing.single, x)
        return self._forward_sub_batches(x, routing)

    def _sample_index(self, x: torch.Tensor) -> torch.Tensor:
        index = self._sample_modality
        if index is None:
            _refuse_unset()
        if index.shape[0] != x.shape[0]:
            if index.shape[0] != 1:
                _refuse_batch_size(index.shape[0], x.shape[0])
            index = index.expand(x.shape[0])
        return index

    def _apply_norm(self, modality: int, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.norms[modality](x)
        except ValueError as error:
            if "Expected more than 1 value per channel" not in str(error):
                raise
            raise ValueError(
                f"modality {modality} has a sub-batch of shape {tuple(x.shape)} at this "
                f"normalization layer: modality-specific BatchNorm computes its training "
                f"statistics per modality and needs more than one value per channel there. "
                f"Use at least 2 samples of each modality per batch, or InstanceNorm") from error

    def _gathered_affine(self, index: torch.Tensor):
        """Per-sample affine parameters, shape (B, C), gathered from all modalities' stacked
        parameters (an absent modality's get a zero gradient)."""
        if not self.norms[0].affine:
            return None, None
        weight = torch.stack([norm.weight for norm in self.norms]).index_select(0, index)
        bias = torch.stack([norm.bias for norm in self.norms]).index_select(0, index)
        return weight, bias

    def _forward_per_sample(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        template = self.norms[0]
        weight, bias = self._gathered_affine(index)
        batch, channels = x.shape[:2]
        if isinstance(template, nn.GroupNorm):
            normalised = F.group_norm(x, template.num_groups, None, None, template.eps)
            if weight is None:
                return normalised
            shape = (batch, channels) + (1,) * (x.dim() - 2)
            return torch.addcmul(bias.view(shape), normalised, weight.view(shape))
        # Exactly torch.instance_norm's own computation, with per-sample instead of
        # repeated weights: a batch norm over the (1, B*C, ...) view.
        flat = x.contiguous().view(1, batch * channels, *x.shape[2:])
        out = F.batch_norm(
            flat, None, None,
            None if weight is None else weight.reshape(-1),
            None if bias is None else bias.reshape(-1),
            training=True, momentum=0.0, eps=template.eps)
        return out.view(x.shape)

    def _forward_sub_batches(self, x: torch.Tensor, routing: _Routing) -> torch.Tensor:
        if routing.is_sorted:
            chunks = x.split(routing.split_sizes)  # views, no copy
            return torch.cat([self._apply_norm(k, c) for k, c in zip(routing.present, chunks)])
        grouped = x.index_select(0, routing.sort_order)
        chunks = grouped.split(routing.split_sizes)
        out = torch.cat([self._apply_norm(k, c) for k, c in zip(routing.present, chunks)])
        return out.index_select(0, routing.unsort_order)


def _refuse_unset():
    raise RuntimeError(
        "ModalitySpecificNorm called before set_modality: call "
        "nnunetv2_csa.modality_norm.set_modality(network, modality) with an int (the "
        "whole batch is that modality) or a (B,) tensor of per-sample modalities first")


def _refuse_batch_size(routed: int, received: int):
    raise RuntimeError(
        f"set_modality was given {routed} per-sample modalities but this layer received a batch of "
        f"{received}; call set_modality for every batch")


def _check_n_modalities(n_modalities) -> None:
    if isinstance(n_modalities, bool) or not isinstance(n_modalities, int) or n_modalities < 1:
        raise ValueError(f"n_modalities must be a positive int, got {n_modalities!r}")


def _replace_submodules(root: nn.Module, replacement_for) -> int:
    """Calls ``replacement_for(module)`` for every submodule and puts each non-None result
    in its place, at every path the module is registered under (nnU-Net's
    ConvDropoutNormReLU registers its norm both as ``norm`` and as ``all_modules.1``; both
    must end up pointing to the same replacement). Returns the number of replaced paths."""
    replaced: dict[int, nn.Module] = {}
    paths = [(name, module) for name, module in root.named_modules(remove_duplicate=False) if name]
    count = 0
    for name, module in paths:
        if id(module) not in replaced:
            new = replacement_for(module)
            if new is None:
                continue
            replaced[id(module)] = new
        parent_name, _, child_name = name.rpartition(".")
        setattr(root.get_submodule(parent_name), child_name, replaced[id(module)])
        count += 1
    return count


def convert_to_modality_specific_norms(network: nn.Module, n_modalities: int) -> nn.Module:
    """Replaces, in place, every InstanceNorm/BatchNorm/GroupNorm (1d/2d/3d) of ``network``
    by a :class:`ModalitySpecificNorm` of ``n_modalities`` identical copies; returns the
    network. Convert before ``torch.compile`` and before wrapping in DDP.

    Raises ``TypeError`` naming the module path for a normalization layer that cannot be
    split per modality (LayerNorm, RMSNorm, LocalResponseNorm, unknown ``*Norm`` classes),
    and ``ValueError`` for a network that is already converted. Nothing is changed when it
    raises.
    """
    _check_n_modalities(n_modalities)
    if isinstance(network, ModalitySpecificNorm):
        raise ValueError("the network is already a ModalitySpecificNorm; convert only once")
    if isinstance(network, SPLITTABLE_NORM_TYPES):
        return ModalitySpecificNorm(network, n_modalities)
    for name, module in network.named_modules():
        if isinstance(module, ModalitySpecificNorm):
            raise ValueError(
                f"network already has modality-specific norms (at {name!r}); convert only once")
        if not isinstance(module, SPLITTABLE_NORM_TYPES) and _LOOKS_LIKE_NORM.search(type(module).__name__):
            raise TypeError(
                f"cannot make {name!r} ({type(module).__name__}) modality-specific: only "
                f"InstanceNorm, BatchNorm and GroupNorm layers can be split per modality. "
                f"Build the network with one of those norm ops")

    def to_modality_specific(module):
        if isinstance(module, SPLITTABLE_NORM_TYPES):
            return ModalitySpecificNorm(module, n_modalities)
        return None

    _replace_submodules(network, to_modality_specific)
    return network


def _modality_specific_norms(network: nn.Module) -> list[ModalitySpecificNorm]:
    norms = [m for m in network.modules() if isinstance(m, ModalitySpecificNorm)]
    if not norms:
        raise ValueError(
            f"{type(unwrap_network(network)).__name__} has no ModalitySpecificNorm layers: call "
            f"convert_to_modality_specific_norms(network, n_modalities) first")
    return norms


def _routing_device(norms: list[ModalitySpecificNorm]) -> torch.device:
    for norm in norms:
        for tensor in norm.parameters():
            return tensor.device
        for tensor in norm.buffers():
            return tensor.device
    return torch.device("cpu")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def _make_routing(modality: ModalityLike, n_modalities: int, device: torch.device) -> _Routing:
    if isinstance(modality, torch.Tensor) and modality.dim() == 0 and _is_integer_dtype(modality.dtype):
        modality = int(modality.item())
    elif isinstance(modality, numbers.Integral) and not isinstance(modality, bool):
        modality = int(modality)  # also numpy integers
    if isinstance(modality, int) and not isinstance(modality, bool):
        if not 0 <= modality < n_modalities:
            raise ValueError(
                f"modality {modality} out of range: the network has {n_modalities} modalities "
                f"(0..{n_modalities - 1})")
        return _Routing(modality=modality, sample_modality=torch.tensor([modality], device=device),
                        single=modality, batch_size=None)

    per_sample = torch.as_tensor(modality)
    if per_sample.dim() != 1 or per_sample.numel() == 0 or not _is_integer_dtype(per_sample.dtype):
        raise ValueError(
            f"modality must be an int or a non-empty 1-D integer tensor of per-sample modality "
            f"indices (shape (B,)), got {type(modality).__name__} with dtype "
            f"{getattr(per_sample, 'dtype', None)} and shape {tuple(per_sample.shape)}")
    # One host sync per batch (none when the sampler's tensor is already on the CPU).
    on_host = per_sample.detach().to("cpu", torch.long)
    low, high = int(on_host.min()), int(on_host.max())
    if low < 0 or high >= n_modalities:
        raise ValueError(
            f"per-sample modalities must lie in 0..{n_modalities - 1} (the network has "
            f"{n_modalities} modalities), got values from {low} to {high}")
    counts = torch.bincount(on_host, minlength=n_modalities).tolist()
    present = tuple(k for k, c in enumerate(counts) if c > 0)
    batch_size = on_host.numel()
    sample_modality = on_host.to(device, non_blocking=True)
    if len(present) == 1:
        return _Routing(modality=per_sample, sample_modality=sample_modality, single=present[0],
                        batch_size=batch_size)

    is_sorted = bool((on_host[1:] >= on_host[:-1]).all())
    sort_order = unsort_order = None
    if not is_sorted:
        sort_order = torch.argsort(on_host, stable=True)
        unsort_order = torch.argsort(sort_order).to(device)
        sort_order = sort_order.to(device)
    return _Routing(
        modality=per_sample, sample_modality=sample_modality, single=None, batch_size=batch_size,
        present=present, split_sizes=tuple(counts[k] for k in present), is_sorted=is_sorted,
        sort_order=sort_order, unsort_order=unsort_order)


def set_modality(network: nn.Module, modality: ModalityLike) -> None:
    """Sets which modality each sample of the next forward passes belongs to.

    ``modality`` is an int (the whole batch is that modality, any batch size: inference)
    or a (B,) integer tensor/sequence of per-sample modalities (training; the batch must
    then have B samples). The setting persists until the next call, so an int set once
    before inference serves every sliding-window patch. Works through torch.compile and
    DDP wrappers. Raises ``ValueError`` for out-of-range modalities or a network without
    modality-specific norms.
    """
    norms = _modality_specific_norms(network)
    n_modalities = min(norm.n_modalities for norm in norms)
    routing = _make_routing(modality, n_modalities, _routing_device(norms))
    for norm in norms:
        norm._routing = routing
        norm._sample_modality = routing.sample_modality


def set_default_modality(network: nn.Module, modality: int) -> None:
    """Inference: every following forward pass treats its whole batch as ``modality``,
    until :func:`set_modality` is called again. (``set_modality`` with an int.)"""
    if isinstance(modality, torch.Tensor) and modality.dim() > 0:
        raise ValueError("set_default_modality takes one modality index (an int)")
    set_modality(network, modality)


def fold_modality(network: nn.Module, modality: int) -> nn.Module:
    """A deep copy of ``network`` in which every :class:`ModalitySpecificNorm` is replaced
    by its ``modality``-th normalization module: a plain single-modality network of the
    original class whose state_dict keys equal those before conversion, computing what the
    converted network computes after ``set_modality(network, modality)``. Wrappers
    (torch.compile, DDP) are removed; ``network`` itself is not changed."""
    plain = unwrap_network(network)
    norms = _modality_specific_norms(plain)
    if isinstance(modality, bool) or not isinstance(modality, int) \
            or not all(0 <= modality < norm.n_modalities for norm in norms):
        raise ValueError(
            f"modality must be an int in 0..{min(n.n_modalities for n in norms) - 1}, got {modality!r}")
    if isinstance(plain, ModalitySpecificNorm):
        return copy.deepcopy(plain.norms[modality])
    folded = copy.deepcopy(plain)

    def chosen_norm(module):
        if isinstance(module, ModalitySpecificNorm):
            return module.norms[modality]
        return None

    _replace_submodules(folded, chosen_norm)
    return folded
