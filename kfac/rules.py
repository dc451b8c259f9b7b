"""Per-module rules: which factors a module's parameters get, and the lookup of a module's rule.

A rule (:data:`Rule`) applied to a recorded module is a :class:`FactorBuilder`: it receives the output
gradients ``G`` of all ``D`` loss-Hessian square-root directions in chunks ``(D_i, *output.shape)`` while the
backward runs, keeps only the statistics it needs (:mod:`kfac.statistics`), and forms the blocks of the
module's trainable ``weight`` and ``bias`` at the end. Rules are found by module type (:func:`find_rule`):
:func:`register_rule` adds a rule for a module class (the way other packages teach kfac their layers, with the
options their rules read registered by :func:`kfac.options.register_option`).

Stock rules (they also apply to subclasses of these classes):

- ``nn.Linear``: ``a`` = input rows (extra leading axes are positions).
- ``nn.Conv2d`` (``groups=1``; any stride/dilation/padding, any ``padding_mode``): ``a`` = im2col patches of
  the input padded exactly as the module pads it, layout ``(C, kh, kw)`` matching ``weight (O, C, kh, kw)``
  (:func:`kfac.patches.conv_patches`). When the (padded) input of a stride-1 conv is periodic with the output's
  period (circular padding, checked exactly), ``A`` comes from the input's circular cross-correlations
  (:func:`kfac.patches.periodic_gram`) without patches.

Both share their weight over positions (:class:`SharedWeightBuilder`): KFAC-expand or -reduce with an exact
bias, as :mod:`kfac.statistics` describes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from kfac.curvature import KronBlock
from kfac.options import RuleOptions
from kfac.patches import Patches, conv_patches
from kfac.statistics import position_stats

HANDLED_PARAMS = frozenset({"weight", "bias"})


class FactorBuilder(ABC):
    """A rule applied to one recorded module: :meth:`add` takes the output gradients of some directions,
    ``(D_i, *output.shape)``, as the backward produces them (any number of chunks, in any order);
    :meth:`blocks` returns the module's curvature blocks."""

    @abstractmethod
    def add(self, grads: torch.Tensor) -> None:
        """Take the output gradients of some more directions."""

    @abstractmethod
    def blocks(self) -> dict[str, KronBlock]:
        """The curvature blocks of the module's trainable parameters."""


Rule = Callable[[str, nn.Module, torch.Tensor, RuleOptions], FactorBuilder]  # (prefix, module, input, options)


def trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a parameter ``name`` that requires a gradient."""
    param = getattr(module, name, None)
    return param is not None and param.requires_grad


class SharedWeightBuilder(FactorBuilder):
    """A weight shared over positions, KFAC-expand or -reduce (``options.kfac_approx``), with an exact bias:
    ``to_sites`` maps a gradient chunk to ``(D_i, B, O, P)`` (positions last), ``patches()`` gives the matching
    patches ``(B, Din, P)`` when the blocks are formed (lazily: after the backward)."""

    def __init__(
        self,
        prefix: str,
        module: nn.Module,
        patches: Callable[[], Patches],
        to_sites: Callable[[torch.Tensor], torch.Tensor],
        options: RuleOptions,
    ) -> None:
        self.prefix, self.module, self.patches, self.to_sites = prefix, module, patches, to_sites
        self.stats = position_stats(trainable(module, "weight"), trainable(module, "bias"), options)

    def add(self, grads: torch.Tensor) -> None:
        self.stats.add(self.to_sites(grads))

    def blocks(self) -> dict[str, KronBlock]:
        return self.stats.blocks(self.prefix, self.module, self.patches)


def sites_last(batch: int, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(D, B, C, *sites) -> (D, B, C, P)``."""
    return lambda t: t.reshape(t.shape[0], batch, channels, -1)


def linear_rule(prefix: str, module: nn.Linear, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """``nn.Linear`` on ``(B, ..., I)``; extra leading axes are positions."""
    batch, d_out = x.shape[0], module.out_features
    patches = x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)
    to_sites = lambda t: t.reshape(t.shape[0], batch, -1, d_out).transpose(2, 3)  # noqa: E731
    return SharedWeightBuilder(prefix, module, lambda: patches, to_sites, options)


def conv2d_rule(prefix: str, module: nn.Conv2d, x: torch.Tensor, options: RuleOptions) -> FactorBuilder:
    """Stock ``nn.Conv2d`` (``groups=1``), KFAC-expand (or -reduce) over output sites."""
    if module.groups != 1:
        raise NotImplementedError(f"module {prefix.rstrip('.')} (Conv2d): groups={module.groups} is not supported")
    return SharedWeightBuilder(
        prefix, module, lambda: conv_patches(x, module), sites_last(x.shape[0], module.out_channels), options
    )


_RULES: dict[type[nn.Module], tuple[Rule, bool]] = {}  # module class -> (rule, applies to subclasses)


def register_rule(module_type: type[nn.Module], rule: Rule, *, subclasses: bool = False, replace: bool = False) -> None:
    """Use ``rule`` for the modules of class ``module_type`` (and of its subclasses if ``subclasses``).

    ``rule(prefix, module, input, options)`` is called once per recorded module and batch, with ``prefix`` the
    module's name plus ``"."`` (``""`` for the root), the module's detached input and the :class:`RuleOptions`;
    it returns a :class:`FactorBuilder` whose blocks cover the module's trainable ``weight`` and ``bias``.
    Registering the same rule again changes nothing; another rule for a registered class is a ValueError unless
    ``replace``.
    """
    known = _RULES.get(module_type)
    if known is not None and known != (rule, subclasses) and not replace:
        raise ValueError(f"{module_type.__name__} already has a KFAC rule ({known[0].__name__}); pass replace=True")
    _RULES[module_type] = (rule, subclasses)


def find_rule(module: nn.Module) -> Rule | None:
    """The rule registered for ``module``'s exact class, else the first one registered (in registration order)
    for a class it derives from with ``subclasses=True``, else ``None``."""
    if type(module) in _RULES:
        return _RULES[type(module)][0]
    for cls, (rule, subclasses) in _RULES.items():
        if subclasses and isinstance(module, cls):
            return rule
    return None


def curvature_modules(model: nn.Module) -> dict[str, tuple[nn.Module, Rule]]:
    """Every module owning trainable parameters, with its rule; raise for anything unsupported."""
    found = {}
    for name, module in model.named_modules():
        own = [p_name for p_name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = find_rule(module)
        label = name or "<root>"
        if rule is None:
            raise NotImplementedError(
                f"module {label} ({type(module).__name__}) owns parameters {own} but has no KFAC rule "
                "(kfac.register_rule adds one)"
            )
        unknown = sorted(set(own) - HANDLED_PARAMS)
        if unknown:
            raise NotImplementedError(
                f"module {label} ({type(module).__name__}): parameters {unknown} are not covered by its KFAC rule"
            )
        found[name] = (module, rule)
    return found


register_rule(nn.Linear, linear_rule, subclasses=True)
register_rule(nn.Conv2d, conv2d_rule, subclasses=True)
