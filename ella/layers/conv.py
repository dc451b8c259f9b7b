"""CONV path: 3x3 circular convolution at stride 1 (spec 1.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_kernel_size(kernel_size: int, owner: str) -> None:
    """Only odd kernels have a centre, which 'same' circular padding by ``k // 2`` needs."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{owner}: kernel_size must be a positive odd integer, got {kernel_size}")


def check_channels(x: torch.Tensor, channels: int, owner: str) -> None:
    """Raise a ValueError unless ``x`` has shape ``(B, channels, H, W)``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects input (B, {channels}, H, W), got {tuple(x.shape)}")


def circular_pad(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` circularly by ``k // 2`` on every side -> ``(B, C, H + 2p, W + 2p)``."""
    pad = kernel_size // 2
    if pad == 0:
        return x
    if pad > min(x.shape[-2:]):
        raise ValueError(
            f"circular padding by {pad} needs maps of at least {pad}x{pad}, got {tuple(x.shape[-2:])}"
        )
    if min(x.shape[-2:]) < 2 * pad:
        return F.pad(x, (pad, pad, pad, pad), mode="circular")
    return _CircularPad.apply(x, pad)


def _fold_circular(grad: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Adjoint of circular padding along ``dim``: add the two pad strips back onto the rows they copy."""
    size = grad.shape[dim] - 2 * pad
    core = grad.narrow(dim, pad, size)
    before, after = grad.narrow(dim, 0, pad), grad.narrow(dim, pad + size, pad)
    middle = torch.zeros_like(core.narrow(dim, 0, size - 2 * pad))
    return core + torch.cat([after, middle, before], dim=dim)


class _CircularPad(torch.autograd.Function):
    """Circular padding with a cheap backward (one fold per axis instead of F.pad's 8 slice copies)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, pad: int) -> torch.Tensor:
        return F.pad(x, (pad, pad, pad, pad), mode="circular")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.pad = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _fold_circular(_fold_circular(grad, ctx.pad, -2), ctx.pad, -1), None


def kaiming_relu_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform init with ReLU gain: variance ``2 / fan_in`` (``fan_in = weight[0].numel()``)."""
    return nn.init.kaiming_uniform_(weight, nonlinearity="relu")


class Conv(nn.Module):
    """Translation-equivariant path ``(B, C, H, W) -> (B, C', H, W)``.

    Child ``conv: nn.Conv2d(C, C', k, padding=0)``; the forward pads circularly by ``k // 2`` *before* the
    stock module, so curvature code that hooks ``nn.Conv2d`` sees the padded input. Parameters ``9CC' + C'``
    for ``k = 3``. Init: Kaiming-uniform with ReLU gain (variance ``2 / (k^2 C)``), bias 0.
    """

    equivariant = True
    kind = "CONV"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "Conv")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=0, device=device, dtype=dtype)
        kaiming_relu_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H, W)``."""
        check_channels(x, self.in_channels, "Conv")
        return self.conv(circular_pad(x, self.kernel_size))
