"""The training loop: metrics, checkpoints, resume, divergence, and the eval command."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from robust_sparse.files.checkpoint import load_checkpoint, save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config, to_dict
from robust_sparse.errors import CheckpointError, DivergenceError, UserError
from robust_sparse.optim import lr_factor
from robust_sparse.train import fit


def test_fit_writes_metrics_checkpoints_and_evaluation(tiny_config):
    config = tiny_config()
    result = fit(config)
    run = result.run_dir
    assert list(result.metrics["epoch"]) == [1, 2]
    for column in ["train_loss", "val_clean_accuracy", "val_pgd_accuracy", "images_per_second", "lr"]:
        assert result.metrics[column].notna().all()
    assert {"config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt", "eval.json"} <= {
        p.name for p in run.iterdir()}
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(config)
    best = load_checkpoint(run / "best.pt")
    assert best["config"] == to_dict(config)  # the resolved config travels inside every checkpoint
    best_row = result.metrics.loc[result.metrics["best"]].iloc[-1]
    assert best["epoch"] == best_row["epoch"]
    # best = highest robust validation accuracy (clean accuracy breaks ties)
    top = result.metrics.sort_values(["val_pgd_accuracy", "val_clean_accuracy"]).iloc[-1]
    assert best["epoch"] == top["epoch"]
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["n_examples"] == 128 and 0 <= evaluation["pgd_accuracy"] <= evaluation["clean_accuracy"]


def test_no_validation_selects_the_last_epoch_and_says_so(tiny_config, monkeypatch, caplog):
    """val.max_examples=0: nothing is validated, best.pt is the last epoch, its history marks no epoch best by
    validation (so the evaluation reads it as the latest epoch), and the run's log says so."""
    import logging

    from robust_sparse import train as train_module
    from robust_sparse.eval.leaderboard import Selection, checkpoint_selection

    def no_validation(*args, **kwargs):
        raise AssertionError("measure_validation called with val.max_examples=0")

    monkeypatch.setattr(train_module, "measure_validation", no_validation)
    with caplog.at_level(logging.INFO, logger="robust_sparse.train"):
        result = fit(tiny_config("val.max_examples=0", "optim.epochs=2", "eval.n_examples=32"))
    assert "val.max_examples = 0: no validation; the last epoch is selected" in caplog.text
    epoch_lines = [m for m in caplog.messages if m.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("no validation" in m for m in epoch_lines)
    metrics = result.metrics
    assert metrics["val_clean_accuracy"].isna().all() and metrics["val_pgd_accuracy"].isna().all()
    assert not metrics["best"].any()
    best, last = load_checkpoint(result.run_dir / "best.pt"), load_checkpoint(result.run_dir / "last.pt")
    assert best["epoch"] == last["epoch"] == 2
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert checkpoint_selection(best) is Selection.LAST
    assert json.loads((result.run_dir / "eval.json").read_text())["epoch"] == 2
    with pytest.raises(UserError, match=r"^val.max_examples = -1: must be >= 0 \(0 = no validation"):
        load_config(None, ["val.max_examples=-1"])


def test_resume_gives_identical_weights(tiny_config, tmp_path):
    uninterrupted = fit(tiny_config("optim.epochs=3", f"out_dir={tmp_path / 'a'}", "eval.n_examples=0"))
    # The "killed" run: the same config, stopped after its first epoch, then resumed to the end.
    killed = tiny_config("optim.epochs=3", f"out_dir={tmp_path / 'b'}", "eval.n_examples=0")
    _train_one_epoch_then_stop(killed)
    resumed = fit(killed, resume=True)
    a = load_checkpoint(uninterrupted.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert len(b["history"]) == 3


def _train_one_epoch_then_stop(config):
    """Run ``fit`` but interrupt it right after the first epoch's checkpoint is written."""
    import robust_sparse.train as train_module

    original = train_module.write_metrics
    def interrupt(history, run_dir):
        original(history, run_dir)
        raise KeyboardInterrupt  # simulates a kill after the epoch-1 checkpoint

    train_module.write_metrics = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            fit(config)
    finally:
        train_module.write_metrics = original
    assert load_checkpoint(config.out_dir + "/last.pt")["epoch"] == 1


def test_existing_run_is_never_overwritten(tiny_config):
    config = tiny_config("optim.epochs=1", "eval.n_examples=0")
    fit(config)
    before = (load_checkpoint(config.out_dir + "/last.pt")["model"])
    with pytest.raises(UserError, match="already holds a run"):
        fit(config)
    after = load_checkpoint(config.out_dir + "/last.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_a_different_config_is_refused(tiny_config):
    fit(tiny_config("optim.epochs=1", "eval.n_examples=0"))
    with pytest.raises(UserError, match="config differs"):
        fit(tiny_config("optim.epochs=1", "eval.n_examples=0", "optim.lr=0.5"), resume=True)


def test_resume_after_an_upgrade_that_added_a_config_field(tiny_config):
    """A run saved before a field existed resumes: the field compares at its default on both sides."""
    config = tiny_config("optim.epochs=2", "eval.n_examples=0")
    _train_one_epoch_then_stop(config)
    path = Path(config.out_dir) / "last.pt"
    state = load_checkpoint(path)
    del state["config"]["sparsity"]["ast"]["subnet_bn"]  # as written by a version without the field
    torch.save(state, path)
    assert fit(config, resume=True).metrics["epoch"].tolist() == [1, 2]
    state = load_checkpoint(path)
    state["config"]["sparsity"]["from_the_future"] = 1  # written by a newer version: refused, one line
    torch.save(state, path)
    with pytest.raises(UserError, match="saved config does not load"):
        fit(config, resume=True)


def test_nan_loss_stops_the_run(tiny_config):
    config = tiny_config("optim.lr=1e6", "optim.momentum=0", "optim.weight_decay=0", "objective=natural",
                         "optim.epochs=3")
    with pytest.raises(DivergenceError, match="loss"):
        fit(config)


def test_collapse_to_chance_stops_and_keeps_best(tiny_config, tmp_path, capsys):
    # With a margin of 0.95 every accuracy counts as "at chance": the run must stop after `patience` epochs.
    config = tiny_config("divergence.patience=2", "divergence.chance_margin=0.95", "optim.epochs=4")
    assert main(["train", "--set", "model.name=tiny_cnn", "--set", "data.train_limit=256", "--set",
                 "data.val_size=64", "--set", "optim.epochs=4", "--set", "attack.steps=1", "--set",
                 "val.pgd_steps=1", "--set", "divergence.patience=2", "--set", "divergence.chance_margin=0.95",
                 "--out", config.out_dir, "--device", "cpu", "--no-progress"]) == 3
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("robust-sparse: diverged: validation accuracy stayed at chance")
    last = load_checkpoint(config.out_dir + "/last.pt")
    assert last["epoch"] == 2  # stopped after `patience` epochs, not at optim.epochs
    # the first epoch with the highest (robust, clean) validation accuracy
    best_epoch = -max((row["val_pgd_accuracy"], row["val_clean_accuracy"], -row["epoch"]) for row in last["history"])[2]
    assert load_checkpoint(config.out_dir + "/best.pt")["epoch"] == best_epoch


def test_lr_schedules():
    piecewise = load_config(None, ["optim.milestones=[0.25, 0.5]", "optim.factors=[0.1, 0.005]"])
    assert [lr_factor(piecewise, p) for p in (0.0, 0.2499, 0.25, 0.49, 0.5, 0.99)] == [1, 1, 0.1, 0.1, 0.005, 0.005]
    cosine = load_config(None, ["optim.schedule=cosine"])
    assert lr_factor(cosine, 0.0) == 1.0 and lr_factor(cosine, 0.5) == pytest.approx(0.5)
    assert lr_factor(cosine, 1.0) == pytest.approx(0.0)
    assert lr_factor(load_config(None, ["optim.schedule=constant"]), 0.9) == 1.0


# ---- checkpoints -------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 3, "weights": torch.arange(4.0)}, path)
    assert load_checkpoint(path)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 3, "weights": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a robust-sparse checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint carrying arbitrary pickled objects is refused rather than executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "robust-sparse/1", "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="not loadable safely"):
        load_checkpoint(path)


def test_eval_command_on_a_trained_run(tiny_config, tmp_path, capsys):
    config = tiny_config("optim.epochs=1", "eval.n_examples=0")
    fit(config)
    output = tmp_path / "eval.json"
    code = main(["eval", config.out_dir + "/best.pt", "--n-examples", "100", "--pgd-steps", "2", "--eps", "0",
                 "--output", str(output), "--device", "cpu"])
    assert code == 0
    result = json.loads(output.read_text())
    assert result["n_examples"] == 100 and result["pgd_accuracy"] == result["clean_accuracy"]  # eps 0
    assert "clean accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1})])
def test_eval_command_rejects_corrupted_checkpoints(tmp_path, capsys, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    assert main(["eval", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "bad.pt" in error[0]


def test_eval_command_rejects_too_many_examples(tiny_config, capsys):
    config = tiny_config("optim.epochs=1", "eval.n_examples=0")
    fit(config)
    assert main(["eval", config.out_dir + "/best.pt", "--n-examples", "5000"]) == 2
    assert "only 1000 points" in capsys.readouterr().err


def test_train_ends_with_autoattack_on_the_configured_points(tiny_config, tmp_path, capsys):
    """eval.autoattack_examples: `robust-sparse train` runs the original AutoAttack on best.pt (the quickstart's
    number), into the run's results store, after the clean/PGD test evaluation."""
    config = tiny_config()
    assert main(["train", "--set", "model.name=tiny_cnn", "--set", "data.train_limit=256", "--set", "data.val_size=64",
                 "--set", "optim.epochs=1", "--set", "attack.steps=1", "--set", "val.pgd_steps=1", "--set",
                 "eval.n_examples=16", "--set", "eval.autoattack_examples=12", "--out", config.out_dir,
                 "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "AutoAttack standard (12 points, Linf eps=0.1" in out
    (row,) = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    # PGD at the run's own setting (eval.pgd_steps, one restart) on the same points, so the store holds both numbers
    assert row["n_examples"] == 12 and row["attacks"] == "pgd-20x1,autoattack" and row["source"] == "checkpoint"
    assert row["autoattack_acc"] <= row["clean_acc"] and row["pgd_attack"] == "PGD-20x1"
    assert f"PGD-20x1 accuracy {row['pgd_acc']:.4f}, AutoAttack accuracy {row['autoattack_acc']:.4f}" in out
    assert main(["train", "--set", "eval.autoattack_examples=-1", "--out", str(tmp_path / "bad")]) == 2
    assert "eval.autoattack_examples = -1" in capsys.readouterr().err
