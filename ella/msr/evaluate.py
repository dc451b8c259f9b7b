"""Summary statistics for meta-test results."""

from __future__ import annotations

import math

import numpy as np
from scipy import special


def mean_confidence_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t confidence interval of the mean.

    ``values``: one number per test task, shape ``(T,)`` with T >= 2. Half-width =
    ``t_{(1+confidence)/2, T-1} * s / sqrt(T)`` with s the unbiased sample standard deviation.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"mean_confidence_interval needs at least 2 values, got {x.size}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    quantile = special.stdtrit(x.size - 1, 0.5 + confidence / 2.0)
    sem = x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(quantile * sem)

