"""Results store, the shipped leaderboard, comparability, and ``robust-sparse report``."""

from __future__ import annotations

import json
import zipfile
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from robust_sparse.cli import main
from robust_sparse.errors import UserError
from robust_sparse.eval.leaderboard import differences, load_leaderboard, normalize_attack
from robust_sparse.eval.report import build_report, collect
from robust_sparse.eval.store import COLUMNS, append_result, flags_path, load_results

REPO = Path(__file__).resolve().parents[1]


def _row(**changes):
    row = {
        "timestamp": "2026-01-01T00:00:00+00:00", "model": "vgg16-99", "source": "checkpoint", "path": "runs/a/best.pt",
        "architecture": "vgg16", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255, "n_examples": 10000,
        "seed": 0, "batch_size": 500, "mode": "standalone", "attacks": "pgd-50x10,autoattack", "clean_acc": 0.70,
        "pgd_attack": "PGD-50x10", "pgd_acc": 0.42, "autoattack_acc": 0.38, "worst_acc": 0.38,
        "per_attack": {"PGD-50x10": 0.42, "AutoAttack": 0.38, "AutoAttack/apgd-ce": 0.40}, "sparsity": 0.99,
        "params": 15_000_000, "nonzero_params": 150_000, "wall_seconds": 1234.5, "device": "cuda:0", "warnings": [],
        "model_fingerprint": "abc", "data_fingerprint": "def", "large_eps": 0.5, "large_eps_acc": 0.0,
    }
    row.update(changes)
    return row


def test_store_appends_csv_and_json(tmp_path):
    assert append_result(tmp_path, _row()) == 0
    assert append_result(tmp_path, _row(eps=4 / 255, warnings=["something"])) == 1
    frame = load_results(tmp_path)
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS and len(frame) == 2
    assert frame.loc[1, "warnings"] == ["something"] and frame.loc[0, "per_attack"]["AutoAttack"] == 0.38
    csv = pd.read_csv(tmp_path / "results.csv")
    assert json.loads(csv.loc[0, "per_attack"])["PGD-50x10"] == 0.42
    first = flags_path(tmp_path, model="runs/a", dataset="cifar10", threat_model="Linf", eps=8 / 255, settings={"n": 1})
    second = flags_path(tmp_path, model="runs/a", dataset="cifar10", threat_model="Linf", eps=8 / 255, settings={"n": 2})
    assert first != second and first.parent == tmp_path / "flags" and "/" not in first.name


def test_the_store_reads_back_as_one_tidy_frame(tmp_path):
    """One row per model x attack x eps x seed x sub-net, attack and corruptions rows alike; the corruptions mean
    carries its stored t interval, a corruption cell its Wilson interval on n."""
    from robust_sparse.eval.store import TIDY_COLUMNS, load_tidy
    from robust_sparse.studies.stats import wilson_interval

    append_result(tmp_path, _row(model="runs/ast/best/subnet0"))
    append_result(tmp_path, _row(model="runs/ast/best/subnet1", seed=1, clean_acc=0.6))
    append_result(tmp_path, _row(model="c", threat_model="corruptions", eps=0.0, seed=None, n_examples=100,
                                 pgd_attack=None, pgd_acc=None, autoattack_acc=None, worst_acc=0.5,
                                 per_attack={"corruptions (1 of 15, severities 1,2)": 0.5, "fog/1": 0.6, "fog/2": 0.4},
                                 corruptions_interval=[0.45, 0.55]))
    frame = load_tidy(tmp_path)
    assert list(frame.columns) == TIDY_COLUMNS and len(frame) == 2 * 5 + 4
    ast = frame[frame["model"] == "runs/ast/best"]
    assert sorted(set(zip(ast["subnet"], ast["seed"]))) == [(0, 0), (1, 1)]
    assert ast.groupby(["subnet", "seed", "attack"]).size().eq(1).all()
    assert list(ast.loc[ast["subnet"] == 1, "attack"]) == ["clean", "PGD-50x10", "AutoAttack", "AutoAttack/apgd-ce",
                                                          "worst case"]
    assert ast.loc[(ast["subnet"] == 1) & (ast["attack"] == "clean"), "correct"].item() == 6000
    corrupted = frame[frame["model"] == "c"].set_index("attack")
    assert list(corrupted["kind"]) == ["clean", "corruptions mean", "corruption", "corruption"]
    assert corrupted["subnet"].isna().all() and corrupted["seed"].isna().all()
    assert tuple(corrupted.loc["corruptions (1 of 15, severities 1,2)", ["ci_low", "ci_high"]]) == (0.45, 0.55)
    assert tuple(corrupted.loc["fog/1", ["ci_low", "ci_high"]]) == pytest.approx(wilson_interval(0.6, 100))


def test_shipped_leaderboard_has_the_required_rows():
    board = load_leaderboard()
    names = set(board["name"])
    assert {"Sehwag2020Hydra", "Kundu2020Tunable", "Wong2020Fast", "Rice2020Overfitting"} <= names
    methods = " ".join(board["method"])
    for method in ("HYDRA", "RADMM", "FlyingBird", "BSR-Net", "A-BSR-Net"):
        assert method in methods
    assert set(board["dataset"]) >= {"cifar10", "cifar100", "svhn"}
    assert board["source_url"].str.startswith("https://").all() and board["source_date"].notna().all()
    assert board["robust_acc"].between(0, 100).all()
    assert board[board["threat_model"] != "corruptions"]["eps"].gt(0).all()  # corruptions rows: eps 0, no radius
    hydra = board[board["name"] == "Sehwag2020Hydra"].iloc[0]
    assert (hydra["clean_acc"], hydra["robust_acc"], hydra["attack"], hydra["n_examples"]) == (88.98, 57.14, "AutoAttack", 10000)


def test_comparability():
    board = load_leaderboard()
    entry = board[board["name"] == "Wong2020Fast"].iloc[0].to_dict()
    same = dict(dataset="cifar10", threat_model="Linf", eps=8 / 255, attack="AutoAttack", n_examples=10000)
    assert differences(entry, **same) == []
    assert differences(entry, **{**same, "n_examples": 1000}) == ["n 10000 vs 1000"]
    assert differences(entry, **{**same, "attack": "PGD-50x10"}) == ["attack AutoAttack vs PGD-50x10"]
    trades = board[board["name"] == "Zhang2019Theoretically"].iloc[0].to_dict()
    assert differences(trades, **same) == ["eps 0.031 vs 0.03137"]  # 0.031 is not 8/255
    # the recipe of a model trained here: the whole training split (a 10% validation split is fine) or not
    assert differences(entry, **same, train_images=45000) == []
    assert differences(entry, **same, train_images=4194) == [
        "trained on 4,194 images; the entry used the 50,000 of the training split"]
    # epochs the entry does not state are not assumed equal (tests/test_leaderboard.py: every recipe field)
    assert differences(entry, **same, train_images=45000, epochs=200) == ["epochs: 200 here, unknown for the entry"]
    hydra = board[board["name"] == "Sehwag2020Hydra"].iloc[0].to_dict()
    assert differences(hydra, **same, train_images=50000) == [
        "trained on 50,000 images; the entry used 50,000 plus extra data"]
    assert differences(hydra, **same) == []  # an outside model: its recipe is unknown, only the protocol counts
    assert normalize_attack("PGD-20") == normalize_attack("pgd-20x1") == "pgd-20x1"


def test_report_tables_plots_and_checks(tmp_path, capsys):
    store = tmp_path / "results"
    append_result(store, _row())
    append_result(store, _row(model="tiny", dataset="mnist5k", eps=0.1, n_examples=100,
                              per_attack={"PGD-20x1": 0.3}, pgd_attack="PGD-20x1", pgd_acc=0.3, autoattack_acc=None,
                              worst_acc=0.3, warnings=["the black-box Square attack broke 3 points"]))
    append_result(store, _row(model="tiny", dataset="mnist5k", eps=0.2, n_examples=100, per_attack={"PGD-20x1": 0.4},
                              pgd_attack="PGD-20x1", pgd_acc=0.4, autoattack_acc=None, worst_acc=0.4))
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == 0
    assert "report: " in capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| vgg16-99 | checkpoint | cifar10 | Linf | 0.03137 | 10000 | 70.00 | 42.00 (PGD-50x10) | 38.00 |" in text
    assert "the black-box Square attack broke 3 points" in text
    # beside every accuracy its 95% Wilson interval on the n points: 30 of 100 -> [21.9, 39.6]
    assert "| tiny | mnist5k | Linf | 0.1 | PGD-20x1 | 30.00 | [21.9, 39.6] |" in text
    assert "clean [" in text and "PGD [21.9, 39.6]" in text
    assert "accuracy rises from 0.3000 at eps=0.1 to 0.4000 at eps=0.2" in text  # non-monotone across stored rows
    comparison = text.split("## Leaderboard comparison: cifar10 Linf")[1].split("## ")[0]
    wong = next(line for line in comparison.splitlines() if line.startswith("| Wong2020Fast"))
    assert "yes: vgg16-99 (AutoAttack)" in wong
    trades = next(line for line in comparison.splitlines() if line.startswith("| Zhang2019Theoretically"))
    assert "no: eps 0.031 vs 0.03137" in trades
    bsr = next(line for line in comparison.splitlines() if line.startswith("| BSR-Net AT VGG-16 99%"))
    assert "yes: vgg16-99 (PGD-50x10)" in bsr
    assert (tmp_path / "report" / "robust_vs_sparsity_cifar10_Linf.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "accuracy_vs_eps_mnist5k_Linf.png").is_file()
    assert "No leaderboard rows for this dataset" in text.split("## Leaderboard comparison: mnist5k Linf")[1]


def test_rerun_rows_are_deduplicated_and_a_custom_leaderboard_can_be_used(tmp_path):
    store = tmp_path / "results"
    append_result(store, _row(clean_acc=0.5))
    append_result(store, _row(clean_acc=0.7))  # the same evaluation again: only the latest counts
    assert collect([store])["clean_acc"].tolist() == [0.7]
    board = tmp_path / "board.csv"
    load_leaderboard().head(2).to_csv(board, index=False, columns=[c for c in load_leaderboard().columns if c != "eps_text"])
    assert main(["report", str(store), "--leaderboard", str(board)]) == 0
    assert not (store / "report.md").exists()  # beside the store, not inside it
    text = (tmp_path / "results-report" / "report.md").read_text()
    assert "2 leaderboard rows" in text and "Sehwag2020Hydra" in text
    with pytest.raises(UserError, match="missing columns"):
        pd.DataFrame({"name": ["x"]}).to_csv(board, index=False)
        build_report([store], leaderboard=board)


def test_the_leaderboard_ships_in_the_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("robust_sparse-*.whl")
    assert "robust_sparse/eval/leaderboard.csv" in zipfile.ZipFile(wheel).namelist()
