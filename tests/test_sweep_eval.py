"""A sweep's evaluation stage: robust-sparse eval on each finished run's best.pt, resumable, in the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from robust_sparse.cli import main
from robust_sparse.errors import ConfigError
from robust_sparse.studies.local import EVAL_RESULT, eval_stage_done
from robust_sparse.studies.sweep import load_sweep, run_sweep
from robust_sparse.studies.report import aggregate, collect

TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "optim.epochs=1", "attack.steps=1",
        "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=64", "eval.pgd_steps=2", "device=cpu"]
STAGE = {"attacks": "pgd-2x1,fgsm", "n_examples": 24, "seeds": [0], "probe": False}


def write(tmp_path, **content):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": TINY, "grid": {"seed": [0, 1]},
                                    "threads": 1, **content}, sort_keys=False))
    return path


def _stamps(runs_dir):
    return {path.relative_to(runs_dir): path.stat().st_mtime_ns for path in runs_dir.rglob("*")
            if path.is_file() and path.name not in ("requested.yaml",)}


def test_eval_stage_added_to_a_finished_sweep_runs_once_and_reaches_the_report(tmp_path, capsys):
    runs_dir = tmp_path / "out" / "runs"
    index = run_sweep(load_sweep(write(tmp_path)))  # trained without a stage
    assert list(index["status"]) == ["done", "done"] and "eval" not in index
    trained = {run: (runs_dir / run / "eval.json").stat().st_mtime_ns for run in ("seed=0", "seed=1")}

    # The stage is added afterwards: nothing retrains, only the selected seed is evaluated.
    sweep = load_sweep(write(tmp_path, eval=STAGE))
    index = run_sweep(sweep)
    assert list(index["eval"]) == ["done", "-"]
    assert {run: (runs_dir / run / "eval.json").stat().st_mtime_ns for run in trained} == trained
    record = json.loads((runs_dir / "seed=0" / EVAL_RESULT).read_text())
    assert record["stage"]["attacks"] == "pgd-2x1,fgsm" and len(record["results"]) == 1
    result = record["results"][0]
    assert result["n_examples"] == 24 and result["checkpoint"].endswith("best.pt")
    assert not (runs_dir / "seed=1" / EVAL_RESULT).exists()
    assert eval_stage_done(runs_dir / "seed=0", sweep.eval_stage)
    written = yaml.safe_load((runs_dir / "seed=0" / "sweep_eval.yaml").read_text())  # the EvalConfig eval read
    assert written["checkpoint"] == str(runs_dir / "seed=0" / "best.pt") and written["attacks"] == "pgd-2x1,fgsm"
    assert written["results_dir"] == str(runs_dir / "seed=0" / "eval") and written["n_examples"] == 24
    assert written["probe"] is False and written["seeds"] == [0]

    # A rerun evaluates nothing again: no file of any run changes, the results store keeps one row.
    stamps = _stamps(runs_dir)
    index = run_sweep(sweep)
    assert list(index["eval"]) == ["done", "-"] and _stamps(runs_dir) == stamps
    assert len(pd.read_csv(runs_dir / "seed=0" / "eval" / "results.csv")) == 1

    runs, _ = collect(tmp_path / "out")
    evaluated = runs.set_index("run_id").loc["seed=0"]
    assert evaluated["eval_n"] == 24
    assert evaluated["eval_PGD-2x1_accuracy"] == pytest.approx(result["per_attack"]["PGD-2x1"])
    assert evaluated["eval_FGSM_accuracy"] == pytest.approx(result["per_attack"]["FGSM"])
    assert evaluated["eval_worst_accuracy"] <= min(evaluated["eval_PGD-2x1_accuracy"], evaluated["eval_FGSM_accuracy"])
    assert evaluated["eval_PGD-2x1_accuracy"] <= evaluated["eval_clean_accuracy"]
    assert evaluated["eval_seconds"] == pytest.approx(result["wall_seconds"]) and evaluated["eval_seconds"] > 0
    assert evaluated["eval_warnings"] == len(result["warnings"])
    assert runs.set_index("run_id").loc["seed=1", ["eval_n", "eval_FGSM_accuracy"]].isna().all()
    summary = aggregate(runs)
    assert summary.loc[0, "eval_runs"] == 1 and summary.loc[0, "runs"] == 2 and summary.loc[0, "eval_n"] == 24
    assert summary.loc[0, "eval_FGSM_accuracy mean"] == pytest.approx(result["per_attack"]["FGSM"])
    assert "seed" not in summary  # the stage's columns are not mistaken for grid keys

    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Evaluation stage" in text and "PGD-2x1" in text and "FGSM" in text

    # Widening the seeds evaluates only the run it adds.
    first = (runs_dir / "seed=0" / EVAL_RESULT).stat().st_mtime_ns
    index = run_sweep(load_sweep(write(tmp_path, eval={**STAGE, "seeds": [0, 1]})))
    assert list(index["eval"]) == ["done", "done"] and (runs_dir / "seed=1" / EVAL_RESULT).exists()
    assert (runs_dir / "seed=0" / EVAL_RESULT).stat().st_mtime_ns == first

    # Other stage settings are another evaluation: it runs again (on more points) without retraining.
    index = run_sweep(load_sweep(write(tmp_path, eval={**STAGE, "n_examples": 32})))
    assert list(index["eval"]) == ["done", "-"]
    assert json.loads((runs_dir / "seed=0" / EVAL_RESULT).read_text())["results"][0]["n_examples"] == 32
    assert {run: (runs_dir / run / "eval.json").stat().st_mtime_ns for run in trained} == trained


def test_no_eval_trains_only(tmp_path):
    index = run_sweep(load_sweep(write(tmp_path, grid={"seed": [0]}, eval=STAGE)), evaluate=False)
    assert list(index["status"]) == ["done"] and list(index["eval"]) == ["pending"]
    assert not (tmp_path / "out" / "runs" / "seed=0" / EVAL_RESULT).exists()


@pytest.mark.parametrize("stage,message", [
    ({"attacks": "pgd-2x1", "n_exampels": 8}, "sweep eval: unknown key 'n_exampels'"),
    ({"attacks": "pgd-2x1,autoatack"}, "sweep eval.attacks: unknown attack 'autoatack'"),
    ({"n_examples": 8}, "sweep eval.attacks: required"),
    ({"attacks": "fgsm", "n_examples": 0}, "sweep eval.n_examples"),
    ({"attacks": "fgsm", "seeds": "first"}, "sweep eval.seeds"),
    ({"attacks": "fgsm", "eps": "eight"}, "sweep eval.eps"),
    ({"attacks": "fgsm", "probe": "yes"}, "sweep eval.probe"),
    ("pgd", "sweep eval: expected a mapping"),
])
def test_bad_eval_stage_fails_in_one_line_before_any_run(tmp_path, stage, message, capsys):
    path = write(tmp_path, eval=stage)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "out").exists()  # nothing was prepared, let alone trained


def test_bad_threads_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="sweep threads"):
        load_sweep(write(tmp_path, threads=-1))


def test_report_measures_agents_cosine_per_density_and_takes_thresholds(tmp_path):
    overrides = [o for o in TINY if not o.startswith("optim.epochs")] + [
        "optim.epochs=2", "agent.enabled=true", "agent.gamma=0.1", "sparsity.density=0.1"]
    run_sweep(load_sweep(write(tmp_path, overrides=overrides, grid={"sparsity.method": ["none", "bsrnet"]})))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "out"), "--out", str(out), "--thresholds", "0.1,0.2",
                 "--robust-thresholds", "0.05"]) == 0
    cosine = pd.read_csv(out / "cosine.csv")
    assert sorted(cosine["density"]) == pytest.approx([0.1, 1.0], abs=1e-3)  # the dense run counts as density 1
    for method, density in (("none", 1.0), ("bsrnet", 0.1)):
        metrics = pd.read_csv(tmp_path / "out" / "runs" / f"sparsity.method={method}" / "metrics.csv")
        logged = metrics["agent_cosine"].dropna()
        assert len(logged) == 1  # epoch 1 has no snapshot yet: AGENT corrects (and logs) from epoch 2
        row = cosine[cosine["density"].round(3) == density].iloc[0]
        assert row["cosine mean"] == pytest.approx(logged.mean()) and -1 <= row["cosine mean"] <= 1
        assert row["runs"] == 1 and row["epochs_logged"] == 1
    assert (out / "cosine.png").stat().st_size > 0
    assert "## AGENT's assumption" in (out / "report.md").read_text()
    steps = pd.read_csv(out / "epochs_to_accuracy.csv")
    assert {"val_clean_accuracy >= 0.1", "val_clean_accuracy >= 0.2", "val_pgd_accuracy >= 0.05"} <= set(steps)
    assert main(["report", str(tmp_path / "out"), "--thresholds", "x"]) == 2


def test_a_stage_recorded_by_an_older_sweep_still_counts(tmp_path):
    """sweep_eval.json as sweeps wrote it before the stage became an EvalConfig: the same stage is done and not
    evaluated again, a changed one is not done."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = {"attacks": "pgd-2x1,fgsm", "n_examples": 24, "eps": None, "batch_size": 500, "probe": False,
                "seeds": [0]}
    (run_dir / EVAL_RESULT).write_text(json.dumps({"stage": recorded, "results": []}))
    assert eval_stage_done(run_dir, load_sweep(write(tmp_path, eval=STAGE)).eval_stage)
    assert not eval_stage_done(run_dir, load_sweep(write(tmp_path, eval={**STAGE, "n_examples": 32})).eval_stage)


def test_attack_seeds_are_the_attacks_and_seeds_the_runs(tmp_path):
    """``seeds`` picks the runs by training seed; ``attack_seeds`` is eval --seeds, part of the stage's settings
    only when not the default [0] (stages recorded before it still match)."""
    default = load_sweep(write(tmp_path, eval=STAGE)).eval_stage
    assert default.config.seeds == [0] and "attack_seeds" not in default.settings()
    assert default.for_run(tmp_path / "run").seeds == [0]
    stage = load_sweep(write(tmp_path, eval={**STAGE, "attack_seeds": "0,1,2"})).eval_stage
    assert stage.seeds == [0] and stage.config.seeds == [0, 1, 2] and stage.settings()["attack_seeds"] == [0, 1, 2]
    assert stage.for_run(tmp_path / "run").seeds == [0, 1, 2]  # the attacks' seeds, in the child's EvalConfig
    for bad, message in (({"attack_seeds": [1, 1]}, "sweep eval.attack_seeds = [1, 1]: a seed is listed twice"),
                         ({"attack_seeds": [-1]}, "sweep eval.attack_seeds = -1: must be in 0..4294967295"),
                         ({"eps": 2}, "sweep eval.eps = 2.0: must be <= 1 for linf"),
                         ({"batch_size": 0}, "sweep eval.batch_size = 0: must be in 1..1000000")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_sweep(write(tmp_path, eval={**STAGE, **bad}))


def test_a_stage_with_several_attack_seeds_reports_their_mean_per_model():
    from robust_sparse.studies.report import _by_model, _stage_columns

    def record(model, seed, pgd, worst, warnings, seconds):
        return {"model": model, "n_examples": 4, "clean_acc": 0.75, "seed": seed, "worst_acc": worst,
                "per_attack": {"PGD-2x1": pgd, "FGSM": 0.5}, "warnings": warnings, "wall_seconds": seconds}

    records = [record("run/best", 0, 0.25, 0.25, [], 1.0), record("run/best", 1, 0.75, 0.5, ["w"], 2.0),
               record("run/best/subnet1", 0, 0.0, 0.0, [], 1.0)]
    (first, subnet) = _by_model(records)
    columns = _stage_columns(first)
    assert columns["eval_PGD-2x1_accuracy"] == 0.5 and columns["eval_FGSM_accuracy"] == 0.5
    assert columns["eval_worst_accuracy"] == 0.375 and columns["eval_clean_accuracy"] == 0.75
    assert (columns["eval_warnings"], columns["eval_seconds"], columns["eval_seed"]) == (1, 3.0, "0,1")
    assert columns["eval_warning_text"] == "w" and columns["eval_n"] == 4
    assert _stage_columns(subnet)["eval_seed"] == 0  # one seed: the row's columns as they were
