"""The statistics of a sweep report: paired differences against a reference setting and binomial intervals.

Runs of one sweep that differ only in a treatment key (γ, an estimator) share their seed, so the seed fixes the
initialisation, the batch order and the attacks' random starts on both sides: the per-seed difference removes
that variation, and a paired t interval on it sees effects that comparing two means with their standard
deviations (Welch) misses. A test accuracy measured on n points carries a binomial sampling error of its own;
the Wilson interval states it (honest near 0 and 1, where the normal approximation is not).

Many intervals in one report: each one excludes 0 by chance with probability 0.05 when nothing differs, so a
report with 48 of them shows about 2.4 "effects" from noise alone. :func:`adjust` corrects the p-values of a
family of comparisons (Holm's step-down, which controls the family-wise error under any dependence, such as
comparisons that share a reference run; Benjamini-Hochberg's false discovery rate; or none), and a difference is
"established" only when its adjusted p-value is below 0.05.

Pure functions on pandas frames; quantiles and tests from scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import pandas as pd
from scipy import stats as scipy_stats

# the intervals of one accuracy and of a mean are the evaluation's (it stores them with every row); re-exported
# here, where the report reads them with the paired comparisons
from robust_sparse.eval.intervals import Z_975, mean_interval, t_quantile, t_quantile_975, wilson_interval  # noqa: F401

LEVEL = 0.05  # the error rate of every interval and test: 95% intervals, p < 0.05 after adjustment


class Correction(str, Enum):
    """How the p-values of a family of comparisons are adjusted (``report --correction``)."""

    HOLM = "holm"  # family-wise error rate, any dependence (Holm 1979)
    BH = "bh"  # false discovery rate (Benjamini-Hochberg 1995; positive dependence)
    NONE = "none"  # every interval on its own


def paired_p_value(differences: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t test that the mean difference is 0 (n - 1 degrees of freedom); NaN
    for fewer than two, and NaN when every difference is the same: without spread the t test is undefined (three
    accuracies on 500 points moving by the same digit are "3 of 3 seeds", not a measured effect)."""
    values = [float(v) for v in differences]
    # "the same" up to float noise: accuracies are counts over n points (stored as float32 by some writers), far
    # coarser than 1e-6, and their differences carry rounding error
    if len(values) < 2 or max(values) - min(values) <= 1e-6:
        return math.nan
    return float(scipy_stats.ttest_1samp(values, 0.0).pvalue)


def adjust(p_values: Sequence[float], correction: Correction | str = Correction.HOLM) -> list[float]:
    """Adjusted p-values of one family (NaN entries are not comparisons: they stay NaN and do not count).

    Holm: sort ascending, ``p_(i) * (m - i + 1)``, made non-decreasing by a running maximum, capped at 1.
    BH: ``p_(i) * m / i``, made non-increasing from the largest down by a running minimum, capped at 1.
    """
    correction = Correction(correction)
    present = [(p, i) for i, p in enumerate(p_values) if p == p]
    adjusted = [math.nan] * len(p_values)
    m = len(present)
    if correction is Correction.NONE:
        for p, i in present:
            adjusted[i] = p
        return adjusted
    ordered = sorted(present)
    if correction is Correction.HOLM:
        running = 0.0
        for rank, (p, i) in enumerate(ordered):
            running = max(running, min(1.0, (m - rank) * p))
            adjusted[i] = running
    else:
        running = 1.0
        for rank in range(m - 1, -1, -1):
            p, i = ordered[rank]
            running = min(running, min(1.0, p * m / (rank + 1)))
            adjusted[i] = running
    return adjusted


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
    columns = list(PAIRED_COLUMNS[:10])
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
            sd = (math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
                  if len(differences) > 1 else math.nan)
            rows.append({**values, "metric": metric, "n": len(shared),
                         "differences": ", ".join(f"{d:+.3f}" for d in differences), "mean": mean, "low": low,
                         "high": high, "consistent": consistent,
                         "established": bool(len(shared) > 1 and (low > 0 or high < 0)), "sd": sd,
                         "p": paired_p_value(differences)})
    return pd.DataFrame(rows, columns=[*settings, *columns]) if rows else pd.DataFrame(columns=[*settings, *columns])


class Family(str, Enum):
    """Which intervals are corrected together (``report --family``)."""

    SPLIT = "split"  # every test-set interval of the report (test and evaluation-stage metrics), and apart from
    #                  them every validation interval (validation accuracy selected the checkpoints)
    METRIC = "metric"  # the intervals of one metric across every setting (γ, density, ...)
    REPORT = "report"  # every interval of the report


def family_of(metric: str, family: Family | str) -> str:
    """The family ``metric``'s intervals belong to."""
    family = Family(family)
    if family is Family.REPORT:
        return "all intervals"
    if family is Family.METRIC:
        return metric
    return "validation" if metric.startswith("val_") else "test"


def adjust_table(table: pd.DataFrame, correction: Correction | str = Correction.HOLM,
                 family: Family | str = Family.SPLIT) -> pd.DataFrame:
    """``table`` (from :func:`paired_differences`) with each row's family, its size, the count of intervals that
    would exclude 0 by chance in it (0.05 x size), the adjusted p-value, the Bonferroni interval (each at
    1 - 0.05/size: simultaneous for the family) and ``established`` = adjusted p < 0.05 (two or more seeds)."""
    table = table.copy()
    correction = Correction(correction)
    if table.empty:
        return table.assign(family=[], family_size=[], expected_by_chance=[], p_adjusted=[], correction=[],
                            low_adjusted=[], high_adjusted=[])
    table["family"] = [family_of(m, family) for m in table["metric"]]
    table["correction"] = correction.value
    table["p_adjusted"] = math.nan
    for name, rows in table.groupby("family", sort=False):
        table.loc[rows.index, "p_adjusted"] = adjust(rows["p"].tolist(), correction)
    sizes = table.groupby("family")["p"].transform(lambda p: int(p.notna().sum()))
    table["family_size"] = sizes.astype(int)
    table["expected_by_chance"] = LEVEL * table["family_size"]
    lows, highs = [], []
    for row in table.itertuples(index=False):
        if row.n < 2 or row.sd != row.sd or correction is Correction.NONE:
            lows.append(row.low)
            highs.append(row.high)
            continue
        half = t_quantile(1 - LEVEL / (2 * max(row.family_size, 1)), row.n - 1) * row.sd / math.sqrt(row.n)
        lows.append(row.mean - half)
        highs.append(row.mean + half)
    table["low_adjusted"], table["high_adjusted"] = lows, highs
    table["established"] = [bool(n > 1 and p == p and p < LEVEL) for n, p in zip(table["n"], table["p_adjusted"])]
    return table


#: the columns of a paired table that are not setting keys
PAIRED_COLUMNS = ("metric", "n", "differences", "mean", "low", "high", "consistent", "established", "sd", "p",
                  "family", "family_size", "expected_by_chance", "p_adjusted", "correction", "low_adjusted",
                  "high_adjusted")


def paired_sentence(row: dict[str, Any], setting: str, reference: str, metric: str) -> str:
    """One line a reader can quote: the mean paired difference, its interval, the seeds that agree, the p-value
    (raw and, where the row carries one, adjusted for its family) and "established" only when the (adjusted)
    p-value is below 0.05."""
    n, mean = int(row["n"]), float(row["mean"])
    points = f"{100 * mean:+.1f} points"
    if n < 2:
        return f"{setting} vs {reference}, {metric}: {points} on one seed; not established (one seed, no interval)."
    direction = "higher" if mean > 0 else "lower" if mean < 0 else "equal"
    interval = f"paired 95% CI [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}]"
    agreement = f"{direction} in {int(row['consistent'])} of {n} seeds"
    adjusted = row.get("p_adjusted")
    correction = row.get("correction", Correction.NONE.value)
    raw_p = row.get("p")
    if raw_p is not None and raw_p != raw_p:  # an interval of zero width: every seed moved by the same amount
        return (f"{setting} vs {reference}, {metric}: {points} in every one of {n} seeds (no spread between seeds, "
                "so no t test); not established.")
    if adjusted is None or adjusted != adjusted or correction == Correction.NONE.value:
        verdict = ("established: the interval excludes 0" if row["established"]
                   else "not established: the interval includes 0")
        return f"{setting} vs {reference}, {metric}: {points} ({interval}; {agreement}); {verdict}."
    p = f"p = {row['p']:.3g}, {correction}-adjusted {adjusted:.3g} over {int(row['family_size'])} comparisons"
    verdict = ("established after adjustment" if row["established"] else
               "not established: the raw interval excludes 0, the adjusted p-value does not hold"
               if row["low"] > 0 or row["high"] < 0 else "not established: the interval includes 0")
    return f"{setting} vs {reference}, {metric}: {points} ({interval}; {agreement}; {p}); {verdict}."
