"""The Slurm backend against a real one-node Slurm (tests/cluster/slurm.sh: slurmctld, slurmd and munged on this
machine, no accounting storage, so sacct answers "Slurm accounting storage is disabled" as on many small
clusters). What fake commands cannot show: jobs that really run under slurmstepd, states as Slurm reports them
after scancel, a SIGKILL and a time limit, and pending jobs that a rerun must not submit twice. NODE_FAIL and
PREEMPTED need more than one node or a preemption policy; tests/test_slurm.py covers them with fake commands.

Each test is bounded (every wait has a deadline, and its jobs are cancelled at the end, passed or not); the
models are tiny_cnn on a few hundred MNIST-5k images for one epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytest.importorskip("submitit", reason="the Slurm backend needs submitit (the cluster extra)")

from robust_sparse.studies import slurm  # noqa: E402

pytestmark = pytest.mark.slurm

CLUSTER_DIR = Path(__file__).resolve().parent / "cluster"  # its sitecustomize.py: where each training runs
TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "optim.epochs=1", "attack.steps=1",
        "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "device=cpu"]
SWEEP_SECONDS = 300  # the most one sweep may take here (two tiny trainings on a busy 2-core machine take ~1 min)


class Cluster:
    """One test's view of the cluster: its environment (SLURM_CONF, the probe on PYTHONPATH, one thread), a job
    name of its own, and clean-up of everything it started."""

    def __init__(self, conf: Path, tmp_path: Path) -> None:
        self.name = f"rs-test-{uuid.uuid4().hex[:8]}"
        self.tmp_path = tmp_path
        self.env = dict(os.environ, SLURM_CONF=str(conf), OMP_NUM_THREADS="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(CLUSTER_DIR), os.environ.get("PYTHONPATH")])))
        self.sweeps: list[subprocess.Popen] = []

    def command(self, *argv: str, check: bool = True) -> str:
        result = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        assert not check or result.returncode == 0, result.stderr
        return result.stdout

    def sweep_file(self, seeds=(0, 1), parallel=2, overrides=(), **slurm_options) -> Path:
        path = self.tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({
            "out_dir": str(self.tmp_path / "out"), "overrides": TINY + list(overrides), "grid": {"seed": list(seeds)},
            "backend": "slurm", "parallel": parallel,
            "slurm": {"name": self.name, "cpus_per_task": 1, "timeout_min": 10, "poll_seconds": 2, **slurm_options}}))
        return path

    def start_sweep(self, path: Path, log: str) -> subprocess.Popen:
        with open(self.tmp_path / log, "w") as stderr:
            sweep = subprocess.Popen([sys.executable, "-m", "robust_sparse.cli", "sweep", str(path)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=stderr)
        self.sweeps.append(sweep)
        return sweep

    def finish(self, sweep: subprocess.Popen, log: str, seconds: float = SWEEP_SECONDS, code: int = 0) -> str:
        """The sweep's log once it has ended with ``code`` (1: some run did not finish)."""
        try:
            sweep.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not end within {seconds} s; its log:\n{self.log(log)}")
        assert sweep.returncode == code, self.log(log)
        return self.log(log)

    def log(self, name: str) -> str:
        return (self.tmp_path / name).read_text()

    def jobs(self) -> dict[str, str]:
        """Every job of this test that Slurm still knows, by id (array tasks one by one): its state."""
        listed = {}
        for line in self.command("squeue", "-h", "-t", "all", "-n", self.name, "-o", "%i|%T").split():
            job_id, state = line.split("|")
            listed.update({task: state for task in slurm._expand(job_id)})
        return listed

    def recorded(self) -> dict[str, str]:
        path = self.tmp_path / "out" / "slurm" / "jobs.json"
        return {run: entry["job_id"] for run, entry in json.loads(path.read_text())["train"].items()} \
            if path.is_file() else {}

    def status(self) -> list[str]:
        return list(pd.read_csv(self.tmp_path / "out" / "runs.csv")["status"])

    def close(self) -> None:
        for sweep in self.sweeps:
            if sweep.poll() is None:
                sweep.kill()
                sweep.wait()
        self.command("scancel", "-n", self.name, check=False)


@pytest.fixture
def cluster(slurm_cluster, tmp_path):
    view = Cluster(slurm_cluster, tmp_path)
    yield view
    view.close()


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"not within {seconds} s: {what}")


def probe(run_dir: Path) -> dict | None:
    """What the run's training process wrote of itself (tests/cluster/sitecustomize.py), the latest one."""
    found = sorted(run_dir.glob("probe.*.json"), key=lambda path: path.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def test_a_two_run_sweep_trains_inside_slurm_jobs_survives_kill_9_and_its_report_works(cluster):
    # three epochs: the jobs still train when the rerun, which imports torch first, looks at them
    path = cluster.sweep_file(overrides=["eval.n_examples=32", "eval.pgd_steps=1", "optim.epochs=3"])
    first = cluster.start_sweep(path, "first.log")
    recorded = wait_for(lambda: len(cluster.recorded()) == 2 and cluster.recorded(), SWEEP_SECONDS,
                        "the sweep submits its two runs")
    wait_for(lambda: all(cluster.jobs().get(job_id) == "RUNNING" for job_id in recorded.values()), 60,
             "both jobs run")
    first.kill()  # kill -9 of the sweep while its jobs train: they go on, and a rerun collects them
    first.wait()
    log = cluster.finish(cluster.start_sweep(path, "sweep.log"), "sweep.log")
    assert log.count("is running; waiting on it, not submitting it again") == 2, log
    assert "submitted as" not in log, log
    assert cluster.status() == ["done", "done"] and cluster.recorded() == recorded
    for seed in (0, 1):
        seen = probe(cluster.tmp_path / "out" / "runs" / f"seed={seed}")
        assert seen and seen["SLURM_JOB_ID"], seen  # the training process ran inside a Slurm job ...
        # ... the array task the sweep recorded for this run
        assert f"{seen['SLURM_ARRAY_JOB_ID']}_{seen['SLURM_ARRAY_TASK_ID']}" == recorded[f"seed={seed}"]
    # a cluster without accounting is said once, and neither sacct's nor submitit's own warnings are repeated
    assert log.count("keeps no accounting") == 1, log
    assert "Bypassing" not in log and log.count("accounting storage is disabled") == 1, log
    cluster.command(sys.executable, "-m", "robust_sparse.cli", "report", str(cluster.tmp_path / "out"))
    assert (cluster.tmp_path / "out-report" / "report.md").is_file()


def test_a_rerun_while_jobs_are_pending_waits_on_them_and_submits_nothing(cluster):
    cpus = cluster.command("sinfo", "-h", "-o", "%c").split()[0]
    blocker = cluster.command("sbatch", "--parsable", "-J", cluster.name, "-c", cpus, "-o", "/dev/null",
                              "--wrap", "sleep 600").strip()
    wait_for(lambda: cluster.jobs().get(blocker) == "RUNNING", 60, "the blocking job holds every CPU")
    path = cluster.sweep_file()
    first = cluster.start_sweep(path, "first.log")
    recorded = wait_for(lambda: len(cluster.recorded()) == 2 and cluster.recorded(), SWEEP_SECONDS,
                        "the sweep submits its two runs")
    assert all(cluster.jobs().get(job_id) == "PENDING" for job_id in recorded.values()), cluster.jobs()
    first.kill()  # kill -9 of the sweep while its jobs wait
    first.wait()
    second = cluster.start_sweep(path, "second.log")
    wait_for(lambda: cluster.log("second.log").count("not submitting it again") == 2, SWEEP_SECONDS,
             "the rerun finds both jobs pending")
    assert cluster.recorded() == recorded  # nothing submitted again ...
    assert sorted(cluster.jobs()) == sorted([blocker, *recorded.values()])  # ... and no duplicate in the queue
    cluster.command("scancel", blocker)
    cluster.finish(second, "second.log")
    assert cluster.status() == ["done", "done"] and cluster.recorded() == recorded


def test_scancel_of_a_running_and_a_pending_job_is_cancelled_and_the_next_run_finishes_them(cluster):
    path = cluster.sweep_file(parallel=1)  # an array of two, one at a time: one runs while the other waits
    first = cluster.start_sweep(path, "first.log")
    recorded = wait_for(lambda: len(cluster.recorded()) == 2 and cluster.recorded(), SWEEP_SECONDS,
                        "the sweep submits its two runs")
    running, pending = recorded["seed=0"], recorded["seed=1"]
    wait_for(lambda: cluster.jobs().get(running) == "RUNNING", 60, "the first job starts")
    # the sweep has seen the second job pending (runs.csv says so) before it is cancelled: Slurm drops a pending
    # array task on scancel at once, leaving no record of it
    wait_for(lambda: cluster.status()[1] == f"pending (slurm job {pending})", 30, "the sweep sees the queue")
    cluster.command("scancel", pending)
    cluster.command("scancel", running)
    cluster.finish(first, "first.log", 120, code=1)
    ran, waited = cluster.status()
    assert ran.startswith(f"cancelled (slurm job {running} CANCELLED after "), ran  # cancelled, not "failed (143)"
    assert waited == f"cancelled (slurm job {pending} CANCELLED while pending; it never started)"  # and no log named
    rerun = cluster.sweep_file(parallel=2)  # how many at once may change between runs of a sweep
    log = cluster.finish(cluster.start_sweep(rerun, "second.log"), "second.log")
    assert f"seed=0: previous attempt: cancelled (slurm job {running} CANCELLED" in log, log
    assert (f"seed=1: previous attempt: cancelled (slurm job {pending} CANCELLED while pending; it never started); "
            f"submitting the run again, from the start") in log, log
    assert cluster.status() == ["done", "done"]
    assert set(cluster.recorded().values()).isdisjoint({running, pending})  # both submitted again


def test_a_sigkilled_training_is_failed_with_its_exit_code_and_a_time_limit_stop_says_so(cluster):
    # seed 0: its training process is killed with SIGKILL (as the kernel's OOM killer does); seed 1: trains for
    # far longer than its two-minute limit (Slurm checks limits every 30 s: it stops within 120-160 s). Not one
    # minute: submitit's USR2 (90 s before the limit) would then come before the job has started to ignore it
    path = cluster.sweep_file(overrides=["optim.epochs=500", "data.train_limit=4000", "attack.steps=3"],
                              timeout_min=2)
    sweep = cluster.start_sweep(path, "sweep.log")
    killed = cluster.tmp_path / "out" / "runs" / "seed=0"
    pid = wait_for(lambda: (probe(killed) or {}).get("pid"), SWEEP_SECONDS, "the first run's training starts")
    os.kill(pid, signal.SIGKILL)
    log = cluster.finish(sweep, "sweep.log", 300, code=1)
    assert "timeout_min = 2: leaves 30 s after submitit's time-limit warning" in log, log  # said when read
    failed, stopped = cluster.status()
    jobs = cluster.recorded()
    logfile = cluster.tmp_path / "out" / "slurm" / f"{jobs['seed=0']}_0_log.err"
    assert failed == f"failed (slurm job {jobs['seed=0']} FAILED, exit code 137 (128+9: SIGKILL), see {logfile})"
    assert stopped.startswith(f"time limit (slurm job {jobs['seed=1']} TIMEOUT: stopped at its time limit after "
                              f"00:0"), stopped
    assert "last.pt kept, the next sweep run resumes from it" in stopped
    assert (cluster.tmp_path / "out" / "runs" / "seed=1" / "last.pt").is_file()
