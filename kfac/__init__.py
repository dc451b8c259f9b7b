"""Kronecker-factored (KFAC) curvature for ``nn.Linear`` / ``nn.Conv2d`` and any module type a rule is registered for.

Entry points: :func:`fit_kfac` (curvature over a loader), :class:`KronCurvature` (per-parameter blocks that
add), :class:`KronDecomposition` (log-determinants and effective parameter counts per block), and
``kfac.laplace_backend`` (laplace-torch ``KronLaplace`` backends; imported on demand).

Other packages teach kfac their module types: :func:`register_rule` maps a module class to a rule (a
:class:`FactorBuilder` factory, most simply a :class:`SharedWeightBuilder` over the module's patches) and
:func:`register_option` adds a keyword option those rules read from :class:`RuleOptions`. The remaining names
are the building blocks such rules are made of (see :mod:`kfac.rules`, :mod:`kfac.statistics`,
:mod:`kfac.patches`).
"""

from kfac.capture import BACKWARD_MODES
from kfac.curvature import KronBlock, KronCurvature
from kfac.decomposition import BlockEigen, CurvatureError, EigenvalueMemo, KronDecomposition, segment_sum
from kfac.fit import fit_kfac, kfac_batch
from kfac.options import (
    KFAC_APPROXES,
    POSITION_NORMS,
    RuleOption,
    RuleOptions,
    check_choice,
    register_option,
    registered_options,
)
from kfac.patches import ConvWindows, Patches, circular_patches, conv_patches, im2col
from kfac.rules import FactorBuilder, Rule, SharedWeightBuilder, register_rule, sites_last, trainable
from kfac.sqrt_hessian import CURVATURES, LIKELIHOODS
from kfac.statistics import RowsGram, mirror_lower, per_group_gram, position_stats

__all__ = [
    "BACKWARD_MODES",
    "BlockEigen",
    "CURVATURES",
    "ConvWindows",
    "CurvatureError",
    "EigenvalueMemo",
    "FactorBuilder",
    "KFAC_APPROXES",
    "KronBlock",
    "KronCurvature",
    "KronDecomposition",
    "LIKELIHOODS",
    "POSITION_NORMS",
    "Patches",
    "RowsGram",
    "Rule",
    "RuleOption",
    "RuleOptions",
    "SharedWeightBuilder",
    "check_choice",
    "circular_patches",
    "conv_patches",
    "fit_kfac",
    "im2col",
    "kfac_batch",
    "mirror_lower",
    "per_group_gram",
    "position_stats",
    "register_option",
    "register_rule",
    "registered_options",
    "segment_sum",
    "sites_last",
    "trainable",
]
