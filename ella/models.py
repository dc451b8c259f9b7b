"""The paper's 8-block network (App. F, Table 6) built from relaxed layers.

Every block is a :class:`~ella.layers.RelaxedLayer` built by :func:`~ella.layers.relaxed_layer` from a *layer
name* (``"ffc_conv"`` = F-FC + CONV, ...), its channels, input size and whether it downsamples. Blocks 2, 4, 6, 7 and 8 halve the spatial size, so a 32x32 input
reaches 1x1 before the two-layer head. Group models (``gconv``, ``ffc_conv_gconv``) lift the input to the
p4 common frame (4 copies, ``(B, 4C, H, W)``) and max-pool over rotations before the head.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ella.layers import group_max_pool, lift
from ella.layers.blocks import GROUP_LAYERS, LAYER_NAMES, LAYERS, BlockSpec, check_layer_name, relaxed_layer
from ella.options import COUNT

__all__ = ["DEFAULT_ALPHA", "LAYER_NAMES", "RelaxedNet", "block_specs", "build_model", "count_parameters"]

DEFAULT_ALPHA: dict[str, int] = {name: (2 if name == "ffc_conv_gconv" else 10) for name in LAYERS}


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
        self.blocks = nn.ModuleList(
            relaxed_layer(spec.in_channels, spec.out_channels, spec.in_size, layer, downsample=spec.downsample,
                          combine=combine, criterion=criterion)
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
    if not COUNT.allows(alpha):
        raise ValueError(f"alpha must be a positive integer, got {alpha!r}")
    with torch.device(device) if device is not None else nullcontext():
        return RelaxedNet(layer, in_channels, n_classes, alpha, combine=combine, criterion=criterion)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters())
