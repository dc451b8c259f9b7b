"""MSR baseline: Meta-learning Symmetries by Reparameterization (Zhou, Knowles & Finn, ICLR 2021)."""

from ella.msr.evaluate import mean_confidence_interval
from ella.msr.layers import (
    Conv1dFlat,
    LocallyConnected1d,
    MSRConv,
    MSRFC,
    PlainConv2d,
    PlainLinear,
    conv_symmetry_matrix,
)
from ella.msr.meta import MetaConfig, MetaLearner, MultiTaskConfig, MultiTaskLearner
from ella.msr.tasks import Batch, RotationProblem, SyntheticProblem, TranslationProblem, group_filters

__all__ = [
    "Batch",
    "Conv1dFlat",
    "LocallyConnected1d",
    "MSRConv",
    "MSRFC",
    "MetaConfig",
    "MetaLearner",
    "MultiTaskConfig",
    "MultiTaskLearner",
    "PlainConv2d",
    "PlainLinear",
    "RotationProblem",
    "SyntheticProblem",
    "TranslationProblem",
    "conv_symmetry_matrix",
    "group_filters",
    "mean_confidence_interval",
]
