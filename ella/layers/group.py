"""p4 (translations x 90-degree rotations) group convolutions in the common frame (Cohen & Welling 2016).

Representation: a p4 feature map with ``C`` channels is stored as ``(B, 4*C, H, W)``, group-major (channel
``g*C + c`` is rotation ``g`` of channel ``c``). The generator ``r`` acts by rotating every slice with
``torch.rot90(., 1, dims=(-2, -1))`` and cyclically shifting the group axis so that slice ``g`` of the result
is the rotated slice ``g - 1`` (:func:`rotate_p4`). Translations act on all slices alike.

Derivation used below (cross-correlation ``[f * psi](x) = sum_y f(x + y) psi(y)``, ``R`` = rot90):
``(R f) * (R psi) = R (f * psi)`` on the torus for odd, centred kernels. Hence with output slice ``g`` built
from filters rotated ``g`` times, rotating the input rotates the output and moves slice ``g - 1`` to ``g``.
All convolutions pad circularly, so every layer here is exactly equivariant to circular translations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ella.layers.conv import check_channels, check_kernel_size, circular_pad, kaiming_relu_uniform_

N_ROTATIONS = 4
GROUP_CONV_MODES = ("pointwise", "full")


def _split_group(x: torch.Tensor) -> torch.Tensor:
    """``(B, 4C, H, W) -> (B, 4, C, H, W)``."""
    if x.dim() != 4 or x.shape[1] % N_ROTATIONS != 0:
        raise ValueError(f"expected a p4 feature map (B, 4*C, H, W), got {tuple(x.shape)}")
    return x.view(x.shape[0], N_ROTATIONS, x.shape[1] // N_ROTATIONS, *x.shape[2:])


def lift(x: torch.Tensor) -> torch.Tensor:
    """Lift an image to the p4 common frame: 4 identical copies, ``(B, C, H, W) -> (B, 4C, H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"lift expects (B, C, H, W), got {tuple(x.shape)}")
    return x.repeat(1, N_ROTATIONS, 1, 1)


def group_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Rotation readout: max over the group axis, ``(B, 4C, H, W) -> (B, C, H, W)``."""
    return _split_group(x).amax(dim=1)


def rotate_p4(x: torch.Tensor, r: int = 1) -> torch.Tensor:
    """Act with ``r`` quarter turns on a common-frame tensor ``(B, 4C, H, W)`` (same shape out).

    Every slice is rotated by ``torch.rot90(., r, dims=(-2, -1))`` and slice ``g`` of the result is the
    rotated slice ``g - r`` (indices mod 4).
    """
    parts = _split_group(x)
    rotated = torch.rot90(parts, r, dims=(-2, -1))
    return torch.roll(rotated, shifts=r, dims=1).reshape(x.shape)


def rotated_filter_bank(weight: torch.Tensor) -> torch.Tensor:
    """Stack the 4 rotations of a filter: ``(C', C, k, k) -> (4C', C, k, k)``, block ``g`` = ``rot90^g``."""
    return torch.cat([torch.rot90(weight, g, dims=(-2, -1)) for g in range(N_ROTATIONS)], dim=0)


def full_group_filter_bank(weight: torch.Tensor) -> torch.Tensor:
    """Expand a p4 filter ``(C', C, 4, k, k)`` to an ordinary conv weight ``(4C', 4C, k, k)``.

    Output rotation ``g`` reads input rotation ``h`` through ``rot90^g(weight[:, :, (h - g) mod 4])``:
    the filter is cyclically shifted by ``g`` along its rotation axis and spatially rotated ``g`` times.
    Input channels are ordered group-major (``h*C + c``) to match the common frame.
    """
    c_out, c_in, n_rot, k, _ = weight.shape
    blocks = []
    for g in range(N_ROTATIONS):
        moved = torch.rot90(torch.roll(weight, shifts=g, dims=2), g, dims=(-2, -1))  # (C', C, 4, k, k)
        blocks.append(moved.transpose(1, 2).reshape(c_out, n_rot * c_in, k, k))
    return torch.cat(blocks, dim=0)


class LiftingConv(nn.Module):
    """Lifting convolution ``(B, C, H, W) -> (B, 4C', H, W)`` into the common frame.

    Output slice ``g`` is the circular conv of the input with ``weight`` rotated ``g`` times, plus ``bias``.
    Parameters ``weight (C', C, k, k)``, ``bias (C')`` (``9CC' + C'``). Init Kaiming-uniform (ReLU gain), bias 0.
    """

    equivariant = True
    kind = "GCONV"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "LiftingConv")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory))
        kaiming_relu_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 4C', H, W)``."""
        check_channels(x, self.in_channels, "LiftingConv")
        bias = self.bias.repeat(N_ROTATIONS)
        return F.conv2d(circular_pad(x, self.kernel_size), rotated_filter_bank(self.weight), bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


class GroupConv(nn.Module):
    """p4 group convolution ``(B, 4C, H, W) -> (B, 4C', H, W)`` in the common frame.

    - ``mode="pointwise"``: ``weight (C', C, k, k)``; output slice ``g`` = circular conv of input slice ``g``
      with ``weight`` rotated ``g`` times (no mixing across rotations). One grouped ``F.conv2d`` with
      ``groups=4``. Parameters ``9CC' + C'``.
    - ``mode="full"``: ``weight (C', C, 4, k, k)`` (Cohen & Welling p4 conv): output rotation ``g`` uses the
      filter spatially rotated by ``g`` and cyclically shifted along its rotation axis by ``g``
      (:func:`full_group_filter_bank`). Parameters ``36CC' + C'``.

    ``bias (C')`` is shared over rotations. Init Kaiming-uniform (ReLU gain, fan-in ``C k^2`` resp.
    ``4 C k^2``), bias 0.
    """

    equivariant = True
    kind = "GCONV"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        mode: str = "pointwise",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_kernel_size(kernel_size, "GroupConv")
        if mode not in GROUP_CONV_MODES:
            raise ValueError(f"GroupConv: unknown mode {mode!r}; expected one of {GROUP_CONV_MODES}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.mode = mode
        factory = {"device": device, "dtype": dtype}
        rotation_axis = (N_ROTATIONS,) if mode == "full" else ()
        shape = (out_channels, in_channels, *rotation_axis, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory))
        kaiming_relu_uniform_(self.weight)

    def filter_bank(self) -> torch.Tensor:
        """Ordinary conv weight: ``(4C', C, k, k)`` (pointwise, used with ``groups=4``) or ``(4C', 4C, k, k)``."""
        if self.mode == "pointwise":
            return rotated_filter_bank(self.weight)
        return full_group_filter_bank(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 4C, H, W) -> (B, 4C', H, W)``."""
        check_channels(x, N_ROTATIONS * self.in_channels, "GroupConv")
        groups = N_ROTATIONS if self.mode == "pointwise" else 1
        bias = self.bias.repeat(N_ROTATIONS)
        return F.conv2d(circular_pad(x, self.kernel_size), self.filter_bank(), bias, groups=groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, mode={self.mode!r}"
