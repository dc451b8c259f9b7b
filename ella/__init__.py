"""ella: learning layer-wise equivariances by Laplace marginal likelihood.

Subpackages: ``ella.layers`` (the relaxed-layer zoo). Submodules are imported explicitly by the user.
"""

__version__ = "0.1.0"
