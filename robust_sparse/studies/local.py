"""The runner of a sweep's runs: one child process per run on this machine, for training (``robust-sparse train
--resume``) and for the evaluation stage (``robust-sparse eval --config`` on the stage's config file). The local
backend runs them in a pool of threads that wait on the children; the Slurm backend (robust_sparse.studies.slurm)
runs the same functions inside its jobs. A run's outcome is what it leaves in its folder (:func:`run_status`,
:func:`eval_stage_done`), so either backend, and a rerun, reads it the same way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from robust_sparse import plugins
from robust_sparse.config import to_dict
from robust_sparse.config.yaml_input import load_yaml
from robust_sparse.errors import ConfigError, ExitCode
from robust_sparse.files import rundir
from robust_sparse.files.atomic import write_atomic

log = logging.getLogger(__name__)

EVAL_RESULT = "sweep_eval.json"  # in a run directory: the evaluation stage's settings and result rows
EVAL_CONFIG = "sweep_eval.yaml"  # in a run directory: the EvalConfig its evaluation child reads
WATCH_SECONDS = 10.0  # how often the sweep reads its running runs' metrics.csv for the console


def run_status(run_dir: Path) -> str:
    """done, diverged, partial (a last.pt to resume from) or pending, by what the run left."""
    if (run_dir / "eval.json").exists() or (run_dir / "done.json").exists():
        return "done"
    if (run_dir / "diverged.json").exists():
        return "diverged"
    if (run_dir / "last.pt").exists():
        return "partial"
    return "pending"


def train_command(config_path: Path, run_dir: Path, device: str) -> list[str]:
    """What a run's training child runs: resumable, so a rerun or a resubmitted job continues from last.pt."""
    return [sys.executable, "-m", "robust_sparse.cli", "train", str(config_path), "--resume",
            "--out", str(run_dir), "--device", device]


def child_environment(device: str, threads: int, modules: tuple[str, ...] = ()) -> tuple[dict[str, str], str]:
    """A child process's environment and --device: its thread count, the modules that register what it uses by
    name, and one GPU per run (it sees only its own)."""
    env = plugins.environment(dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                                   **{rundir.PARENT_ENV: str(os.getpid())}), modules)  # it dies with this process
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda"
    return env, device


class _Children:
    """The sweep's live child processes, so that an interrupted sweep (Ctrl-C, or SIGTERM, which the CLI turns
    into the same interrupt) stops them instead of waiting for them, and starts no new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, command: list[str], log_path: Path, env: dict[str, str]) -> int:
        with self._lock:
            if self.stopping:
                return -signal.SIGTERM
        with open(log_path, "a") as logfile:
            with self._lock:
                if self.stopping:
                    return -signal.SIGTERM
                child = subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT, env=env)
                self._live.add(child)
            try:
                return child.wait()
            finally:
                with self._lock:
                    self._live.discard(child)

    def reset(self) -> None:
        with self._lock:
            self.stopping = False

    def stop(self) -> None:
        """SIGTERM to every live child (each saves a resumable state and exits); none is started after this."""
        with self._lock:
            self.stopping = True
            for child in self._live:
                child.terminate()


_CHILDREN = _Children()


class _Watch:
    """The sweep's console between "N runs to do" and "done": a run's start names its log, then one line per
    epoch it finishes, with an ETA from this attempt's own epochs (read from its metrics.csv every
    :data:`WATCH_SECONDS`; the run's own progress lines stay in its train.log)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[Path, tuple[float, int, int]] = {}  # run dir -> (started, epochs done then, epochs)
        self._seen: dict[Path, int] = {}

    @staticmethod
    def _epochs_done(run_dir: Path) -> int:
        try:
            with open(run_dir / "metrics.csv", encoding="utf-8", errors="replace") as stream:
                return max(0, sum(1 for line in stream if line.strip()) - 1)  # minus the header
        except OSError:
            return 0

    def start(self, run_dir: Path, config_path: Path) -> None:
        try:
            epochs = int((load_yaml(config_path.read_text(), str(config_path)).get("optim") or {}).get("epochs") or 0)
        except (OSError, ValueError, ConfigError, AttributeError):
            epochs = 0
        done = self._epochs_done(run_dir)
        with self._lock:
            self._runs[run_dir] = (time.monotonic(), done, epochs)
            self._seen[run_dir] = done
        log.info("%s: training%s; its log: %s", run_dir.name,
                 f" from epoch {done + 1} of {epochs}" if done else f", {epochs} epochs" if epochs else "",
                 run_dir / "train.log")

    def stop(self, run_dir: Path) -> None:
        with self._lock:
            self._runs.pop(run_dir, None)
            self._seen.pop(run_dir, None)

    def poll(self) -> None:
        with self._lock:
            runs = dict(self._runs)
        for run_dir, (started, done_before, epochs) in runs.items():
            done = self._epochs_done(run_dir)
            if done <= self._seen.get(run_dir, 0):
                continue
            self._seen[run_dir] = done
            this_attempt = done - done_before
            eta = ""
            if epochs and this_attempt > 0 and done < epochs:
                eta = f", ETA ~{(time.monotonic() - started) / this_attempt * (epochs - done):.0f} s"
            log.info("%s: epoch %d%s done%s", run_dir.name, done, f"/{epochs}" if epochs else "", eta)


_WATCH = _Watch()


def run_training(config_path: Path, run_dir: Path, modules: tuple[str, ...], device: str, threads: int) -> str:
    """One run's training in a child process; its outcome as runs.csv shows it (and a marker in the run)."""
    env, device = child_environment(device, threads, modules)
    _WATCH.start(run_dir, config_path)
    try:
        returncode = _CHILDREN.run(train_command(config_path, run_dir, device), run_dir / "train.log", env)
    finally:
        _WATCH.poll()  # the last epoch's line before the run's status line
        _WATCH.stop(run_dir)
    if returncode == ExitCode.DIVERGED:
        write_atomic(run_dir / "diverged.json", json.dumps({"returncode": int(ExitCode.DIVERGED)}))
        return "diverged"
    if returncode == ExitCode.OK and not (run_dir / "eval.json").exists():
        write_atomic(run_dir / "done.json", "{}")
    return "done" if returncode == ExitCode.OK else f"failed ({returncode}, see {run_dir / 'train.log'})"


def eval_stage_done(run_dir: Path, stage: Any) -> bool:
    """Whether ``run_dir`` holds the result of ``stage`` (a robust_sparse.studies.sweep.EvalStage): a stage with
    other settings runs again; widening its ``seeds`` evaluates only the runs it adds."""
    path = run_dir / EVAL_RESULT
    try:
        recorded = json.loads(path.read_text()).get("stage") if path.is_file() else None
    except json.JSONDecodeError:
        return False
    return isinstance(recorded, dict) and {k: v for k, v in recorded.items() if k != "seeds"} == stage.settings()


def eval_command(config_path: Path, device: str) -> list[str]:
    """What a run's evaluation child runs: every setting is in its config file; the device is where it is placed."""
    return [sys.executable, "-m", "robust_sparse.cli", "eval", "--config", str(config_path), "--device", device]


def run_evaluation(run_dir: Path, stage: Any, modules: tuple[str, ...], device: str, threads: int) -> str:
    """The stage on one run: its EvalConfig written to the run's folder (atomically) for ``robust-sparse eval
    --config`` (resuming from its saved per-point flags), then the record."""
    config = stage.for_run(run_dir)
    config_path = run_dir / EVAL_CONFIG
    write_atomic(config_path, yaml.safe_dump(to_dict(config), sort_keys=False))
    env, device = child_environment(device, threads, modules)
    returncode = _CHILDREN.run(eval_command(config_path, device), run_dir / "eval.log", env)
    output = Path(config.output)
    if returncode != ExitCode.OK or not output.is_file():
        return f"failed ({returncode}, see {run_dir / 'eval.log'})"
    rows = json.loads(output.read_text())
    write_atomic(run_dir / EVAL_RESULT, json.dumps({"stage": stage.settings(),
                                                    "results": rows if isinstance(rows, list) else [rows]}, indent=2))
    output.unlink()
    return "done"


def launch(todo: list[tuple], index: pd.DataFrame, column: str, job: Callable[..., str], *, parallel: int,
           devices: list[str], threads: int, write_index: Callable[[], None]) -> None:
    """``job(*arguments, device, threads)`` for every ``(row, *arguments)`` of ``todo``, ``parallel`` at once on
    this machine, devices round robin; each outcome into ``column`` of ``index`` (and runs.csv) as it comes."""
    threads = threads or max(1, (os.cpu_count() or 1) // parallel)
    _CHILDREN.reset()
    pool = ThreadPoolExecutor(max_workers=parallel)  # threads only wait on child processes
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(WATCH_SECONDS):
            _WATCH.poll()

    watcher = threading.Thread(target=watch, name="robust-sparse-sweep-watch", daemon=True)
    watcher.start()
    try:
        futures = {pool.submit(job, *arguments, devices[i % len(devices)], threads): row
                   for i, (row, *arguments) in enumerate(todo)}
        for future in as_completed(futures):
            index.loc[futures[future], column] = future.result()
            write_index()  # progress survives a killed sweep
            log.info("%s: %s %s", index.loc[futures[future], "run_id"], column, index.loc[futures[future], column])
    except BaseException:  # interrupted: no new run, the running ones stopped (they resume on a rerun)
        pool.shutdown(wait=False, cancel_futures=True)
        _CHILDREN.stop()
        raise
    finally:
        watching.set()
        pool.shutdown(wait=True)
