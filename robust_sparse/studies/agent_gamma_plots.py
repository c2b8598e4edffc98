"""The γ/AGENT study's figures (robust_sparse.studies.agent_gamma places them in the report): AGENT over epochs,
its cosine per density, accuracy against γ (mean ± std, and with the paired intervals), epochs to accuracy against
γ, and the clean-robust trade-off labelled by γ. Drawn with the generic report's building blocks
(robust_sparse.studies.plots), which name no study key.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import ScaledTranslation

from robust_sparse.config.schema import GAMMA_KEY
from robust_sparse.studies import plots


def gamma_figure(table: pd.DataFrame, keys: Sequence[str], labels: dict[str, str]) -> Figure | None:
    """Test accuracy per γ (``table``: the report's mean ± std per setting), one line per setting of the other
    keys (density above all)."""
    table = table[table[GAMMA].notna()]
    if table[GAMMA].nunique() < 2:
        return None
    metrics = [m for m in plots.test_metrics(table, " mean") if table[f"{m} mean"].notna().any()]
    if not metrics:  # no γ setting has test results yet (a report while the sweep still trains)
        return None
    table = table[table[[f"{m} mean" for m in metrics]].notna().any(axis=1)]  # settings not yet tested: no entry
    if table[GAMMA].nunique() < 2:  # one γ tested so far: nothing to compare
        return None
    table = plots.in_percent(table, [f"{m} {part}" for m in metrics for part in ("mean", "std")])
    others = [k for k in keys if k not in ("seed", GAMMA) and k in table]
    plotted = plots.series(table, plots.legend_keys(table, others))
    figure, axes = plots.new_figure(len(metrics))
    gammas = sorted(float(g) for g in table[GAMMA].unique())
    positive = [g for g in gammas if g > 0]
    for axis, metric in zip(axes, metrics):
        for i, s in enumerate(plotted):
            rows = s.frame.dropna(subset=[f"{metric} mean"]).sort_values(GAMMA)
            bars = axis.errorbar(rows[GAMMA], rows[f"{metric} mean"], yerr=rows[f"{metric} std"].fillna(0),
                                 color=s.color, linestyle=s.linestyle, marker=s.marker, markersize=5, capsize=3)
            plots.dodge_bars(figure, bars, i, len(plotted))
        # γ spans decades and includes 0: symmetric log, ticks at the values studied
        axis.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
        axis.set_xticks(gammas, [f"{g:g}" for g in gammas])
        axis.minorticks_off()
        axis.margins(x=0.1)
        axis.set(xlabel=textwrap.fill("γ (weight of AGENT's correction; 0 = no correction; symlog scale)", plots.WRAP),
                 ylabel=plots.axis_label(labels, metric))
    return plots.finish_figure(figure, axes, "AGENT γ sensitivity: test accuracy per γ (" +
                   plots.spread_note(plotted, band=False, table=True) + ")", plotted)


AGENT_PANELS = {  # per-epoch column: axis label
    "agent_c": "c_t, AGENT's adaptive coefficient\n(the paper's range: [0, 1])",
    "agent_variance_ratio": "Var(ĝ)/Var(g) on a probe batch\n(below 1: the correction reduces variance)",
    "agent_cosine": "cos(g_new, g_old) on the same batch,\nmean over the epoch's steps",
}


def agent_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str]) -> Figure | None:
    """AGENT over epochs: c_t, the variance ratio and the cosine, one line per setting of the AGENT runs."""
    if curves.empty or "agent_c" not in curves:
        return None
    logged = curves.groupby("run_id")["agent_c"].apply(lambda c: c.notna().any())
    ids = set(logged[logged].index)
    if not ids:
        return None
    rows = runs[runs["run_id"].isin(ids)].drop_duplicates("run_id")
    rows = plots.fill_density(rows, plots.row_densities(rows, curves))
    legend = plots.legend_keys(rows, [k for k in keys if k not in ("subnet", "subnet_density")])
    panels = [c for c in AGENT_PANELS if c in curves and curves.loc[curves["run_id"].isin(ids), c].notna().any()]
    long = curves[curves["run_id"].isin(ids)][["run_id", "epoch", *panels]].merge(
        rows[["run_id", *legend]], on="run_id")
    plotted = plots.series(long, legend)
    figure, axes = plots.new_figure(len(panels))
    for axis, column in zip(axes, panels):
        for s in plotted:
            stats = s.frame.dropna(subset=[column]).groupby("epoch")[column].agg(["mean", "std", "count"])
            plots.draw_band(axis, stats, s)
        axis.set(xlabel="epoch", ylabel=AGENT_PANELS[column])
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if column == "agent_c":
            for level in (0, 1):
                axis.axhline(level, color="0.5", linewidth=0.8, linestyle=":")
        if column == "agent_variance_ratio":
            axis.axhline(1, color="0.5", linewidth=0.8, linestyle=":")
            ratios = long[column].dropna()
            if (ratios > 0).all() and ratios.max() > 10 * ratios.min():  # a spike: log scale keeps the rest legible
                axis.set_yscale("log")
                axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    return plots.finish_figure(figure, axes, "AGENT over epochs (" + plots.spread_note(plotted, band=True) + ")",
                               plotted)


def cosine_figure(table: pd.DataFrame, varying: Sequence[str]) -> Figure:
    """AGENT's cosine between g_new and g_old per density (``table``: the report's cosine table)."""
    plotted = plots.series(table, plots.legend_keys(table, varying))
    figure, axes = plots.new_figure(1, width=7.0)
    for i, s in enumerate(plotted):
        rows = s.frame.sort_values("density", ascending=False)
        bars = axes[0].errorbar(rows["density"], rows["cosine mean"], yerr=rows["cosine std"].fillna(0),
                                color=s.color, linestyle=s.linestyle, marker=s.marker, markersize=5, capsize=3)
        plots.dodge_bars(figure, bars, i, len(plotted))
    plots.density_axis(axes[0], table["density"])
    axes[0].set_ylabel("cos(g_new, g_old) on the same batch,\nmean over the run's logged epochs")
    return plots.finish_figure(figure, axes, "AGENT: cosine between the current and the snapshot gradient\n(" +
                   plots.spread_note(plotted, band=False, table=True) + ")", plotted)


GAMMA = GAMMA_KEY  # the grid key these figures are drawn against


GAMMA_LABEL = "γ (weight of AGENT's correction; symlog scale: linear below the smallest γ > 0)"


def _gamma_axis(axis: Any, gammas: Iterable[float]) -> None:
    """γ spans decades and includes 0: a symmetric-log axis (said in the label), ticks at the values studied."""
    gammas = sorted({float(g) for g in gammas})
    positive = [g for g in gammas if g > 0]
    axis.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    axis.set_xticks(gammas, [f"{g:g}" for g in gammas])
    axis.minorticks_off()
    axis.margins(x=0.08)
    axis.set_xlabel(textwrap.fill(GAMMA_LABEL, plots.WRAP))


def gamma_paired_figure(runs: pd.DataFrame, curves: pd.DataFrame, paired: pd.DataFrame, keys: Sequence[str],
                        labels: dict[str, str]) -> Figure | None:
    """Per density (a column of panels) final test clean and robust accuracy (rows) against γ: the mean over
    seeds, and as bars the paired 95% interval of each γ's difference from the γ = 0 run of the same seed, drawn
    about the mean; a dotted line at the γ = 0 level. A bar clear of that line is an established difference."""
    if GAMMA not in runs or runs[GAMMA].dropna().nunique() < 2:
        return None
    frame = runs[runs[GAMMA].notna()].assign(_density=plots.row_densities(runs[runs[GAMMA].notna()], curves))
    metrics = [m for m in plots.test_metrics(frame) if frame[m].notna().any()]
    if not metrics:
        return None
    frame = frame[frame[metrics].notna().any(axis=1)]
    if frame[GAMMA].nunique() < 2:  # a sweep still training: fewer than two γ with test results
        return None
    frame = plots.in_percent(frame, metrics)
    levels = sorted(frame["_density"].dropna().unique(), reverse=True) or [None]
    others = [k for k in keys if k not in ("seed", GAMMA, *plots.DENSITY_KEYS, "subnet")]
    plotted = plots.series(frame, plots.legend_keys(frame, others))
    plotted = plots.mark_identical(plotted, plots.identical_settings(plotted, metrics[0], GAMMA))
    figure = Figure(figsize=(5.0 * len(levels), 3.6 * len(metrics) + 0.6))
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(metrics), len(levels), squeeze=False, sharex=True)
    for row, metric in enumerate(metrics):
        for col, level in enumerate(levels):
            axis = grid[row][col]
            for i, s in enumerate(plotted):
                part = s.frame if level is None else s.frame[s.frame["_density"] == level]
                part = part.dropna(subset=[metric])
                if part.empty:
                    continue
                means = part.groupby(GAMMA)[metric].mean().sort_index()
                lower, upper = [], []
                for gamma in means.index:
                    found = plots.paired_row(paired, part[part[GAMMA] == gamma].iloc[0].to_dict(), metric)
                    # the family's simultaneous (Bonferroni) interval where the table was adjusted, else the raw one
                    low_key, high_key = (("low_adjusted", "high_adjusted") if found is not None
                                         and found.get("low_adjusted") == found.get("low_adjusted")
                                         and "low_adjusted" in found else ("low", "high"))
                    if found is None or found[low_key] != found[low_key]:
                        lower.append(0.0)
                        upper.append(0.0)
                    else:  # the paired table holds fractions
                        lower.append(plots.PERCENT * max(0.0, found["mean"] - found[low_key]))
                        upper.append(plots.PERCENT * max(0.0, found[high_key] - found["mean"]))
                bars = axis.errorbar(means.index, means.values, yerr=[lower, upper], color=s.color,
                                     linestyle=s.linestyle, capsize=3, **s.marker_style)
                plots.dodge_bars(figure, bars, i, len(plotted))
                if 0.0 in [float(g) for g in means.index]:
                    axis.axhline(float(means[means.index.astype(float) == 0.0].iloc[0]), color=s.color,
                                 linestyle=":", linewidth=0.9)
            _gamma_axis(axis, frame[GAMMA])
            plots.chance_line(axis, plots.chance_level(frame))
            if row < len(metrics) - 1:
                axis.set_xlabel("")
            if col == 0:
                axis.set_ylabel(plots.axis_label(labels, metric))
            if row == 0 and level is not None:
                key = next((k for k in plots.DENSITY_KEYS if k in frame), "sparsity.density")
                axis.set_title(f"{plots.display_name(key)}={plots.format_value(key, float(level))}")
    counts = frame.groupby([GAMMA, "_density"], dropna=False)["seed"].nunique() if "seed" in frame else [1]
    low, high = int(min(counts)), int(max(counts))
    seeds = (f"{low}" if low == high else f"{low}-{high}") + (" seed" if high == 1 else " seeds")
    return plots.finish_figure(figure, [a for line in grid for a in line],
                   f"Test accuracy against γ: mean over {seeds}; bars: paired t interval of the difference\n"
                   "from γ = 0 (same seed), simultaneous for the report's test intervals (95% / family size, "
                   "Bonferroni), about the mean;\ndotted: the γ = 0 level", plotted)


def gamma_epochs_figure(steps: pd.DataFrame, thresholds: Sequence[str], keys: Sequence[str]) -> Figure | None:
    """Epochs to reach each validation accuracy against γ, one panel per density, one line per threshold
    (``steps``: the report's epochs_to_accuracy table). A median seed that never got there within E epochs is
    drawn as an open triangle at E + 0.5 (censored: later than E, not missing)."""
    if GAMMA not in steps or steps[GAMMA].dropna().nunique() < 2 or not thresholds:
        return None
    frame = steps[steps[GAMMA].notna()]
    density_key = next((k for k in plots.DENSITY_KEYS if k in frame), None)
    levels = sorted(frame[density_key].dropna().unique(), reverse=True) if density_key else [None]
    others = [k for k in keys if k not in ("seed", GAMMA, *plots.DENSITY_KEYS, "subnet") and k in frame
              and frame[k].astype(str).nunique() > 1]
    figure, axes = plots.new_figure(len(levels), width=5.0, height=4.0)
    palette = plots.colours(len(thresholds))
    handles = []
    for axis, level in zip(axes, levels):
        part = frame if level is None else frame[frame[density_key] == level]
        for t, name in enumerate(thresholds):
            for o, (_, group) in enumerate(part.groupby(others, dropna=False) if others else [((), part)]):
                group = group.sort_values(GAMMA)
                reached = group[name]
                censored = group[f"{name} censored at"] + 0.5
                y = reached.where(reached.notna(), censored)
                # equal epochs for several levels are common: each level's line a few points up or down
                shift = ScaledTranslation(0, (t - (len(thresholds) - 1) / 2) * 2.0 / 72, figure.dpi_scale_trans)
                drawn = [*axis.plot(group[GAMMA], y, color=palette[t], linestyle=plots.STYLES[o % len(plots.STYLES)],
                                    linewidth=1),
                         *axis.plot(group[GAMMA][reached.notna()], reached[reached.notna()], color=palette[t],
                                    marker=plots.MARKERS[o % len(plots.MARKERS)], linestyle="none", markersize=5),
                         *axis.plot(group[GAMMA][reached.isna()], censored[reached.isna()], color=palette[t],
                                    marker="^", markerfacecolor="none", linestyle="none", markersize=7)]
                for artist in drawn:
                    artist.set_transform(artist.get_transform() + shift)
        _gamma_axis(axis, frame[GAMMA])
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.margins(y=0.15)  # room for the lines set apart
        axis.set_ylabel("epochs (median over seeds)")
        if level is not None:
            axis.set_title(f"{plots.display_name(density_key)}={plots.format_value(density_key, float(level))}")
    for t, name in enumerate(thresholds):
        handles.append(plots.Series(plots.threshold_label(name), palette[t], "-", "o", frame))
    return plots.finish_figure(figure, axes, "Epochs to reach a validation accuracy against γ (median over seeds)"
                               "\nopen triangle at E + 0.5: the median seed did not get there within its E "
                               "epochs; lines of equal epochs set a few points apart", handles)


def tradeoff_figure(table: pd.DataFrame, keys: Sequence[str], labels: dict[str, str],
                    chance: float | None = None) -> Figure | None:
    """The clean-robust trade-off: mean test clean (x) against robust (y) accuracy per setting, one line per
    setting of the other keys through its γ values, each point labelled with its γ. One panel per density, each
    scaled to its own points: sparsity levels sit tens of points apart, and on one shared scale the γ values of a
    density crowd into one corner. The chance lines are drawn where they fall inside a panel's scale."""
    if GAMMA not in table or table[GAMMA].dropna().nunique() < 2:
        return None
    robust = [m for m in plots.test_metrics(table, " mean") if m != "test_clean_accuracy"]
    if "test_clean_accuracy mean" not in table or not robust:
        return None
    metric = robust[-1]  # the strongest evaluation (the stage's worst case) where there is one
    frame = table[table[GAMMA].notna()].dropna(subset=["test_clean_accuracy mean", f"{metric} mean"])
    if frame[GAMMA].nunique() < 2:
        return None
    frame = plots.in_percent(frame, ["test_clean_accuracy mean", f"{metric} mean"])
    density = next((k for k in plots.DENSITY_KEYS if k in frame and frame[k].nunique() > 1), None)
    others = [k for k in keys if k not in ("seed", GAMMA, density) and k in frame]
    panels = [(None, frame)] if density is None else \
        [(value, frame[frame[density] == value]) for value in sorted(frame[density].unique(), reverse=True)]
    legend = plots.legend_keys(frame, others)
    figure, axes = plots.new_figure(len(panels), width=6.0, height=5.0)
    plotted: list[plots.Series] = []
    for axis, (value, rows_of_panel) in zip(axes, panels):
        plotted = plots.series(rows_of_panel, legend)
        for s in plotted:
            rows = s.frame.sort_values(GAMMA)
            axis.plot(rows["test_clean_accuracy mean"], rows[f"{metric} mean"], color=s.color,
                      linestyle=s.linestyle, marker=s.marker, markersize=5)
            for k, (x, y, gamma) in enumerate(zip(rows["test_clean_accuracy mean"], rows[f"{metric} mean"],
                                                  rows[GAMMA])):
                axis.annotate(f"γ={float(gamma):g}", (x, y), xytext=(5, 4 if k % 2 else -10),
                              textcoords="offset points", fontsize=7, color=s.color)  # alternate: near points apart
        axis.margins(0.15)  # room for the labels
        axis.set(xlabel=plots.axis_label(labels, "test_clean_accuracy"), ylabel=plots.axis_label(labels, metric))
        if value is not None:
            axis.set_title(f"{plots.display_name(density)}={plots.format_value(density, value)}")
        (x_low, x_high), (y_low, y_high) = axis.get_xlim(), axis.get_ylim()
        if chance is not None and y_low <= plots.PERCENT * chance <= y_high:
            plots.chance_line(axis, chance)
        if chance is not None and x_low <= plots.PERCENT * chance <= x_high:
            plots.chance_line(axis, chance, vertical=True)
    title = "Clean-robust trade-off across γ (means over seeds; labels: γ"
    title += "; each panel on its own scale)" if len(panels) > 1 else ")"
    return plots.finish_figure(figure, axes, title, plotted if legend else [])
