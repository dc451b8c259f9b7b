"""Zero-mean isotropic Gaussian priors ``N(0, I / delta)`` with one learnable precision ``delta`` per path.

A *prior group* is a name, not an index: ``"blocks.3.fc"`` is the F-FC path of block 3 (weights and biases of
that path share one precision), ``"head.0"`` the first head layer. With ``per_tensor=True`` every parameter
tensor gets its own group (the reference code's "layerwise" structure, e.g. 52 precisions for F-FC+CONV).
Precisions are parameterised as ``log delta`` and initialised at ``delta = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ella.layers import RelaxedLayer


@dataclass(frozen=True)
class PriorGroup:
    """Parameters that share one prior precision.

    ``layer`` is the owning layer (``"blocks.3"``, ``"head.0"``), ``path`` the path name inside a relaxed layer
    (``"fc"``, ``"conv"``, ``"gconv"``) or ``None`` outside one, ``kind`` the paper's name of the path type
    (``"F-FC"``, ``"CONV"``, ...; ``"Linear"`` for head layers).
    """

    name: str
    layer: str
    path: str | None
    kind: str
    param_names: tuple[str, ...]


def _owners(model: nn.Module) -> dict[str, tuple[str, str | None, str]]:
    """Map each module prefix that owns a prior to ``(layer, path, kind)``: the paths of every relaxed layer,
    however deeply nested (``layer`` is the relaxed layer's module path, ``""`` for the model itself)."""
    owners: dict[str, tuple[str, str | None, str]] = {}
    for layer_name, module in model.named_modules():
        if isinstance(module, RelaxedLayer):
            for path_name, path in module.paths.items():
                owners[_join(layer_name, f"paths.{path_name}")] = (layer_name, path_name, path.kind)
    return owners


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def prior_groups(model: nn.Module, per_tensor: bool = False) -> list[PriorGroup]:
    """Prior groups of ``model`` in parameter order (one per path, or one per tensor with ``per_tensor``).

    A parameter belongs to the innermost relaxed-layer path holding it (a path may itself hold relaxed layers);
    other parameters are grouped by the module owning them. Frozen parameters (``requires_grad=False``) are
    constants of the model, not weights with a prior: they belong to no group.
    """
    owners = _owners(model)
    modules = dict(model.named_modules())
    members: dict[str, list[str]] = {}
    info: dict[str, tuple[str, str | None, str]] = {}
    for name in trainable_names(model):
        prefix = max((p for p in owners if name.startswith(p + ".")), key=len, default=None)
        if prefix is not None:
            layer, path, kind = owners[prefix]
            group = _join(layer, path)
        else:
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            path, kind = None, type(modules[layer]).__name__
            group = layer or name
        if per_tensor:
            group = name
        members.setdefault(group, []).append(name)
        info.setdefault(group, (layer, path, kind))
    return [PriorGroup(g, *info[g], tuple(names)) for g, names in members.items()]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s trainable parameters (``requires_grad``), in ``model.named_parameters()`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class Prior(nn.Module):
    """Isotropic Gaussian prior ``N(0, 1/delta_g)`` per group ``g`` with learnable ``log_precision``.

    ``log_precision``: ``(n_groups,)``; ``group_of_tensor``: ``(n_tensors,)`` index of each parameter tensor's
    group, over the parameters trainable when the prior is built (``param_names``), in
    ``model.named_parameters()`` order.
    """

    def __init__(self, model: nn.Module, per_tensor: bool = False, init_precision: float = 1.0) -> None:
        super().__init__()
        if init_precision <= 0:
            raise ValueError(f"init_precision must be positive, got {init_precision}")
        self.groups = prior_groups(model, per_tensor=per_tensor)
        self.param_names = trainable_names(model)
        if not self.param_names:
            raise ValueError(f"the model ({type(model).__name__}) has no trainable parameter (requires_grad=True), so "
                             "there is nothing to put a prior on")
        position = {name: i for i, name in enumerate(self.param_names)}
        index = torch.empty(len(self.param_names), dtype=torch.long)
        for g, group in enumerate(self.groups):
            for name in group.param_names:
                index[position[name]] = g
        device = next(model.parameters()).device
        self.register_buffer("group_of_tensor", index.to(device))
        self.log_precision = nn.Parameter(torch.full((len(self.groups),), float(init_precision)).log().to(device))

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def precisions(self) -> torch.Tensor:
        """``(n_groups,)`` precisions ``delta_g``."""
        return self.log_precision.exp()

    def tensor_precisions(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(n_tensors,)`` precision of each parameter tensor, differentiable in ``log_precision``; with
        ``dtype`` the exponential is taken in that precision (e.g. float64 for the marginal likelihood)."""
        return self.log_precision.to(dtype or self.log_precision.dtype)[self.group_of_tensor].exp()

    def squared_norms(self, model: nn.Module) -> torch.Tensor:
        """``(n_tensors,)`` squared norms ``||theta_t||^2`` of the tensors ``param_names`` (differentiable in
        theta)."""
        params = dict(model.named_parameters())
        return torch.stack([params[name].pow(2).sum() for name in self.param_names])

    def penalty(self, model: nn.Module, detach_precision: bool = True) -> torch.Tensor:
        """``0.5 * sum_t delta_t ||theta_t||^2``: the negative log prior up to constants."""
        delta = self.tensor_precisions()
        if detach_precision:
            delta = delta.detach()
        return 0.5 * (delta * self.squared_norms(model)).sum()

    def as_dict(self) -> dict[str, float]:
        """Group name -> precision, for logs."""
        return dict(zip(self.group_names, self.precisions().tolist()))
