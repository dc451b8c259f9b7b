"""Eigendecomposed Kronecker curvature: log-determinants and effective parameter counts.

For a block with factor eigenvalues ``beta (K_out, o)`` and ``alpha (K, i)`` (``alpha`` already divided by
``n_data``; ``K_out`` is 1 or ``K``) the block's GGN eigenvalues are ``lambda[k, j, i] = beta[k, j] alpha[k, i]``
(``beta`` broadcast over ``k`` when shared); one-factor (bias) blocks have ``lambda = beta``. Negative
eigenvalues (round-off) are clamped to 0. With a per-block prior precision ``delta_l``:

- ``logdet(delta)[l] = sum log(lambda + delta_l)`` (log-determinant of GGN block + ``delta_l I``),
- ``effective_params(delta)[l] = sum lambda / (lambda + delta_l)`` (MacKay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kfac.curvature import KronCurvature

logger = logging.getLogger(__name__)

class CurvatureError(RuntimeError):
    """The curvature cannot be computed: the model output of a batch is not finite, or a factor could not be
    eigendecomposed (the message names the block)."""


def _eigh(matrix: torch.Tensor, what: str, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition of ``(..., n, n)`` in float64 (float32 LAPACK fails on the many zero
    eigenvalues that dead ReLUs cause); on failure or non-finite output retry with a tiny jitter."""
    if not torch.isfinite(matrix).all():
        raise CurvatureError(f"{what}: factor has non-finite entries")
    wide = matrix.double()
    sym = 0.5 * (wide + wide.transpose(-1, -2))
    try:
        vals, vecs = torch.linalg.eigh(sym)
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            return vals, vecs
        first: Exception = RuntimeError("non-finite eigenpairs")
    except (torch.linalg.LinAlgError, RuntimeError) as error:
        first = error
    logger.warning("eigh failed for %s (%s); retrying with jitter", what, first)
    n = sym.shape[-1]
    scale = sym.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)
    eye = torch.eye(n, dtype=sym.dtype, device=sym.device)
    try:
        vals, vecs = torch.linalg.eigh(sym + jitter * scale[..., None, None] * eye)
    except (torch.linalg.LinAlgError, RuntimeError) as second:
        raise CurvatureError(f"{what}: eigendecomposition failed twice ({second})") from second
    if not (torch.isfinite(vals).all() and torch.isfinite(vecs).all()):
        raise CurvatureError(f"{what}: eigendecomposition returned non-finite values twice")
    return vals, vecs


@dataclass
class BlockEigen:
    """Eigen-pairs of one block: ``out_vals (K_out, o)``, ``out_vecs (K_out, o, o)``, ``in_* (K, i[, i])``."""

    out_vals: torch.Tensor
    out_vecs: torch.Tensor
    in_vals: torch.Tensor | None
    in_vecs: torch.Tensor | None
    num_params: int

    def eigenvalues(self) -> torch.Tensor:
        """``(num_params,)`` the block's GGN eigenvalues ``beta[k, j] alpha[k, i]`` (clamped at 0), flat."""
        beta = self.out_vals.clamp_min(0.0)
        if self.in_vals is None:
            return beta.reshape(-1)
        alpha = self.in_vals.clamp_min(0.0)
        return (beta.expand(alpha.shape[0], beta.shape[1])[:, :, None] * alpha[:, None, :]).reshape(-1)


class KronDecomposition:
    """Eigendecomposition of every factor of a :class:`~kfac.curvature.KronCurvature` (done once)."""

    def __init__(self, names: list[str], eigen: list[BlockEigen], n_data: int, loss) -> None:
        self.block_names = list(names)
        self.eigen = list(eigen)
        self.n_data = n_data
        self.loss = loss
        self._eigenvalues: torch.Tensor | None = None

    @classmethod
    def from_curvature(cls, curvature: KronCurvature, jitter: float = 1e-10) -> KronDecomposition:
        eigen = []
        for name in curvature.block_names:
            b, a = curvature.scaled_factors(name)
            out_vals, out_vecs = _eigh(b, f"block {name} (output-side factor)", jitter)
            in_vals = in_vecs = None
            if a is not None:
                in_vals, in_vecs = _eigh(a, f"block {name} (input-side factor)", jitter)
            eigen.append(BlockEigen(out_vals, out_vecs, in_vals, in_vecs, curvature.blocks[name].num_params()))
        return cls(curvature.block_names, eigen, curvature.n_data, curvature.loss)

    def num_params(self) -> list[int]:
        """Parameter count of every block (in ``block_names`` order)."""
        return [e.num_params for e in self.eigen]

    def _check_delta(self, delta: torch.Tensor) -> torch.Tensor:
        delta = torch.as_tensor(delta)
        if delta.dim() == 0:
            delta = delta.expand(len(self.eigen))
        if delta.shape != (len(self.eigen),):
            raise ValueError(f"delta must have one entry per block ({len(self.eigen)}), got {tuple(delta.shape)}")
        return delta

    def eigenvalues(self) -> torch.Tensor:
        """``(sum_l num_params_l,)`` every block's GGN eigenvalues (clamped at 0), block after block in
        ``block_names`` order (formed once, then cached); :meth:`segment_lengths` says where each block ends."""
        if self._eigenvalues is None:
            self._eigenvalues = torch.cat([e.eigenvalues() for e in self.eigen])
        return self._eigenvalues

    def block_eigenvalues(self, index: int) -> torch.Tensor:
        """``(num_params,)`` the GGN eigenvalues of block ``index``: a view of :meth:`eigenvalues`."""
        start = sum(self.num_params()[:index])
        return self.eigenvalues()[start : start + self.eigen[index].num_params]

    def segment_lengths(self) -> torch.Tensor:
        """``(n_blocks,)`` int64 on the eigenvalues' device: the number of eigenvalues of each block."""
        return torch.tensor(self.num_params(), device=self.eigen[0].out_vals.device)

    def _reduce(self, delta: torch.Tensor, fn) -> torch.Tensor:
        delta = self._check_delta(delta)
        lam = self.eigenvalues()
        lengths = self.segment_lengths()
        shifted = delta.to(lam).repeat_interleave(lengths, output_size=lam.numel())
        return torch.segment_reduce(fn(lam, shifted), "sum", lengths=lengths)

    def logdet(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-block ``log det(GGN_l + delta_l I)``, ``(n_blocks,)``, differentiable in ``delta``."""
        return self._reduce(delta, lambda lam, d: torch.log(lam + d))

    def effective_params(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-block MacKay effective parameter count ``sum lambda / (lambda + delta_l)``, ``(n_blocks,)``."""
        return self._reduce(delta, lambda lam, d: lam / (lam + d))
