"""Relaxed layer: a combination of equivariant and dense paths followed by ReLU (spec 1.0, 1.3, 1.5, 1.12)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ella.layers.polyphase import PolyphaseDownsample

COMBINE_MODES = ("sqrt", "sum", "mean")
# divisor of the summed paths, given the number of paths
_DIVISORS = {"sqrt": math.sqrt, "sum": lambda n: 1, "mean": lambda n: n}


class RelaxedLayer(nn.Module):
    """``ReLU(combine(paths))``: ``(B, C, H, W) -> (B, C', H/s, W/s)`` with ``s = 2`` when ``downsample``.

    Every path declares ``equivariant: bool``. Equivariant paths run at the input resolution; their outputs
    are **summed first and downsampled once** by one :class:`PolyphaseDownsample`, so all equivariant paths
    share one per-sample component choice. This is a deliberate fix of the reference, which selected a
    component per path: independent choices can differ between paths, and the sum is then not equivariant.
    Dense paths map straight to the output resolution and are added afterwards. The sum of the ``P`` paths is
    divided by ``sqrt(P)`` (``combine="sqrt"``, the default), by nothing (``"sum"``, the paper's formula) or by
    ``P`` (``"mean"``, the reference code). Every path is initialised to keep the second moment of its input
    through the ReLU, and independent paths add their variances, so only ``"sqrt"`` keeps the activation scale
    of a deep relaxed network at initialisation: "sum" grows it by ``sqrt(P)`` per block and "mean" shrinks it
    by ``sqrt(P)`` per block (after 8 blocks of F-FC+CONV: x16 and /16). A divisor is a constant, so a path
    switched off by its prior still leaves the others an exact CONV (or GCONV), only rescaled.

    Parameters: ``paths: nn.ModuleDict`` (names ``fc``, ``conv``, ``gconv`` by convention).
    """

    def __init__(
        self,
        paths: dict[str, nn.Module],
        downsample: bool,
        combine: str = "sqrt",
        criterion: str = "l2",
    ) -> None:
        super().__init__()
        if not paths:
            raise ValueError("RelaxedLayer needs at least one path")
        if combine not in COMBINE_MODES:
            raise ValueError(f"RelaxedLayer: unknown combine {combine!r}; expected one of {COMBINE_MODES}")
        for name, path in paths.items():
            if not isinstance(getattr(path, "equivariant", None), bool):
                raise ValueError(
                    f"RelaxedLayer path {name!r} ({type(path).__name__}) lacks a boolean class attribute "
                    "'equivariant'"
                )
        self.paths = nn.ModuleDict(paths)
        self.downsample = downsample
        self.combine = combine
        self.subsample = PolyphaseDownsample(criterion) if downsample else None

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        height, width = x.shape[-2:]
        return (height // 2, width // 2) if self.downsample else (height, width)

    def _check_shape(self, name: str, out: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(out.shape) != expected:
            raise ValueError(
                f"RelaxedLayer path {name!r} produced shape {tuple(out.shape)}, expected {expected} "
                "(all paths must agree on batch and channels; dense paths must map to the output resolution)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C', H/s, W/s)``."""
        height, width = self._output_size(x)
        total: torch.Tensor | None = None
        expected: tuple[int, ...] | None = None
        equivariant = [(n, p) for n, p in self.paths.items() if p.equivariant]
        dense = [(n, p) for n, p in self.paths.items() if not p.equivariant]
        for name, path in equivariant:
            out = path(x)
            if expected is None:
                expected = (x.shape[0], out.shape[1], *x.shape[-2:])
            self._check_shape(name, out, expected)
            total = out if total is None else total + out
        if total is not None and self.subsample is not None:
            total = self.subsample(total)
        for name, path in dense:
            out = path(x)
            expected = (x.shape[0], out.shape[1] if total is None else total.shape[1], height, width)
            self._check_shape(name, out, expected)
            total = out if total is None else total + out
        divisor = _DIVISORS[self.combine](len(self.paths))
        if divisor != 1:
            total = total / divisor
        return F.relu(total)

    def extra_repr(self) -> str:
        return f"downsample={self.downsample}, combine={self.combine!r}"
