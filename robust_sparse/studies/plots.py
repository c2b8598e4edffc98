"""The figures of a sweep report, one per question: convergence (validation accuracy per epoch), AGENT's γ
sensitivity (test accuracy per γ), robust accuracy against density and against training FLOPs, AGENT over epochs
(c_t, variance ratio, cosine) and AGENT's cosine per density.

Every function returns a matplotlib ``Figure`` (None when its question does not arise in the sweep) built
without pyplot, so reports leave no global figure state behind and tests can read the legend and the axes;
:func:`save` writes one atomically. Conventions shared by all figures:

- legend entries name a setting as ``name=value`` pairs of the grid keys that tell the plotted settings apart
  (a key every setting shares, or one implied by the others such as the sweep's name, is left out; a key a
  setting does not set is left out of its entry); the legend sits below the panels, never on a curve;
- colour marks the setting of every key but one, line style and marker the density (or the key with the
  fewest values), so a sparsity level reads the same in every colour; convergence puts each density in its
  own column of panels instead;
- lines are the mean over seeds, bands or error bars ± 1 standard deviation over seeds (the title says so);
  error bars at the same x are set a few points apart;
- axis labels name the attack, its steps, norm and ε as the runs' configs and evaluations record them;
- accuracies are drawn in % (0-100), as the evaluation report's leaderboard plots draw them (the runs record
  fractions: :func:`in_percent` converts a figure's columns as it draws them), the chance line included;
- a series drawn exactly under another (the same values everywhere) says so in its legend entry, ``(= ...)``, and
  its markers are hollow and larger, so both stay visible.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import ScaledTranslation

from robust_sparse.files.atomic import save_figure
from robust_sparse.config.schema import GAMMA_KEY
from robust_sparse.studies import stats

# Legend names of the grid keys a reader knows by another name; any other key shows its last dotted part. The
# order is also the order of the pairs in a legend entry.
DISPLAY = {
    "sparsity.method": "method",
    "sparsity.density": "density",
    "subnet_density": "sub-net density",
    "agent.enabled": "AGENT",
    "agent.estimator": "AGENT estimator",
    GAMMA_KEY: "γ",
    "objective": "objective",
}
DENSITY_KEYS = ("subnet_density", "sparsity.density")  # the first present is the density of a row
IMPLIED_FIRST = ("sweep", "subnet")  # names that other keys usually imply: dropped from legends first
STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
NORMS = {"linf": "L∞", "l2": "L2"}
WRAP = 42  # characters of an axis label per line
PERCENT = 100.0  # the accuracy axes' unit: the runs' fractions times this


def save(figure: Figure, path: str | Path) -> None:
    """Write ``figure`` as a PNG atomically, cropped to what it draws (the legend below the panels included)."""
    save_figure(figure, path, dpi=130, bbox_inches="tight")


def new_figure(panels: int, width: float = 5.6, height: float = 4.2) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(width * panels, height))
    FigureCanvasAgg(figure)  # Agg without pyplot: no global figure registry, nothing to close
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, list(axes)


# ----------------------------------------------------------------------------------------------- axis labels

def format_eps(eps: float) -> str:
    """ε as a reader writes it: 0.1, 0.5, or 8/255 for a multiple of 1/255 without a short decimal."""
    text = f"{eps:g}"
    if len(text) <= 5:
        return text
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-4 else f"{eps:.3g}"


def _norm(name: Any) -> str:
    return NORMS.get(str(name).lower(), str(name))


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def metric_labels(run_dirs: Iterable[Path]) -> dict[str, str]:
    """Axis labels of the report's accuracy columns from the runs' own records: ``config.yaml`` (validation
    attack), ``eval.json`` (the test PGD run after training) and ``sweep_eval.json`` (the evaluation stage), e.g.
    ``test PGD-20 accuracy (L∞, ε=0.1)``. A part that differs between runs lists its values."""
    parts: dict[str, dict[str, list[str]]] = {}

    def add(metric: str, name: str, threat: str) -> None:  # name: "test PGD-20 accuracy", threat: "L∞, ε=0.1"
        seen = parts.setdefault(metric, {"name": [], "threat": []})
        for field, value in (("name", name), ("threat", threat)):
            if value not in seen[field]:
                seen[field].append(value)

    for run_dir in run_dirs:
        config = _read(run_dir / "config.yaml")
        attack, val, test_config = (config.get(k) or {} for k in ("attack", "val", "eval"))
        if attack.get("eps") is not None and val.get("pgd_steps") is not None:
            add("val_pgd_accuracy", f"validation PGD-{val['pgd_steps']} accuracy",
                f"{_norm(attack.get('norm'))}, ε={format_eps(float(attack['eps']))}")
        test = _read(run_dir / "eval.json")
        steps = test.get("pgd_steps", test_config.get("pgd_steps"))
        restarts = test.get("restarts", test_config.get("restarts")) or 1
        eps = test.get("eps", test_config.get("eps") if test_config.get("eps") is not None else attack.get("eps"))
        if steps is not None and eps is not None:
            add("test_pgd_accuracy", f"test PGD-{steps}" + (f"x{restarts}" if restarts > 1 else "") + " accuracy",
                f"{_norm(test.get('norm', attack.get('norm')))}, ε={format_eps(float(eps))}")
        for record in (_read(run_dir / "sweep_eval.json").get("results") or [])[:1]:
            threat = f"{record.get('n_examples')} test points, {_norm(record.get('threat_model'))}, " \
                     f"ε={format_eps(float(record.get('eps')))}"
            attacks = [label for label in record.get("per_attack") or {} if "/" not in label]
            for label in attacks:
                add(f"eval_{label}_accuracy", f"{label} accuracy", threat)
            if len(attacks) > 1:
                add("eval_worst_accuracy", f"accuracy under the worst of {' and '.join(attacks)}", threat)
    labels = {"val_clean_accuracy": "validation clean accuracy", "test_clean_accuracy": "test clean accuracy",
              "eval_clean_accuracy": "evaluation-stage clean accuracy"}
    for metric, seen in parts.items():
        labels[metric] = f"{' / '.join(seen['name'])} ({'; '.join(seen['threat'])})"
    return labels


def axis_label(labels: dict[str, str], metric: str) -> str:
    """An accuracy axis's label with its unit: ``test PGD-20 accuracy (%; L∞, ε=8/255)``."""
    text = labels.get(metric, metric.replace("_", " "))
    name, bracket, rest = text.partition(" (")
    return textwrap.fill(f"{name} (%; {rest}" if bracket else f"{text} (%)", WRAP)


def in_percent(frame: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """``frame`` with its accuracy ``columns`` (fractions, as the runs record them) in %."""
    return frame.assign(**{c: frame[c] * PERCENT for c in columns if c in frame})


# ------------------------------------------------------------------------------------------ settings, legend

def _value(value: Any) -> Any:
    """A grid value as a hashable, NaN-free key: None for 'not set'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _distinct(frame: pd.DataFrame, keys: Sequence[str]) -> int:
    return len({tuple(_value(v) for v in row) for row in frame[list(keys)].itertuples(index=False)})


def display_name(key: str, keys: Sequence[str] = ()) -> str:
    if key in DISPLAY:
        return DISPLAY[key]
    short = key.split(".")[-1]
    clash = [k for k in keys if k != key and k.split(".")[-1] == short]
    return key if clash else short


def format_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if key == "sparsity.method" and value == "none":
        return "dense"
    if key in DENSITY_KEYS and isinstance(value, (int, float)):
        return "1 (dense)" if value == 1 else f"{value:.3g}"  # a measured density: 0.2001 reads as 0.2
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_label(keys: Sequence[str], values: Sequence[Any]) -> str:
    """``γ=0.1, density=0.01``: the keys a setting sets, ``name=value``."""
    return ", ".join(f"{display_name(k, keys)}={format_value(k, v)}" for k, v in zip(keys, values)
                     if _value(v) is not None)


def legend_keys(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The keys that tell the settings of ``frame`` apart, fewest first: keys with one value go; then a key the
    others imply (the sweep's name, a sub-net's index, an auxiliary override) goes if the rest still separate
    every setting; known keys (DISPLAY) go last, when the others tell the settings apart without them. A key
    that only some settings set (an override of one sweep: ``ast_subnet_bn=True``, ``optim.epochs=18``) says
    what is special about them, so it stays even where another key would tell them apart."""
    keys = [k for k in keys if k in frame and k != "seed" and _distinct(frame, [k]) > 1]
    total = _distinct(frame, keys) if keys else 1
    known = [k for k in reversed(DISPLAY) if k in keys]  # the least telling first: γ=0.1 if all AGENT runs share it
    partial = {k for k in keys if k not in IMPLIED_FIRST and any(_value(v) is None for v in frame[k])}
    droppable = [k for k in IMPLIED_FIRST if k in keys] + [k for k in reversed(keys) if k not in DISPLAY
                                                         and k not in IMPLIED_FIRST and k not in partial] + known
    for key in droppable:
        rest = [k for k in keys if k != key]
        if rest and _distinct(frame, rest) == total and all(
                any(_value(v) is not None for v in row) for row in frame[rest].itertuples(index=False)):
            keys = rest  # every setting still told apart, and none left with an empty entry
    order = list(DISPLAY)
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), keys.index(k)))


@dataclass
class Series:
    label: str  # "" when only one setting is plotted (no legend)
    color: Any
    linestyle: str
    marker: str
    frame: pd.DataFrame
    hollow: bool = False  # drawn exactly under another series: hollow, larger markers keep both visible

    @property
    def marker_style(self) -> dict[str, Any]:
        return {"marker": self.marker, "markersize": 8 if self.hollow else 5,
                "markerfacecolor": "none" if self.hollow else self.color}


def series(frame: pd.DataFrame, keys: Sequence[str]) -> list[Series]:
    """One series per setting of ``keys`` (legend keys), in the order they first appear, grouped by colour."""
    keys = list(keys)
    if not keys:
        return [Series("", "C0", "-", "o", frame)]
    style_key = None
    if len(keys) > 1:
        style_key = next((k for k in DENSITY_KEYS if k in keys), None)
        fewest = min(keys, key=lambda k: _distinct(frame, [k]))
        if style_key is None and _distinct(frame, [fewest]) <= len(STYLES):
            style_key = fewest
    hue_keys = [k for k in keys if k != style_key]
    hues = [tuple(_value(v) for v in row) for row in frame[hue_keys].itertuples(index=False)]
    styles = [_value(v) for v in frame[style_key]] if style_key else [None] * len(frame)
    hue_order = list(dict.fromkeys(hues))
    style_order = list(dict.fromkeys(styles))
    if style_key in DENSITY_KEYS:  # densest first: solid for dense, then sparser and sparser
        style_order.sort(key=lambda d: -math.inf if d is None else -float(d))
    palette = colours(len(hue_order))
    result = []
    for h, hue in enumerate(hue_order):
        for j, style in enumerate(style_order):
            # compared as Python values: in a column pandas would turn a None ('not set') into NaN != None
            part = frame[[v == hue and w == style for v, w in zip(hues, styles)]]
            if part.empty:
                continue
            first = part.iloc[0]
            result.append(Series(setting_label(keys, [first[k] for k in keys]), palette[h],
                                 STYLES[j % len(STYLES)], MARKERS[j % len(MARKERS)], part))
    return result


def colours(count: int) -> list[Any]:
    colors = colormaps["tab10" if count <= 10 else "tab20"].colors
    return [colors[i % len(colors)] for i in range(count)]


def _legend_below(figure: Figure, plotted: list[Series]) -> None:
    """The legend under the panels, in as many columns as the figure's width holds."""
    entries = [s for s in plotted if s.label]
    if len(entries) < 2:
        return
    handles = [Line2D([], [], color=s.color, linestyle=s.linestyle, marker=s.marker, markersize=5,
                      markerfacecolor="none" if s.hollow else s.color) for s in entries]
    widest = max(len(s.label) for s in entries)
    characters = figure.get_figwidth() * 72 / (8 * 0.6)  # 8 pt text, about 0.6 em per character
    fits = max(1, min(len(entries), int(characters // (widest + 6))))
    columns = math.ceil(len(entries) / math.ceil(len(entries) / fits))  # rows as full as each other
    figure.legend(handles, [s.label for s in entries], loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=columns, fontsize=8, frameon=False)


def spread_note(plotted: list[Series], band: bool, table: bool = False) -> str:
    """What the lines and the spread show, for the title: seeds per setting (a run's AST sub-nets count once;
    a table of means counts them in its ``runs`` column)."""
    counts = [int(c) for s in plotted for c in s.frame["runs"]] if table else \
        [n for s in plotted for n in (s.frame.groupby("_density")["run_id"].nunique() if "_density" in s.frame
                                      else [s.frame["run_id"].nunique()])]
    low, high = min(counts), max(counts)
    if high == 1:
        return "one seed per setting"
    seeds = (f"{low}" if low == high else f"{low}-{high}") + " seeds"
    return f"line: mean, band: ± 1 std over {seeds}" if band else f"mean ± 1 std over {seeds}"


def finish_figure(figure: Figure, axes: list[Any], title: str, plotted: list[Series]) -> Figure:
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    _legend_below(figure, plotted)
    return figure


def draw_band(axis: Any, stats: pd.DataFrame, s: Series) -> None:
    """Mean line and ± 1 std band of one series (no band where one seed)."""
    axis.plot(stats.index, stats["mean"], color=s.color, linestyle=s.linestyle,
              **{**s.marker_style, "markersize": 7 if s.hollow else 4})
    spread = stats[stats["count"] > 1]
    if not spread.empty:
        axis.fill_between(spread.index, spread["mean"] - spread["std"], spread["mean"] + spread["std"],
                          color=s.color, alpha=0.12, linewidth=0)


def dodge_bars(figure: Figure, container: Any, index: int, count: int) -> None:
    """Shift the error-bar series ``index`` of ``count`` a few points sideways, so bars at the same x stay apart;
    after plotting, so the axes' limits come from the data, which (as a test reads it back) keeps its x."""
    shift = ScaledTranslation((index - (count - 1) / 2) * min(4.0, 24.0 / max(count, 1)) / 72, 0,
                              figure.dpi_scale_trans)
    for artist in container.get_children():
        artist.set_transform(artist.get_transform() + shift)


def density_axis(axis: Any, densities: Iterable[float]) -> None:
    densities = sorted(set(densities), reverse=True)
    axis.set_xscale("log")
    axis.set_xticks(densities, [format_value("sparsity.density", float(d)) for d in densities])
    axis.minorticks_off()
    axis.margins(x=0.1)  # room for the dodged error bars at the outermost densities
    axis.invert_xaxis()
    axis.set_xlabel("density: fraction of weights kept (sparser to the right)")


# --------------------------------------------------------------------------------------------------- figures

VALIDATION = ["val_clean_accuracy", "val_pgd_accuracy"]


def fill_density(frame: pd.DataFrame, densities: pd.Series) -> pd.DataFrame:
    """``frame`` with its density key's 'not set' (a dense run among sparse ones) replaced by the row's density,
    so a legend says density=1 (dense) instead of leaving the density out."""
    key = next((k for k in DENSITY_KEYS if k in frame), None)
    if key is None:
        return frame
    return frame.assign(**{key: [d if _value(v) is None else v for v, d in zip(frame[key], densities)]})


def per_epoch(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str],
              columns: Sequence[str] = VALIDATION) -> pd.DataFrame:
    """One row per run (per sub-net for AST) and epoch with its setting keys; an AST sub-net's rows take its own
    ``*_subnet{k}`` columns."""
    by_run = dict(tuple(curves.groupby("run_id", sort=False)))
    id_columns = [c for c in ("run_id", "subnet") if c in runs]
    parts = []
    for record in runs.drop_duplicates(id_columns).to_dict("records"):
        run = by_run.get(record["run_id"])
        if run is None:
            continue
        k = record.get("subnet")
        part = {"run_id": record["run_id"], "epoch": run["epoch"].to_numpy()}
        for column in columns:
            own = f"{column}_subnet{int(k)}" if _value(k) is not None else None
            source = own if own in run else column
            part[column] = run[source].to_numpy() if source in run else float("nan")
        part = pd.DataFrame(part)
        for key in keys:
            part[key] = [record.get(key)] * len(part)
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def convergence_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str],
                       labels: dict[str, str]) -> Figure | None:
    """Validation clean and PGD accuracy per epoch, one line per setting. When the density varies over a few
    levels, one column of panels per density (a dense run in its own column), so no panel holds more than the
    settings of one density; colour then marks the setting of the other keys, the same in every column."""
    rows = runs.assign(_density=row_densities(runs, curves))
    long = per_epoch(rows, curves, [*keys, "_density"])
    if long.empty:
        return None
    long = in_percent(long, VALIDATION)
    legend = legend_keys(long, keys)
    levels = sorted(long["_density"].dropna().unique(), reverse=True)
    facets = any(k in DENSITY_KEYS for k in legend) and 1 < len(levels) <= 4 and long["_density"].notna().all()
    if facets:  # chosen again without the density, so that no setting is left with an empty legend entry
        legend = legend_keys(long, [k for k in keys if k not in DENSITY_KEYS])
    plotted = series(long, legend)
    # a γ that changed nothing (γ = 0 and 0.1 before AGENT's correction starts) draws exactly over another line
    same = [identical_settings(plotted, metric, ["_density", "epoch"]) for metric in VALIDATION]
    plotted = mark_identical(plotted, {i: j for i, j in same[0].items() if same[1].get(i) == j})
    columns = levels if facets else [None]
    figure = Figure(figsize=(5.0 * len(columns), 7.2) if facets else (11.2, 4.2))
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, len(columns), squeeze=False, sharex=True, sharey="row") if facets else \
        figure.subplots(1, 2, squeeze=False)[0].reshape(2, 1)
    for row, metric in enumerate(VALIDATION):
        for col, level in enumerate(columns):
            axis = grid[row][col]
            for s in plotted:
                frame = s.frame if level is None else s.frame[s.frame["_density"] == level]
                stats = frame.groupby("epoch")[metric].agg(["mean", "std", "count"]).dropna(subset=["mean"])
                if not stats.empty:
                    draw_band(axis, stats, s)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_xlabel("epoch" if row == 1 or not facets else "")
            if col == 0:
                axis.set_ylabel(axis_label(labels, metric))
            if facets and row == 0:
                key = next(k for k in DENSITY_KEYS if k in long)
                axis.set_title(f"{display_name(key)}={format_value(key, float(level))}")
    return finish_figure(figure, [a for line in grid for a in line], "Convergence: validation accuracy per epoch (" +
                   spread_note(plotted, band=True) + ")", plotted)


def test_metrics(frame: pd.DataFrame, suffix: str = "") -> list[str]:
    """The test accuracies to plot: clean, PGD after training, and the evaluation stage's robust accuracy (its
    worst case over attacks, or its one attack)."""
    metrics = [m for m in ("test_clean_accuracy", "test_pgd_accuracy") if f"{m}{suffix}" in frame]
    stage = [c[: len(c) - len(suffix)] for c in frame.columns
             if c.startswith("eval_") and c.endswith(f"_accuracy{suffix}") and "clean" not in c]
    worst = [m for m in stage if m == "eval_worst_accuracy"]
    return metrics + (worst or stage[:1])


def row_densities(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.Series:
    """Each row's density: the sub-net's, else the configured one, else the run's last measured one, else 1
    (a dense run logs none)."""
    measured = {}
    if not curves.empty and "density" in curves:
        last = curves.dropna(subset=["density"]).groupby("run_id")["density"].last()
        measured = last.to_dict()
    densities = []
    for record in runs.to_dict("records"):
        value = next((record[k] for k in DENSITY_KEYS if _value(record.get(k)) is not None),
                     measured.get(record["run_id"], 1.0))
        try:
            densities.append(round(float(value), 4))
        except (TypeError, ValueError):  # a density given as a list (AST's densities): not one level
            densities.append(float("nan"))
    return pd.Series(densities, index=runs.index)


def sparsity_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str],
                    labels: dict[str, str]) -> Figure | None:
    """Test accuracy against density, one line per setting of the other keys; None unless density varies."""
    frame = runs.assign(_density=row_densities(runs, curves)).dropna(subset=["_density"])
    metrics = [m for m in test_metrics(frame) if frame[m].notna().any()]
    frame = frame[frame[metrics].notna().any(axis=1)] if metrics else frame.iloc[:0]  # runs not yet tested
    if frame["_density"].nunique() < 2:
        return None
    frame = in_percent(frame, metrics)
    others = [k for k in keys if k not in (*DENSITY_KEYS, "subnet")]
    plotted = series(frame, legend_keys(frame, others))
    figure, axes = new_figure(len(metrics))
    for axis, metric in zip(axes, metrics):
        for i, s in enumerate(plotted):
            stats = s.frame.groupby("_density")[metric].agg(["mean", "std"]).dropna(subset=["mean"])
            stats = stats.sort_index(ascending=False)
            bars = axis.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), color=s.color,
                                 linestyle=s.linestyle, marker=s.marker, markersize=5, capsize=3)
            dodge_bars(figure, bars, i, len(plotted))
        density_axis(axis, frame["_density"])
        axis.set_ylabel(axis_label(labels, metric))
    return finish_figure(figure, axes, "Robust accuracy against sparsity (" + spread_note(plotted, band=False) + ")",
                   plotted)


def flops_figure(runs: pd.DataFrame, curves: pd.DataFrame, keys: Sequence[str],
                 labels: dict[str, str]) -> Figure | None:
    """Test accuracy against training FLOPs (a fraction of dense training), one line per setting of the keys
    other than density joining its densities; None without FLOPs figures or with fewer than two points."""
    frame = runs.assign(_density=row_densities(runs, curves)).dropna(subset=["train_flops_vs_dense"])
    metrics = [m for m in test_metrics(frame) if frame[m].notna().any()]
    frame = frame[frame[metrics].notna().any(axis=1)] if metrics else frame.iloc[:0]
    others = [k for k in keys if k not in (*DENSITY_KEYS, "subnet")]
    if _distinct(frame, [*others, "_density"]) < 2:
        return None
    frame = in_percent(frame, metrics)
    plotted = series(frame, legend_keys(frame, others))
    figure, axes = new_figure(len(metrics))
    for axis, metric in zip(axes, metrics):
        for s in plotted:
            stats = s.frame.groupby("_density").agg(x=("train_flops_vs_dense", "mean"),
                                                     x_std=("train_flops_vs_dense", "std"),
                                                     y=(metric, "mean"), y_std=(metric, "std"))
            stats = stats.dropna(subset=["y"]).sort_values("x")
            axis.errorbar(stats["x"], stats["y"], xerr=stats["x_std"].fillna(0), yerr=stats["y_std"].fillna(0),
                          color=s.color, linestyle=s.linestyle, marker=s.marker, markersize=5, capsize=3)
        axis.axvline(1, color="0.5", linewidth=0.8, linestyle=":")
        ratios = frame["train_flops_vs_dense"]
        if (ratios > 0).all() and ratios.max() > 5 * ratios.min():  # sparsity levels span decades
            axis.set_xscale("log")
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set(xlabel="training FLOPs / dense training FLOPs (dotted: dense)\n(same objective, attack and epochs)",
                 ylabel=axis_label(labels, metric))
    return finish_figure(figure, axes,
                         "Robust accuracy against training cost (" + spread_note(plotted, band=False) + ")",
                         plotted)


# ------------------------------------------------------------------------- γ studies with paired intervals


def chance_level(frame: pd.DataFrame) -> float | None:
    """Chance accuracy (1 / classes, a fraction) of the runs, from the report's ``chance`` column; None if
    unknown."""
    if "chance" not in frame or not frame["chance"].notna().any():
        return None
    return float(frame["chance"].dropna().iloc[0])


def chance_line(axis: Any, level: float | None, vertical: bool = False) -> None:
    """A grey dashed line at chance accuracy (``level``: a fraction), labelled on the axis, which is in %."""
    if level is None:
        return
    level *= PERCENT
    if vertical:
        axis.axvline(level, color="0.45", linestyle="--", linewidth=0.9)
        low, high = axis.get_xlim()
        axis.set_xlim(min(low, level - 2), max(high, level + 2))
        return
    axis.axhline(level, color="0.45", linestyle="--", linewidth=0.9)
    axis.annotate("chance", (0.0, level), xycoords=("axes fraction", "data"), xytext=(3, 2),
                  textcoords="offset points", fontsize=7, color="0.35")
    low, high = axis.get_ylim()
    axis.set_ylim(min(low, level - 2), max(high, level + 2))


def identical_settings(plotted: list[Series], column: str, by: str | list[str]) -> dict[int, int]:
    """Series whose ``column`` (mean over ``by``) equals an earlier series' everywhere: index -> that index, so
    the legend can say the line hides under another."""
    means = [tuple(s.frame.groupby(by)[column].mean().round(12).items()) for s in plotted]
    same = {}
    for i, values in enumerate(means):
        for j in range(i):
            if values and values == means[j] and j not in same:
                same[i] = j
                break
    return same


def mark_identical(plotted: list[Series], same: dict[int, int]) -> list[Series]:
    """The legend of a series drawn exactly under another says so; its marker is drawn hollow and larger."""
    return [Series(f"{s.label} (= {plotted[same[i]].label})" if i in same else s.label, s.color, s.linestyle,
                   s.marker, s.frame, hollow=i in same or s.hollow) for i, s in enumerate(plotted)]


def paired_row(paired: pd.DataFrame, record: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The paired-difference row of the setting of ``record`` (a run row) for ``metric``, None if there is none."""
    if paired is None or paired.empty:
        return None
    rows = paired[paired["metric"] == metric]
    settings = [c for c in paired.columns if c not in stats.PAIRED_COLUMNS]
    for key in settings:
        want = _value(record.get(key))
        rows = rows.loc[pd.Series([_value(v) == want or (want is not None and _value(v) is not None
                                                         and str(v) == str(want)) for v in rows[key]],
                                  index=rows.index, dtype=bool)]
    return rows.iloc[0].to_dict() if len(rows) else None


def threshold_label(name: str) -> str:
    """``val_clean_accuracy >= 0.5`` (the epochs table's column) as the legend says it: ``val clean >= 50%``."""
    metric, _, level = name.partition(" >= ")
    text = metric.replace("_accuracy", "").replace("_", " ")
    try:
        return f"{text} >= {PERCENT * float(level):g}%"
    except ValueError:
        return name.replace("_accuracy", "").replace("_", " ")


# ------------------------------------------------------------------- the gradient-correlation probe

#: the paper's Table 9 (Lei et al., CPAL 2024): gradient correlation after perturbing the weights, ResNet-50 on
#: CIFAR-100, by sparsity
PAPER_TABLE9 = {"rigl": {0.0: 0.6005, 0.5: 0.4564, 0.8: 0.3217, 0.9: 0.1886, 0.95: 0.1590},
                "set": {0.0: 0.6005, 0.5: 0.4535, 0.8: 0.2528, 0.9: 0.1763, 0.95: 0.1195}}
PROBE_PANELS = {"probe_perturbed_correlation": "correlation of g(θ) and g(θ + δ)\n(Table 9's quantity, as read here)",
                "probe_snapshot_cosine": "cosine of g(θ_t) and g(θ at the epoch's start)\non the same batch"}


def correlation_figure(table: pd.DataFrame, varying: Sequence[str]) -> Figure | None:
    """Gradient correlation against sparsity (``table``: the report's correlation table, one row per method,
    sparsity and other varying key, with ``<metric> mean/low/high``): one line per method and setting with the
    95% t interval over seeds; the paper's Table 9 beside it, dashed and grey, labelled with its setting. The
    sparsity axis is categorical (the levels studied, evenly spaced): the interesting range is 80-99%."""
    if table.empty:
        return None
    levels = sorted(set(table["sparsity"].round(4)) | {s for values in PAPER_TABLE9.values() for s in values})
    position = {level: i for i, level in enumerate(levels)}
    panels = [m for m in PROBE_PANELS if f"{m} mean" in table]
    figure, axes = new_figure(len(panels), width=6.2, height=4.6)
    plotted = series(table, legend_keys(table, ["sparsity.method", *varying]))
    for axis, metric in zip(axes, panels):
        for i, s in enumerate(plotted):
            rows = s.frame.sort_values("sparsity")
            x = [position[round(v, 4)] for v in rows["sparsity"]]
            mean = rows[f"{metric} mean"]
            error = [(mean - rows[f"{metric} low"]).fillna(0).clip(lower=0),
                     (rows[f"{metric} high"] - mean).fillna(0).clip(lower=0)]
            bars = axis.errorbar(x, mean, yerr=error, color=s.color, linestyle=s.linestyle, marker=s.marker,
                                 markersize=5, capsize=3)
            dodge_bars(figure, bars, i, len(plotted))
        if metric == "probe_perturbed_correlation":
            for method, marker in (("rigl", "x"), ("set", "+")):
                points = sorted(PAPER_TABLE9[method].items())
                axis.plot([position[s] for s, _ in points], [v for _, v in points], color="0.45", linestyle="--",
                          marker=marker, markersize=7, linewidth=1.0,
                          label=f"paper Table 9, {method.upper() if method == 'set' else 'RigL'} "
                                "(ResNet-50, CIFAR-100)")
            axis.legend(loc="lower left", fontsize=7, frameon=False)
        axis.set_xticks(range(len(levels)), [f"{100 * s:g}%" for s in levels])
        axis.set_xlabel("sparsity (categorical axis: the levels studied)")
        axis.set_ylabel(PROBE_PANELS[metric])
        axis.set_ylim(min(0.0, axis.get_ylim()[0]), 1.02)
    low, high = int(table["runs"].min()), int(table["runs"].max())
    seeds = (f"{low}" if low == high else f"{low}-{high}") + (" seed" if high == 1 else " seeds")
    return finish_figure(figure, axes, "Gradient correlation against sparsity at the last probed epoch\n"
                         f"(mean and 95% t interval over {seeds}; the dense run at 0%)", plotted)
