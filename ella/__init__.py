"""ella: learning layer-wise equivariances by Laplace marginal likelihood.

Subpackages: ``ella.layers`` (the relaxed-layer zoo; ``ella.layers.relaxed_layer`` builds one). In your own
network: ``ella.learn.learn(model, train, epochs=...)`` trains it and learns every path's prior precision
(``examples/mnist_symmetries.py``). Submodules are imported explicitly by the user.
"""

__version__ = "0.1.0"
