"""Paired differences, t quantiles and Wilson intervals against hand computations; a sweep report on a
constructed sweep calls a consistent small effect established (the unpaired comparison misses it) and an
inconsistent one not."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from robust_sparse.studies import stats
from robust_sparse.studies.report import paired_table, write_report

# test clean accuracy per seed: the reference γ = 0 varies a lot between seeds (0.50..0.70)
REFERENCE = [0.50, 0.60, 0.70]
CONSISTENT = [0.52, 0.621, 0.719]  # γ = 0.1: +0.020, +0.021, +0.019 -> mean 0.02, sd 0.001
INCONSISTENT = [0.55, 0.56, 0.72]  # γ = 0.5: +0.05, -0.04, +0.02 -> mean 0.01


def _runs() -> pd.DataFrame:
    rows = []
    for gamma, values in ((0.0, REFERENCE), (0.1, CONSISTENT), (0.5, INCONSISTENT)):
        for seed, value in enumerate(values):
            rows.append({"agent.gamma": gamma, "seed": seed, "test_clean_accuracy": value})
    return pd.DataFrame(rows)


def test_t_quantiles_are_scipys_and_match_the_printed_table():
    for df, printed in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert stats.t_quantile_975(df) == pytest.approx(printed, abs=5e-4)
    with pytest.raises(ValueError):
        stats.t_quantile_975(0)


def test_paired_p_value_matches_a_hand_t_test():
    # differences +0.02, +0.03, +0.01: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.4641, df 2
    # two-sided p = 2 * (1 - F_t2(3.4641)); F_t2(x) = 1/2 + x / (2 sqrt(x^2 + 2)) for 2 degrees of freedom
    t = 0.02 / (0.01 / math.sqrt(3))
    expected = 2 * (0.5 - t / (2 * math.sqrt(t * t + 2)))
    assert stats.paired_p_value([0.02, 0.03, 0.01]) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(stats.paired_p_value([0.02]))
    assert math.isnan(stats.paired_p_value([0.01, 0.01]))  # no spread: no test, never "established"
    assert math.isnan(stats.paired_p_value([0.846 - 0.848, 0.902 - 0.904, 0.5 - 0.502]))  # equal up to float noise


def test_holm_and_bh_adjustments_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # Holm over the 4 present, sorted 0.005, 0.01, 0.03, 0.04: x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> 0.06
    holm = stats.adjust(p, "holm")
    assert holm[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(holm[4])
    # BH: p * 4 / rank = 0.02, 0.02, 0.04, 0.04, then running minimum from the largest down
    assert stats.adjust(p, "bh")[:4] == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.adjust(p, "none")[:4] == p[:4]
    assert stats.adjust([0.5, 0.9], "holm") == [1.0, 1.0]  # capped at 1


def test_an_interval_that_excludes_0_alone_may_not_survive_the_family():
    """Four test-set comparisons; one has a raw p of 0.02 (its interval excludes 0), Holm multiplies it by 4."""
    rows = []
    for seed, (ref, a, b, c, d) in enumerate([(0.5, 0.52, 0.5, 0.5, 0.49), (0.6, 0.625, 0.62, 0.59, 0.6),
                                              (0.7, 0.715, 0.69, 0.71, 0.7)]):
        for gamma, value in ((0.0, ref), (0.1, a), (0.2, b), (0.3, c), (0.4, d)):
            rows.append({"agent.gamma": gamma, "seed": seed, "test_clean_accuracy": value})
    table = stats.paired_differences(pd.DataFrame(rows), {"agent.gamma": 0}, ["test_clean_accuracy"], ["agent.gamma"])
    raw = table[table["agent.gamma"] == 0.1].iloc[0]
    assert raw["established"] and raw["low"] > 0  # +0.020, +0.025, +0.015: p = 0.02 on its own
    adjusted = stats.adjust_table(table, "holm")
    row = adjusted[adjusted["agent.gamma"] == 0.1].iloc[0]
    assert row["family"] == "test" and row["family_size"] == 4 and row["expected_by_chance"] == pytest.approx(0.2)
    assert row["p_adjusted"] == pytest.approx(min(1.0, 4 * row["p"])) and not row["established"]
    assert row["low_adjusted"] < 0 < row["high_adjusted"]  # the simultaneous interval includes 0
    sentence = stats.paired_sentence(row.to_dict(), "γ=0.1", "γ=0", "test clean accuracy")
    assert "holm-adjusted" in sentence and sentence.endswith("the adjusted p-value does not hold.")
    none = stats.adjust_table(table, "none")
    assert none[none["agent.gamma"] == 0.1].iloc[0]["established"]
    assert set(stats.adjust_table(table, "holm", "metric")["family"]) == {"test_clean_accuracy"}


def test_wilson_intervals_match_hand_values():
    low, high = stats.wilson_interval(0.5, 100)  # centre 0.5, half 1.96/1.0384 * sqrt(0.0025 + 0.000096) = 0.0962
    assert (low, high) == pytest.approx((0.40383, 0.59617), abs=5e-5)
    assert stats.wilson_interval(0.0, 10) == pytest.approx((0.0, 0.27754), abs=5e-5)  # z^2 / (n + z^2)
    assert stats.wilson_interval(1.0, 932)[0] == pytest.approx(932 / (932 + 1.959964 ** 2), abs=1e-6)
    assert stats.wilson_interval(1.0, 932)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in stats.wilson_interval(0.5, 0))
    assert stats.format_wilson(0.5, 100) == "0.500 [0.404, 0.596]"


def test_a_consistent_small_effect_is_established():
    table = stats.paired_differences(_runs(), {"agent.gamma": 0}, ["test_clean_accuracy"], ["agent.gamma"])
    consistent = table[table["agent.gamma"] == 0.1].iloc[0]
    half = 4.303 * 0.001 / math.sqrt(3)  # t(2) * sd / sqrt(n)
    assert consistent["n"] == 3 and consistent["differences"] == "+0.020, +0.021, +0.019"
    assert consistent["mean"] == pytest.approx(0.02)
    assert (consistent["low"], consistent["high"]) == pytest.approx((0.02 - half, 0.02 + half), abs=2e-6)
    assert consistent["consistent"] == 3 and consistent["established"]


def test_an_inconsistent_effect_is_not_established():
    table = stats.paired_differences(_runs(), {"agent.gamma": 0}, ["test_clean_accuracy"], ["agent.gamma"])
    row = table[table["agent.gamma"] == 0.5].iloc[0]
    assert row["mean"] == pytest.approx(0.01) and row["consistent"] == 2 and not row["established"]
    assert row["low"] < 0 < row["high"]


def test_pairs_within_each_value_the_reference_varies_on_and_across_one_it_holds():
    """Each density has its own γ = 0 run; the official estimator (the reference runs all use paper) is a
    treatment compared with the paper estimator's γ = 0."""
    rows = []
    for density, offset in ((0.1, 0.0), (0.01, -0.3)):
        for seed in range(2):
            rows.append({"d": density, "est": "paper", "g": 0.0, "seed": seed, "acc": 0.9 + offset + seed / 10})
            rows.append({"d": density, "est": "official", "g": 0.1, "seed": seed,
                         "acc": 0.9 + offset + seed / 10 + 0.05})
    table = stats.paired_differences(pd.DataFrame(rows), {"g": 0}, ["acc"], ["d", "est", "g"])
    assert sorted(table["d"]) == [0.01, 0.1] and list(table["est"]) == ["official"] * 2
    assert table["mean"].tolist() == pytest.approx([0.05, 0.05]) and table["established"].all()


def test_one_seed_is_never_established():
    runs = _runs()
    table = stats.paired_differences(runs[runs["seed"] == 0], {"agent.gamma": 0}, ["test_clean_accuracy"],
                                     ["agent.gamma"])
    assert (table["n"] == 1).all() and not table["established"].any()
    same = stats.adjust_table(stats.paired_differences(
        pd.DataFrame([{"g": g, "seed": k, "acc": 0.5 + k / 10 + (0.02 if g else 0)} for g in (0, 1) for k in range(3)]),
        {"g": 0}, ["acc"], ["g"]), "none").iloc[0].to_dict()
    assert not same["established"] and stats.paired_sentence(same, "g=1", "g=0", "acc").endswith(
        "+2.0 points in every one of 3 seeds (no spread between seeds, so no t test); not established.")
    sentence = stats.paired_sentence(table.iloc[0].to_dict(), "γ=0.1", "γ=0", "test clean accuracy")
    assert sentence.endswith("+2.0 points on one seed; not established (one seed, no interval).")


def _sweep(root: Path) -> Path:
    """A sweep directory as a sweep and train leave it: runs.csv, sweep.yaml, per run metrics.csv and eval.json."""
    index = []
    for gamma, values in ((0.0, REFERENCE), (0.1, CONSISTENT), (0.5, INCONSISTENT)):
        for seed, value in enumerate(values):
            run_id = f"agent.gamma={gamma:g}__seed={seed}"
            run_dir = root / "runs" / run_id
            run_dir.mkdir(parents=True)
            pd.DataFrame([{"epoch": e, "train_loss": 1.0 / e, "val_clean_accuracy": value * e / 2,
                           "val_pgd_accuracy": value * e / 4} for e in (1, 2)]).to_csv(run_dir / "metrics.csv",
                                                                                      index=False)
            (run_dir / "eval.json").write_text(json.dumps({"epoch": 2, "n_examples": 500, "clean_accuracy": value,
                                                           "pgd_accuracy": value / 2}))
            index.append({"run_id": run_id, "overrides": f"agent.gamma={gamma:g} seed={seed}", "status": "done"})
    pd.DataFrame(index).to_csv(root / "runs.csv", index=False)
    (root / "sweep.yaml").write_text(yaml.safe_dump({"grid": {"agent.gamma": [0, 0.1, 0.5], "seed": [0, 1, 2]}}))
    return root


def test_the_report_sentence_follows_the_interval(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    text = write_report(sweep, tmp_path / "report").read_text()
    lines = {line.split(",")[0]: line for line in text.splitlines() if line.startswith("- γ=")}
    clean = [line for line in text.splitlines() if line.startswith("- γ=") and "test clean accuracy" in line]
    consistent = next(line for line in clean if line.startswith("- γ=0.1 "))
    inconsistent = next(line for line in clean if line.startswith("- γ=0.5 "))
    assert lines and "+2.0 points" in consistent and "higher in 3 of 3 seeds" in consistent
    assert consistent.endswith("established after adjustment.") and "holm-adjusted" in consistent
    assert "+1.0 points" in inconsistent and inconsistent.endswith("not established: the interval includes 0.")
    assert "**test**: 4 intervals" in text and "(0.2) would exclude 0 by chance" in text
    assert "compared with the γ=0 run of their seed" in text
    paired = pd.read_csv(tmp_path / "report" / "paired.csv")
    assert set(paired["metric"]) >= {"test_clean_accuracy", "test_pgd_accuracy", "val_clean_accuracy"}
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")  # a Wilson interval beside every test accuracy
    assert runs["test_clean_accuracy wilson_low"].tolist() == pytest.approx(
        [stats.wilson_interval(v, 500)[0] for v in runs["test_clean_accuracy"]])
    assert "0.500 [0.456, 0.544]" in text  # seed 0 of γ = 0 on its 500 test points


def test_a_reference_no_run_has_is_a_one_line_error(tmp_path):
    from robust_sparse.errors import UserError
    from robust_sparse.studies.report import collect

    runs, _ = collect(_sweep(tmp_path / "sweep"))
    with pytest.raises(UserError, match="no run has this setting"):
        paired_table(runs, ["agent.gamma"], {"agent.gamma": 0.3})
    with pytest.raises(UserError, match="not a grid key"):
        paired_table(runs, ["agent.gamma"], {"sparsity.method": "rigl"})


def test_a_stored_report_runs_csv_is_recomputed_and_bad_flags_are_one_line_errors(tmp_path, capsys):
    from robust_sparse.cli import main

    write_report(_sweep(tmp_path / "sweep"), tmp_path / "report")
    stored = tmp_path / "report" / "runs.csv"
    assert main(["report", str(stored), "--out", str(tmp_path / "again")]) == 0  # runs.csv records test_n now
    assert (pd.read_csv(tmp_path / "again" / "paired.csv")["metric"] == "test_clean_accuracy").any()
    for correction, words in (("bh", "Benjamini-Hochberg"), ("none", "no adjustment")):
        assert main(["report", str(stored), "--correction", correction, "--family", "metric",
                     "--out", str(tmp_path / correction)]) == 0
        assert words in (tmp_path / correction / "paired.md").read_text()
        assert set(pd.read_csv(tmp_path / correction / "paired.csv")["correction"]) == {correction}
    capsys.readouterr()
    assert main(["report", str(stored), "--correction", "bonferroni", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--correction" in err
    for flags, words in ((["--reference", "gamma"], "--reference 'gamma': expected KEY=VALUE"),
                         (["--test-n", "5"], None)):
        capsys.readouterr()
        target = str(tmp_path / "sweep") if words is None else str(stored)
        assert main(["report", target, *flags, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and (words or "--test-n: only for a stored runs.csv") in err
