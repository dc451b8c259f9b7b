"""Numerical equivariance checks for layers and small networks.

Every check returns the largest absolute deviation found (0 up to round-off for an exactly equivariant
module). Translations are circular shifts ``torch.roll(x, (s, t), dims=(-2, -1))``; rotations are
``torch.rot90`` on plain maps and :func:`~ella.layers.group.rotate_p4` on common-frame p4 maps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch

from ella.layers.group import rotate_p4

Module = Callable[[torch.Tensor], torch.Tensor]


def shift(x: torch.Tensor, s: int, t: int) -> torch.Tensor:
    """Circular shift of ``(..., H, W)`` by ``s`` rows and ``t`` columns."""
    return torch.roll(x, shifts=(s, t), dims=(-2, -1))


def candidate_output_shifts(s: int, factor: int) -> list[int]:
    """Output shifts compatible with an input shift ``s`` after total downsampling by ``factor``.

    One APS stage maps ``s`` to ``floor(s/2)`` or ``ceil(s/2)``; composing stages keeps the result in
    ``[floor(s/factor), ceil(s/factor)]``.
    """
    if factor < 1:
        raise ValueError(f"downsampling factor must be >= 1, got {factor}")
    return list(range(math.floor(s / factor), math.ceil(s / factor) + 1))


def _per_sample_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Max absolute difference per sample: ``(B, ...) x2 -> (B,)``."""
    return (a - b).abs().flatten(1).amax(1)


@torch.no_grad()
def check_translation_equivariance(
    module: Module, x: torch.Tensor, shifts: Iterable[tuple[int, int]], factor: int = 1
) -> float:
    """Max over ``shifts`` and samples of ``min_{(s', t')} |module(shift(x, s, t)) - shift(module(x), s', t')|``.

    ``x`` is ``(B, C, H, W)``; the output must be ``(B, C', H/factor, W/factor)``. ``factor`` is the module's
    total downsampling; the output shift ``(s', t')`` is searched per sample among
    :func:`candidate_output_shifts` (exactly ``(s, t)`` for ``factor = 1``).
    """
    reference = module(x)
    worst = 0.0
    for s, t in shifts:
        moved = module(shift(x, s, t))
        candidates = itertools.product(candidate_output_shifts(s, factor), candidate_output_shifts(t, factor))
        errors = torch.stack(
            [_per_sample_error(moved, shift(reference, a, b)) for a, b in candidates]
        )  # (n_candidates, B)
        worst = max(worst, errors.amin(0).max().item())
    return worst


@torch.no_grad()
def check_translation_invariance(module: Module, x: torch.Tensor, shifts: Iterable[tuple[int, int]]) -> float:
    """Max over ``shifts`` of ``|module(shift(x, s, t)) - module(x)|`` (any output shape)."""
    reference = module(x)
    return max((module(shift(x, s, t)) - reference).abs().max().item() for s, t in shifts)


def _rotate(x: torch.Tensor, r: int, group: bool) -> torch.Tensor:
    return rotate_p4(x, r) if group else torch.rot90(x, r, dims=(-2, -1))


@torch.no_grad()
def check_rotation_equivariance(
    module: Module, x: torch.Tensor, r: int = 1, group_input: bool = False, group_output: bool = False
) -> float:
    """``|module(rotate(x)) - rotate(module(x))|`` for ``r`` quarter turns.

    ``group_input`` / ``group_output`` select :func:`rotate_p4` (common-frame p4 maps ``(B, 4C, H, W)``)
    instead of a plain ``rot90`` for the input / output.
    """
    moved = module(_rotate(x, r, group_input))
    return (moved - _rotate(module(x), r, group_output)).abs().max().item()


@torch.no_grad()
def check_rotation_invariance(module: Module, x: torch.Tensor, r: int = 1, group_input: bool = False) -> float:
    """``|module(rotate(x)) - module(x)|`` for ``r`` quarter turns (any output shape)."""
    return (module(_rotate(x, r, group_input)) - module(x)).abs().max().item()
