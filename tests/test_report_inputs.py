"""``report`` reads files from strangers (issue 32): it counts what the runs recorded (a run that diverged before
writing metrics is a diverged run), an unreadable stored file is one line naming it, and a refused report leaves
no folder behind (the output folder is claimed only after every input is read and checked)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import one_line_error, snapshot
from robust_sparse.cli import main

BINARY = b"\x80\x81\xfe\xff\x00 binary"


def _sweep(root, runs):
    """A sweep directory as sweep and train leave it. ``runs``: run id -> (runs.csv status, what the run left:
    a subset of metrics, eval, marker, log)."""
    index = []
    for seed, (run_id, (status, left)) in enumerate(runs.items()):
        run_dir = root / "runs" / run_id
        run_dir.mkdir(parents=True)
        if "metrics" in left:
            pd.DataFrame([{"epoch": 1, "train_loss": 0.5, "val_clean_accuracy": 0.8, "val_pgd_accuracy": 0.4}]
                         ).to_csv(run_dir / "metrics.csv", index=False)
        if "eval" in left:
            (run_dir / "eval.json").write_text(json.dumps({"epoch": 1, "n_examples": 100, "clean_accuracy": 0.8,
                                                           "pgd_accuracy": 0.4}))
        if "marker" in left:  # what the sweep writes when train exits with code 3
            (run_dir / "diverged.json").write_text(json.dumps({"returncode": 3}))
        if "log" in left:  # train's own last line on stderr, in the run's train.log
            (run_dir / "train.log").write_text("12:00:00 INFO robust_sparse.train: epoch 1\n"
                                               "robust-sparse: diverged: training loss became nan in epoch 1, batch 3\n")
        index.append({"run_id": run_id, "overrides": f"seed={seed}", "status": status})
    pd.DataFrame(index).to_csv(root / "runs.csv", index=False)
    (root / "sweep.yaml").write_text(yaml.safe_dump({"grid": {"seed": list(range(len(runs)))}}))
    return root


@pytest.mark.parametrize("evidence", [("diverged", {"marker", "log"}), ("diverged", set()), ("partial", {"log"}),
                                      ("pending", {"marker"})])
def test_runs_that_diverged_before_writing_metrics_count_as_diverged(tmp_path, capsys, evidence):
    """Issue 32: two runs that diverged in epoch 1 were reported as '2 runs; 0 diverged'. Each of the records a
    divergence leaves (the sweep's diverged.json, the status in runs.csv, train's line in train.log) counts."""
    sweep = _sweep(tmp_path / "sweep", {"seed=0": evidence, "seed=1": evidence, "seed=2": ("done", {"metrics", "eval"})})
    assert main(["report", str(sweep), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "3 runs; 2 diverged" in text
    assert "2 run(s) diverged before their first epoch ended (NaN loss): they have no numbers: seed=0, seed=1" in text
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert runs.set_index("run_id")["diverged"].to_dict() == {"seed=0": True, "seed=1": True, "seed=2": False}
    assert pd.read_csv(tmp_path / "report" / "summary.csv")["diverged"].sum() == 2


def test_a_finished_run_is_not_counted_by_an_old_divergence_line(tmp_path):
    """A run restarted by hand after a divergence and finished: its last verdict is what counts."""
    sweep = _sweep(tmp_path / "sweep", {"seed=0": ("done", {"metrics", "eval", "log"}),
                                        "seed=1": ("pending", {"log"})})
    log = sweep / "runs" / "seed=1" / "train.log"
    log.write_text(log.read_text() + "robust-sparse: terminated (SIGTERM); resume with ...\n")
    assert main(["report", str(sweep), "--out", str(tmp_path / "report")]) == 0
    assert "2 runs; 0 diverged" in (tmp_path / "report" / "report.md").read_text()


def _good_sweep(tmp_path):
    return _sweep(tmp_path / "sweep", {"seed=0": ("done", {"metrics", "eval"}), "seed=1": ("done", {"metrics", "eval"})})


@pytest.mark.parametrize("damage, named, words", [
    (lambda s: (s / "runs.csv").write_bytes(BINARY), "runs.csv", "not UTF-8 text"),
    (lambda s: (s / "runs" / "seed=1" / "eval.json").write_bytes(BINARY), "runs/seed=1/eval.json", "not UTF-8 text"),
    (lambda s: (s / "runs" / "seed=1" / "eval.json").write_text("{\"epoch\": 1,"), "runs/seed=1/eval.json",
     "cannot read it as JSON"),
    (lambda s: (s / "runs" / "seed=1" / "eval.json").write_text("{\"epoch\": 1}"), "runs/seed=1/eval.json",
     "(no clean_accuracy)"),
    (lambda s: (s / "runs" / "seed=1" / "eval.json").write_text("[1, 2]"), "runs/seed=1/eval.json",
     "(not a mapping)"),
    (lambda s: (s / "runs" / "seed=1" / "sweep_eval.json").write_text("{\"results\": [{\"model\": 1}]}"),
     "runs/seed=1/sweep_eval.json", "no list of result rows"),
    (lambda s: (s / "runs" / "seed=0" / "metrics.csv").write_bytes(BINARY), "runs/seed=0/metrics.csv",
     "empty or damaged"),
    (lambda s: (s / "runs" / "seed=0" / "sweep_eval.json").write_bytes(BINARY), "runs/seed=0/sweep_eval.json",
     "not UTF-8 text"),
    (lambda s: (s / "runs.csv").write_text("run_id,overrides,status\n../../outside,seed=0,done\n"), "runs.csv",
     "run_id '../../outside' is not a folder under"),
    (lambda s: (s / "runs.csv").write_text("name,status\nx,done\n"), "runs.csv", "no run_id column"),
])
def test_an_unreadable_sweep_file_is_one_line_naming_it_and_no_report_folder(tmp_path, capsys, damage, named, words):
    sweep = _good_sweep(tmp_path)
    damage(sweep)
    before = snapshot(sweep)
    line = one_line_error(["report", str(sweep), "--out", str(tmp_path / "report")], capsys)
    assert f"{sweep / named}" in line and words in line, line
    assert not (tmp_path / "report").exists() and snapshot(sweep) == before
    assert not (tmp_path / "sweep-report").exists()


def test_a_binary_stored_runs_csv_is_one_line_naming_it(tmp_path, capsys):
    stored = tmp_path / "old" / "runs.csv"
    stored.parent.mkdir()
    stored.write_bytes(BINARY)
    line = one_line_error(["report", str(stored), "--out", str(tmp_path / "again"), "--test-n", "100"], capsys)
    assert f"{stored}: cannot read it as a sweep report's runs.csv (not UTF-8 text" in line
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("reference, words", [
    ("agent.gamma=[0", "report --reference 'agent.gamma=[0' is not valid YAML"),
    ("agent.gamma=\"0", "report --reference 'agent.gamma=\"0' is not valid YAML"),
    ("agent.gamma=0", "report --reference agent.gamma=...: not a grid key"),
])
def test_a_bad_reference_is_one_line_naming_it_and_no_report_folder(tmp_path, capsys, reference, words):
    sweep = _good_sweep(tmp_path)
    write = main(["report", str(sweep), "--out", str(tmp_path / "first")])  # a stored runs.csv to read again
    assert write == 0
    capsys.readouterr()
    for target, out in ((sweep, tmp_path / "report"), (tmp_path / "first" / "runs.csv", tmp_path / "again")):
        line = one_line_error(["report", str(target), "--reference", reference, "--out", str(out)], capsys)
        assert words in line, line
        assert not out.exists()
    assert not (tmp_path / "sweep-report").exists()


def test_a_reference_no_run_has_leaves_no_default_report_folder(tmp_path, capsys):
    """Without --out the report goes beside the sweep: a refusal leaves nothing there either."""
    sweep = _good_sweep(tmp_path)
    line = one_line_error(["report", str(sweep), "--reference", "seed=7"], capsys)
    assert "report --reference seed=7: no run has this setting" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def _store(directory):
    from robust_sparse.eval.store import append_result

    append_result(directory, {
        "timestamp": "2026-01-01T00:00:00+00:00", "model": "m", "source": "weights", "path": "w.pt",
        "architecture": "tiny_cnn", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255, "n_examples": 100,
        "seed": 0, "batch_size": 100, "mode": "standalone", "attacks": "pgd", "clean_acc": 0.9, "pgd_attack": "pgd",
        "pgd_acc": 0.4, "autoattack_acc": None, "worst_acc": 0.4, "per_attack": {"pgd": 0.4}, "sparsity": 0.9,
        "params": 100, "nonzero_params": 10, "wall_seconds": 1.0, "device": "cpu", "warnings": [],
        "model_fingerprint": "f", "data_fingerprint": "d", "large_eps": None, "large_eps_acc": None})
    return directory


@pytest.mark.parametrize("case", ["binary store", "binary leaderboard", "exports without AST rows"])
def test_a_refused_store_report_leaves_no_folder(tmp_path, capsys, case):
    store = _store(tmp_path / "store")
    flags = []
    if case == "binary store":
        (store / "results.json").write_bytes(BINARY)
        named = f"{store / 'results.json'}: cannot read it as a results store (not UTF-8 text"
    elif case == "binary leaderboard":
        (tmp_path / "board.csv").write_bytes(BINARY)
        flags = ["--leaderboard", str(tmp_path / "board.csv")]
        named = f"report --leaderboard {tmp_path / 'board.csv'}: cannot read it as a leaderboard CSV (not UTF-8"
    else:
        export = tmp_path / "export"
        export.mkdir()
        (export / "export.json").write_text(json.dumps({"kind": "ast-dynamic", "checkpoint": "x.pt", "subnets": []}))
        flags = ["--exports", str(export)]
        named = "report --exports: the results hold no AST sub-net rows"
    before = snapshot(store)
    line = one_line_error(["report", str(store), *flags], capsys)
    assert named in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["store", *(["board.csv"] if "leaderboard" in case
                                                                          else []),
                                                                 *(["export"] if "exports" in case else [])])
    assert snapshot(store) == before
