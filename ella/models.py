"""The paper's 8-block network (App. F, Table 6; spec section 2) built from relaxed layers.

Every block is a :class:`~ella.layers.RelaxedLayer` whose paths are chosen by a *layer name*
(``"ffc_conv"`` = F-FC + CONV, ...). Blocks 2, 4, 6, 7 and 8 halve the spatial size, so a 32x32 input
reaches 1x1 before the two-layer head. Group models (``gconv``, ``ffc_conv_gconv``) lift the input to the
p4 common frame (4 copies, ``(B, 4C, H, W)``) and max-pool over rotations before the head.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ella.layers import (
    FC,
    Conv,
    FactoredFC,
    GroupConv,
    RelaxedLayer,
    SparseConv,
    SparseFC,
    group_max_pool,
    lift,
)

GROUP_ORDER = 4  # p4: rotations by multiples of 90 degrees


@dataclass(frozen=True)
class BlockSpec:
    """Shape of one block: channels ``in_channels -> out_channels`` on square maps ``in_size -> out_size``."""

    in_channels: int
    out_channels: int
    in_size: int
    out_size: int

    @property
    def downsample(self) -> bool:
        return self.out_size != self.in_size


def block_specs(in_channels: int, alpha: int, image_size: int = 32) -> list[BlockSpec]:
    """The 8 blocks of the network for ``(in_channels, image_size, image_size)`` inputs and width ``alpha``."""
    if image_size != 32:
        raise ValueError(f"the paper's network expects 32x32 inputs, got {image_size}x{image_size}")
    a = alpha
    rows = [  # (C, C', H_in, H_out)
        (in_channels, a, 32, 32),
        (a, 2 * a, 32, 16),
        (2 * a, 2 * a, 16, 16),
        (2 * a, 4 * a, 16, 8),
        (4 * a, 4 * a, 8, 8),
        (4 * a, 8 * a, 8, 4),
        (8 * a, 8 * a, 4, 2),
        (8 * a, 16 * a, 2, 1),
    ]
    return [BlockSpec(*row) for row in rows]


PathFactory = Callable[[BlockSpec], nn.Module]


def _fc(s: BlockSpec) -> nn.Module:
    return FC(s.in_channels, s.out_channels, s.in_size, s.out_size)


def _conv(s: BlockSpec) -> nn.Module:
    # in a downsampling block the CONV path computes only the polyphase component the block keeps
    return Conv(s.in_channels, s.out_channels, stride=2 if s.downsample else 1)


def _ffc(s: BlockSpec) -> nn.Module:
    return FactoredFC(s.in_channels, s.out_channels, s.in_size, s.out_size)


def _sfc(s: BlockSpec) -> nn.Module:
    return SparseFC(s.in_channels, s.out_channels, s.in_size, s.out_size)


def _sconv(s: BlockSpec) -> nn.Module:
    return SparseConv(s.in_channels, s.out_channels)


def _gconv(s: BlockSpec) -> nn.Module:
    return GroupConv(s.in_channels, s.out_channels, mode="pointwise")


def _lifted(factory: PathFactory) -> PathFactory:
    """A non-group path acting on the lifted ``4C``-channel tensor of a group model."""

    def make(s: BlockSpec) -> nn.Module:
        return factory(BlockSpec(GROUP_ORDER * s.in_channels, GROUP_ORDER * s.out_channels, s.in_size, s.out_size))

    return make


# layer name -> (path name -> factory); the order of the paths is the order of their parameters.
LAYERS: dict[str, dict[str, PathFactory]] = {
    "fc": {"fc": _fc},
    "conv": {"conv": _conv},
    "fc_conv": {"fc": _fc, "conv": _conv},
    "ffc": {"fc": _ffc},
    "ffc_conv": {"fc": _ffc, "conv": _conv},
    "sfc": {"fc": _sfc},
    "sconv": {"conv": _sconv},
    "sfc_sconv": {"fc": _sfc, "conv": _sconv},
    "gconv": {"gconv": _gconv},
    "ffc_conv_gconv": {"fc": _lifted(_ffc), "conv": _lifted(_conv), "gconv": _gconv},
}
GROUP_LAYERS = frozenset({"gconv", "ffc_conv_gconv"})
LAYER_NAMES: tuple[str, ...] = tuple(LAYERS)
DEFAULT_ALPHA: dict[str, int] = {name: (2 if name == "ffc_conv_gconv" else 10) for name in LAYERS}


def check_layer_name(layer: str) -> str:
    """Return ``layer`` if it names a model, else raise a ValueError that lists the valid names."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; valid layers are: {', '.join(LAYER_NAMES)}")
    return layer


class RelaxedNet(nn.Module):
    """The paper's network: 8 relaxed blocks, then ``Linear(16a, 64a) -> ReLU -> Linear(64a, classes)``.

    Input ``(B, C, 32, 32)``, output logits ``(B, n_classes)``. ``layer`` records the layer name.
    """

    def __init__(
        self,
        layer: str,
        in_channels: int,
        n_classes: int,
        alpha: int,
        combine: str = "sqrt",
        criterion: str = "l2",
    ) -> None:
        super().__init__()
        self.layer = check_layer_name(layer)
        self.grouped = layer in GROUP_LAYERS
        self.in_channels = in_channels
        specs = block_specs(in_channels, alpha)
        factories = LAYERS[layer]
        self.blocks = nn.ModuleList(
            RelaxedLayer(
                {name: make(spec) for name, make in factories.items()},
                downsample=spec.downsample,
                combine=combine,
                criterion=criterion,
            )
            for spec in specs
        )
        width = specs[-1].out_channels
        self.head = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, n_classes))
        for module in self.head:
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, 32, 32) -> (B, 16a)``: the blocks and the rotation readout, before the head."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (32, 32):
            raise ValueError(f"expected input of shape (B, {self.in_channels}, 32, 32), got {tuple(x.shape)}")
        if self.grouped:
            x = lift(x)
        for block in self.blocks:
            x = block(x)
        if self.grouped:
            x = group_max_pool(x)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(
    layer: str,
    in_channels: int = 3,
    n_classes: int = 10,
    alpha: int | None = None,
    *,
    combine: str = "sqrt",
    criterion: str = "l2",
    device: torch.device | str | None = None,
) -> RelaxedNet:
    """Build the network for a layer name (see :data:`LAYER_NAMES`).

    ``alpha`` defaults to 10 (2 for the multi-group ``ffc_conv_gconv``, the paper's reduced width).
    ``device="meta"`` builds the model without allocating its weights (for parameter counts).
    """
    check_layer_name(layer)
    alpha = DEFAULT_ALPHA[layer] if alpha is None else alpha
    if alpha < 1:
        raise ValueError(f"alpha must be a positive integer, got {alpha}")
    with torch.device(device) if device is not None else nullcontext():
        return RelaxedNet(layer, in_channels, n_classes, alpha, combine=combine, criterion=criterion)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters())
