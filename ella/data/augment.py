"""Training augmentation for CIFAR-10: per-sample random horizontal flip and shift by up to 4 px (pad-4 crop)."""
from __future__ import annotations

import torch
from torch import Tensor

from ella.data.images import shift_images

CIFAR_MAX_SHIFT = 4


def sample_flip_shift(n: int, generator: torch.Generator | None,
                      max_shift: int = CIFAR_MAX_SHIFT) -> tuple[Tensor, Tensor]:
    """Per-sample augmentation parameters: flips (N,) bool with p=0.5, shifts (N, 2) ints in
    [-max_shift, max_shift] (drawn in that order from ``generator``)."""
    flips = torch.rand(n, generator=generator) < 0.5
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    return flips, shifts


def apply_flip_shift(x: Tensor, flips: Tensor, shifts: Tensor) -> Tensor:
    """Horizontally flip the images where ``flips`` is True, then shift them (zero fill) by ``shifts``.

    x: (N, C, H, W); flips: (N,) bool; shifts: (N, 2) ``(dy, dx)``. A shift (dy, dx) equals a crop of the
    4-zero-padded image at offset (4 - dy, 4 - dx).
    """
    return shift_images(x, shifts, flips)


def cifar_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random horizontal flip (p=0.5) and random shift by up to 4 px with zero padding
    (= pad-4 random crop). x: (B, C, H, W) -> (B, C, H, W). ``generator`` is a CPU generator."""
    flips, shifts = sample_flip_shift(x.shape[0], generator)
    return apply_flip_shift(x, flips, shifts)
