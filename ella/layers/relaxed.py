"""Relaxed layer: a combination of equivariant and dense paths followed by ReLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ella.layers.polyphase import CRITERIA, phase_index, take_phase

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

    Strided paths: an equivariant path with ``stride == 2`` (e.g. ``Conv(..., stride=2)``, as
    :func:`ella.models.build_model` builds them for downsampling blocks) computes only the chosen component:
    the layer picks the components from the paths' full-resolution outputs without gradients
    (``path.full_resolution(x)``), then calls ``path(x, phase)``, whose stride-2 convolution costs a quarter
    of the full one, in the forward and in every backward (training, and each KFAC direction). The result is
    the same function. Other equivariant paths run at full resolution and are subsampled with the same choice.

    Parameters: ``paths: nn.ModuleDict`` (names ``fc``, ``conv``, ``gconv`` by convention); every path declares
    ``equivariant`` and ``kind`` (the paper's name of its type, which the report shows).
    :func:`ella.layers.relaxed_layer` builds the library's paths from a layer name and the layer's shape.
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
        if criterion not in CRITERIA:
            raise ValueError(f"RelaxedLayer: unknown criterion {criterion!r}; expected one of {CRITERIA}")
        for name, path in paths.items():
            if not isinstance(getattr(path, "equivariant", None), bool):
                raise ValueError(
                    f"RelaxedLayer path {name!r} ({type(path).__name__}) lacks a boolean class attribute "
                    "'equivariant'"
                )
            if not isinstance(getattr(path, "kind", None), str):
                raise ValueError(
                    f"RelaxedLayer path {name!r} ({type(path).__name__}) lacks a string class attribute 'kind' "
                    "(the path type the report names, e.g. 'CONV')"
                )
            stride = _stride(path)
            if stride != 1 and (stride != 2 or not path.equivariant or not downsample):
                raise ValueError(
                    f"RelaxedLayer path {name!r} has stride {stride}: only equivariant paths of a downsampling "
                    "layer may have stride 2"
                )
        self.paths = nn.ModuleDict(paths)
        self.downsample = downsample
        self.combine = combine
        self.criterion = criterion

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
        total = self._equivariant_sum(x)
        for name, path in self.paths.items():
            if not path.equivariant:
                total = self._add(total, name, path(x), x.shape[0], self._output_size(x))
        divisor = _DIVISORS[self.combine](len(self.paths))
        if divisor != 1:
            total = total / divisor
        return F.relu(total)

    def _add(
        self, total: torch.Tensor | None, name: str, out: torch.Tensor, batch: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """``total + out`` after checking that ``out`` is ``(batch, C', *size)`` with the channels of ``total``."""
        channels = out.shape[1] if total is None else total.shape[1]
        self._check_shape(name, out, (batch, channels, *size))
        return out if total is None else total + out

    def _equivariant_sum(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of the equivariant paths at the output resolution (one component choice per sample), or None."""
        batch = x.shape[0]
        total = None
        for name, path in self.paths.items():
            if path.equivariant and _stride(path) == 1:
                total = self._add(total, name, path(x), batch, tuple(x.shape[-2:]))
        strided = [(name, path) for name, path in self.paths.items() if _stride(path) == 2]
        if not self.downsample or (total is None and not strided):
            return total
        with torch.no_grad():
            outputs = [path.full_resolution(x) for _, path in strided] + ([] if total is None else [total])
            index = phase_index(sum(outputs), self.criterion)
        total = None if total is None else take_phase(total, index)
        for name, path in strided:
            total = self._add(total, name, path(x, index), batch, self._output_size(x))
        return total

    def extra_repr(self) -> str:
        return f"downsample={self.downsample}, combine={self.combine!r}, criterion={self.criterion!r}"


def _stride(path: nn.Module) -> int:
    """A path's ``stride`` attribute (1 when it has none)."""
    return getattr(path, "stride", 1)
