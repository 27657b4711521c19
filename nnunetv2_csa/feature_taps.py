"""Reads the feature maps of two layers of a network during its forward pass, with
forward hooks, so that the affinity losses can use them without any change to the
network class (nnU-Net's PlainConvUNet stays as it is)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from nnunetv2_csa.wrappers import unwrap_network


def _is_conv_block(module: nn.Module) -> bool:
    # dynamic_network_architectures' ConvDropoutNormReLU: one convolution followed by its
    # norm and non-linearity; its output is what the paper calls a layer's feature map
    return type(module).__name__ == "ConvDropoutNormReLU"


def consecutive_conv_layers(network: nn.Module, part: str = "encoder", stage: int | None = None) -> tuple[str, str]:
    """Names of the first two convolution blocks of one stage of nnU-Net's U-Net.

    ``stage=None`` takes the middle encoder stage (``n_stages // 2``): the paper uses
    "intermediate" layers, close to each other, because the deepest features are too
    close to the labels and distant layers relate poorly.

    PlainConvUNet: ``encoder.stages.{s}.0.convs.0`` and ``.convs.1``. ResidualEncoderUNet
    (the ResEnc presets): the first residual block's ``conv1`` and ``conv2``
    (``encoder.stages.{s}.blocks.0.conv1`` / ``.conv2``): conv1's output is convolution +
    norm + non-linearity, conv2's is convolution + norm, taken before the residual sum and
    the block's non-linearity (a block has no layer of its own after the sum), so both are
    maps of one convolution each, two consecutive layers as in the paper.
    """
    network = unwrap_network(network)
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', not {part!r}")
    stages = getattr(getattr(network, part, None), "stages", None)
    if stages is None:
        raise ValueError(f"{type(network).__name__} has no {part}.stages: the affinity losses need one of "
                         f"nnU-Net's U-Nets (PlainConvUNet and relatives)")
    if stage is None:
        stage = len(stages) // 2
    if not -len(stages) <= stage < len(stages):
        raise ValueError(f"{part} stage {stage} does not exist: the network has {len(stages)} {part} stages")
    stage = stage % len(stages)
    prefix = f"{part}.stages.{stage}."
    blocks = [name for name, module in network.named_modules()
              if name.startswith(prefix) and _is_conv_block(module)]
    if len(blocks) < 2:
        raise ValueError(f"{part} stage {stage} has {len(blocks)} convolution block(s); the affinity needs two "
                         f"consecutive ones. Choose another stage")
    return blocks[0], blocks[1]


class FeatureTap:
    """Holds the outputs of the named layers from the most recent forward pass."""

    def __init__(self, network: nn.Module, layer_names: tuple[str, ...]):
        network = unwrap_network(network)
        modules = dict(network.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise ValueError(f"layers {missing} are not in the network")
        self.layer_names = tuple(layer_names)
        self._features: dict[str, torch.Tensor] = {}
        #: whether the hooks keep the layers' outputs (see :meth:`paused`)
        self.active = True
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in layer_names]

    def _keeper(self, name):
        def keep(module, inputs, output):
            if self.active:
                # a copy, because the network may change the output in place afterwards: ResEnc's residual
                # block adds the shortcut to conv2's output and applies its non-linearity in place
                self._features[name] = output.clone()
        return keep

    @contextmanager
    def paused(self):
        """Keeps nothing while inside: for forward passes whose features nobody reads (nnU-Net's final
        validation), which then hold no activations, and under torch.compile need no graph per state
        of the kept features."""
        active, self.active = self.active, False
        self.clear()
        try:
            yield
        finally:
            self.active = active

    def features(self) -> tuple[torch.Tensor, ...]:
        if len(self._features) != len(self.layer_names):
            raise RuntimeError("no forward pass has run since the tap was installed")
        return tuple(self._features[n] for n in self.layer_names)

    def clear(self) -> None:
        # drops the references so that the activations of the last step can be freed
        self._features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()
