"""laplace-torch backends computing ``kron`` with this package's KFAC rules (stock and registered ones).

Usage: ``laplace.KronLaplace(model, "classification", backend=KfacGGN)``. The backends return one
laplace ``Kron`` entry per trainable parameter tensor in ``model.parameters()`` order, following
laplace-torch 0.3's conventions (checked against its curvlinops backend): ``[B (out x out), A / N (in x in)]``
for weights (laplace flattens a parameter as ``shape[0] x rest``; the rules' factors use exactly that layout),
``[B]`` for biases, with raw sums over the batch so that ``KronLaplace``'s summation over batches gives
``(1/N) sum B (x) sum A``. The returned loss is the summed negative log likelihood (cross-entropy, or
``0.5 * ||y - f||^2`` for regression, i.e. laplace's ``factor * MSELoss(sum)``).

Factors are checked: a batch's factor and the summed factors that ``KronLaplace.fit`` eigendecomposes must be
finite (laplace-torch's eigendecomposition calls ``exit()`` when it fails), else :class:`kfac.CurvatureError`
names the block; a ``SystemExit`` from that eigendecomposition becomes one too.

Limits: every block must be one Kronecker product, so every registered option with a ``kron_value``
(:class:`kfac.RuleOption`) is set to it (another value is a ValueError); laplace's ``Kron.init_from_model``
rejects parameters of more than 4 dimensions, so models with such weights cannot be used with ``KronLaplace``
at all — use :func:`kfac.fit_kfac` and :class:`kfac.KronDecomposition` for them. ``last_layer`` and subnetworks
are not supported.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.curvature import EFInterface, GGNInterface
from laplace.utils import Kron, KronDecomposed
from torch import nn

from kfac.decomposition import CurvatureError
from kfac.fit import kfac_batch
from kfac.options import registered_options

_SIDES = ("output-side", "input-side")


def _check_finite(name: str, factors: list[torch.Tensor], what: str) -> None:
    """Raise CurvatureError naming block ``name`` unless every factor of its laplace entry is finite."""
    for side, factor in zip(_SIDES, factors):
        if not bool(torch.isfinite(factor).all()):
            raise CurvatureError(
                f"block {name} ({side} factor): {what} has inf or NaN entries (inputs or parameters too large for "
                f"{factor.dtype}?), so laplace-torch could not eigendecompose it"
            )


class _CheckedKron(Kron):
    """laplace ``Kron`` that knows its blocks' names: sums with laplace's own ``Kron`` (``KronLaplace.fit``
    adds the batches onto a zero ``Kron``, which calls ``__radd__`` here first) stay checked, and
    :meth:`decompose` checks every block before laplace-torch's eigendecomposition can call ``exit()``."""

    def __init__(self, kfacs: list[list[torch.Tensor]], names: list[str]) -> None:
        super().__init__(kfacs)
        self.names = names

    def __add__(self, other: Kron) -> _CheckedKron:
        return _CheckedKron(super().__add__(other).kfacs, self.names)

    def __radd__(self, other: Kron) -> _CheckedKron:
        return _CheckedKron(Kron.__add__(other, self).kfacs, self.names)

    def decompose(self, damping: bool = False) -> KronDecomposed:
        """laplace-torch's decomposition, block by block (the same numbers); raise CurvatureError naming the block
        whose summed factors are not finite (laplace-torch would call ``exit()`` or, where its eigendecomposition
        succeeds, silently replace the inf or NaN eigenvalues by finite ones) or whose decomposition exits."""
        eigenvectors, eigenvalues = [], []
        for name, factors in zip(self.names, self.kfacs):
            _check_finite(name, factors, "the factor summed over the batches")
            try:
                block = Kron([factors]).decompose(damping)
            except SystemExit:
                raise CurvatureError(f"block {name}: laplace-torch's eigendecomposition failed (it called exit())") from None
            eigenvectors.append(block.eigenvectors[0])
            eigenvalues.append(block.eigenvalues[0])
        return KronDecomposed(eigenvectors, eigenvalues, damping=damping)


class _KfacKron:
    """Mixin implementing ``kron`` with :func:`kfac.fit.kfac_batch` (one Kronecker product per tensor)."""

    curvature_type = "ggn"

    def _setup(self, last_layer: bool, subnetwork_indices, kfac_options: dict[str, Any]) -> None:
        if last_layer or subnetwork_indices is not None:
            raise NotImplementedError("the kfac backends support neither last_layer nor subnetworks")
        forced = {}
        for option in registered_options():
            if option.kron_value is None:
                continue
            if kfac_options.get(option.name, option.kron_value) != option.kron_value:
                raise ValueError(
                    f"laplace-torch needs one Kronecker product per tensor: {option.name} must be {option.kron_value!r}"
                )
            forced[option.name] = option.kron_value
        self.kfac_options = {**kfac_options, **forced}

    def kron(
        self, x: torch.Tensor | MutableMapping, y: torch.Tensor, N: int, **kwargs: Any
    ) -> tuple[torch.Tensor, Kron]:
        """Summed loss and laplace ``Kron`` of the batch ``(x, y)`` for a data set of size ``N``."""
        if isinstance(x, MutableMapping):
            raise NotImplementedError("the kfac backends need tensor inputs")
        options = {**self.kfac_options, **kwargs}
        if self.curvature_type == "mc":
            options.setdefault("mc_samples", self.num_samples)
        curvature = kfac_batch(self.model, x, y, self.likelihood, self.curvature_type, **options)
        names = list(self.params_dict)
        kfacs = [curvature.blocks[name].laplace_factors(N) for name in names]
        for name, factors in zip(names, kfacs):
            _check_finite(name, factors, "the factor of a batch")
        return curvature.loss.detach(), _CheckedKron(kfacs, names)


class KfacGGN(_KfacKron, GGNInterface):
    """Exact GGN (``stochastic=False``) or Monte-Carlo Fisher (``stochastic=True``, ``num_samples`` draws).

    Extra keyword arguments (via laplace's ``backend_kwargs``) are KFAC options of :func:`kfac.kfac_batch`
    (``position_norm``, ``kfac_approx``, ``rank_reduced``, ``backward``, ``factor_dtype``, registered options).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **kfac_options: Any,
    ) -> None:
        self._setup(last_layer, subnetwork_indices, kfac_options)
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic, num_samples
        )
        self.curvature_type = "mc" if stochastic else "ggn"


class KfacMC(KfacGGN):
    """Monte-Carlo Fisher KFAC (``num_samples`` sampled labels per input)."""

    def __init__(self, model: nn.Module, likelihood: str, num_samples: int = 1, **kwargs: Any) -> None:
        kwargs.pop("stochastic", None)
        super().__init__(model, likelihood, stochastic=True, num_samples=num_samples, **kwargs)


class KfacEF(_KfacKron, EFInterface):
    """Empirical-Fisher KFAC (loss gradient at the observed targets)."""

    curvature_type = "ef"

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        **kfac_options: Any,
    ) -> None:
        self._setup(last_layer, subnetwork_indices, kfac_options)
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)


# the names these backends had before (kept so that existing code keeps working)
EllaGGN, EllaMC, EllaEF = KfacGGN, KfacMC, KfacEF
