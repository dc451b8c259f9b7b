"""A bank of independent linear maps, one per group, with a bias shared over the groups."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupedLinear(nn.Module):
    """``G`` independent linear maps ``I -> O`` applied to ``(B, G, I)`` inputs.

    ``out[n, g, o] = sum_i weight[o, g, i] * x[n, g, i] + bias[o]``

    Parameters: ``weight (O, G, I)``, ``bias (O)`` (shared over the groups; absent when ``bias=False``).
    Init: ``weight ~ Uniform(+-sqrt(3 * init_variance))`` (variance ``init_variance``, default ``1/I``), bias 0.
    Used for both stages of :class:`~ella.layers.factored.FactoredFC` and :class:`~ella.layers.sparse.SparseFC`.
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_variance: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("groups", groups), ("in_features", in_features), ("out_features", out_features)):
            if value < 1:
                raise ValueError(f"GroupedLinear: {name} must be >= 1, got {value}")
        if init_variance is not None and init_variance <= 0:
            raise ValueError(f"GroupedLinear: init_variance must be positive, got {init_variance}")
        self.groups = groups
        self.in_features = in_features
        self.out_features = out_features
        self.init_variance = 1.0 / in_features if init_variance is None else float(init_variance)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, groups, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform weights with variance ``init_variance``; zero bias."""
        bound = math.sqrt(3.0 * self.init_variance)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, G, I) -> (B, G, O)``."""
        if x.dim() != 3 or x.shape[1:] != (self.groups, self.in_features):
            raise ValueError(
                f"GroupedLinear expects input (B, {self.groups}, {self.in_features}), got {tuple(x.shape)}"
            )
        out = torch.einsum("ogi,ngi->ngo", self.weight, x)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
