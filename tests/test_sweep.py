"""Sweeps: grid expansion, bad sweep files, idempotent resume, aggregated report."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml

from robust_sparse.errors import ConfigError
from robust_sparse.studies.local import run_status
from robust_sparse.studies.sweep import expand, load_sweep, run_id, run_sweep
from robust_sparse.studies.report import aggregate, collect, epochs_to_accuracy, write_report

TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "optim.epochs=2", "attack.steps=1",
        "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=64", "eval.pgd_steps=2", "device=cpu"]


def write(tmp_path, **content):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), **content}, sort_keys=False))
    return path


def test_grid_expands_to_the_cartesian_product(tmp_path):
    sweep = load_sweep(write(tmp_path, overrides=["agent.enabled=true"],
                             grid={"agent.gamma": [0, 0.01, 0.1], "sparsity.density": [0.1, 0.01], "seed": [0, 1, 2]}))
    runs = expand(sweep)
    assert len(runs) == 18 and len({tuple(r) for r in runs}) == 18
    assert ["agent.gamma=0", "sparsity.density=0.1", "seed=0"] in runs
    assert run_id(["agent.gamma=0.1", "seed=2"]) == "agent.gamma=0.1__seed=2"


def test_a_whole_float_is_spelled_as_an_integer_and_old_run_directories_are_kept(tmp_path):
    """Run names spell γ = 0.0 as ``0``, as W&B tags do (robust_sparse.tracking); a run directory named under the
    previous spelling (``agent.gamma=0.0``) is still the run's, so a rerun resumes it rather than starting over."""
    path = write(tmp_path, overrides=TINY + ["agent.enabled=true"], grid={"agent.gamma": [0.0, 0.5], "seed": [0]})
    assert expand(load_sweep(path)) == [["agent.gamma=0", "seed=0"], ["agent.gamma=0.5", "seed=0"]]
    runs = tmp_path / "out" / "runs"
    run_sweep(load_sweep(path), dry_run=True)
    (runs / "agent.gamma=0__seed=0").rename(runs / "agent.gamma=0.0__seed=0")  # as the sweep named it before
    index = run_sweep(load_sweep(path), dry_run=True)
    assert not (runs / "agent.gamma=0__seed=0").exists()
    assert list(index["run_id"]) == ["agent.gamma=0.0__seed=0", "agent.gamma=0.5__seed=0"]
    with pytest.raises(ConfigError, match="listed twice"):  # 0 and 0.0 are one run
        load_sweep(write(tmp_path, grid={"agent.gamma": [0, 0.0]}))


def test_random_search_samples_inside_the_space(tmp_path):
    sweep = load_sweep(write(tmp_path, grid={"seed": [0, 1]},
                             random={"samples": 5, "seed": 3, "space": {"optim.lr": {"log_uniform": [0.001, 0.1]}}}))
    runs = expand(sweep)
    assert len(runs) == 10
    learning_rates = [float(r[1].split("=")[1]) for r in runs]
    assert all(0.001 <= lr <= 0.1 for lr in learning_rates)
    assert expand(sweep) == runs  # seeded: the same sweep file gives the same runs


@pytest.mark.parametrize("content,message", [
    ({"grid": {"optim.lrr": [0.1]}}, "optim.lrr"),
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"optim.epochs": ["many"]}}, "optim.epochs"),
    ({"grid": {"agent.gamma": [2.0]}}, "agent.gamma"),
    ({"grid": {"seed": [0]}, "backend": "kubernetes"}, "backend"),
    ({"grid": {"seed": [0]}, "parallel": 0}, "parallel"),
    ({"grid": {"seed": [0]}, "bogus": 1}, "bogus"),
    ({"grid": {"seed": [0]}, "base": "missing.yaml"}, "not found"),
])
def test_bad_sweep_files_give_one_line_errors(tmp_path, content, message, capsys):
    from robust_sparse.cli import main

    path = write(tmp_path, **content)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    from robust_sparse.files.checkpoint import load_checkpoint
    from robust_sparse.config import load_config
    from test_train import _train_one_epoch_then_stop

    sweep = load_sweep(write(tmp_path, overrides=TINY + ["agent.enabled=true"],
                             grid={"agent.gamma": [0, 0.1], "seed": [0]}, parallel=2))
    index = run_sweep(sweep, dry_run=True)
    assert list(index["status"]) == ["pending", "pending"]
    runs = tmp_path / "out" / "runs"
    killed = runs / "agent.gamma=0.1__seed=0"
    # The sweep was killed after this run's first epoch: its last.pt holds epoch 1 of 2.
    _train_one_epoch_then_stop(load_config(killed / "requested.yaml"))
    assert run_status(killed) == "partial"

    index = run_sweep(sweep)
    assert list(index["status"]) == ["done", "done"]
    assert load_checkpoint(killed / "last.pt")["epoch"] == 2 and (killed / "eval.json").exists()
    log = (killed / "train.log").read_text()
    assert "resuming" in log and "after epoch 1" in log  # continued, not restarted
    stamps = {run.name: (run / "eval.json").stat().st_mtime_ns for run in runs.iterdir()}
    index = run_sweep(sweep)  # everything finished: nothing runs again
    assert {run.name: (run / "eval.json").stat().st_mtime_ns for run in runs.iterdir()} == stamps

    runs_table, curves = collect(tmp_path / "out")
    assert set(runs_table["status"]) == {"done"} and len(curves) == 4
    summary = aggregate(runs_table)
    assert list(summary["runs"]) == [1, 1] and list(summary["unfinished"]) == [0, 0]
    assert "test_pgd_accuracy mean" in summary
    steps = epochs_to_accuracy(runs_table, curves, [0.0, 1.01])
    assert (steps["val_clean_accuracy >= 0"] == 1).all() and steps["val_clean_accuracy >= 1.01"].isna().all()
    assert list(steps["val_clean_accuracy >= 0 reached"]) == ["1/1", "1/1"]
    assert list(steps["val_clean_accuracy >= 1.01 reached"]) == ["0/1", "0/1"]
    report = write_report(tmp_path / "out")
    assert "Final accuracy" in report.read_text()
    assert (report.parent / "gamma_sensitivity.png").exists() and (report.parent / "convergence.png").exists()


def test_another_sweep_in_the_same_directory_is_refused(tmp_path):
    first = load_sweep(write(tmp_path, overrides=TINY, grid={"seed": [0]}))
    run_sweep(first, dry_run=True)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": TINY, "grid": {"seed": [5]}}))
    with pytest.raises(ConfigError, match="holds another sweep"):
        run_sweep(load_sweep(other))
    wider = tmp_path / "wider.yaml"  # the same sweep, more runs at once and other threads: it resumes
    wider.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": TINY, "grid": {"seed": [0]},
                                     "parallel": 2, "threads": 1}))
    assert isinstance(run_sweep(load_sweep(wider), dry_run=True), pd.DataFrame)
    shutil.rmtree(tmp_path / "out")
    assert isinstance(run_sweep(load_sweep(other), dry_run=True), pd.DataFrame)


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs" / "studies")
                                        .glob("*_*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_expand_and_validate(path, tmp_path, monkeypatch):
    if path.name.startswith("common_"):
        pytest.skip("a base config, not a sweep file")
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    (repo / "data").mkdir()  # the CIFAR studies read a local copy from ./data
    (tmp_path / "shared" / "data" / "cifar10-prefix").mkdir(parents=True)  # ... or the prefix beside the repo
    sweep = load_sweep(path)
    runs = expand(sweep)
    assert runs and len({run_id(r) for r in runs}) == len(runs)


def test_report_command_on_a_sweep_directory(tmp_path, capsys):
    from robust_sparse.cli import main

    # an AST run: the report has one row per sub-net, with its density
    sweep = load_sweep(write(tmp_path, overrides=TINY + ["sparsity.method=ast", "sparsity.ast_densities=[0.3, 0.1]",
                                                         "sparsity.update_every=1"], grid={"seed": [0]}))
    run_sweep(sweep)
    runs, _ = collect(tmp_path / "out")
    assert list(runs["subnet"]) == [0, 1] and list(runs["subnet_density"]) == pytest.approx([0.3, 0.1], abs=1e-3)
    assert list(aggregate(runs)["subnet"]) == [0, 1]
    assert main(["report", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out-report" / "report.md").exists()  # beside the sweep directory, not inside it
    assert not (tmp_path / "out" / "report").exists()
    assert "report.md" in capsys.readouterr().out

    # two sweeps side by side (a study and its baseline): one table with a leading sweep column
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    run_sweep(load_sweep(write(baseline, overrides=TINY, grid={"seed": [0]})))
    assert main(["report", str(tmp_path / "out"), str(baseline / "out"), "--out", str(tmp_path / "both")]) == 0
    summary = pd.read_csv(tmp_path / "both" / "summary.csv")
    assert list(summary.columns[:2]) == ["sweep", "subnet"] and len(summary) == 3  # 2 AST sub-nets + 1 dense run
    assert summary["sweep"].nunique() == 2
    assert main(["report", str(tmp_path / "out"), str(tmp_path)]) == 2  # a sweep and a non-sweep: refused


def test_report_flags_diverged_chance_and_c_t_outside_0_1_in_words():
    from robust_sparse.studies.report import run_flags

    runs = pd.DataFrame([
        {"run_id": "ok", "seed": 0, "status": "done", "diverged": False, "chance": 0.1, "val_clean_accuracy": 0.9,
         "agent_c_min": 0.0, "agent_c_max": 0.4},
        {"run_id": "nan", "seed": 1, "status": "diverged", "diverged": True, "chance": 0.1,
         "val_clean_accuracy": 0.5, "agent_c_min": 0.0, "agent_c_max": 0.2},
        {"run_id": "flat", "seed": 2, "status": "done", "diverged": False, "chance": 0.1,
         "val_clean_accuracy": 0.115, "agent_c_min": -0.23, "agent_c_max": 0.1},
    ])
    diverged, at_chance, outside = run_flags(runs)
    assert diverged.startswith("1 run(s) diverged") and diverged.endswith(": nan")
    assert at_chance.startswith("1 run(s) ended with validation clean accuracy at chance") and "flat" in at_chance
    assert "ok" not in at_chance  # 0.9 is far above 0.1 + 0.02
    assert outside.startswith("1 AGENT run(s) had c_t outside [0, 1]") and "flat [-0.23, 0.1]" in outside
    assert run_flags(runs.iloc[:1]) == []
    table = aggregate(runs)
    assert table["agent_c_min"].min() == -0.23 and "chance" not in table.columns


def test_the_report_judges_each_run_by_the_chance_margin_it_was_trained_with():
    """The margin is the run's divergence.chance_margin (robust_sparse.chance, the rule its training stopped on),
    not a copy of the default: 0.55 is at chance for a run trained with margin 0.5, not for one with 0.02."""
    from robust_sparse.chance import CHANCE_MARGIN, at_chance
    from robust_sparse.config import TrainConfig
    from robust_sparse.studies.report import run_flags

    assert TrainConfig().divergence.chance_margin == CHANCE_MARGIN and at_chance(0.11, 10) and not at_chance(0.13, 10)
    runs = pd.DataFrame([
        {"run_id": "wide", "chance": 0.1, "chance_margin": 0.5, "val_clean_accuracy": 0.55},
        {"run_id": "default", "chance": 0.1, "chance_margin": 0.02, "val_clean_accuracy": 0.55},
        {"run_id": "unknown", "chance": None, "chance_margin": 0.5, "val_clean_accuracy": 0.05}])
    assert run_flags(runs) == ["1 run(s) ended with validation clean accuracy at chance (below 1/classes + 0.5): "
                               "they learned nothing, and their robust accuracy means nothing: wide"]


def test_the_generic_report_names_no_study_key_and_a_registered_hook_adds_its_part():
    """The γ study's columns, flags and reference come from its hook (robust_sparse.studies.agent_gamma); any
    other study registers its own the same way, and its columns stay out of the grid keys."""
    from pathlib import Path

    from robust_sparse.studies import hooks, report
    from robust_sparse.studies.report import default_reference, grid_keys, run_flags

    source = Path(report.__file__).read_text()
    assert "agent.gamma" not in source and '"agent_' not in source and "GAMMA" not in source
    runs = pd.DataFrame([{"run_id": f"toy.level={v}", "seed": 0, "toy.level": v, "toy_score": v / 10}
                         for v in (0, 1)])
    assert default_reference(runs) is None and run_flags(runs) == [] and "toy_score" in grid_keys(runs)
    hooks.register(hooks.StudyHook(name="toy", prefixes=("toy_",), flags=lambda frame: ["toy flag"],
                                   reference=lambda frame: {"toy.level": 0} if "toy.level" in frame else None))
    try:
        assert run_flags(runs) == ["toy flag"] and default_reference(runs) == {"toy.level": 0}
        assert grid_keys(runs) == ["seed", "toy.level"]
    finally:
        hooks.unregister("toy")


def test_epochs_to_accuracy_counts_seeds_that_never_reach_the_level_as_censored():
    """Three seeds reach 0.5 at epochs 2, never (4 epochs) and 3: the median is 3, not the mean 2.5 of the two
    that got there; a level only one seed reaches is '>4 (1/3)', not '2.00 (1/3)'."""
    from robust_sparse.studies.report import _with_reached

    accuracy = {"a": [0.3, 0.5, 0.6, 0.9], "b": [0.2, 0.3, 0.4, 0.45], "c": [0.1, 0.4, 0.5, 0.6]}
    curves = pd.DataFrame([{"run_id": run, "epoch": epoch + 1, "val_clean_accuracy": value}
                           for run, values in accuracy.items() for epoch, value in enumerate(values)])
    runs = pd.DataFrame([{"run_id": run, "seed": seed, "gamma": 0.1} for seed, run in enumerate(accuracy)])
    steps = epochs_to_accuracy(runs, curves, [0.5, 0.9, 0.95])
    row = steps.iloc[0]
    assert row["val_clean_accuracy >= 0.5"] == 3 and row["val_clean_accuracy >= 0.5 reached"] == "2/3"
    assert pd.isna(row["val_clean_accuracy >= 0.9"]) and row["val_clean_accuracy >= 0.9 censored at"] == 4
    shown = _with_reached(steps).iloc[0]
    assert shown["val_clean_accuracy >= 0.5"] == "3 (2/3)"
    assert shown["val_clean_accuracy >= 0.9"] == ">4 (1/3)" and shown["val_clean_accuracy >= 0.95"] == ">4 (0/3)"


def test_agent_columns_quote_the_last_epoch_and_the_largest_variance_ratio_and_stay_out_of_the_grid():
    from robust_sparse.studies.agent_gamma import agent_columns as _agent_columns
    from robust_sparse.studies.report import grid_keys

    metrics = pd.DataFrame({"epoch": [1, 2, 3, 4], "agent_weight": [0.0, 0.03, 0.06, 0.05],
                            "agent_variance_ratio": [float("nan"), 0.9, 52.7, 0.8]})
    columns = _agent_columns(metrics)
    assert columns == {"agent_weight_last": 0.05, "agent_weight_max": 0.06, "agent_variance_ratio_last": 0.8,
                       "agent_variance_ratio_max": 52.7, "agent_variance_ratio_max_epoch": 3}
    assert _agent_columns(metrics.drop(columns=["agent_weight", "agent_variance_ratio"])) == {}
    runs = pd.DataFrame([{"run_id": f"seed={s}", "seed": s, "agent.gamma": 0.1, "status": "done", "diverged": False,
                          "test_pgd_accuracy": 0.5 + s / 10,
                          **columns} for s in (0, 1)])
    assert sorted(grid_keys(runs)) == ["agent.gamma", "seed"]  # per-run AGENT figures are results, not settings
    summary = aggregate(runs)
    assert summary["agent_weight_last mean"].tolist() == [0.05]
    assert summary["agent_variance_ratio_last mean"].tolist() == [0.8]


def test_the_sweep_console_names_each_runs_log_and_reports_its_epochs(tmp_path, caplog, monkeypatch):
    """Between "N runs to do" and the status lines a sweep says where each run logs and, read from its
    metrics.csv, every epoch it finishes with an ETA from this attempt's epochs (issue 35)."""
    import logging

    import robust_sparse.studies.local as local_module

    monkeypatch.setattr(local_module, "WATCH_SECONDS", 0.2)
    with caplog.at_level(logging.INFO, logger="robust_sparse.studies"):
        run_sweep(load_sweep(write(tmp_path, overrides=TINY, grid={"seed": [0]})))
    lines = [r.getMessage() for r in caplog.records]
    run_dir = tmp_path / "out" / "runs" / "seed=0"
    assert f"seed=0: training, 2 epochs; its log: {run_dir / 'train.log'}" in lines
    epochs = [line for line in lines if line.startswith("seed=0: epoch ")]
    assert epochs[-1] == "seed=0: epoch 2/2 done"  # the last one: nothing left, no ETA
    assert all(line.startswith(("seed=0: epoch 1/2 done, ETA ~", "seed=0: epoch 2/2 done")) for line in epochs)
    assert lines.index(epochs[-1]) < lines.index("seed=0: status done")


def test_the_report_flags_what_the_runs_flagged_test_chance_and_an_idle_gamma():
    """A run whose test clean accuracy is at chance (it warned at its end) and an AGENT run whose γ·c_t stayed 0
    (c_t = 0 until the second refresh) are named in "Read this first"; γ = 0 and an acting γ are not."""
    from robust_sparse.studies.report import run_flags

    runs = pd.DataFrame([
        {"run_id": "a", "chance": 0.1, "val_clean_accuracy": 0.9, "test_clean_accuracy": 0.11,
         "agent_gamma": 0.5, "agent_weight_max": 0.0},
        {"run_id": "b", "chance": 0.1, "val_clean_accuracy": 0.9, "test_clean_accuracy": 0.90,
         "agent_gamma": 0.0, "agent_weight_max": 0.0},
        {"run_id": "c", "chance": 0.1, "val_clean_accuracy": 0.9, "test_clean_accuracy": 0.90,
         "agent_gamma": 0.5, "agent_weight_max": 0.2},
    ])
    flags = run_flags(runs)
    assert flags == [
        "1 run(s) ended with test clean accuracy at chance (below 1/classes + 0.02): their robust accuracy means "
        "nothing: a",
        "1 AGENT run(s) with γ > 0 whose correction weight γ·c_t was 0 in every epoch (c_t is 0 until the second "
        "snapshot refresh): they trained as γ = 0 did, so a γ comparison of them shows nothing: a"]


def test_a_one_epoch_gamma_sweep_says_gamma_never_acted_and_refers_to_no_missing_table(tmp_path):
    sweep_dir = tmp_path / "out"
    run_sweep(load_sweep(write(tmp_path, overrides=TINY + ["agent.enabled=true", "optim.epochs=1"],
                               grid={"agent.gamma": [0, 0.5], "seed": [0]})))
    report = write_report(sweep_dir, tmp_path / "report").read_text()
    assert "whose correction weight γ·c_t was 0 in every epoch" in report and "agent.gamma=0.5__seed=0" in report
    # one seed: the paired table has no intervals, so the figure's caption promises no interval bars
    assert "No interval bars: a paired interval needs at least two seeds" in report
    assert "as bars, the paired interval" not in report


def test_local_sweep_processes_and_threads_are_bounded_by_the_machine(tmp_path):
    """parallel local runs and threads per run start on this machine: 100,000 of them is one line, not a fork
    bomb; a Slurm array's parallelism is the cluster's business."""
    import os

    from robust_sparse.config.validation import max_workers

    bound = max_workers()
    assert bound == max(64, 4 * (os.cpu_count() or 1))
    with pytest.raises(ConfigError, match=rf"^sweep parallel = 100000: must be in 1\.\.{bound}$"):
        load_sweep(write(tmp_path, grid={"seed": [0]}, parallel=100000))
    with pytest.raises(ConfigError, match=rf"^sweep threads = 100000: must be in 0\.\.{bound} "):
        load_sweep(write(tmp_path, grid={"seed": [0]}, threads=100000))
    assert load_sweep(write(tmp_path, grid={"seed": [0]}, parallel=bound, threads=bound)).parallel == bound
