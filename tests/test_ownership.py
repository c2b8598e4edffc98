"""Issue 21: a directory is written only by the command that owns it (a marker written first), one writer at a
time (an OS lock the kernel drops when its holder dies), and a sweep's children die with it. Every refusal is one
line naming the directory, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_model, one_line_error, snapshot
from robust_sparse.files import rundir
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.eval.store import append_result
from robust_sparse.train import fit

# a seconds-long dense run of tiny_cnn on MNIST-5k, as CLI flags
TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "data.batch_size=64", "optim.epochs=1",
        "attack.steps=1", "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "eval.autoattack_examples=0",
        "device=cpu"]
TRAIN = ["train", *[part for item in TINY for part in ("--set", item)], "--no-progress"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished one-epoch run written by train."""
    assert main([*TRAIN, "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run"


# ---- ownership ----------------------------------------------------------------------------------------------


def test_train_into_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own\n")
    (folder / "metrics.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    line = one_line_error([*TRAIN, "--out", str(folder)], capsys)
    assert f"out_dir {folder}: exists and is not a robust-sparse train directory" in line
    assert "config.yaml" in line and "metrics.csv" in line
    assert snapshot(folder) == before


def test_a_run_directory_carries_its_marker_and_continues(run_dir):
    assert json.loads((run_dir / rundir.MARKER).read_text()) == {"kind": "train"}
    assert rundir.owner(run_dir) is rundir.Kind.TRAIN
    assert main([*TRAIN, "--out", str(run_dir), "--resume"]) == 0  # finished: nothing left to train
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1


def test_an_unmarked_run_of_an_older_version_is_recognised_by_its_checkpoint_and_marked(run_dir):
    (run_dir / rundir.MARKER).unlink()  # as the versions before markers left it
    assert rundir.owner(run_dir) is rundir.Kind.TRAIN  # config.yaml and a robust-sparse last.pt
    assert main([*TRAIN, "--out", str(run_dir), "--resume"]) == 0
    assert rundir.marker_kind(run_dir) == "train"
    # the same names with other content are not a run
    for name in ("last.pt", "best.pt"):
        torch.save({"model": {}}, run_dir / name)  # a torch file, but not a robust-sparse checkpoint
    (run_dir / rundir.MARKER).unlink()
    assert rundir.owner(run_dir) is None


def test_resume_with_best_pt_but_no_last_pt_is_refused_and_says_what_is_there(run_dir, capsys):
    (run_dir / "last.pt").unlink()
    before = snapshot(run_dir)
    line = one_line_error([*TRAIN, "--out", str(run_dir), "--resume"], capsys)
    assert f"--resume: {run_dir} holds no last.pt" in line and "best.pt, config.yaml" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("command", ["sweep", "export", "eval", "report"])
def test_other_commands_do_not_write_into_a_run_directory(run_dir, tmp_path, capsys, command):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"out_dir": str(run_dir), "overrides": TINY, "grid": {"seed": [0]}}))
    argv = {"sweep": ["sweep", str(sweep_file)],
            "export": ["export", str(run_dir / "best.pt"), "--out", str(run_dir)],
            "eval": ["eval", str(run_dir / "best.pt"), "--attacks", "pgd-1x1", "--results-dir", str(run_dir)],
            "report": ["report", str(tmp_path / "store"), "--out", str(run_dir)]}[command]
    if command == "report":
        append_result(tmp_path / "store", {"model": "m", "eps": 0.1, "per_attack": {}, "warnings": []})
    before = snapshot(run_dir)
    line = one_line_error(argv, capsys)
    assert f"{run_dir}: belongs to robust-sparse train, not {command if command != 'eval' else 'eval'}" in line
    assert snapshot(run_dir) == before


def test_report_writes_beside_the_run_never_into_it(run_dir, tmp_path, capsys):
    row = {"model": "m", "dataset": "mnist5k", "threat_model": "Linf", "eps": 0.1, "n_examples": 8,
           "source": "checkpoint", "clean_acc": 0.5, "worst_acc": 0.25, "sparsity": 0.0, "nonzero_params": 10,
           "wall_seconds": 1.0, "device": "cpu", "mode": "standalone", "per_attack": {"pgd": 0.25}, "warnings": []}
    append_result(run_dir / "eval", row)
    before = snapshot(run_dir)
    assert main(["report", str(run_dir / "eval")]) == 0
    assert snapshot(run_dir) == before
    assert (tmp_path / "run-report" / "report.md").is_file()
    assert rundir.marker_kind(tmp_path / "run-report") == "report"
    assert main(["report", str(run_dir / "eval")]) == 0  # its own folder: written again


@pytest.mark.parametrize("argv", [
    ["train", "--out", ""], ["sweep", "s.yaml", "--out", ""], ["export", "best.pt", "--out", ""],
    ["report", "store", "--out", ""], ["report", ""], ["eval", "best.pt", "--results-dir", ""],
    ["eval", "best.pt", "--output", ""], ["eval", "--arch", "tiny_cnn", "--weights", "", "--dataset", "mnist5k"],
])
def test_empty_paths_are_refused(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(argv, capsys)
    assert "must not be empty" in line
    assert list(tmp_path.iterdir()) == []


def test_empty_path_fields_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for field in ("out_dir", "data.root"):
        assert f"{field}: must not be empty" in one_line_error([*TRAIN, "--set", f'{field}=""'], capsys)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"out_dir": "", "overrides": TINY, "grid": {"seed": [0]}}))
    assert "out_dir is required and must not be empty" in one_line_error(["sweep", str(sweep_file)], capsys)
    sweep_file.write_text(yaml.safe_dump({"base": "", "out_dir": "out", "overrides": TINY, "grid": {"seed": [0]}}))
    assert "sweep base: must not be empty" in one_line_error(["sweep", str(sweep_file)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


# ---- locks -----------------------------------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom robust_sparse.files import rundir\n"
        "held = rundir.locked(sys.argv[1], rundir.Kind(sys.argv[2]), 'test')\nheld.__enter__()\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")


def _holder(directory: Path, kind: str) -> subprocess.Popen:
    """Another process holding ``directory``'s lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), kind], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(run_dir, capsys):
    holder = _holder(run_dir, "train")
    try:
        before = snapshot(run_dir)
        line = one_line_error([*TRAIN, "--out", str(run_dir), "--resume"], capsys)
        assert f"out_dir {run_dir}: in use by pid {holder.pid} on {socket.gethostname()}" in line
        assert snapshot(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the lock with the process: no stale lock, the run can be resumed
    assert main([*TRAIN, "--out", str(run_dir), "--resume"]) == 0


def _eval_argv(tmp_path: Path, store: Path) -> list[str]:
    weights = tmp_path / "tiny.pt"
    if not weights.exists():
        torch.save(make_tiny_model().state_dict(), weights)
    return ["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "mnist5k", "--n-examples", "16",
            "--attacks", "pgd-2x1", "--no-probe", "--results-dir", str(store), "--device", "cpu", "--no-progress"]


def test_an_evaluation_store_is_locked_and_a_finished_evaluation_is_stored_once(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(_eval_argv(tmp_path, store)) == 0
    assert main(_eval_argv(tmp_path, store)) == 0  # the same evaluation again: resumed from its flags
    capsys.readouterr()
    assert len(json.loads((store / "results.json").read_text())) == 1
    assert len((store / "results.csv").read_text().strip().splitlines()) == 2  # the header and one row
    holder = _holder(store, "eval")
    try:
        before = snapshot(store)
        line = one_line_error(_eval_argv(tmp_path, store), capsys)
        assert f"--results-dir {store}: in use by pid {holder.pid}" in line
        assert snapshot(store) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_concurrent_trainings_into_one_directory_one_runs_the_other_is_refused(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "robust_sparse.cli", *TRAIN, "--set", "optim.epochs=2", "--set",
            "divergence.patience=5", "--out", str(out)]
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2).strip().splitlines()[-1]
    assert "Traceback" not in refused and str(out) in refused
    assert "in use by pid" in refused or "already holds a run" in refused  # refused by the lock, or once done
    history = load_checkpoint(out / "last.pt")["history"]
    assert [row["epoch"] for row in history] == [1, 2]  # one training, not two interleaved


def _sweep_file(tmp_path: Path, out: Path, epochs: int = 1) -> Path:
    path = tmp_path / "sweep.yaml"
    overrides = [item for item in TINY if not item.startswith("optim.epochs")] + [f"optim.epochs={epochs}"]
    path.write_text(yaml.safe_dump({"out_dir": str(out), "overrides": overrides, "grid": {"seed": [0, 1]}}))
    return path


def _wait_for_lock(directory: Path, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lock = directory / rundir.LOCK
        if lock.is_file() and lock.read_text().split()[:1] == [str(pid)]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{directory} was never locked by {pid}")


def test_two_concurrent_sweeps_on_one_directory_one_runs_the_other_is_refused(tmp_path):
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "robust_sparse.cli", "sweep", str(_sweep_file(tmp_path, out))]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for_lock(out, first.pid)
    second = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert first.poll() is None, "the first sweep ended before the second was refused: the test proves nothing"
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"robust-sparse: error: sweep out_dir {out}: in use by pid {first.pid}"), second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    for seed in (0, 1):  # every run trained once: one "training" line in its log, its epochs once each
        log = (out / "runs" / f"seed={seed}" / "train.log").read_text()
        assert log.count("training tiny_cnn") == 1
        assert [row["epoch"] for row in load_checkpoint(out / "runs" / f"seed={seed}" / "last.pt")["history"]] == [1]


def _children(pid: int) -> list[int]:
    """The training processes ``pid`` started (not any short-lived helper an import may spawn, ldconfig say)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return [child for child in found if _is_training(child)]


def _is_training(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"robust_sparse.cli" in argv and b"train" in argv


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the sweep's children")
def test_a_sweep_killed_with_9_leaves_no_live_child(tmp_path):
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "robust_sparse.cli", "sweep",
                              str(_sweep_file(tmp_path, out, epochs=50))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline, children = time.monotonic() + 120, []
    while not children and time.monotonic() < deadline:
        children = _children(sweep.pid)
        time.sleep(0.1)
    assert children, "the sweep started no training child"
    time.sleep(1.0)  # the child is past its start, where it asks to die with its parent
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 30
    while any(_alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(child) for child in children)
    # and the run directory it left is not locked: a rerun resumes it
    assert rundir.marker_kind(out / "runs" / "seed=0") == "train"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the sweep's children")
def test_a_sweep_stopped_with_sigterm_stops_its_children_and_starts_no_new_run(tmp_path):
    """SIGTERM (a scheduler's stop, ``kill PID``) is turned into the same interrupt as Ctrl-C: the sweep must then
    stop its running child rather than wait for it, and must not start the next run."""
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "robust_sparse.cli", "sweep",
                              str(_sweep_file(tmp_path, out, epochs=50))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline, children = time.monotonic() + 120, []
    while not children and time.monotonic() < deadline:
        children = _children(sweep.pid)
        time.sleep(0.1)
    assert children, "the sweep started no training child"
    time.sleep(1.0)
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 128 + signal.SIGTERM
    assert "terminated (SIGTERM)" in sweep.stderr.read()
    assert not any(_alive(child) for child in children)
    assert not (out / "runs" / "seed=1" / "train.log").exists()  # the queued run never started (parallel 1)


def test_fit_holds_the_run_directory_while_it_trains(tiny_config, monkeypatch):
    """In-process view of the lock: while fit writes, another lock on the directory is refused."""
    import robust_sparse.train as train_module

    config = tiny_config("optim.epochs=1", "eval.n_examples=0")
    seen = []
    original = train_module.write_metrics

    def probe(history, run_dir):
        with pytest.raises(rundir.OutputError, match=f"in use by pid {os.getpid()}"):
            with rundir.locked(run_dir, rundir.Kind.TRAIN, "out_dir"):
                pass
        seen.append(True)
        return original(history, run_dir)

    monkeypatch.setattr(train_module, "write_metrics", probe)
    fit(config)
    assert seen
    with rundir.locked(config.out_dir, rundir.Kind.TRAIN, "out_dir"):  # released when fit returned
        pass


def test_a_file_system_without_locks_warns_and_lets_the_work_go_on(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK on NFS without lockd (and Lustre without its flock option): where a cluster
    writes, that must not stop every command; the work goes on unguarded, and the log says so."""
    import errno
    import fcntl

    def no_locks(stream, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        with rundir.locked(tmp_path / "run", rundir.Kind.TRAIN, "out_dir") as directory:
            assert directory == tmp_path / "run"
    assert "does not support locks" in caplog.text


def test_a_store_row_with_gaps_in_a_whole_number_column_is_still_recognised_as_stored(tmp_path):
    """A column of whole numbers with a missing value once went through a DataFrame and came back as floats
    (seed 0 -> 0.0), and the same evaluation was then appended again."""
    store = tmp_path / "store"
    first = {"model": "a", "seed": None, "epoch": None, "clean_acc": 0.5}
    second = {"model": "b", "seed": 0, "epoch": 3, "clean_acc": 0.25}
    assert append_result(store, first) == 0
    assert append_result(store, second) == 1
    assert append_result(store, dict(second)) == 1  # the rerun: not appended
    rows = json.loads((store / "results.json").read_text())
    assert len(rows) == 2 and rows[1]["seed"] == 0 and isinstance(rows[1]["seed"], int)


def test_a_report_from_a_stored_runs_csv_can_be_regenerated_into_its_own_folder(tmp_path, capsys):
    runs = tmp_path / "runs.csv"
    runs.write_text("run_id,seed,agent.gamma,test_clean_accuracy,test_n\n"
                    "agent.gamma=0__seed=0,0,0,0.50,100\nagent.gamma=0.5__seed=0,0,0.5,0.55,100\n"
                    "agent.gamma=0__seed=1,1,0,0.52,100\nagent.gamma=0.5__seed=1,1,0.5,0.56,100\n")
    out = tmp_path / "paired"
    for _ in range(2):  # the second time into the folder the first one made and marked
        assert main(["report", str(runs), "--out", str(out)]) == 0
    assert rundir.owner(out) is rundir.Kind.REPORT and (out / "paired.md").is_file()
    capsys.readouterr()
