"""Training augmentation for CIFAR-10: per-sample random horizontal flip and shift by up to 4 px (pad-4 crop)."""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class FlipShift:
    """Per-sample random horizontal flip (p=0.5) and random shift by up to ``max_shift`` px with zero padding
    (= pad-``max_shift`` random crop): ``augment(x (B, C, H, W), generator) -> (B, C, H, W)``.

    Drawing the parameters (``sample``, from a CPU generator) and applying them (``apply``, on the images'
    device, free of host synchronisation) are separate, so that a whole epoch's parameters can be drawn
    ahead and applied inside a captured CUDA graph (:mod:`ella.static_step`).
    """

    max_shift: int = CIFAR_MAX_SHIFT

    def sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """``(flips (n,) bool, shifts (n, 2) int64)``, drawn as :func:`sample_flip_shift` draws them."""
        return sample_flip_shift(n, generator, self.max_shift)

    def apply(self, x: Tensor, params: tuple[Tensor, Tensor]) -> Tensor:
        flips, shifts = params
        return shift_images(x, shifts, flips, pad=self.max_shift)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x, self.sample(x.shape[0], generator))


cifar_augment = FlipShift()  # the CIFAR training augmentation (flip, shift by up to 4 px)
