"""The leaderboard's recipe columns and what "comparable" means for a model trained here: training-set size,
epochs, model selection rule and AGENT estimator, each named in words when it differs or is unknown."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from robust_sparse.files.checkpoint import save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config, to_dict
from robust_sparse.errors import UserError
from robust_sparse.eval.leaderboard import Selection, checkpoint_selection, differences, load_leaderboard

PROTOCOL = dict(dataset="cifar10", threat_model="Linf", eps=8 / 255, attack="AutoAttack", n_examples=10000)
# a model trained here: 49,000 training images, 200 epochs, best.pt written at epoch 150, AGENT's official estimator
OURS = dict(train_images=49000, epochs=200, selection="best-val-robust", epoch=150, estimator="official")


def _entry(**changes):
    entry = {"name": "X", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255, "eps_text": "8/255",
             "attack": "AutoAttack", "n_examples": 10000, "extra_data": "false", "epochs": 200,
             "selection": "best-val-robust", "estimator": "official"}
    entry.update(changes)
    return entry


def test_an_identical_recipe_is_comparable():
    assert differences(_entry(), **PROTOCOL, **OURS) == []


@pytest.mark.parametrize("changes, reason", [
    ({"epochs": 100}, "epochs: 200 here, 100 in the entry"),
    ({"epochs": None}, "epochs: 200 here, unknown for the entry"),
    ({"selection": "best-test-robust"},
     "model selection: best validation robust accuracy (epoch 150 of 200) here, best test robust accuracy in the entry"),
    ({"selection": "last"},
     "model selection: best validation robust accuracy (epoch 150 of 200) here, last epoch in the entry"),
    ({"selection": ""}, "model selection: best validation robust accuracy (epoch 150 of 200) here, unknown for the entry"),
    ({"estimator": "paper"}, "AGENT estimator: official here, paper in the entry"),
    ({"estimator": None}, "AGENT estimator: official here, unknown for the entry"),
    ({"extra_data": "true"}, "trained on 49,000 images; the entry used 50,000 plus extra data"),
])
def test_each_differing_recipe_field_is_named(changes, reason):
    assert differences(_entry(**changes), **PROTOCOL, **OURS) == [reason]


def test_every_differing_field_is_named_once_beside_the_protocol():
    entry = _entry(epochs=float("nan"), selection="best-test-clean", estimator="paper", n_examples=1000)
    assert differences(entry, **PROTOCOL, **{**OURS, "train_images": 4194}) == [
        "trained on 4,194 images; the entry used the 50,000 of the training split",
        "epochs: 200 here, unknown for the entry",
        "model selection: best validation robust accuracy (epoch 150 of 200) here, best test clean accuracy in the entry",
        "AGENT estimator: official here, paper in the entry",
        "n 1000 vs 10000",
    ]


def test_selection_at_the_final_epoch_and_of_an_unfinished_run():
    # best.pt written at the final epoch holds the last epoch's weights: comparable with a "last" entry
    assert differences(_entry(selection="last"), **PROTOCOL, **{**OURS, "epoch": 200}) == []
    # last.pt of a finished run is the last epoch, and is not a best-by-validation checkpoint
    last = {**OURS, "selection": "last", "epoch": 200}
    assert differences(_entry(selection="last"), **PROTOCOL, **last) == []
    assert differences(_entry(), **PROTOCOL, **last) == [
        "model selection: last epoch (epoch 200 of 200) here, best validation robust accuracy in the entry"]
    # last.pt of a run stopped at epoch 40 of 200 is neither rule
    assert differences(_entry(selection="last"), **PROTOCOL, **{**last, "epoch": 40}) == [
        "model selection: last epoch (epoch 40 of 200) here, last epoch in the entry"]


def test_the_estimator_is_compared_only_between_agent_runs():
    without_agent = _entry(estimator="none")
    assert differences(without_agent, **PROTOCOL, **OURS) == []  # A-BSR-Net beside BSR-Net: methods, not recipes
    assert differences(_entry(), **PROTOCOL, **{**OURS, "estimator": "none"}) == []
    assert differences(_entry(estimator=None), **PROTOCOL, **{**OURS, "estimator": "none"}) == []


def test_an_outside_model_is_compared_by_protocol_only():
    """A RobustBench or --model evaluation knows no recipe: only the threat model, attack and n count."""
    assert differences(_entry(epochs=None, selection=None, estimator=None), **PROTOCOL) == []


def test_checkpoint_selection_reads_the_history_mark():
    assert checkpoint_selection({"history": [{"best": True}, {"best": True}]}) is Selection.BEST_VAL_ROBUST
    assert checkpoint_selection({"history": [{"best": True}, {"best": False}]}) is Selection.LAST
    assert checkpoint_selection({"history": []}) is None and checkpoint_selection({}) is None
    assert checkpoint_selection({"history": [{"epoch": 1}]}) is None  # written before the mark existed


def test_shipped_rows_state_only_what_their_sources_say():
    board = load_leaderboard()
    agent = board[board["method"].str.startswith("A-BSR-Net")]
    assert len(agent) == 8 and set(agent["estimator"]) == {"official"} and set(agent["selection"]) == {"last"}
    assert set(board.loc[~board.index.isin(agent.index), "estimator"]) == {"none"}
    robustbench = board[board["kind"] == "robustbench"]
    assert robustbench["selection"].isna().all() and robustbench["epochs"].isna().all()
    # a model trained here is never claimed comparable with a row whose recipe is unknown
    rice = robustbench[robustbench["name"] == "Rice2020Overfitting"].iloc[0].to_dict()
    assert differences(rice, **PROTOCOL, **{**OURS, "estimator": "none"}) == [
        "epochs: 200 here, unknown for the entry",
        "model selection: best validation robust accuracy (epoch 150 of 200) here, unknown for the entry"]


def test_a_leaderboard_without_recipe_columns_loads_and_bad_values_are_one_line(tmp_path):
    board = tmp_path / "board.csv"
    columns = [c for c in load_leaderboard().columns if c not in ("eps_text", "epochs", "selection", "estimator")]
    load_leaderboard().head(3).to_csv(board, index=False, columns=columns)
    loaded = load_leaderboard(board)
    assert loaded["selection"].isna().all() and loaded["estimator"].isna().all() and loaded["epochs"].isna().all()
    frame = pd.read_csv(board).assign(selection=["last", "best-on-test", ""])
    frame.to_csv(board, index=False)
    with pytest.raises(UserError, match=r"line 3: selection 'best-on-test'; allowed: best-val-robust, .*last or empty"):
        load_leaderboard(board)
    frame.assign(selection="", estimator=["none", "paper", "guess"]).to_csv(board, index=False)
    with pytest.raises(UserError, match=r"line 4: estimator 'guess'; allowed: none, paper, official, fixed"):
        load_leaderboard(board)


def test_eval_records_the_recipe_and_report_names_what_differs(trained_tiny, tmp_path, capsys):
    """A checkpoint trained here with AGENT, evaluated and reported against a leaderboard with one row of the
    same recipe and one that differs in every recipe field: the first is comparable, the second names each."""
    config = load_config(None, ["model.name=tiny_cnn", "attack.eps=0.2", "optim.epochs=4", "agent.enabled=true",
                                "agent.estimator=official"])
    run = tmp_path / "run"
    history = [{"epoch": e, "best": e == 3} for e in (1, 2, 3)]
    save_checkpoint({"config": to_dict(config), "model": trained_tiny.state_dict(), "epoch": 3, "history": history,
                     "data_sizes": {"train": 4000, "val": 500}}, run / "best.pt")
    store = tmp_path / "store"
    assert main(["eval", str(run / "best.pt"), "--n-examples", "20", "--attacks", "fgsm", "--no-probe",
                 "--device", "cpu", "--no-progress", "--results-dir", str(store)]) == 0
    (row,) = json.loads((store / "results.json").read_text())
    assert (row["train_images"], row["epochs"], row["epoch"], row["selection"], row["estimator"]) == (
        4000, 4, 3, "best-val-robust", "official")
    base = {"kind": "paper", "method": "m", "dataset": "mnist5k", "threat_model": "Linf", "eps": "0.2",
            "attack": "FGSM", "n_examples": 20, "architecture": "tiny_cnn", "sparsity": 0, "clean_acc": 90,
            "robust_acc": 50, "extra_data": "false", "source_url": "https://example.org", "source_date": "2026"}
    board = tmp_path / "board.csv"
    pd.DataFrame([
        {**base, "name": "Same", "epochs": 4, "selection": "best-val-robust", "estimator": "official"},
        {**base, "name": "Other", "epochs": 200, "selection": "best-test-clean", "estimator": "paper"},
    ]).to_csv(board, index=False)
    assert main(["report", str(store), "--leaderboard", str(board), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    same = next(line for line in text.splitlines() if line.startswith("| Same "))
    other = next(line for line in text.splitlines() if line.startswith("| Other "))
    assert f"yes: {row['model']} (FGSM)" in same
    assert ("no: epochs: 4 here, 200 in the entry; model selection: best validation robust accuracy (epoch 3 of 4) "
            "here, best test clean accuracy in the entry; AGENT estimator: official here, paper in the entry") in other


def test_names_are_unique_within_a_dataset_and_threat_model_and_hydra_rows_state_its_eps():
    """A report places rows by name: two rows of one dataset and threat model must not share it. HYDRA's own
    table is at HYDRA's eps, 0.031 (its configs/configs.yml), as its re-evaluation rows and configs/papers say."""
    board = load_leaderboard()
    assert not board.duplicated(["name", "dataset", "threat_model"]).any()
    hydra_paper = board[board["attack"] == "PGD (HYDRA paper)"]
    assert len(hydra_paper) and hydra_paper["eps"].tolist() == pytest.approx([0.031] * len(hydra_paper))
