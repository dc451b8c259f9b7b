"""laplace-torch backends computing ``kron`` with this package's KFAC rules (all ella layers + stock ones).

Usage: ``laplace.KronLaplace(model, "classification", backend=EllaGGN)``. The backends return one
laplace ``Kron`` entry per trainable parameter tensor in ``model.parameters()`` order, following
laplace-torch 0.3's conventions (checked against its curvlinops backend): ``[B (out x out), A / N (in x in)]``
for weights (laplace flattens a parameter as ``shape[0] x rest``; our factors use exactly that layout for
Linear, Conv2d, GroupedLinear ``(O, G*I)``, SparseConv ``(C', C*M)``, Lifting/pointwise GroupConv
``(C', C*k*k)``), ``[B]`` for biases, with raw sums over the batch so that ``KronLaplace``'s summation over
batches gives ``(1/N) sum B (x) sum A``. The returned loss is the summed negative log likelihood
(cross-entropy, or ``0.5 * ||y - f||^2`` for regression, i.e. laplace's ``factor * MSELoss(sum)``).

Limits: GroupedLinear blocks use ``grouped_mode="reference"`` (a per-group direct sum has no single
Kronecker product); laplace's ``Kron.init_from_model`` rejects 5-D parameters, so ``GroupConv(mode="full")``
(weight ``(C', C, 4, k, k)``) cannot be used with ``KronLaplace`` at all — use :func:`kfac.fit_kfac` and
:class:`kfac.KronDecomposition` for such models. ``last_layer`` and subnetworks are not supported.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from laplace.curvature import EFInterface, GGNInterface
from laplace.utils import Kron
from torch import nn

from kfac.fit import kfac_batch


class _EllaKron:
    """Mixin implementing ``kron`` with :func:`kfac.fit.kfac_batch` (reference mode for GroupedLinear)."""

    curvature_type = "ggn"

    def _setup(self, last_layer: bool, subnetwork_indices, kfac_options: dict[str, Any]) -> None:
        if last_layer or subnetwork_indices is not None:
            raise NotImplementedError("the ella KFAC backends support neither last_layer nor subnetworks")
        if kfac_options.get("grouped_mode", "reference") != "reference":
            raise ValueError("laplace-torch needs one Kronecker product per tensor: grouped_mode must be 'reference'")
        self.kfac_options = {**kfac_options, "grouped_mode": "reference"}

    def kron(
        self, x: torch.Tensor | MutableMapping, y: torch.Tensor, N: int, **kwargs: Any
    ) -> tuple[torch.Tensor, Kron]:
        """Summed loss and laplace ``Kron`` of the batch ``(x, y)`` for a data set of size ``N``."""
        if isinstance(x, MutableMapping):
            raise NotImplementedError("the ella KFAC backends need tensor inputs")
        options = {**self.kfac_options, **kwargs}
        if self.curvature_type == "mc":
            options.setdefault("mc_samples", self.num_samples)
        curvature = kfac_batch(self.model, x, y, self.likelihood, self.curvature_type, **options)
        kfacs = [curvature.blocks[name].laplace_factors(N) for name in self.params_dict]
        return curvature.loss.detach(), Kron(kfacs)


class EllaGGN(_EllaKron, GGNInterface):
    """Exact GGN (``stochastic=False``) or Monte-Carlo Fisher (``stochastic=True``, ``num_samples`` draws).

    Extra keyword arguments (via laplace's ``backend_kwargs``) are KFAC options of :func:`kfac.kfac_batch`
    (``rotation_mode``, ``position_norm``, ``rank_reduced``, ``backward``, ``factor_dtype``).
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


class EllaMC(EllaGGN):
    """Monte-Carlo Fisher KFAC (``num_samples`` sampled labels per input)."""

    def __init__(self, model: nn.Module, likelihood: str, num_samples: int = 1, **kwargs: Any) -> None:
        kwargs.pop("stochastic", None)
        super().__init__(model, likelihood, stochastic=True, num_samples=num_samples, **kwargs)


class EllaEF(_EllaKron, EFInterface):
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
