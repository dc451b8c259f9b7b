"""Relaxed layers from what a user knows: which paths, channels, input size, and whether the layer downsamples.

A *layer name* says which paths a relaxed layer combines (``"ffc_conv"`` = F-FC + CONV, ...; :data:`LAYER_NAMES`),
and :func:`relaxed_layer` derives every path's sizes and strides from the layer's shape: the dense paths map the
input size to the output size (halved when downsampling), the CONV path of a downsampling layer computes only
the polyphase component the layer keeps (``stride=2``). The paper's network (:mod:`ella.models`) builds every
block with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ella.layers.conv import Conv
from ella.layers.factored import FactoredFC
from ella.layers.fc import FC
from ella.layers.group import N_ROTATIONS, GroupConv
from ella.layers.relaxed import RelaxedLayer
from ella.layers.sparse import SparseConv, SparseFC


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
    """A non-group path acting on the lifted ``4C``-channel tensor of a group layer."""

    def make(s: BlockSpec) -> nn.Module:
        return factory(BlockSpec(N_ROTATIONS * s.in_channels, N_ROTATIONS * s.out_channels, s.in_size, s.out_size))

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
GROUP_LAYERS = frozenset({"gconv", "ffc_conv_gconv"})  # their layers act on p4 feature maps (B, 4C, H, W)
LAYER_NAMES: tuple[str, ...] = tuple(LAYERS)


def check_layer_name(layer: str) -> str:
    """Return ``layer`` if it names a relaxed layer, else raise a ValueError that lists the valid names."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; valid layers are: {', '.join(LAYER_NAMES)}")
    return layer


def relaxed_layer(in_channels: int, out_channels: int, size: int, paths: str = "ffc_conv", *,
                  downsample: bool = False, combine: str = "sqrt", criterion: str = "l2") -> RelaxedLayer:
    """The relaxed layer ``paths`` (a layer name, e.g. ``"ffc_conv"``; :data:`LAYER_NAMES`) for square inputs.

    ``(B, C, size, size) -> (B, C', s, s)`` with ``C = in_channels``, ``C' = out_channels`` and ``s = size // 2``
    when ``downsample`` (``size`` must then be even), else ``s = size``. Every path gets the sizes and strides
    this shape implies; the paths' names are ``fc`` (FC, F-FC, S-FC), ``conv`` (CONV, S-CONV) and ``gconv``, and
    their prior precisions are learned apart. The group layers (``gconv``, ``ffc_conv_gconv``) act on p4 feature
    maps: their channels count fields of 4 rotations each, ``(B, 4C, size, size) -> (B, 4C', s, s)`` (lift an
    image with :func:`ella.layers.lift`, read out with :func:`ella.layers.group_max_pool`). ``combine`` and
    ``criterion`` are :class:`RelaxedLayer` 's.
    """
    check_layer_name(paths)
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"relaxed_layer: {name} must be a positive integer, got {value!r}")
    if downsample and size % 2:
        raise ValueError(f"relaxed_layer: a downsampling layer halves its input, so size must be even, got {size}")
    spec = BlockSpec(in_channels, out_channels, size, size // 2 if downsample else size)
    return RelaxedLayer({name: make(spec) for name, make in LAYERS[paths].items()}, downsample=downsample,
                        combine=combine, criterion=criterion)
