"""Image operations on batches ``(N, C, H, W)``: per-image shifts, rotations, resizing, normalising, quadrants.

All are vectorised over the batch (no loop over samples) and act on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32


def shift_images(x: Tensor, shifts: Tensor, flips: Tensor | None = None, pad: int | None = None) -> Tensor:
    """Translate every image by its own integer shift with zero fill (optionally flipping it first).

    x: (N, C, H, W) of any dtype; shifts: (N, 2) integers ``(dy, dx)``, positive = down / right, i.e.
    ``out[n, :, i, j] = x'[n, :, i - dy, j - dx]`` (0 outside the image), where ``x'`` is ``x`` with the
    images selected by ``flips`` ((N,) bool, optional) mirrored left-right. One gather, no loop over samples.
    ``pad``: a bound on ``|shift|`` (default: the largest one, which reads the shifts back from the device;
    a given bound keeps the operation free of host synchronisation, e.g. inside a CUDA graph). Returns (N, C, H, W).
    """
    n, c, h, w = x.shape
    shifts = shifts.to(device=x.device, dtype=torch.long)
    m = pad if pad is not None else (int(shifts.abs().max()) if n else 0)
    padded = x.new_zeros(n, c, h + 2 * m, w + 2 * m)
    padded[..., m:m + h, m:m + w] = x
    rows = torch.arange(h, device=x.device) - shifts[:, :1]  # (N, H) source row
    cols = torch.arange(w, device=x.device) - shifts[:, 1:]  # (N, W) source column before flipping
    if flips is not None:
        cols = torch.where(flips.to(x.device).view(-1, 1), w - 1 - cols, cols)
    flat = ((rows[:, :, None] + m) * (w + 2 * m) + cols[:, None, :] + m).reshape(n, 1, h * w)
    return padded.flatten(2).gather(2, flat.expand(n, c, h * w)).reshape(n, c, h, w)


def rotate_images(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate every square image about its centre by its own angle (degrees, positive = counter-clockwise
    as displayed, so 90 degrees equals ``torch.rot90(x, 1, dims=(-2, -1))``); bilinear, zero fill.

    x: (N, C, H, H) floating; angles: (N,). Returns (N, C, H, H).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_images needs square images, got {tuple(x.shape[-2:])}")
    rad = torch.deg2rad(angles.to(device=x.device, dtype=torch.float64))
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # output (x, y) (image coords, y down) samples the input at (c x - s y, s x + c y)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize_images(x: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Bilinear resize (no antialiasing, ``align_corners=False``) of (N, C, H, W) to (N, C, size, size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel ``(x - mean) / std`` of (N, C, H, W) on the 0-1 scale."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def paste_in_quadrants(x: Tensor, quadrants: Tensor) -> Tensor:
    """Paste (N, C, H, W) images into one quadrant each of a zero (N, C, 2H, 2W) canvas.

    Quadrant q: 0 upper-left, 1 upper-right, 2 lower-left, 3 lower-right (row offset H*(q//2), column
    offset W*(q%2)).
    """
    n, c, h, w = x.shape
    q = quadrants.to(device=x.device, dtype=torch.long)
    canvas = x.new_zeros(n, c, 2, h, 2, w)  # (quadrant row, row, quadrant column, column)
    canvas[torch.arange(n, device=x.device), :, q // 2, :, q % 2, :] = x
    return canvas.view(n, c, 2 * h, 2 * w)
