"""The γ/AGENT study's part of the sweep report (a :class:`~robust_sparse.studies.hooks.StudyHook`): what each
AGENT run did (the γ it used, its correction weight γ·c_t, c_t's range, the variance ratio of its probe batch),
the flags a reader must see first (γ > 0 that never acted, c_t outside [0, 1]), γ = 0 (else AGENT off) as the
default reference of the paired differences, AGENT's cosine table, and the figures over epochs and against γ
(drawn by robust_sparse.studies.agent_gamma_plots). The generic report (robust_sparse.studies.report) names none of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from robust_sparse.config.schema import GAMMA_KEY
from robust_sparse.errors import UserError
from robust_sparse.files.atomic import write_atomic
from robust_sparse.studies import agent_gamma_plots as figures
from robust_sparse.studies import plots, stats
from robust_sparse.studies.hooks import Context, Place, StudyHook, register

PREFIX = "agent_"  # every run column this study adds: never a grid key
C_RANGE = ("agent_c_min", "agent_c_max")  # per run: the range of AGENT's c_t over its epochs
AGENT_SUMMARY = ("agent_weight_last", "agent_variance_ratio_last")  # averaged over seeds in summary.csv


def _agent_gamma(run_dir: Path) -> float | None:
    """The γ the run's AGENT used (its variant's: ``svrg``/``no_gamma``/``fixed_c`` fix it to 1), None without
    AGENT or a readable config.yaml."""
    from robust_sparse.agent import resolve_variant
    from robust_sparse.config import config_from_dict

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        agent = config_from_dict({**saved, "data": {**saved.get("data", {}), "root": "."}}).agent
    except (OSError, yaml.YAMLError, UserError, TypeError, AttributeError, KeyError):
        return None
    return resolve_variant(agent).gamma if agent.enabled else None


def agent_columns(metrics: pd.DataFrame) -> dict[str, Any]:
    """What AGENT did in one run, for the tables and texts that quote it: the correction weight gamma*c_t and the
    variance ratio Var(g_hat)/Var(g) of the probe batch (below 1: the correction reduced the gradient variance)
    in the last epoch, and the largest variance ratio with its epoch (a spike is the instability the paper warns
    about)."""
    columns: dict[str, Any] = {}
    if "agent_weight" in metrics and metrics["agent_weight"].notna().any():
        columns["agent_weight_last"] = metrics["agent_weight"].dropna().iloc[-1]
        columns["agent_weight_max"] = metrics["agent_weight"].dropna().abs().max()  # 0: the correction never acted
    if "agent_variance_ratio" in metrics and metrics["agent_variance_ratio"].notna().any():
        ratios = metrics.set_index("epoch")["agent_variance_ratio"].dropna()
        columns.update({"agent_variance_ratio_last": ratios.iloc[-1], "agent_variance_ratio_max": ratios.max(),
                        "agent_variance_ratio_max_epoch": int(ratios.idxmax())})
    return columns


def run_columns(run_dir: Path, metrics: pd.DataFrame) -> dict[str, Any]:
    """One run's AGENT columns: the γ it used, and from its metrics.csv c_t's range and :func:`agent_columns`."""
    columns: dict[str, Any] = {"agent_gamma": _agent_gamma(run_dir)}
    if "agent_c" in metrics and metrics["agent_c"].notna().any():  # c_t's range (the paper: [0, 1])
        columns[C_RANGE[0]], columns[C_RANGE[1]] = metrics["agent_c"].min(), metrics["agent_c"].max()
        columns.update(agent_columns(metrics))
    return columns


def flags(runs: pd.DataFrame) -> list[str]:
    """AGENT runs whose correction never acted though γ > 0 (a γ comparison of them shows nothing), and runs whose
    c_t left [0, 1] (a negative c_t reverses the correction)."""
    flags = []
    if "agent_gamma" in runs and "agent_weight_max" in runs:
        idle = runs[(runs["agent_gamma"].fillna(0) != 0) & (runs["agent_weight_max"].fillna(0) == 0)]
        if not idle.empty:
            names = sorted(idle["run_id"].unique())
            flags.append(f"{len(names)} AGENT run(s) with γ > 0 whose correction weight γ·c_t was 0 in every epoch "
                         "(c_t is 0 until the second snapshot refresh): they trained as γ = 0 did, so a γ comparison "
                         f"of them shows nothing: {', '.join(names)}")
    if "agent_c_min" in runs:
        outside = runs[(runs["agent_c_min"] < 0) | (runs["agent_c_max"] > 1)].drop_duplicates("run_id")
        if not outside.empty:
            ranges = ", ".join(f"{r.run_id} [{r.agent_c_min:.3g}, {r.agent_c_max:.3g}]"
                               for r in outside.itertuples())
            flags.append(f"{len(outside)} AGENT run(s) had c_t outside [0, 1], the paper's range (unclipped, as "
                         f"the official code; agent.clip=true clips; a negative c_t reverses the correction): "
                         f"{ranges}")
    return flags


def reference(runs: pd.DataFrame) -> dict[str, Any] | None:
    """γ = 0 where the runs vary γ and some have γ = 0; else AGENT off where some runs have it on and some off;
    else None (no paired section unless a reference is given)."""
    if GAMMA_KEY in runs and runs[GAMMA_KEY].astype(str).nunique() > 1 and \
            stats.is_reference(runs, {GAMMA_KEY: 0}).any():
        return {GAMMA_KEY: 0}
    if "agent.enabled" in runs and stats.is_reference(runs, {"agent.enabled": False}).any() and \
            runs["agent.enabled"].astype(str).nunique() > 1:
        return {"agent.enabled": False}
    return None


def _cosine_runs(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run that logged AGENT's cosine: its density (the measured one; 1.0 for a dense run), the mean
    over its logged epochs, its last logged epoch, and the grid keys that vary among these runs."""
    logged = curves[curves["agent_cosine"].notna()]
    per_run = []
    for run_id_, run in logged.groupby("run_id"):
        density = run["density"].iloc[-1] if "density" in run and run["density"].notna().any() else 1.0
        per_run.append({"run_id": run_id_, "density": round(float(density), 3),
                        "cosine": run["agent_cosine"].mean(), "cosine_last": run["agent_cosine"].iloc[-1],
                        "epochs_logged": len(run)})
    per_run = pd.DataFrame(per_run).merge(runs[["run_id", *keys]].drop_duplicates("run_id"), on="run_id")
    varying = [k for k in keys if per_run[k].astype(str).nunique() > 1
               and k not in ("sparsity.density", "sparsity.method", "sweep", "subnet_density")]
    return per_run, varying


def cosine_table(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """AGENT's logged cosine between g_new and g_old: per density (and any other key that varies among the AGENT
    runs), mean ± std over seeds of each run's mean over its logged epochs and of its last logged epoch.
    ``keys``: the grid keys but seed."""
    per_run, varying = _cosine_runs(runs, curves, keys)
    grouped = per_run.groupby(["density", *varying], dropna=False)
    table = grouped[["cosine", "cosine_last"]].agg(["mean", "std"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table["runs"] = grouped.size()
    table["epochs_logged"] = grouped["epochs_logged"].max()
    return table.reset_index().sort_values(["density", *varying], ascending=[False] + [True] * len(varying))


def _cosine_section(context: Context) -> list[str]:
    """AGENT's logged cosine (its assumption that g_new and g_old agree): a table, per-epoch CSV and figure."""
    runs, curves, out = context.runs, context.curves, context.out
    if curves.empty or "agent_cosine" not in curves or not curves["agent_cosine"].notna().any():
        return []
    table = cosine_table(runs, curves, context.keys)
    write_atomic(out / "cosine.csv", table.to_csv(index=False))
    per_run, varying = _cosine_runs(runs, curves, context.keys)
    merged = curves[["run_id", "epoch", "agent_cosine"]].merge(per_run[["run_id", "density", *varying]], on="run_id")
    per_epoch = merged.dropna(subset=["agent_cosine"]).groupby(["density", *varying, "epoch"], dropna=False)
    per_epoch = per_epoch["agent_cosine"].agg(["mean", "std", "count"]).reset_index()
    per_epoch = per_epoch.sort_values(["density", *varying, "epoch"], ascending=[False] + [True] * (len(varying) + 1))
    write_atomic(out / "cosine_per_epoch.csv", per_epoch.rename(
        columns={"mean": "cosine mean", "std": "cosine std", "count": "runs"}).to_csv(index=False))
    plots.save(figures.cosine_figure(table, varying), out / "cosine.png")  # per epoch: agent.png
    return ["## AGENT's assumption: cosine between g_new and g_old", "",
            "Logged by AGENT at every corrected step, averaged per epoch (epochs where the correction is off are not "
            "logged); per run, the mean over the logged epochs and the last logged epoch; mean ± std over seeds "
            "(per epoch: cosine_per_epoch.csv).",
            "", context.markdown(table), "", "![cosine](cosine.png)", ""]


def _agent_figure(context: Context) -> list[str]:
    return context.figure(figures.agent_figure(context.runs, context.curves, context.keys), context.out, "agent.png",
                          "## AGENT over epochs", "AGENT's c_t, the variance ratio Var(ĝ)/Var(g) of its probe batch "
                          "and the cosine between g_new and g_old, per epoch of every run that used AGENT.")


def _after_tables(context: Context) -> list[str]:
    return _cosine_section(context) + _agent_figure(context)


def _gamma_figures(context: Context) -> list[str]:
    """The γ study's figures: accuracy against γ (mean ± std, then with paired intervals), epochs to accuracy
    against γ, and the clean-robust trade-off labelled by γ; where the runs vary γ and have test results."""
    runs, curves, table, keys, labels, out = (context.runs, context.curves, context.table, context.keys,
                                              context.labels, context.out)
    if GAMMA_KEY not in runs or "test_pgd_accuracy mean" not in table or table[GAMMA_KEY].nunique() < 2:
        return []
    lines = context.figure(figures.gamma_figure(table, keys, labels), out, "gamma_sensitivity.png")
    paired = context.paired(context.reference) if (context.reference or reference(runs)) else pd.DataFrame()
    intervals = not paired.empty and bool(paired["low"].notna().any())  # one seed: rows, but no interval
    caption = ("Per density: the mean over seeds and, as bars, the paired interval of the difference from γ = 0 "
               "(the paired table above), simultaneous for its family (Bonferroni; the raw 95% interval with "
               "--correction none), drawn about the mean; a bar clear of the dotted γ = 0 line is an established "
               "difference." if intervals else
               "Per density: the mean over seeds. No interval bars: a paired interval needs at least two seeds of "
               "a setting and of its γ = 0 reference, and this sweep has fewer.")
    lines += context.figure(figures.gamma_paired_figure(runs, curves, paired, keys, labels), out, "gamma_paired.png",
                    "## Accuracy against γ, paired" if intervals else "## Accuracy against γ", caption)
    steps = context.steps
    if steps is not None:
        names = [c for c in steps.columns if " >= " in c and not c.endswith((" reached", " censored at"))]
        lines += context.figure(figures.gamma_epochs_figure(steps, names, keys), out, "gamma_epochs.png",
                         "## Epochs to accuracy against γ", "Median over seeds of the first epoch at each validation "
                         "level (the epochs table above); open triangles: the median seed never reached it.")
    lines += context.figure(figures.tradeoff_figure(table, keys, labels, plots.chance_level(runs)), out, "tradeoff.png",
                     "## Clean-robust trade-off across γ", "Mean test clean against robust accuracy per setting, "
                     "each point labelled with its γ.")
    return lines


HOOK = register(StudyHook(name="agent_gamma", prefixes=(PREFIX,), averaged=AGENT_SUMMARY, ranges=(C_RANGE,),
                           run_columns=run_columns, flags=flags, reference=reference,
                           sections={Place.AFTER_TABLES: _after_tables, Place.AFTER_CONVERGENCE: _gamma_figures}))
