"""Progress on long work: periodic log lines where there is no terminal (sweep children, Slurm, CI)."""

from __future__ import annotations

import logging

import yaml

from robust_sparse import progress
from robust_sparse.studies.sweep import load_sweep, run_sweep

from test_sweep import TINY


def test_log_progress_reports_count_share_and_eta(caplog, monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress.progress(range(4), enabled=True, desc="test PGD-20x1", unit="pt")
    assert isinstance(bar, progress.LogProgress)
    bar.every_seconds = 0.0  # every update logs
    with caplog.at_level(logging.INFO, logger="robust_sparse.progress"):
        assert list(bar) == [0, 1, 2, 3]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4
    assert lines[1].startswith("test PGD-20x1: 2/4 pt (50%), ") and "ETA" in lines[1]
    assert "ETA 0.0 s" in lines[-1]


def test_disabled_progress_is_silent(caplog):
    with caplog.at_level(logging.INFO, logger="robust_sparse.progress"):
        assert list(progress.progress(range(3), enabled=False, desc="quiet")) == [0, 1, 2]
    assert caplog.records == []


def test_a_sweep_run_logs_periodic_progress_lines(tmp_path, monkeypatch):
    """A sweep's children write to train.log (no terminal): training, validation and test show progress there."""
    monkeypatch.setenv("ROBUST_SPARSE_PROGRESS_SECONDS", "0")  # inherited by the child processes
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": TINY, "grid": {"seed": [0]}}))
    index = run_sweep(load_sweep(path))
    assert list(index["status"]) == ["done"]
    log_text = (tmp_path / "out" / "runs" / "seed=0" / "train.log").read_text()
    assert "robust_sparse.progress: epoch 1/2: " in log_text and " batch (" in log_text
    assert "robust_sparse.progress: validation PGD-1: " in log_text
    assert "robust_sparse.progress: test PGD-2x1: " in log_text
    assert "\r" not in log_text  # no tqdm bar written into a file
