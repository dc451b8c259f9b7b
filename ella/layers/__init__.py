"""The relaxed-layer zoo: dense, convolutional, factored, sparse and p4 paths, polyphase downsampling, and
:func:`relaxed_layer`, which builds a relaxed layer from its paths' names, channels and input size.

Importing it registers the layers' KFAC rules with :mod:`kfac` (:mod:`ella.layers.curvature`).
"""

from ella.layers.blocks import LAYER_NAMES, check_layer_name, relaxed_layer
from ella.layers.conv import Conv, with_stock_strided_convs
from ella.layers.curvature import GROUPED_MODES, ROTATION_MODES
from ella.layers.equivariance import (
    check_rotation_equivariance,
    check_rotation_invariance,
    check_translation_equivariance,
    check_translation_invariance,
)
from ella.layers.factored import FactoredFC
from ella.layers.fc import FC
from ella.layers.group import GroupConv, LiftingConv, group_max_pool, lift, rotate_p4
from ella.layers.grouped_linear import GroupedLinear
from ella.layers.polyphase import PolyphaseDownsample, polyphase_select
from ella.layers.relaxed import RelaxedLayer
from ella.layers.sparse import (
    SparseConv,
    SparseFC,
    anchor_count,
    grid_coordinates,
    interpolation_basis,
    project_onto_basis,
)

__all__ = [
    "FC",
    "GROUPED_MODES",
    "ROTATION_MODES",
    "Conv",
    "FactoredFC",
    "GroupConv",
    "GroupedLinear",
    "LAYER_NAMES",
    "LiftingConv",
    "PolyphaseDownsample",
    "RelaxedLayer",
    "SparseConv",
    "SparseFC",
    "anchor_count",
    "check_layer_name",
    "check_rotation_equivariance",
    "check_rotation_invariance",
    "check_translation_equivariance",
    "check_translation_invariance",
    "grid_coordinates",
    "group_max_pool",
    "interpolation_basis",
    "lift",
    "polyphase_select",
    "project_onto_basis",
    "relaxed_layer",
    "rotate_p4",
    "with_stock_strided_convs",
]
