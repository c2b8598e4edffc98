"""The spread of an evaluation over its attack seeds (``robust-sparse eval --seeds 0,1,2``).

Every seed fixes every random start (PGD's, AutoAttack's), so robust accuracy under one seed is one draw: rows
that differ only in ``seed`` are the same evaluation, and the spread over them says how much of a difference
between two models the seeds alone can make. Rows of a store written before seeds were recorded read as seed 0
(robust_sparse.eval.store.load_results).
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

#: What makes rows the same evaluation but for the seed (robust_sparse.eval.report.IDENTITY without it).
GROUP = ["model", "model_fingerprint", "dataset", "threat_model", "eps", "n_examples", "attacks", "mode",
         "batch_size"]
COLUMNS = GROUP + ["metric", "seeds", "mean", "std", "min", "max", "seed_list"]


def _metrics(row: pd.Series) -> dict[str, float]:
    """Clean accuracy, every attack's (``per_attack``, AutoAttack's units too) and the worst case, in that order."""
    values: dict[str, float] = {}
    if _present(row.get("clean_acc")):
        values["clean"] = float(row["clean_acc"])
    per_attack = row.get("per_attack")
    if isinstance(per_attack, str):  # a row read from results.csv
        per_attack = json.loads(per_attack)
    for label, value in (per_attack or {}).items():
        if _present(value):
            values[label] = float(value)
    if _present(row.get("worst_acc")):
        values["worst case"] = float(row["worst_acc"])
    return values


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)


def seed_spread(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation (``GROUP``) and metric: how many seeds, and the mean, sample standard deviation
    (n - 1; NaN for one seed), min and max over them. A seed evaluated twice counts once (its last row)."""
    if frame.empty or "seed" not in frame:
        return pd.DataFrame(columns=COLUMNS)
    frame = frame[frame["seed"].map(_present)]  # the corruptions track has no seed
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    keys = [key for key in GROUP if key in frame]
    records = []
    for group, rows in frame.groupby(keys, sort=False, dropna=False):
        latest = rows.drop_duplicates("seed", keep="last")
        seeds = [int(seed) for seed in latest["seed"]]
        per_seed = [_metrics(row) for _, row in latest.iterrows()]
        labels = list(dict.fromkeys(label for values in per_seed for label in values))
        for label in labels:
            values = pd.Series([values[label] for values in per_seed if label in values], dtype=float)
            records.append({**dict(zip(keys, group if isinstance(group, tuple) else (group,))), "metric": label,
                            "seeds": len(values), "mean": values.mean(), "std": values.std(ddof=1),
                            "min": values.min(), "max": values.max(),
                            "seed_list": ",".join(str(seed) for seed, found in zip(seeds, per_seed)
                                                  if label in found)})
    return pd.DataFrame(records, columns=COLUMNS)


def format_spread(spread: pd.DataFrame) -> str:
    """The lines ``robust-sparse eval`` prints: per model and eps, each metric's mean ± std [min, max] over seeds."""
    lines = []
    for (model, threat, eps), rows in spread.groupby(["model", "threat_model", "eps"], sort=False):
        lines.append(f"{model} ({threat} eps={eps:.4g}) over {int(rows['seeds'].max())} attack seeds "
                     f"({rows['seed_list'].iloc[0]}): mean ± std [min, max]")
        for _, row in rows.iterrows():
            std = f"{row['std']:.4f}" if row["std"] == row["std"] else "n/a"
            lines.append(f"  {row['metric']:<24} {row['mean']:.4f} ± {std} [{row['min']:.4f}, {row['max']:.4f}]")
    return "\n".join(lines)
