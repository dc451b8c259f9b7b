"""CONV path: 3x3 circular convolution, at stride 1 or as one polyphase component at stride 2."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ella.layers.polyphase import phase_stack, phase_windows, stacked_filter


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


def _fold_circular(grad: torch.Tensor, pad: int) -> torch.Tensor:
    """Adjoint of circular padding by ``pad``: ``(..., H + 2p, W + 2p) -> (..., H, W)``.

    Copies the core once and adds the 4 edge strips and 4 corners (each ``p`` wide) onto the rows/columns they
    copy: padded row ``i < p`` holds row ``H - p + i``, padded row ``p + H + i`` holds row ``i`` (columns alike).
    """
    height, width = grad.shape[-2] - 2 * pad, grad.shape[-1] - 2 * pad
    rows = {"core": slice(pad, pad + height), "low": slice(0, pad), "high": slice(pad + height, None)}
    cols = {"core": slice(pad, pad + width), "low": slice(0, pad), "high": slice(pad + width, None)}
    # where a padded strip lands in the unpadded map: "low" pads copy the last p rows/columns, "high" the first p
    land_rows = {"core": slice(None), "low": slice(height - pad, None), "high": slice(0, pad)}
    land_cols = {"core": slice(None), "low": slice(width - pad, None), "high": slice(0, pad)}
    out = grad[..., rows["core"], cols["core"]].clone()
    for r in rows:
        for c in cols:
            if r == "core" and c == "core":
                continue
            out[..., land_rows[r], land_cols[c]] += grad[..., rows[r], cols[c]]
    return out


class _CircularPad(torch.autograd.Function):
    """Circular padding with a cheap backward (one copy of the core plus 8 strip additions)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, pad: int) -> torch.Tensor:
        return F.pad(x, (pad, pad, pad, pad), mode="circular")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.pad = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _fold_circular(grad, ctx.pad), None


def kaiming_relu_uniform_(weight: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform init with ReLU gain: variance ``2 / fan_in`` (``fan_in = weight[0].numel()``)."""
    return nn.init.kaiming_uniform_(weight, nonlinearity="relu")


class StackedConv2d(nn.Module):
    """The stride-2 convolution of a downsampling CONV path, applied to a :func:`~ella.layers.polyphase.phase_stack`:
    ``(B, 4C, h, w) -> (B, C', h - (k - 1) / 2, w - (k - 1) / 2)``. Parameters as ``nn.Conv2d(C, C', k)``: ``weight
    (C', C, k, k)``, ``bias (C',)``; the forward convolves with :func:`~ella.layers.polyphase.stacked_filter` of the
    weight at stride 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        # nn.Conv2d's default init, so that building a network draws the same random numbers as with a stock
        # stride-2 child (the owner re-initialises the weight anyway)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(in_channels * kernel_size**2)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        return F.conv2d(stack, stacked_filter(self.weight), self.bias)


class Conv(nn.Module):
    """Translation-equivariant path ``(B, C, H, W) -> (B, C', H, W)``.

    Child ``conv: nn.Conv2d(C, C', k, padding=0)`` (stride 1); the forward pads circularly by ``k // 2``
    *before* the stock module, so curvature code that hooks ``nn.Conv2d`` sees the padded input. Parameters
    ``9CC' + C'`` for ``k = 3``. Init: Kaiming-uniform with ReLU gain (variance ``2 / (k^2 C)``), bias 0.

    ``stride=2`` is the CONV path of a downsampling relaxed layer: ``forward(x, phase)`` returns polyphase
    component ``phase[n]`` of every sample's stride-1 output, ``(B, C', H/2, W/2)``, computed by the child
    :class:`StackedConv2d` (same parameters) on :func:`~ella.layers.polyphase.phase_stack` (a quarter of the work
    of the stride-1 convolution, in the forward and in every backward). The relaxed layer chooses the components
    from :meth:`full_resolution`, which is not hooked, so curvature code sees one call of the child.
    :func:`with_stock_strided_convs` gives the stock form (``nn.Conv2d(stride=2)`` on
    :func:`~ella.layers.polyphase.phase_windows`) for tools that know only stock layers.
    """

    equivariant = True
    kind = "CONV"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "Conv")
        if stride not in (1, 2):
            raise ValueError(f"Conv: stride must be 1 or 2 (polyphase downsampling), got {stride}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        if stride == 1:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=0, device=device, dtype=dtype)
        else:
            self.conv = StackedConv2d(in_channels, out_channels, kernel_size, device=device, dtype=dtype)
        kaiming_relu_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def full_resolution(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-1 output ``(B, C, H, W) -> (B, C', H, W)`` by a functional call (no module hooks)."""
        check_channels(x, self.in_channels, "Conv")
        return F.conv2d(circular_pad(x, self.kernel_size), self.conv.weight, self.conv.bias)

    def forward(self, x: torch.Tensor, phase: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H, W)``; with ``stride=2``, ``(B, C, H, W), phase (B,) -> (B, C', H/2, W/2)``."""
        check_channels(x, self.in_channels, "Conv")
        if self.stride == 1:
            if phase is not None:
                raise ValueError("Conv: a stride-1 Conv takes no phase; build it with stride=2 to downsample")
            return self.conv(circular_pad(x, self.kernel_size))
        if phase is None:
            raise ValueError(
                "Conv: a stride-2 Conv computes one polyphase component per sample; pass phase (B,) "
                "(RelaxedLayer does), or use full_resolution(x)"
            )
        windows = phase_stack if isinstance(self.conv, StackedConv2d) else phase_windows
        return self.conv(windows(x, phase, self.kernel_size))

    def extra_repr(self) -> str:
        return f"stride={self.stride}" if self.stride != 1 else ""


def with_stock_strided_convs(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose stride-2 :class:`Conv` paths run a stock ``nn.Conv2d(stride=2)`` on
    :func:`~ella.layers.polyphase.phase_windows` instead of :class:`StackedConv2d` on a phase stack.

    The same function of the same parameters (up to float rounding) under the same names, in the form that
    curvature tools knowing only stock layers (curvlinops) can run; used to compare with them.
    """
    stock_model = copy.deepcopy(model)
    for module in stock_model.modules():
        if isinstance(module, Conv) and isinstance(module.conv, StackedConv2d):
            stacked = module.conv
            weight = stacked.weight
            stock = nn.utils.skip_init(
                nn.Conv2d, module.in_channels, module.out_channels, module.kernel_size, stride=2,
                device=weight.device, dtype=weight.dtype,
            )
            with torch.no_grad():
                stock.weight.copy_(weight)
                stock.bias.copy_(stacked.bias)
            module.conv = stock
    return stock_model
