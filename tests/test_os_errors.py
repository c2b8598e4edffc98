"""Issue 21, operating-system errors: a read-only location and a full disk are one line naming the path and the
errno's meaning, exit 2, no traceback; the last good checkpoint is intact and the run resumes bit-identically.
Both need a small tmpfs (mounted here as root, remounted read-only); they are skipped where none can be mounted."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, one_line_error, snapshot
from robust_sparse.files import rundir
from robust_sparse.files.atomic import write_atomic
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.errors import OutputError

TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "data.batch_size=64", "attack.steps=1",
        "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "eval.autoattack_examples=0", "device=cpu"]


def train_argv(out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", *[p for item in [*TINY, f"optim.epochs={epochs}"] for p in ("--set", item)], "--no-progress",
            "--out", str(out), *extra]


def interrupted_run(out: Path, monkeypatch) -> None:
    """A two-epoch run stopped after epoch 1's files are written (as Ctrl-C there would)."""
    import robust_sparse.train as train_module

    original = train_module.write_metrics

    def interrupt(history, run_dir):
        original(history, run_dir)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "write_metrics", interrupt)
        assert main(train_argv(out, 2)) == 130
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def _mount(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *arguments], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs of its own (so it can be filled, and remounted read-only)."""
    point = tmp_path / "fs"
    point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield point
    _mount("-o", "remount,rw", str(point))
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _read_only(point: Path, flag: bool) -> None:
    result = _mount("-o", f"remount,{'ro' if flag else 'rw'}", str(point))
    assert result.returncode == 0, result.stderr


def _same_run(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert [r["train_loss"] for r in first["history"]] == [r["train_loss"] for r in second["history"]]
    assert all(torch.equal(value, second["model"][key]) for key, value in first["model"].items())


def test_a_read_only_run_directory_is_one_line_before_training_and_resumes_bit_identically(tmpfs, tmp_path,
                                                                                          capsys, monkeypatch):
    run = tmpfs / "run"
    interrupted_run(run, monkeypatch)
    assert main(train_argv(tmp_path / "reference", 2)) == 0
    capsys.readouterr()
    _read_only(tmpfs, True)
    before = snapshot(run)
    line = one_line_error(train_argv(run, 2, "--resume"), capsys)
    assert line.startswith(f"robust-sparse: error: out_dir {run}: cannot write into {run}")
    assert line.endswith("Read-only file system (EROFS)")
    assert snapshot(run) == before
    _read_only(tmpfs, False)
    assert main(train_argv(run, 2, "--resume")) == 0
    _same_run(tmp_path / "reference", run)


def test_read_only_outputs_are_refused_before_any_work(tmpfs, tmp_path, capsys, monkeypatch):
    from robust_sparse.eval import points

    checkpoint_run = tmp_path / "run"
    assert main(train_argv(checkpoint_run, 1)) == 0
    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_model().state_dict(), weights)
    capsys.readouterr()
    _read_only(tmpfs, True)

    def no_data(*args, **kwargs):
        raise AssertionError("the test points were read before the output was checked")

    monkeypatch.setattr(points, "load_points", no_data)
    model = ["--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "mnist5k", "--attacks", "pgd-1x1"]
    cases = {
        "train --out": (train_argv(tmpfs / "new", 1), f"out_dir {tmpfs / 'new'}"),
        "export --out": (["export", str(checkpoint_run / "best.pt"), "--out", str(tmpfs / "export")],
                         f"export --out {tmpfs / 'export'}"),
        "eval --output": (["eval", *model, "--results-dir", str(tmp_path / "store"), "--output",
                           str(tmpfs / "result.json")], f"--output {tmpfs / 'result.json'}"),
        "eval --results-dir": (["eval", *model, "--results-dir", str(tmpfs / "store")],
                               f"--results-dir {tmpfs / 'store'}"),
        "report --out": (["report", str(tmp_path / "store"), "--out", str(tmpfs / "report")],
                         f"report --out {tmpfs / 'report'}"),
    }
    for name, (argv, named) in cases.items():
        line = one_line_error(argv, capsys)
        assert named in line and line.endswith("Read-only file system (EROFS)"), (name, line)
    assert list(tmpfs.iterdir()) == []
    assert not (tmp_path / "store").exists()


def _fill(point: Path, leave: int) -> Path:
    """Fill the file system but for ``leave`` bytes."""
    filler = point / "filler"
    with open(filler, "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_disk_full_during_training_is_one_line_and_the_last_checkpoint_survives(tmpfs, tmp_path, capsys,
                                                                                monkeypatch):
    run = tmpfs / "run"
    interrupted_run(run, monkeypatch)
    assert main(train_argv(tmp_path / "reference", 2)) == 0
    capsys.readouterr()
    last = (run / "last.pt").read_bytes()
    filler = _fill(tmpfs, leave=24 * 1024)  # room for config.yaml and the metrics, not for a checkpoint
    line = one_line_error(train_argv(run, 2, "--resume"), capsys)
    assert line.startswith(f"robust-sparse: error: cannot write {run}/")
    assert line.endswith("No space left on device (ENOSPC)")
    assert (run / "last.pt").read_bytes() == last
    assert not list(run.glob(".*.tmp"))  # the interrupted write's temporary is gone
    filler.unlink()
    assert main(train_argv(run, 2, "--resume")) == 0
    _same_run(tmp_path / "reference", run)


def test_a_failed_write_is_one_output_error_naming_the_file(tmp_path, monkeypatch):
    """Without a tmpfs: an OSError from the disk while writing becomes one OutputError, the old file intact."""
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=rf"^cannot write {path}: No space left on device \(ENOSPC\)$"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_results_dir_naming_a_file_and_output_in_a_missing_folder(tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_model().state_dict(), weights)
    model = ["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "mnist5k"]
    line = one_line_error([*model, "--results-dir", str(weights)], capsys)
    assert f"--results-dir {weights}" in line and line.endswith("Not a directory (ENOTDIR)")
    line = one_line_error([*model, "--results-dir", str(weights / "store")], capsys)
    assert line.endswith("Not a directory (ENOTDIR)")
    with pytest.raises(OutputError, match="not a directory"):
        rundir.check_writable(weights / "x", "where")
