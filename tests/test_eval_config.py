"""``robust-sparse eval``'s config (robust_sparse/eval/config.py): a YAML file, flags and ``--set`` read by the
training config's parser with one-line errors, and several attack seeds with their spread (robust_sparse/eval/spread.py)."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest
import torch

from conftest import one_line_error
from robust_sparse.cli import main
from robust_sparse.errors import ConfigError
from robust_sparse.eval.config import EvalConfig, Names, ThreatModel, eval_config_from_dict, load_eval_config
from robust_sparse.eval.spread import seed_spread
from robust_sparse.eval.store import append_result, load_results


@pytest.fixture(scope="module")
def weights(trained_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(trained_tiny.state_dict(), path)
    return str(path)


def _tiny(weights, *extra):
    return ["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "mnist5k", "--device", "cpu",
            "--no-progress", *extra]


def _rows(results_dir):
    return json.loads((results_dir / "results.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# parsing: the same values from a file, flags and --set


def test_file_flags_and_overrides_are_one_config(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("arch: tiny_cnn\nweights: w.pt\ndataset: mnist5k\neps: 2/255\nseeds: 0,1\nattacks: [fgsm, pgd-5x1]\n"
                    "threat_model: Linf\nbatch_size: 100\n")
    config, names = load_eval_config(path, ["batch_size=50", "eps=[2/255, 4/255]"],
                                     {"seeds": [3], "probe": False}, {"seeds": "--seed", "probe": "--no-probe"})
    assert config.arch == "tiny_cnn" and config.dataset == "mnist5k" and config.threat_model is ThreatModel.LINF
    assert config.eps == [2 / 255, 4 / 255] and config.batch_size == 50  # --set wins over the file
    assert config.seeds == [3] and config.probe is False  # the flags win over the file
    assert config.attacks == "fgsm,pgd-5x1"
    assert names("seeds") == "--seed" and names("batch_size") == "batch_size"  # named as the user gave them
    assert EvalConfig().seeds == [0]  # one seed 0 by default: every stored result stays the same evaluation


@pytest.mark.parametrize("data, names, message", [
    ({"checkpoint": "a.pt", "batch_size": 0}, Names(), "batch_size = 0: must be in 1..1000000"),
    ({"checkpoint": "a.pt", "batch_size": 0}, Names(flags={"batch_size": "--batch-size"}),
     "--batch-size 0: must be in 1..1000000"),
    ({"checkpoint": "a.pt", "batch_size": 0}, Names(prefix="sweep eval."), "sweep eval.batch_size = 0: must be in"),
    ({"checkpoint": "a.pt", "batchsize": 8}, Names(), "unknown field 'batchsize'; known fields here:"),
    ({"checkpoint": "a.pt", "seeds": "0,0"}, Names(), "seeds = [0, 0]: a seed is listed twice"),
    ({"checkpoint": "a.pt", "seeds": []}, Names(), "seeds: give at least one seed"),
    ({"checkpoint": "a.pt", "seeds": -1}, Names(), "seeds = -1: must be in 0..4294967295"),
    ({"checkpoint": "a.pt", "seeds": "zero"}, Names(), "seeds[0]: expected an integer, got 'zero'"),
    ({"checkpoint": "a.pt", "eps": "2/255,x"}, Names(), "eps[1]: expected a number (or a fraction like 8/255)"),
    ({"checkpoint": "a.pt", "eps": 2, "threat_model": "linf"}, Names(), "eps = 2: must be <= 1 for linf"),
    ({"checkpoint": "a.pt", "eps": -0.5}, Names(), "eps = -0.5: must be >= 0"),
    ({"checkpoint": "a.pt", "threat_model": "l3"}, Names(), "threat_model: 'l3' is not one of linf, l2, corruptions"),
    ({"checkpoint": "a.pt", "attacks": "pgd-5x2:start=zero"}, Names(), "attacks: attack 'pgd-5x2:start=zero': start=zero"),
    ({"checkpoint": "a.pt", "attacks": "pgd-5x1:step=-1"}, Names(), "step=-1: must be a finite size > 0"),
    ({"checkpoint": "a.pt", "chained": True, "cross_check": True}, Names(), "cross_check compares standalone attacks"),
    ({"checkpoint": "a.pt", "large_eps": 0.5, "probe": False}, Names(), "large_eps and probe contradict"),
    ({"checkpoint": "a.pt", "large_eps": 0}, Names(), "large_eps = 0.0: must be > 0"),
    ({"checkpoint": "a.pt", "threat_model": "corruptions", "eps": 0.1}, Names(), "has no radius or attacks: drop eps"),
    ({"checkpoint": "a.pt", "severities": [1]}, Names(), "corruptions and severities go with threat_model = corruptions"),
    ({"checkpoint": "a.pt", "autoattack_backend": "foolbox"}, Names(), "'foolbox' is not one of auto, pyautoattack"),
    ({"arch": "tiny_cnn"}, Names(), "arch needs weights PATH"),
    ({}, Names(), "eval needs exactly one model"),
])
def test_bad_values_are_one_line_config_errors(data, names, message):
    with pytest.raises(ConfigError) as error:
        eval_config_from_dict(data, names)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("extra, message", [
    (["--set", "batch_size=0"], "batch_size = 0: must be in 1..1000000"),
    (["--set", "seedz=1"], "unknown field 'seedz'"),
    (["--seeds", "0,1,1"], "--seeds [0, 1, 1]: a seed is listed twice"),
    (["--seed", "0", "--seeds", "1"], "--seed and --seeds: give the attack seeds one way"),
    (["--seed", "-3"], "--seed -3: must be in 0..4294967295"),
    (["--seeds", "0,x"], "--seeds[1]: expected an integer, got 'x'"),
    (["--threat-model", "linf", "--eps", "1.5"], "--eps 1.5: must be <= 1 for linf"),
    (["--set", "attacks=pgd-KxR"], "attacks: unknown attack 'pgd-KxR'; choose from: fgsm, pgd[-K[xR]]"),
])
def test_bad_eval_config_on_the_command_line_fails_before_any_work(weights, extra, message, tmp_path, capsys,
                                                                   monkeypatch):
    from robust_sparse.eval import points

    def no_data(*args, **kwargs):
        raise AssertionError("the test points were read before the config was checked")

    monkeypatch.setattr(points, "load_points", no_data)
    line = one_line_error(_tiny(weights, "--results-dir", str(tmp_path / "r"), *extra), capsys)
    assert message in line
    assert not (tmp_path / "r").exists()


def test_a_config_file_error_names_the_file_field(weights, tmp_path, capsys):
    path = tmp_path / "eval.yaml"
    path.write_text("n_examples: 0\n")
    line = one_line_error(_tiny(weights, "--config", str(path)), capsys)
    assert line.endswith("n_examples = 0: must be in 1..100000000")
    assert "config file not found" in one_line_error(_tiny(weights, "--config", str(tmp_path / "missing.yaml")), capsys)


# ----------------------------------------------------------------------------------------------------------
# attack seeds


def test_each_attack_seed_is_a_row_of_its_own_and_a_seed_added_later_reuses_the_others(weights, tmp_path, capsys,
                                                                                       caplog):
    results, single = tmp_path / "results", tmp_path / "single"
    base = _tiny(weights, "--n-examples", "40", "--eps", "0.3", "--attacks", "fgsm,pgd-3x1", "--no-probe",
                 "--batch-size", "16")
    assert main(base + ["--seeds", "0,1", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    rows = _rows(results)
    assert [row["seed"] for row in rows] == [0, 1] and len(list((results / "flags").glob("*.pt"))) == 2
    assert "over 2 attack seeds (0,1): mean ± std [min, max]" in out

    # seed 0 among several is the very evaluation `--seed 0` alone gives (its stored results stay valid)
    assert main(base + ["--seed", "0", "--results-dir", str(single)]) == 0
    (alone,) = _rows(single)
    assert {k: alone[k] for k in ("clean_acc", "per_attack", "worst_acc")} == {
        k: rows[0][k] for k in ("clean_acc", "per_attack", "worst_acc")}

    caplog.clear()
    with caplog.at_level(logging.INFO):  # a third seed: seeds 0 and 1 come from their saved flags
        assert main(base + ["--seed", "0", "--seed", "1", "--seed", "2", "--results-dir", str(results)]) == 0
    assert caplog.text.count("FGSM finished before") == 2 and caplog.text.count("PGD-3x1 finished before") == 2
    rows = _rows(results)
    assert [row["seed"] for row in rows] == [0, 1, 2]  # the first two were already there: not appended again

    spread = seed_spread(load_results(results)).set_index("metric")
    assert (spread["seeds"] == 3).all() and set(spread["seed_list"]) == {"0,1,2"}
    fgsm = [row["per_attack"]["FGSM"] for row in rows]
    assert fgsm[0] == fgsm[1] == fgsm[2]  # FGSM has no random start: no spread
    assert spread.loc["FGSM", "std"] == 0 and spread.loc["FGSM", "min"] == spread.loc["FGSM", "max"] == fgsm[0]
    pgd = pd.Series([row["per_attack"]["PGD-3x1"] for row in rows])
    assert spread.loc["PGD-3x1", "mean"] == pytest.approx(pgd.mean())
    assert spread.loc["PGD-3x1", "std"] == pytest.approx(pgd.std(ddof=1), nan_ok=True)
    assert (spread.loc["PGD-3x1", "min"], spread.loc["PGD-3x1", "max"]) == (pgd.min(), pgd.max())


def _row(seed, eps, clean, pgd, **extra):
    return {"model": "m", "model_fingerprint": "f", "dataset": "mnist5k", "threat_model": "Linf", "eps": eps,
            "n_examples": 4, "attacks": "pgd-5x1", "mode": "standalone", "batch_size": 500, "seed": seed,
            "clean_acc": clean, "per_attack": {"PGD-5x1": pgd}, "worst_acc": pgd, "pgd_attack": "PGD-5x1", "pgd_acc": pgd,
            "source": "weights", "sparsity": 0.5, "params": 10, "nonzero_params": 5, "wall_seconds": 1.0,
            "device": "cpu", "warnings": [], **extra}


def test_seed_spread_of_a_constructed_store_by_hand(tmp_path):
    """4 points: seed 0 leaves 1 robust, seed 1 two, seed 2 three (a rerun of seed 1 replaced its row's value)."""
    for row in (_row(0, 0.1, 0.75, 0.25), _row(1, 0.1, 0.75, 0.0), _row(1, 0.1, 0.75, 0.5, timestamp="later"),
                _row(2, 0.1, 0.75, 0.75), _row(0, 0.2, 0.75, 0.0)):
        append_result(tmp_path, row)
    spread = seed_spread(load_results(tmp_path))
    pgd = spread[(spread["eps"] == 0.1) & (spread["metric"] == "PGD-5x1")].iloc[0]
    assert pgd["seeds"] == 3 and pgd["seed_list"] == "0,1,2"
    assert pgd["mean"] == pytest.approx(0.5) and (pgd["min"], pgd["max"]) == (0.25, 0.75)
    assert pgd["std"] == pytest.approx(0.25)  # sqrt(((-.25)^2 + 0 + .25^2) / 2)
    clean = spread[(spread["eps"] == 0.1) & (spread["metric"] == "clean")].iloc[0]
    assert clean["mean"] == 0.75 and clean["std"] == 0
    single = spread[(spread["eps"] == 0.2) & (spread["metric"] == "PGD-5x1")].iloc[0]
    assert single["seeds"] == 1 and math.isnan(single["std"]) and single["mean"] == 0.0

    from robust_sparse.eval.report import build_report

    text = build_report([tmp_path], tmp_path / "report").read_text()
    section = text.split("## Spread over attack seeds")[1].split("\n## ")[0]
    assert "| m | mnist5k | Linf | 0.1 | 4 | PGD-5x1 | 3 (0,1,2) | 50.00 | 25.00 | 25.00 | 75.00 |" in section
    assert "| 0.2 |" not in section  # one seed: no spread to show


def test_rows_stored_before_seeds_were_recorded_read_as_seed_0(tmp_path):
    old = {k: v for k, v in _row(0, 0.1, 0.75, 0.25).items() if k != "seed"}
    (tmp_path / "results.json").write_text(json.dumps([old, {**old, "threat_model": "corruptions", "seed": None}]))
    frame = load_results(tmp_path)
    assert frame["seed"].iloc[0] == 0 and pd.isna(frame["seed"].iloc[1])  # the corruptions track has no seed
    (row,) = seed_spread(frame).query("metric == 'PGD-5x1'").to_dict("records")
    assert row["seed_list"] == "0" and row["mean"] == 0.25


def test_the_sparsity_plot_draws_one_star_per_evaluation_at_its_seeds_mean(tmp_path, monkeypatch):
    """Three attack seeds of one evaluation are one star at their mean with a min-max bar, not three stars."""
    import robust_sparse.eval.report as report

    for row in (_row(0, 0.1, 0.75, 0.25), _row(1, 0.1, 0.75, 0.5), _row(2, 0.1, 0.75, 0.75), _row(0, 0.2, 0.75, 0.0)):
        append_result(tmp_path / "store", row)
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda figure, path, **options: figures.append(figure))
    report.build_report([tmp_path / "store"], tmp_path / "report")
    (axes,) = next(f for f in figures if "against sparsity" in f.axes[0].get_title()).axes
    from matplotlib.collections import LineCollection, PathCollection  # a scatter's; an error bar's

    stars = [tuple(c.get_offsets()[0]) for c in axes.collections if isinstance(c, PathCollection)]
    assert sorted(stars) == [(50.0, 0.0), (50.0, 50.0)]  # sparsity 50%: eps 0.2 (one seed) and eps 0.1's mean
    bars = [segment.tolist() for c in axes.collections if isinstance(c, LineCollection) for segment in c.get_segments()]
    assert bars == [[[50.0, 25.0], [50.0, 75.0]]]  # the bar: from the lowest seed's accuracy to the highest's
    assert "mean of 3 attack seeds" in " ".join(text.get_text() for text in axes.texts)
