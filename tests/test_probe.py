"""The gradient-correlation probe: its statistics by hand, its invariants, and a run unchanged by it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import load_config
from robust_sparse.objectives import build_objective
from robust_sparse.probe import COLUMNS, GradientProbe, cosine, pearson
from robust_sparse.train import fit

from conftest import make_tiny_model, one_line_error
from test_train import _train_one_epoch_then_stop


def test_cosine_and_pearson_match_numpy():
    a, b = np.array([1.0, 2.0, -1.0, 0.5]), np.array([0.5, 1.0, 1.0, -2.0])
    assert cosine(torch.tensor(a), torch.tensor(b)) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert math.isnan(cosine(torch.zeros(3), torch.ones(3))) and math.isnan(pearson(torch.ones(3), torch.ones(3)))


def test_a_probe_of_an_unchanged_model_finds_correlation_one(mnist):
    """Nothing trained between the snapshot and the probe: the snapshot's gradients are the current ones
    (cosine = correlation = c_hat = 1), and a vanishing perturbation leaves the gradient's direction alone."""
    config = load_config(None, ["model.name=tiny_cnn", "probe.every=1", "probe.batches=3", "data.batch_size=32",
                                "probe.perturbation=1e-6", "objective=pgd_at", "attack.steps=2"])
    model = make_tiny_model()
    probe = GradientProbe(config, model, None)
    probe.start_epoch(0)
    result = probe.probe(build_objective(config, model), mnist[0], 0, torch.device("cpu"))
    values = result.values
    assert values["probe_snapshot_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert values["probe_snapshot_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert values["probe_c_hat"] == pytest.approx(1.0, abs=1e-6)
    assert values["probe_perturbed_correlation"] == pytest.approx(1.0, abs=1e-3)
    assert [row["layer"] for row in result.layers] == ["features.0.weight", "features.4.weight", "classifier.1.weight"]
    # a larger perturbation decorrelates the gradient
    config.probe.perturbation = 0.5
    probe.start_epoch(0)
    noisy = probe.probe(build_objective(config, model), mnist[0], 0, torch.device("cpu")).values
    assert noisy["probe_perturbed_correlation"] < values["probe_perturbed_correlation"]


def _state(run_dir):
    state = load_checkpoint(run_dir / "last.pt")
    return {key: state[key] for key in ("model", "optimizer", "scheduler", "rng", "sparsity", "flops") if key in state}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("settings", [
    ["sparsity.method=rigl", "sparsity.density=0.2", "sparsity.update_every=4", "agent.enabled=true",
     "agent.gamma=0"],  # sparse, AGENT at gamma = 0 (no correction, so no agent_cosine)
    ["objective=natural"],  # dense, no AGENT
], ids=["rigl-agent-gamma0", "dense-natural"])
def test_the_probe_leaves_the_run_bit_identical(settings, tiny_config, tmp_path):
    common = [*settings, "eval.n_examples=0"]
    off = fit(tiny_config(*common, f"out_dir={tmp_path / 'off'}"))
    on = fit(tiny_config(*common, "probe.every=1", "probe.batches=2", f"out_dir={tmp_path / 'on'}"))
    assert _equal(_state(off.run_dir), _state(on.run_dir))  # weights, optimizer, schedule, RNG, masks, FLOPs
    assert off.metrics.drop(columns=["train_seconds", "images_per_second"]).equals(
        on.metrics.drop(columns=["train_seconds", "images_per_second", *COLUMNS, "probe_flops"]))
    metrics = pd.read_csv(on.run_dir / "metrics.csv")
    for column in COLUMNS:
        assert metrics[column].notna().all(), column
    assert (metrics[["probe_perturbed_correlation", "probe_snapshot_cosine"]].abs() <= 1).all().all()
    assert metrics["probe_flops"].is_monotonic_increasing and metrics["probe_flops"].iloc[0] > 0
    layers = pd.read_csv(on.run_dir / "probe_layers.csv")
    assert len(layers) == 2 * 3 and set(layers["epoch"]) == {1, 2}
    if "sparsity.method=rigl" in settings:
        assert (layers["density"] < 1).all()


def test_the_probe_every_second_epoch_and_its_resume(tiny_config, tmp_path):
    config = tiny_config("optim.epochs=3", "probe.every=2", "probe.batches=2", "eval.n_examples=0",
                         "objective=natural", f"out_dir={tmp_path / 'run'}")
    _train_one_epoch_then_stop(config)
    result = fit(config, resume=True)
    metrics = result.metrics
    assert metrics["probe_snapshot_cosine"].isna().tolist() == [True, False, True]  # epoch 2 only
    assert metrics["probe_flops"].tolist()[0] == 0 and metrics["probe_flops"].iloc[1] > 0
    assert metrics["probe_flops"].iloc[2] == metrics["probe_flops"].iloc[1]
    assert set(pd.read_csv(result.run_dir / "probe_layers.csv")["epoch"]) == {2}


@pytest.mark.parametrize("override, words", [("probe.batches=1", "probe.batches = 1"),
                                             ("probe.every=-1", "probe.every = -1"),
                                             ("probe.perturbation=0", "probe.perturbation = 0")])
def test_bad_probe_settings(override, words, capsys, tmp_path):
    assert words in one_line_error(["train", "--set", override, "--out", str(tmp_path / "r")], capsys)


def test_the_report_tables_correlation_by_method_and_sparsity_with_the_dense_runs_on_every_line():
    from robust_sparse.studies import plots
    from robust_sparse.studies.report import correlation_table

    runs, curves = [], []
    values = {("none", 1.0): [0.9, 0.8], ("rigl", 0.1): [0.7, 0.5], ("set", 0.1): [0.6, 0.6]}
    for (method, density), per_seed in values.items():
        for seed, value in enumerate(per_seed):
            run_id = f"{method}-{density}-{seed}"
            runs.append({"run_id": run_id, "sparsity.method": method, "sparsity.density": density, "seed": seed,
                         "objective": "pgd_at"})
            for epoch, v in ((1, 0.0), (2, value)):  # the last probed epoch is the one tabled
                curves.append({"run_id": run_id, "epoch": epoch, "density": None if method == "none" else density,
                               "probe_perturbed_correlation": v, "probe_snapshot_cosine": v / 2,
                               "probe_snapshot_correlation": v / 2, "probe_c_hat": 1.0})
    table, varying = correlation_table(pd.DataFrame(runs), pd.DataFrame(curves))
    assert varying == []
    rows = {(r["sparsity.method"], r["sparsity"]): r for r in table.to_dict("records")}
    assert set(rows) == {("rigl", 0.0), ("rigl", 0.9), ("set", 0.0), ("set", 0.9)}  # dense on both lines
    assert rows[("rigl", 0.9)]["probe_perturbed_correlation mean"] == pytest.approx(0.6)
    # t interval with 1 degree of freedom: 0.6 +- 12.706 * sd / sqrt(2), sd = 0.1414; a correlation's is clipped to 1
    assert rows[("rigl", 0.9)]["probe_perturbed_correlation low"] == pytest.approx(0.6 - 12.706 * 0.1, abs=1e-3)
    assert rows[("rigl", 0.9)]["probe_perturbed_correlation high"] == 1.0
    assert rows[("set", 0.0)]["probe_perturbed_correlation mean"] == pytest.approx(0.85)
    figure = plots.correlation_figure(table, varying)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert any("paper Table 9, RigL (ResNet-50, CIFAR-100)" == label for label in labels)
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert ticks == ["0%", "50%", "80%", "90%", "95%"]
