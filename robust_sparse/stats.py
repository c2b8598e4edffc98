"""The statistics of a sweep report: paired differences against a reference setting and binomial intervals.

Runs of one sweep that differ only in a treatment key (γ, an estimator) share their seed, so the seed fixes the
initialisation, the batch order and the attacks' random starts on both sides: the per-seed difference removes
that variation, and a paired t interval on it sees effects that comparing two means with their standard
deviations (Welch) misses. A test accuracy measured on n points carries a binomial sampling error of its own;
the Wilson interval states it (honest near 0 and 1, where the normal approximation is not).

Pure functions on pandas frames; no scipy needed (a t-quantile table, exact to the 3 decimals of printed tables,
below), scipy used when installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

#: The 0.975 quantile of Student's t with df = 1..30 degrees of freedom (two-sided 95%).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}
Z_975 = 1.959964  # the normal 0.975 quantile, for df beyond the table (t_975(30) is 2.042, the limit 1.960)


def t_quantile_975(df: float) -> float:
    """The 0.975 quantile of t with ``df`` degrees of freedom: scipy's when installed, else the table (a
    fractional df, as Welch's, rounds down: the wider, safer interval), else the normal one beyond df 30."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        whole = int(math.floor(df))
        return T_975[whole] if whole in T_975 else Z_975
    return float(t.ppf(0.975, df))


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


def welch_interval(treated: Sequence[float], reference: Sequence[float]) -> tuple[float, float, float]:
    """(difference of means, low, high): the unpaired 95% interval (Welch-Satterthwaite degrees of freedom), the
    comparison a table of means and standard deviations invites; for contrast with the paired one."""
    a, b = [float(v) for v in treated], [float(v) for v in reference]
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((v - mean_a) ** 2 for v in a) / (len(a) - 1) / len(a)
    var_b = sum((v - mean_b) ** 2 for v in b) / (len(b) - 1) / len(b)
    difference = mean_a - mean_b
    if var_a + var_b == 0:
        return difference, difference, difference
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    half = t_quantile_975(df) * math.sqrt(var_a + var_b)
    return difference, difference - half, difference + half


def wilson_interval(accuracy: float, n: int, z: float = Z_975) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on ``n`` points (``accuracy * n`` correct)."""
    if not n or n <= 0 or accuracy is None or math.isnan(accuracy):
        return math.nan, math.nan
    p = min(max(float(accuracy), 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def format_wilson(accuracy: float, n: int) -> str:
    """``0.846 [0.812, 0.875]``: an accuracy and its Wilson interval (just the accuracy without n)."""
    low, high = wilson_interval(accuracy, n)
    if math.isnan(low):
        return "-" if accuracy is None or math.isnan(accuracy) else f"{accuracy:.3f}"
    return f"{accuracy:.3f} [{low:.3f}, {high:.3f}]"


# ---------------------------------------------------------------------------------------- paired differences

def _same(a: Any, b: Any) -> bool:
    missing_a = a is None or (isinstance(a, float) and math.isnan(a))
    missing_b = b is None or (isinstance(b, float) and math.isnan(b))
    if missing_a or missing_b:
        return missing_a and missing_b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def is_reference(runs: pd.DataFrame, reference: dict[str, Any]) -> pd.Series:
    """Which rows are the reference setting: every ``key=value`` of ``reference`` holds."""
    mask = pd.Series(True, index=runs.index)
    for key, value in reference.items():
        mask &= runs[key].map(lambda v, value=value: _same(v, value)) if key in runs else False
    return mask


def paired_differences(runs: pd.DataFrame, reference: dict[str, Any], metrics: Sequence[str],
                       keys: Sequence[str], pair: str = "seed") -> pd.DataFrame:
    """Per-seed differences of every metric of every setting against the reference setting.

    ``keys``: the grid keys of ``runs`` (``pair`` and the reference's keys among them or not). A setting is
    compared with the reference rows of the same ``pair`` value (seed) and the same value of every key on which
    the reference rows themselves vary (the density, say, in a γ study at several densities: each density has its
    own γ = 0); a key the reference rows hold at one value (the estimator of a γ = 0 run) is a treatment like the
    reference key itself. One row per setting and metric: the n paired differences, their mean, the paired 95%
    t interval (n - 1 degrees of freedom), the seeds whose difference has the mean's sign, and whether the interval
    excludes 0 (``established``).
    """
    columns = ["metric", "n", "differences", "mean", "low", "high", "consistent", "established"]
    if pair not in runs or not set(reference) <= set(runs.columns):
        return pd.DataFrame(columns=columns)
    base = runs[is_reference(runs, reference)]
    settings = [k for k in keys if k != pair and k in runs]
    strata = [k for k in settings if k not in reference and base[k].astype(str).nunique() > 1]
    treated = runs[~is_reference(runs, reference)]
    rows = []
    groups = treated.groupby(settings, dropna=False, sort=False) if settings else [((), treated)]
    for setting, group in groups:
        setting = setting if isinstance(setting, tuple) else (setting,)
        values = dict(zip(settings, setting))
        match = base
        for key in strata:
            match = match[match[key].map(lambda v, want=values[key]: _same(v, want))]
        if match.empty:
            continue
        for metric in metrics:
            if metric not in runs:
                continue
            ours = group.dropna(subset=[metric]).drop_duplicates(pair, keep="last").set_index(pair)[metric]
            theirs = match.dropna(subset=[metric]).drop_duplicates(pair, keep="last").set_index(pair)[metric]
            shared = [s for s in ours.index if s in theirs.index]
            if not shared:
                continue
            differences = [float(ours[s] - theirs[s]) for s in shared]
            mean, low, high = mean_interval(differences)
            sign = (mean > 0) - (mean < 0)
            consistent = sum(1 for d in differences if sign and (d > 0) - (d < 0) == sign)
            rows.append({**values, "metric": metric, "n": len(shared),
                         "differences": ", ".join(f"{d:+.3f}" for d in differences), "mean": mean, "low": low,
                         "high": high, "consistent": consistent,
                         "established": bool(len(shared) > 1 and (low > 0 or high < 0))})
    return pd.DataFrame(rows, columns=[*settings, *columns]) if rows else pd.DataFrame(columns=[*settings, *columns])


def paired_sentence(row: dict[str, Any], setting: str, reference: str, metric: str) -> str:
    """One line a reader can quote: the mean paired difference, its interval, the seeds that agree, and
    "established" only when the interval excludes 0."""
    n, mean = int(row["n"]), float(row["mean"])
    points = f"{100 * mean:+.1f} points"
    if n < 2:
        return f"{setting} vs {reference}, {metric}: {points} on one seed; not established (one seed, no interval)."
    direction = "higher" if mean > 0 else "lower" if mean < 0 else "equal"
    interval = f"paired 95% CI [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}]"
    agreement = f"{direction} in {int(row['consistent'])} of {n} seeds"
    verdict = ("established: the interval excludes 0" if row["established"]
               else "not established: the interval includes 0")
    return f"{setting} vs {reference}, {metric}: {points} ({interval}; {agreement}); {verdict}."
