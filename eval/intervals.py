"""Confidence intervals of measured accuracies: the Wilson interval of one accuracy on n points and the t interval
of a mean over seeds.

The evaluation writes them next to every accuracy it stores (robust_sparse.eval.store, .report, .corruptions);
the studies' report builds its paired comparisons on them (robust_sparse.studies.stats). They live here, with the
evaluation, because the evaluation sits below the studies and must not import them.

Pure functions; the t quantile from scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as scipy_stats

Z_975 = 1.959964  # the normal 0.975 quantile (the Wilson interval's z)


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(scipy_stats.t.ppf(probability, df))


def t_quantile_975(df: float) -> float:
    """The 0.975 quantile of t with ``df`` degrees of freedom (two-sided 95%)."""
    return t_quantile(0.975, df)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean of ``values`` (n - 1 degrees of freedom); NaN bounds for
    fewer than two values."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(accuracy: float, n: int, z: float = Z_975) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on ``n`` points (``accuracy * n`` correct)."""
    if not n or n <= 0 or accuracy is None or math.isnan(accuracy):
        return math.nan, math.nan
    p = min(max(float(accuracy), 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
