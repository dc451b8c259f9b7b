"""Kronecker-factored (KFAC) curvature for ella's relaxed layers and stock ``nn.Linear`` / ``nn.Conv2d``.

Entry points: :func:`fit_kfac` (curvature over a loader), :class:`KronCurvature` (per-parameter blocks that
add), :class:`KronDecomposition` (log-determinants and effective parameter counts per block), and
``kfac.laplace_backend`` (laplace-torch ``KronLaplace`` backends; imported on demand).
"""

from kfac.curvature import KronBlock, KronCurvature
from kfac.decomposition import CurvatureError, KronDecomposition
from kfac.fit import fit_kfac, kfac_batch
from kfac.rules import RuleOptions

__all__ = [
    "CurvatureError",
    "KronBlock",
    "KronCurvature",
    "KronDecomposition",
    "RuleOptions",
    "fit_kfac",
    "kfac_batch",
]
