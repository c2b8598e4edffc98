"""Sweep-report figures: built from a constructed sweep on disk (run directories as train and the sweep's
evaluation stage write them), each figure's legend says name=value and sits outside every panel, its axes name
the attack, steps and ε the runs' configs and evaluations record, and its epoch ticks are whole numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from robust_sparse.studies import plots
from robust_sparse.config import load_config, save_config
from robust_sparse.studies import agent_gamma_plots as figures
from robust_sparse.studies.agent_gamma import cosine_table
from robust_sparse.studies.report import aggregate, collect_many, grid_keys, write_report

EPS = 8 / 255
EPOCHS = 3
GAMMAS = [0.0, 0.1, 0.5]
DENSITIES = [0.1, 0.01]
SEEDS = [0, 1]
ENTRY = re.compile(r"[^=,]+=[^=,]+(, [^=,]+=[^=,]+)*")  # name=value, name=value, ...


def _run(sweep_dir: Path, overrides: list[str], grid: dict[str, object], agent: bool, stage: bool) -> dict:
    """One finished run directory: config.yaml, metrics.csv, eval.json (and sweep_eval.json), as train writes them."""
    items = [f"{k}={v}" for k, v in grid.items()]
    run_id = "__".join(items)
    run_dir = sweep_dir / "runs" / run_id
    run_dir.mkdir(parents=True)
    config = load_config(None, ["data.dataset=mnist5k", "attack.eps=8/255", "val.pgd_steps=5", "eval.pgd_steps=20",
                                f"optim.epochs={EPOCHS}", *overrides, *items])
    save_config(config, run_dir / "config.yaml")
    density = grid.get("sparsity.density")
    level = 0.9 if density is None else 0.8 + density + grid.get("agent.gamma", 0) / 10  # settings differ
    rows = []
    for epoch in range(1, EPOCHS + 1):
        row = {"epoch": epoch, "lr": 0.05, "train_loss": 2.0 / epoch, "train_accuracy": 0.5,
               "val_clean_accuracy": level * epoch / EPOCHS + grid["seed"] / 100,
               "val_pgd_accuracy": level * epoch / EPOCHS / 2 + grid["seed"] / 100, "train_seconds": 1.0,
               "images_per_second": 100.0, "best": True}
        if density is not None:
            row.update({"density": density, "exploration_rate": 0.1})
        if agent:  # AGENT corrects (and logs its cosine and variance ratio) from epoch 2, as train logs it
            c = 0.0 if epoch == 1 else 0.3 * epoch + grid["seed"] / 10
            row.update({"agent_c_hat": None if epoch == 1 else c, "agent_c": c,
                        "agent_weight": grid.get("agent.gamma", 0) * c,
                        "agent_cosine": None if epoch == 1 else 0.5 + 0.1 * epoch,
                        "agent_variance_ratio": None if epoch == 1 else 1.0 - 0.1 * epoch})
        rows.append(row)
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "eval.json").write_text(json.dumps({
        "checkpoint": str(run_dir / "best.pt"), "epoch": EPOCHS, "dataset": "mnist5k", "model": "small_cnn",
        "n_examples": 500, "norm": "linf", "eps": EPS, "pgd_steps": 20, "restarts": 1,
        "clean_accuracy": level, "pgd_accuracy": level / 2, "seconds": 1.0, "device": "cpu"}))
    if stage:  # the sweep's evaluation stage (robust-sparse eval on best.pt), one record
        (run_dir / "sweep_eval.json").write_text(json.dumps({
            "stage": {"attacks": "pgd-50x10,autoattack", "n_examples": 200},
            "results": [{"n_examples": 200, "threat_model": "Linf", "eps": EPS, "clean_acc": level,
                         "worst_acc": level / 3, "per_attack": {"PGD-50x10": level / 2, "AutoAttack": level / 3,
                                                                "AutoAttack/apgd-ce": level / 2.5},
                         "warnings": [], "wall_seconds": 5.0}]}))
    return {"run_id": run_id, "overrides": " ".join(items), "status": "done"}


def _sweep(root: Path, name: str, overrides: list[str], grid: list[dict], agent: bool, stage: bool) -> Path:
    sweep_dir = root / name
    index = [_run(sweep_dir, overrides, setting, agent, stage) for setting in grid]
    pd.DataFrame(index).to_csv(sweep_dir / "runs.csv", index=False)
    keys = list(grid[0])
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({
        "grid": {k: list(dict.fromkeys(g[k] for g in grid)) for k in keys}, "overrides": overrides,
        "out_dir": str(sweep_dir)}))
    return sweep_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A γ study of A-BSR-Net (γ x density x seed) with its dense baseline in a second sweep, as a report of
    both reads them: (sweep dirs, runs, curves)."""
    root = tmp_path_factory.mktemp("study")
    gamma = _sweep(root, "gamma", ["sparsity.method=bsrnet", "agent.enabled=true"],
                   [{"agent.gamma": g, "sparsity.density": d, "seed": s} for g in GAMMAS for d in DENSITIES
                    for s in SEEDS], agent=True, stage=True)
    dense = _sweep(root, "dense", ["sparsity.method=none", "agent.enabled=false"], [{"seed": s} for s in SEEDS],
                   agent=False, stage=False)
    runs, curves = collect_many([gamma, dense])
    return [gamma, dense], runs, curves


def _keys(runs: pd.DataFrame) -> list[str]:
    return [k for k in grid_keys(runs) if k != "seed"]


def _labels(dirs: list[Path]) -> dict[str, str]:
    return plots.metric_labels(p for d in dirs for p in (d / "runs").iterdir())


def _legend_entries(figure) -> list[str]:
    """The figure's legend entries, after checking each is a name=value list (no tuple, no NaN) and that the
    legend lies outside every panel, its tick labels and axis labels included."""
    assert len(figure.legends) == 1
    legend = figure.legends[0]
    entries = [text.get_text() for text in legend.get_texts()]
    for entry in entries:
        assert ENTRY.fullmatch(entry), entry
        assert "nan" not in entry.lower() and "None" not in entry and not re.search(r"\([^)]*,", entry), entry
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    for axis in figure.axes:
        assert not box.overlaps(axis.get_tightbbox(renderer)), f"legend covers the panel {axis.get_ylabel()!r}"
    return entries


def _integer_ticks(axis) -> list[float]:
    low, high = sorted(axis.get_xlim())
    ticks = [t for t in axis.get_xticks() if low - 1e-9 <= t <= high + 1e-9]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


def test_eps_and_attack_labels_come_from_the_runs_records(study):
    dirs, _, _ = study
    assert [plots.format_eps(e) for e in (0.1, 0.5, 8 / 255, 2 / 255, 0.3)] == ["0.1", "0.5", "8/255", "2/255", "0.3"]
    labels = _labels(dirs)
    assert labels["val_pgd_accuracy"] == "validation PGD-5 accuracy (L∞, ε=8/255)"
    assert labels["test_pgd_accuracy"] == "test PGD-20 accuracy (L∞, ε=8/255)"
    assert labels["eval_AutoAttack_accuracy"] == "AutoAttack accuracy (200 test points, L∞, ε=8/255)"
    assert "AutoAttack/apgd-ce" not in " ".join(labels)  # sub-attacks are not plotted
    assert labels["eval_worst_accuracy"].startswith("accuracy under the worst of PGD-50x10 and AutoAttack")


def test_a_label_lists_what_differs_between_runs(tmp_path):
    runs = []
    for steps, eps in ((10, 0.1), (20, 0.3)):
        run_dir = tmp_path / f"pgd{steps}"
        run_dir.mkdir()
        save_config(load_config(None, ["data.dataset=mnist5k", f"attack.eps={eps}", f"val.pgd_steps={steps}"]),
                    run_dir / "config.yaml")
        runs.append(run_dir)
    label = plots.metric_labels(runs)["val_pgd_accuracy"]
    assert label == "validation PGD-10 accuracy / validation PGD-20 accuracy (L∞, ε=0.1; L∞, ε=0.3)"


def test_convergence_has_a_panel_column_per_density_and_integer_epochs(study):
    dirs, runs, curves = study
    figure = plots.convergence_figure(runs, curves, _keys(runs), _labels(dirs))
    entries = _legend_entries(figure)
    # density is the panel column, so the legend names the rest; the dense baseline is 'method=dense'
    assert sorted(entries) == sorted(["method=dense", "method=bsrnet, γ=0", "method=bsrnet, γ=0.1",
                                      "method=bsrnet, γ=0.5"])
    axes = figure.axes
    assert len(axes) == 2 * 3  # validation clean and PGD x densities 1 (dense), 0.1, 0.01
    assert [a.get_title() for a in axes[:3]] == ["density=1 (dense)", "density=0.1", "density=0.01"]
    assert axes[3].get_ylabel().replace("\n", " ") == "validation PGD-5 accuracy (%; L∞, ε=8/255)"
    assert axes[0].get_ylabel() == "validation clean accuracy (%)"
    values = [y for axis in axes for line in axis.get_lines() for y in line.get_ydata()]
    assert 1 < max(values) <= 100  # in %, as the evaluation report's plots: the runs' 0.8 is drawn at 80
    for axis in axes:
        assert _integer_ticks(axis) == [1, 2, 3]
    assert "± 1 std over 2 seeds" in figure._suptitle.get_text()
    # each panel holds its density's settings only: the dense column one line, the sparse ones three
    assert [len(a.get_lines()) for a in axes[:3]] == [1, 3, 3]
    assert len(axes[1].collections) == 3  # a ± std band per line (2 seeds each)


def test_gamma_sensitivity_has_one_line_per_density(study):
    dirs, runs, _ = study
    table = aggregate(runs)
    figure = figures.gamma_figure(table, _keys(runs), _labels(dirs))
    assert sorted(_legend_entries(figure)) == ["density=0.01", "density=0.1"]
    ylabels = [a.get_ylabel().replace("\n", " ") for a in figure.axes]
    assert ylabels[:2] == ["test clean accuracy (%)", "test PGD-20 accuracy (%; L∞, ε=8/255)"]
    assert "PGD-50x10" in ylabels[2] and "AutoAttack" in ylabels[2] and "ε=8/255" in ylabels[2]
    for axis in figure.axes:
        assert [t.get_text() for t in axis.get_xticklabels()] == ["0", "0.1", "0.5"]
        assert axis.get_xlabel().startswith("γ")
    assert "mean ± 1 std over 2 seeds" in figure._suptitle.get_text()


def test_robust_accuracy_against_sparsity_places_the_dense_baseline_at_1(study):
    dirs, runs, curves = study
    figure = plots.sparsity_figure(runs, curves, _keys(runs), _labels(dirs))
    assert sorted(_legend_entries(figure)) == sorted(["method=dense", "method=bsrnet, γ=0", "method=bsrnet, γ=0.1",
                                                      "method=bsrnet, γ=0.5"])
    pgd = figure.axes[1]
    assert pgd.get_ylabel() == "test PGD-20 accuracy (%; L∞, ε=8/255)"
    assert [t.get_text() for t in pgd.get_xticklabels()] == ["1 (dense)", "0.1", "0.01"]
    assert pgd.xaxis_inverted()  # sparser to the right
    # the means plotted are the runs' own, in %: γ = 0.5 at density 0.1 has test PGD accuracy (0.8 + 0.1 + 0.05) / 2
    points = {tuple(line.get_xydata()[0]) for line in pgd.get_lines() if len(line.get_xydata())}
    assert any(x == 0.1 and y == pytest.approx(47.5) for x, y in points)
    single = runs[runs["sweep"] == "gamma"]
    assert plots.sparsity_figure(single[single["sparsity.density"] == 0.1], curves, _keys(runs), {}) is None


def test_agent_figure_shows_c_t_variance_ratio_and_cosine_per_epoch(study):
    _, runs, curves = study
    figure = figures.agent_figure(runs, curves, _keys(runs))
    entries = _legend_entries(figure)
    assert len(entries) == len(GAMMAS) * len(DENSITIES) and "density=0.01, γ=0.5" in entries
    ylabels = [a.get_ylabel() for a in figure.axes]
    assert ylabels[0].startswith("c_t") and "Var(ĝ)/Var(g)" in ylabels[1] and "cos(g_new, g_old)" in ylabels[2]
    assert _integer_ticks(figure.axes[0]) == [1, 2, 3]
    assert _integer_ticks(figure.axes[2]) == [2, 3]  # the cosine is logged from epoch 2 on
    dense_only = runs[runs["sweep"] == "dense"]
    assert figures.agent_figure(dense_only, curves[curves["run_id"].isin(dense_only["run_id"])], []) is None


def test_cosine_per_density_names_each_gamma(study):
    _, runs, curves = study
    table = cosine_table(runs, curves, [k for k in grid_keys(runs) if k != "seed"])
    figure = figures.cosine_figure(table, ["agent.gamma"])
    assert sorted(_legend_entries(figure)) == ["γ=0", "γ=0.1", "γ=0.5"]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["0.1", "0.01"]


def test_one_setting_draws_no_legend(study):
    dirs, runs, curves = study
    dense = runs[runs["sweep"] == "dense"].drop(columns=["sweep"])
    figure = plots.convergence_figure(dense, curves, [], _labels(dirs))
    assert not figure.legends and len(figure.axes) == 2
    assert [_integer_ticks(axis) for axis in figure.axes] == [[1, 2, 3], [1, 2, 3]]


def test_the_report_writes_every_figure_and_links_it(study, tmp_path):
    dirs, _, _ = study
    report = write_report(dirs, tmp_path / "report").read_text()
    for name in ("convergence", "gamma_sensitivity", "robust_vs_sparsity", "agent", "cosine"):
        path = tmp_path / "report" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"]({name}.png)" in report
    assert not list((tmp_path / "report").glob(".*.tmp"))  # written atomically: no temporaries left
    assert math.isfinite(pd.read_csv(tmp_path / "report" / "summary.csv")["test_pgd_accuracy mean"].sum())


def test_no_gamma_figure_while_no_setting_has_test_results():
    """A report of a sweep still training: γ settings without test accuracies yet give no figure (not a crash)."""
    table = pd.DataFrame({"agent.gamma": [0.0, 0.1], "sparsity.density": [0.1, 0.1],
                          "test_clean_accuracy mean": [math.nan] * 2, "test_pgd_accuracy mean": [math.nan] * 2})
    assert figures.gamma_figure(table, ["agent.gamma", "sparsity.density"], {}) is None


def test_a_key_only_some_settings_set_stays_in_the_legend():
    """An override of one sweep (per-sub-net BN, more epochs) names what is special about its runs, even where
    another key (update_every) would tell the settings apart."""
    frame = pd.DataFrame({"sparsity.method": ["ast", "ast", "ast", "rigl"],
                          "sparsity.update_every": [3, 4, 9, 10],
                          "sparsity.ast_subnet_bn": [math.nan, True, math.nan, math.nan],
                          "optim.epochs": [math.nan, math.nan, 18, math.nan]})
    keys = plots.legend_keys(frame, list(frame.columns))
    assert "sparsity.ast_subnet_bn" in keys and "optim.epochs" in keys
    assert "sparsity.update_every" not in keys  # the rest already tell every setting apart


def test_gamma_figures_show_paired_intervals_censoring_and_gamma_labels(study, tmp_path):
    """Accuracy against γ per density with its paired bars and the chance line; epochs to accuracy against γ
    with integer ticks; the trade-off labels every point with its γ; the γ axes say symlog."""
    from robust_sparse.studies.report import epochs_to_accuracy, paired_table

    dirs, runs, curves = study
    gamma_runs = runs[runs["sweep"] == "gamma"].drop(columns=["sweep"])
    keys = _keys(gamma_runs)
    paired = paired_table(gamma_runs, keys, {"agent.gamma": 0})
    figure = figures.gamma_paired_figure(gamma_runs, curves, paired, keys, _labels(dirs))
    axes = figure.axes
    assert [a.get_title() for a in axes[:2]] == ["density=0.1", "density=0.01"]
    assert "symlog" in axes[-1].get_xlabel() and [t.get_text() for t in axes[-1].get_xticklabels()] == \
        ["0", "0.1", "0.5"]
    levels = [line.get_ydata()[0] for line in axes[0].get_lines() if len(set(line.get_ydata())) == 1]
    assert 10.0 in levels  # chance: 1 / 10 classes, in %
    # the seeds are identical here: every paired difference is exact, so its interval has zero width; with no
    # spread the t test is undefined, so nothing is called established however the means differ
    assert (paired["low"] == paired["high"]).all() and paired["p"].isna().all()
    assert not paired["established"].any()
    steps = epochs_to_accuracy(gamma_runs, curves, [0.5, 0.95])
    epochs = figures.gamma_epochs_figure(steps, ["val_clean_accuracy >= 0.5", "val_clean_accuracy >= 0.95"], keys)
    for axis in epochs.axes:
        low, high = axis.get_ylim()
        ticks = [t for t in axis.get_yticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks)
        censored = [line for line in axis.get_lines() if line.get_marker() == "^" and len(line.get_xdata())]
        assert censored and all(y == EPOCHS + 0.5 for line in censored for y in line.get_ydata())  # 0.95: never
    trade = figures.tradeoff_figure(aggregate(gamma_runs), keys, _labels(dirs), chance=0.1)
    # one panel per density, each on its own scale, every γ labelled in each
    assert [axis.get_title() for axis in trade.axes] == ["density=0.1", "density=0.01"]
    for axis in trade.axes:
        assert sorted(t.get_text() for t in axis.texts if t.get_text().startswith("γ=")) == ["γ=0", "γ=0.1", "γ=0.5"]
    report = write_report(dirs[0], tmp_path / "report").read_text()
    for name in ("gamma_paired", "gamma_epochs", "tradeoff"):
        assert f"]({name}.png)" in report and (tmp_path / "report" / f"{name}.png").stat().st_size > 10_000


def test_a_series_identical_to_another_says_so_in_the_legend():
    frame = pd.DataFrame({"agent.gamma": [0.0, 0.1, 0.0, 0.1], "m": [0.5, 0.6, 0.5, 0.6], "k": ["a", "a", "b", "b"],
                          "run_id": list("wxyz")})
    plotted = plots.series(frame, ["k"])
    marked = plots.mark_identical(plotted, plots.identical_settings(plotted, "m", "agent.gamma"))
    assert [s.label for s in marked] == ["k=a", "k=b (= k=a)"]


def test_convergence_keeps_a_series_identical_to_another_visible():
    """γ = 0 and γ = 0.1 with the same validation curves (AGENT's correction not yet started): the second line
    would hide the first exactly; its legend entry says which it equals, and its markers are hollow and larger."""
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "agent.gamma": [0.0, 0.1, 0.5], "seed": [0, 0, 0]})
    curves = pd.DataFrame({"run_id": list("aaabbbccc"), "epoch": [1, 2, 3] * 3,
                           "val_clean_accuracy": [0.5, 0.6, 0.7] * 2 + [0.55, 0.65, 0.75],
                           "val_pgd_accuracy": [0.2, 0.3, 0.4] * 2 + [0.25, 0.35, 0.45]})
    figure = plots.convergence_figure(runs, curves, ["agent.gamma"], {})
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["γ=0", "γ=0.1 (= γ=0)", "γ=0.5"]
    for axis in figure.axes:
        lines = axis.get_lines()
        assert [line.get_markerfacecolor() for line in lines][1] == "none"
        assert lines[1].get_markersize() > lines[0].get_markersize()
        assert list(lines[0].get_ydata()) == list(lines[1].get_ydata())
    assert [h.get_markerfacecolor() for h in legend.legend_handles][1] == "none"
