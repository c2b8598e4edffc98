"""Crash safety: a kill at any file write of a run, an evaluation or a sweep is repaired by resuming or rerunning.

Every file these write goes through ``os.replace`` (atomic writes); :func:`killed_at_write` makes the k-th
replace raise instead, as a kill at that point would stop the process, optionally leaving the temporary file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.errors import UserError
from robust_sparse.studies.sweep import load_sweep, run_sweep
from robust_sparse.train import fit


class Killed(BaseException):
    """The process dies: nothing in the code under test catches this."""


class Writes:
    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def killed_at_write(k: int | None, leave_temporary: bool = False):
    """Count the atomic writes; the k-th (from 1) dies before its rename. ``None``: only count."""
    real = os.replace
    writes = Writes()

    def replace(source, target):
        writes.count += 1
        if writes.count == k:
            if leave_temporary:  # a real kill leaves its temporary file behind
                shutil.copy(source, str(source).removesuffix(".tmp") + "-killed.tmp")
            raise Killed(f"killed while writing {target}")
        real(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        yield writes


# ---- runs ---------------------------------------------------------------------------------------------------

RUN = ["sparsity.method=rigl", "sparsity.density=0.3", "sparsity.update_every=1", "data.train_limit=128",
       "data.val_size=64", "val.max_examples=64", "eval.n_examples=32", "attack.steps=1", "val.pgd_steps=1",
       "eval.pgd_steps=1"]
# metrics.csv columns that do not depend on timing
STABLE = ["epoch", "lr", "train_loss", "train_accuracy", "val_clean_accuracy", "val_pgd_accuracy", "best",
          "density", "exploration_rate"]


def _run_files(run_dir: Path) -> dict:
    """What a finished run directory holds, minus timings and its own path."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(json.loads((run_dir / "metrics.json").read_text())) == len(metrics)
    evaluation = json.loads((run_dir / "eval.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["out_dir"] == str(run_dir)
    return {
        "files": sorted(p.name for p in run_dir.iterdir()),  # no temporary file left
        "metrics": metrics[STABLE].to_dict("list"),
        "layer_density": (run_dir / "layer_density.csv").read_text(),
        "evaluation": {key: evaluation[key] for key in ("epoch", "n_examples", "clean_accuracy", "pgd_accuracy")},
        "config": {key: value for key, value in config.items() if key != "out_dir"},
    }


def _same_weights(a: Path, b: Path) -> None:
    for name in ("last.pt", "best.pt"):
        first, second = load_checkpoint(a / name), load_checkpoint(b / name)
        assert first["epoch"] == second["epoch"]
        for key, value in first["model"].items():
            assert torch.equal(value, second["model"][key]), (name, key)


@pytest.fixture
def reference_run(tiny_config, tmp_path):
    """An uninterrupted run and the number of files it wrote."""
    config = tiny_config(*RUN, f"out_dir={tmp_path / 'reference'}")
    with killed_at_write(None) as writes:
        fit(config)
    return Path(config.out_dir), writes.count


def test_a_run_killed_at_any_write_is_repaired_by_resume(reference_run, tiny_config, tmp_path):
    reference, total = reference_run
    expected = _run_files(reference)
    # config.yaml, then per epoch layer_density.csv, best.pt (when better), last.pt, metrics.csv and .json,
    # then eval.json
    assert total >= 1 + 2 * 4 + 1
    for k in range(1, total + 1):
        config = tiny_config(*RUN, f"out_dir={tmp_path / f'killed-at-{k}'}")
        with killed_at_write(k, leave_temporary=True), pytest.raises(Killed):
            fit(config)
        run_dir = Path(config.out_dir)
        assert any(p.name.endswith(".tmp") for p in run_dir.iterdir())
        fit(config, resume=True)
        assert _run_files(run_dir) == expected, f"killed at write {k}"
        _same_weights(reference, run_dir)


def test_emptied_files_are_rewritten_on_resume_and_the_report_names_them(reference_run, tiny_config, tmp_path,
                                                                          capsys):
    """Files emptied by an old, non-atomic write: resuming a finished run rewrites them from last.pt."""
    reference, _ = reference_run
    expected = _run_files(reference)
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "runs" / "seed=0"
    shutil.copytree(reference, run_dir)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({"overrides": RUN, "grid": {"seed": [0]}}))
    (sweep_dir / "runs.csv").write_text("run_id,overrides,status\nseed=0,seed=0,done\n")
    for name in ("metrics.csv", "metrics.json", "layer_density.csv"):
        (run_dir / name).write_text("")
    (run_dir / ".last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "metrics.csv is empty or damaged" in error[0] and "--resume" in error[0]

    config = tiny_config(*RUN, f"out_dir={run_dir}")  # the copy is a moved run directory, too
    assert len(fit(config, resume=True).metrics) == 2  # last.pt is at the final epoch: nothing to train
    assert _run_files(run_dir) == expected
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "report")]) == 0


def test_a_moved_run_directory_resumes_and_a_changed_config_is_named(tiny_config, tmp_path):
    common = [*RUN, "optim.epochs=2", "eval.n_examples=0"]
    reference = fit(tiny_config(*common, f"out_dir={tmp_path / 'reference'}"))
    moved = tiny_config(*common, f"out_dir={tmp_path / 'before'}")
    with killed_at_write(6), pytest.raises(Killed):  # config.yaml, epoch 1's five files, then killed
        fit(moved)
    assert load_checkpoint(tmp_path / "before" / "last.pt")["epoch"] == 1
    shutil.move(tmp_path / "before", tmp_path / "after")
    with pytest.raises(UserError, match=r"differs from this one in optim\.lr \(saved 0\.05, now 0\.5\)$"):
        fit(tiny_config(*common, "optim.lr=0.5", f"out_dir={tmp_path / 'after'}"), resume=True)
    # on another machine with fewer loader workers (where it runs, like device): resumes, bit for bit here, where
    # the in-memory data is augmented on the device, not by the workers
    resumed = fit(tiny_config(*common, "data.workers=1", f"out_dir={tmp_path / 'after'}"), resume=True)
    assert resumed.metrics["epoch"].tolist() == [1, 2]
    assert resumed.metrics["train_loss"].tolist() == reference.metrics["train_loss"].tolist()
    assert yaml.safe_load((tmp_path / "after" / "config.yaml").read_text())["out_dir"] == str(tmp_path / "after")


def test_resume_of_an_empty_directory_says_it_starts_afresh(tiny_config, tmp_path, caplog):
    config = tiny_config(*RUN, "optim.epochs=1", "eval.n_examples=0", f"out_dir={tmp_path / 'empty'}")
    with caplog.at_level(logging.INFO, logger="robust_sparse.run_record"):
        result = fit(config, resume=True)
    # an information line, not a warning: every sweep run's first start passes --resume (issue 35)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "holds no last.pt" in r.getMessage()]
    assert said == [(logging.INFO, f"--resume: {tmp_path / 'empty'} holds no last.pt yet; starting a fresh run")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert result.metrics["epoch"].tolist() == [1]


# ---- evaluations --------------------------------------------------------------------------------------------


def _eval_argv(weights: Path, results: Path) -> list[str]:
    return ["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "mnist5k", "--device", "cpu",
            "--no-progress", "--n-examples", "16", "--eps", "0.1", "--attacks", "pgd-2", "--batch-size", "8",
            "--no-probe", "--results-dir", str(results)]


def _store(results: Path) -> list[dict]:
    """The store's rows without timings; its CSV holds the same rows as its JSON."""
    rows = json.loads((results / "results.json").read_text())
    frame = pd.read_csv(results / "results.csv")
    assert len(frame) == len(rows) and frame["clean_acc"].tolist() == [row["clean_acc"] for row in rows]
    assert frame["per_attack"].map(json.loads).tolist() == [row["per_attack"] for row in rows]
    return [{key: row[key] for key in ("clean_acc", "per_attack", "worst_acc", "large_eps_acc", "flags_file")}
            for row in rows]


def test_an_evaluation_killed_at_any_write_is_repaired_by_rerunning(trained_tiny, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(trained_tiny.state_dict(), weights)
    with killed_at_write(None) as writes:
        assert main(_eval_argv(weights, tmp_path / "reference")) == 0
    (expected,) = _store(tmp_path / "reference")
    assert writes.count >= 4  # per-point flags (several times), results.csv, results.json
    for k in range(1, writes.count + 1):
        results = tmp_path / f"killed-at-{k}"
        with killed_at_write(k), pytest.raises(Killed):
            main(_eval_argv(weights, results))
        assert main(_eval_argv(weights, results)) == 0
        rows = _store(results)
        # one row, or two when the kill came after the row was stored (every evaluation appends one)
        assert 1 <= len(rows) <= 2, k
        for row in rows:
            assert {**row, "flags_file": Path(row["flags_file"]).name} == {
                **expected, "flags_file": Path(expected["flags_file"]).name}, k


# ---- sweeps -------------------------------------------------------------------------------------------------


def test_a_sweep_killed_at_any_write_is_repaired_by_rerunning(tmp_path):
    overrides = ["model.name=tiny_cnn", "data.train_limit=128", "data.val_size=64", "optim.epochs=1",
                 "attack.steps=1", "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "device=cpu"]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"overrides": overrides, "grid": {"seed": [0]}}))
    with killed_at_write(None) as writes:
        run_sweep(load_sweep(path, str(tmp_path / "reference")))
    assert writes.count >= 4  # sweep.yaml, requested.yaml, done.json, runs.csv (the run writes in its own process)
    for k in range(1, writes.count + 1):
        out = tmp_path / f"killed-at-{k}"
        with killed_at_write(k), pytest.raises(Killed):
            run_sweep(load_sweep(path, str(out)))
        index = run_sweep(load_sweep(path, str(out)))
        assert index["status"].tolist() == ["done"], k
        assert pd.read_csv(out / "runs.csv")["status"].tolist() == ["done"]
        assert load_checkpoint(out / "runs" / "seed=0" / "last.pt")["epoch"] == 1
        assert yaml.safe_load((out / "sweep.yaml").read_text()) == yaml.safe_load(path.read_text())


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    from robust_sparse.files.atomic import write_atomic

    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "shared.csv", "a\n")
        os.umask(0o077)
        write_atomic(tmp_path / "private.csv", "a\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.csv").stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0600
    assert (tmp_path / "private.csv").stat().st_mode & 0o777 == 0o600
