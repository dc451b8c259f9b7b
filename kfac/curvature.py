"""Kronecker-factored curvature blocks and their accumulation.

Storage convention (what :class:`KronBlock` holds, *raw sums*, so that blocks add across batches and
processes without knowing the data-set size in advance):

- two-factor block: ``out_factors`` ``(K_out, o, o)`` with ``K_out in {1, K}`` and ``in_factors``
  ``(K, i, i)``. The GGN block summed over the data set is approximated by
  ``(1 / n_data) * sum_k B_k (x) A_k``; the ``1 / n_data`` (the ``A / N`` of laplace-torch) is applied by
  :meth:`KronCurvature.scaled_factors`, :meth:`KronCurvature.dense` and :meth:`KronCurvature.decompose`.
  Layouts (``layout``):

  * ``"kron"``: ``K = K_out = 1``, ``B (x) A`` in the parameter's ``(shape[0], rest)`` flattening.
  * ``"direct_sum"``: ``K = K_out = G``, weight ``(O, G, I)``; group ``g`` owns ``weight[:, g, :]`` with
    block ``B_g (x) A_g`` and groups are uncoupled (e.g. a grouped linear layer's per-group blocks).
  * ``"shared_out"``: ``K_out = 1``, ``K = G``: ``B (x) blockdiag(A_1..A_G)`` in the ``(O, G*I)`` flattening
    (one output factor shared by the groups; representable as one laplace-torch Kronecker product).

- one-factor block (biases): ``out_factors`` ``(1, o, o)``, ``in_factors`` ``None``, ``layout="single"``:
  the GGN block itself, summed over the data (no ``1 / n_data``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import block_diag

from kfac.decomposition import KronDecomposition
from kfac.options import registered_options

LAYOUTS = ("kron", "direct_sum", "shared_out", "single")


@dataclass
class KronBlock:
    """Curvature of one parameter tensor; see the module docstring for the storage convention."""

    name: str
    param_shape: torch.Size
    layout: str
    out_factors: torch.Tensor
    in_factors: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"block {self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        if (self.in_factors is None) != (self.layout == "single"):
            raise ValueError(f"block {self.name}: layout {self.layout!r} and in_factors do not agree")

    def _check_addable(self, other: KronBlock) -> None:
        if (self.name, self.layout, tuple(self.param_shape)) != (other.name, other.layout, tuple(other.param_shape)):
            raise ValueError(f"cannot add block {other.name} ({other.layout}) to {self.name} ({self.layout})")

    def __add__(self, other: KronBlock) -> KronBlock:
        self._check_addable(other)
        in_factors = None if self.in_factors is None else self.in_factors + other.in_factors
        return KronBlock(self.name, self.param_shape, self.layout, self.out_factors + other.out_factors, in_factors)

    def add_(self, other: KronBlock) -> KronBlock:
        """Add ``other``'s factors onto this block's own, in place (no new factor tensors); returns ``self``."""
        self._check_addable(other)
        self.out_factors += other.out_factors
        if self.in_factors is not None:
            self.in_factors += other.in_factors
        return self

    def num_params(self) -> int:
        return int(torch.Size(self.param_shape).numel())

    def to_dense(self, n_data: int) -> torch.Tensor:
        """Dense ``(P, P)`` matrix in the parameter's flattening order (for tests and small models)."""
        b = self.out_factors
        if self.layout == "single":
            return b[0].clone()
        a = self.in_factors / n_data
        if self.layout == "kron":
            return torch.kron(b[0], a[0])
        if self.layout == "shared_out":
            return torch.kron(b[0], block_diag(*a))
        groups, o, i = a.shape[0], b.shape[1], a.shape[1]
        eye = torch.eye(groups, dtype=a.dtype, device=a.device)
        dense = torch.einsum("gpq,gij,gh->pgiqhj", b, a, eye)
        return dense.reshape(o * groups * i, o * groups * i)

    def laplace_factors(self, n_data: int) -> list[torch.Tensor]:
        """laplace-torch ``Kron`` entry: ``[B, A / N]`` or ``[B]``; ``direct_sum`` blocks cannot be expressed."""
        if self.layout == "single":
            return [self.out_factors[0]]
        if self.layout == "direct_sum":
            kron_values = [f"{o.name}={o.kron_value!r}" for o in registered_options() if o.kron_value is not None]
            raise ValueError(
                f"block {self.name}: per-group (direct-sum) curvature has no single Kronecker product; "
                f"use {' or '.join(kron_values) or 'a single-product layout'} for laplace-torch"
            )
        a = self.in_factors / n_data
        return [self.out_factors[0], a[0] if self.layout == "kron" else block_diag(*a)]


class KronCurvature:
    """Per-parameter :class:`KronBlock` s (``model.named_parameters()`` order), ``n_data`` and summed loss."""

    def __init__(self, blocks: dict[str, KronBlock], n_data: int, loss: torch.Tensor | float) -> None:
        self.blocks = dict(blocks)
        self.n_data = int(n_data)
        self.loss = loss

    def __add__(self, other: KronCurvature) -> KronCurvature:
        if list(self.blocks) != list(other.blocks):
            raise ValueError("cannot add curvatures over different parameter sets")
        blocks = {name: block + other.blocks[name] for name, block in self.blocks.items()}
        return KronCurvature(blocks, self.n_data + other.n_data, self.loss + other.loss)

    def add_(self, other: KronCurvature) -> KronCurvature:
        """Accumulate ``other`` into this curvature's own factor tensors (as ``+``, without new tensors)."""
        if list(self.blocks) != list(other.blocks):
            raise ValueError("cannot add curvatures over different parameter sets")
        for name, block in self.blocks.items():
            block.add_(other.blocks[name])
        self.n_data += other.n_data
        self.loss = self.loss + other.loss
        return self

    @property
    def block_names(self) -> list[str]:
        return list(self.blocks)

    def dense(self, name: str) -> torch.Tensor:
        """Dense GGN approximation of parameter ``name`` summed over the data, ``(P, P)``."""
        return self.blocks[name].to_dense(self.n_data)

    def scaled_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B (K_out, o, o), A / n_data (K, i, i))`` or ``(B (1, o, o), None)`` for one-factor blocks."""
        block = self.blocks[name]
        a = None if block.in_factors is None else block.in_factors / self.n_data
        return block.out_factors, a

    def decompose(self, **kwargs) -> KronDecomposition:
        """Eigendecompose every factor once; see :class:`~kfac.decomposition.KronDecomposition`."""
        return KronDecomposition.from_curvature(self, **kwargs)
