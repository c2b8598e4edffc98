"""``robust-sparse sweep``: a base config times a grid (and optional random samples) of config fields.

The sweep directory is the single source of truth::

    SWEEP_DIR/sweep.yaml            the sweep file as given (a re-run must match it)
    SWEEP_DIR/runs.csv              one row per run: run id, overrides, status
    SWEEP_DIR/runs/<run id>/        an ordinary run directory (config.yaml, metrics.csv, last.pt, eval.json)
    SWEEP_DIR/runs/<run id>/sweep_eval.json   the evaluation stage's settings and result (if the sweep has one)

An optional evaluation stage (``eval:`` in the sweep file: attacks, n_examples, eps, attack_seeds, batch_size,
probe, or the corruptions track's threat_model, corruptions and severities; the fields and rules of
``robust-sparse eval``'s config, robust_sparse/eval/config.py) runs ``robust-sparse eval`` on the best checkpoint
of every finished run once training is done. Two seeds, two meanings: ``seeds`` selects the runs to evaluate by
their *training* seed (default: every run), ``attack_seeds`` are the *attacks'* seeds (default [0]; several give
one row per seed and their spread, as ``eval --seeds``). Its per-point flags live in ``<run id>/eval/``, so a
killed stage resumes, and a run whose ``sweep_eval.json`` holds the same settings is not evaluated again. The
stage, ``threads`` and ``parallel`` may change between reruns of a sweep directory; everything else must match.

Runs are idempotent: a run with ``eval.json`` (or a recorded divergence) is skipped, a run with ``last.pt`` but
no result is resumed, anything else starts fresh. Execution uses existing engines: the standard library's
process pool on one machine (``backend: local``, N runs at once, devices assigned round robin) or submitit for
Slurm clusters (``backend: slurm``: one job per run, of one or several tasks; see robust_sparse/studies/slurm.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from robust_sparse import plugins

from robust_sparse.files import rundir
from robust_sparse.files.checkpoint import check_output_dir, write_atomic
from robust_sparse.config import (REGISTERED_SPARSITY_METHODS, coerce, from_dict, load_config, parse_override,
                                  read_yaml, save_config, spell)
from robust_sparse.config.validation import MAX_SEED, check_radius, check_range, max_workers
from robust_sparse.config.yaml_input import load_yaml
from robust_sparse.errors import ConfigError, UserError

log = logging.getLogger(__name__)

#: Runs a sweep may create without ``--yes`` (a grid typo can multiply them), and the most it may create at all.
CONFIRM_RUNS = 256
MAX_RUNS = 100_000


@dataclass
class Sweep:
    path: Path
    base: Path | None
    overrides: list[str]
    grid: dict[str, list[Any]]
    random_space: dict[str, dict[str, list[float]]]
    random_samples: int
    random_seed: int
    out_dir: Path
    parallel: int = 1
    backend: str = "local"
    devices: list[str] = field(default_factory=lambda: ["auto"])
    slurm: dict[str, Any] = field(default_factory=dict)
    threads: int = 0  # torch threads per local run; 0 = the machine's cores divided by parallel
    eval_stage: "EvalStage | None" = None
    # modules that registered the sparse methods and attacks the runs use by name, imported by every child
    # process (robust_sparse.plugins)
    plugins: tuple[str, ...] = ()


EVAL_KEYS = {"attacks", "n_examples", "eps", "seeds", "attack_seeds", "batch_size", "probe", "threat_model",
             "corruptions", "severities"}
CORRUPTION_KEYS = ("threat_model", "corruptions", "severities")  # the corruptions track (robust_sparse.eval.corruptions)


@dataclass
class EvalStage:
    """``robust-sparse eval`` on the best checkpoint of every finished run (or of the runs with ``seeds``)."""

    attacks: str  # canonical, e.g. "pgd-50x10,autoattack"
    n_examples: int | None = None  # None: the run's eval.n_examples
    eps: float | None = None  # None: the run's eps
    seeds: list[int] | None = None  # the runs to evaluate, by their training seed; None: every run
    attack_seeds: list[int] = field(default_factory=lambda: [0])  # the attacks' seeds (eval --seeds): one row each
    batch_size: int = 500
    probe: bool = True  # the large-eps gradient-masking probe
    modules: tuple[str, ...] = ()  # modules registering attacks from Python: the evaluation children import them
    # threat_model "corruptions": CIFAR-10-C/CIFAR-100-C under the run's data root instead of attacks
    threat_model: str | None = None
    corruptions: str | None = None  # comma-separated; None: RobustBench's 15
    severities: str | None = None  # comma-separated; None: 1-5

    def settings(self) -> dict[str, Any]:
        """What defines one run's evaluation (``seeds`` only selects the runs, ``modules`` where attacks come from,
        so neither is part of it; the corruptions keys and ``attack_seeds`` only when set, so stages recorded
        before them still match)."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key not in ("seeds", "modules") and not (key in CORRUPTION_KEYS and value is None)
                and not (key == "attack_seeds" and value == [0])}


class SweepBackend(str, Enum):
    LOCAL = "local"  # the standard library's process pool on this machine
    SLURM = "slurm"  # submitit: one job per run (robust_sparse/studies/slurm.py)


@dataclass
class RandomSearch:
    """``random:``: ``samples`` draws (seeded by ``seed``) from ``space``, each combined with every grid point."""

    samples: int = 0
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # {field: {uniform|log_uniform: [low, high]}}


@dataclass
class SweepConfig:
    """The sweep file: every key, its type and its default, read by the training config's parser
    (robust_sparse.config.parsing.from_dict); the rules that span keys are in :func:`load_sweep`."""

    base: str | None = None  # a config file, relative to the sweep file; None: the schema's defaults
    overrides: list[str] = field(default_factory=list)  # key=value for every run
    grid: dict[str, Any] = field(default_factory=dict)  # config field -> the values to run (every combination)
    random: RandomSearch = field(default_factory=RandomSearch)
    out_dir: str | None = None  # required here or as --out
    parallel: int = 1  # runs at once (local) or the array's parallelism (slurm)
    threads: int = 0  # torch threads per local run; 0 = the machine's cores divided by parallel
    backend: SweepBackend = SweepBackend.LOCAL
    devices: list[str] = field(default_factory=lambda: ["auto"])  # auto, cpu, cuda or cuda:N, round robin
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit parameters (robust_sparse.studies.slurm.parameters)
    eval: dict[str, Any] | None = None  # the evaluation stage (:func:`_eval_stage`)


#: Keys a sweep file may leave empty (``grid:`` with nothing after it) for their default.
EMPTY_MEANS_DEFAULT = ("grid", "random", "overrides", "slurm")


def read_sweep_file(path: str | Path) -> SweepConfig:
    """The sweep file as a :class:`SweepConfig`; a wrong type or an unknown key is one line naming ``sweep KEY``."""
    data = {key: value for key, value in read_yaml(path).items()
            if not (key in EMPTY_MEANS_DEFAULT and value is None)}
    if isinstance(data.get("random"), dict) and data["random"].get("space", {}) is None:
        data["random"] = {key: value for key, value in data["random"].items() if key != "space"}
    return from_dict(SweepConfig, data, "", names=lambda where: f"sweep {where}")


def load_sweep(path: str | Path, out_dir: str | None = None, *, yes: bool = False) -> Sweep:
    """Read and validate a sweep file; every problem is a one-line ConfigError naming the key. More than
    :data:`CONFIRM_RUNS` runs need ``yes``; duplicate grid values and runs sharing one directory are refused."""
    path = Path(path)
    spec = read_sweep_file(path)
    grid = spec.grid
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid {key!r}: needs a non-empty list of values, got {values!r}")
        written = [spell(value) for value in values]
        repeated = next((text for i, text in enumerate(written) if text in written[:i]), None)
        if repeated is not None:  # the same run twice: two writers of one run directory
            raise ConfigError(f"sweep grid {key!r}: the value {repeated} is listed twice; give each value once")
    samples, seed = spec.random.samples, spec.random.seed
    check_range("sweep random.samples", samples, 0, MAX_RUNS)
    check_range("sweep random.seed", seed, 0, MAX_SEED)
    space = _random_space(spec.random.space)
    if samples > 0 and not space:
        raise ConfigError(f"sweep random.samples = {samples}: needs a random.space to draw from")
    if not grid and not (space and samples > 0):
        raise ConfigError(f"sweep file {path}: the grid is empty (give grid values or random samples)")
    overrides = spec.overrides
    for text in overrides:
        parse_override(text)  # "override 'x' must look like key.sub=value"
    base = spec.base
    if base is not None and not base.strip():
        raise ConfigError("sweep base: must not be empty (a config file, or leave base out)")
    base_path = (path.parent / base).resolve() if base else None
    if base_path is not None and not base_path.is_file():
        raise ConfigError(f"sweep base: config file not found: {base_path}")
    backend = spec.backend.value
    parallel, threads = spec.parallel, spec.threads
    # local processes and their threads run on this machine: bounded by what it can start (data.workers' bound);
    # a Slurm array's parallelism is the cluster's to limit
    processes = max_workers()
    check_range("sweep parallel", parallel, 1, MAX_RUNS if backend == "slurm" else processes)
    if not 0 <= threads <= processes:
        raise ConfigError(f"sweep threads = {threads!r}: must be in 0..{processes} (0 = cores / parallel; the bound "
                          f"is the larger of 64 and 4 per CPU, this machine has {os.cpu_count() or 1})")
    devices = spec.devices
    if not devices or not all(re.fullmatch(r"auto|cpu|cuda(:\d+)?", d) for d in devices):
        raise ConfigError(f"sweep devices: expected a list of auto, cpu, cuda or cuda:N, got {devices!r}")
    slurm = spec.slurm
    runs = math.prod(len(values) for values in grid.values()) * (samples if space and samples > 0 else 1)
    if runs > MAX_RUNS:
        raise ConfigError(f"sweep file {path}: {runs:,} runs (the grid's sizes times random.samples); at most "
                          f"{MAX_RUNS:,}")
    if runs > CONFIRM_RUNS and not yes:
        raise ConfigError(f"sweep file {path}: {runs:,} runs (more than {CONFIRM_RUNS}); check the grid, and pass "
                          "--yes to start them all")
    if backend == "slurm":  # submitit's names, checked and translated (robust_sparse.studies.slurm)
        from robust_sparse.studies import slurm as slurm_backend

        slurm = slurm_backend.parameters(slurm)
    eval_stage = _eval_stage(spec.eval)
    target = out_dir if out_dir is not None else spec.out_dir
    if target is None or not target.strip():
        raise ConfigError(f"sweep file {path}: out_dir is required and must not be empty (or pass --out)")
    check_output_dir(target, "sweep out_dir", "set another out_dir (sweep --out)")
    rundir.check_owned(target, rundir.Kind.SWEEP, "sweep out_dir")
    sweep = Sweep(path=path, base=base_path, overrides=list(overrides), grid=grid,
                  random_space=space, random_samples=samples, random_seed=seed, out_dir=Path(target),
                  parallel=parallel, backend=backend, devices=devices, slurm=dict(slurm), threads=threads,
                  eval_stage=eval_stage)
    from robust_sparse.run_record import check_run  # the training stack, only once the sweep file itself is sound
    from robust_sparse.models import REGISTERED_MODELS

    modules = list(eval_stage.modules) if eval_stage is not None else []
    seen: dict[str, list[str]] = {}
    for overrides in expand(sweep):  # type errors, unknown fields and ranges surface before anything runs
        other = seen.setdefault(run_id(overrides), overrides)
        if other is not overrides:
            raise ConfigError(f"sweep file {path}: the runs {' '.join(other)!r} and {' '.join(overrides)!r} map to "
                              f"one run directory runs/{run_id(overrides)}; change one of the values")
        # each run's own directory, as run_sweep will set it (the base config's out_dir is never used)
        run_dir = sweep.out_dir / "runs" / run_id(overrides)
        config = load_config(sweep.base, sweep.overrides + overrides + [f"out_dir={run_dir}"])
        check_run(config)
        if eval_stage is not None and eval_stage.eps is not None:  # the stage's radius under the run's norm
            check_radius(f"sweep eval.eps = {eval_stage.eps}", eval_stage.eps, config.attack.norm)
        method = getattr(config.sparsity.method, "value", config.sparsity.method)
        if method in REGISTERED_SPARSITY_METHODS:  # registered from Python: the runs import its module
            module = plugins.importable(REGISTERED_SPARSITY_METHODS[method], f"sparsity method {method!r}")
            modules += [module] if module not in modules else []
        if config.model.name in REGISTERED_MODELS:  # robust_sparse.register_model: the same
            module = plugins.importable(REGISTERED_MODELS[config.model.name], f"model {config.model.name!r}")
            modules += [module] if module not in modules else []
    sweep.plugins = tuple(modules)
    return sweep


def _eval_stage(value: Any) -> EvalStage | None:
    """The sweep file's ``eval`` mapping: the evaluation config of ``robust-sparse eval`` (robust_sparse/eval/config.py,
    the same fields and rules) without the model, which is each run's best.pt, plus ``seeds``, the runs to evaluate."""
    from robust_sparse.eval.config import Names, eval_config_from_dict
    from robust_sparse.eval.specs import attack_modules, parse_attacks

    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"sweep eval: expected a mapping with {', '.join(sorted(EVAL_KEYS))}, got {value!r}")
    unknown = sorted(set(map(str, value)) - EVAL_KEYS)
    if unknown:
        raise ConfigError(f"sweep eval: unknown key {unknown[0]!r}; known: {', '.join(sorted(EVAL_KEYS))}")
    track = any(value.get(key) is not None for key in CORRUPTION_KEYS)
    if track and str(value.get("threat_model", "")).strip().lower() != "corruptions":
        raise ConfigError(f"sweep eval.threat_model: only 'corruptions' (the corruptions track; attacks take no "
                          f"threat_model key), got {value.get('threat_model')!r}")
    if not track and "attacks" not in value:
        raise ConfigError("sweep eval.attacks: required, e.g. pgd-50x10,autoattack")
    seeds = value.get("seeds")
    if seeds is not None:
        seeds = coerce(seeds, list[int], "sweep eval.seeds")
        if not seeds:
            raise ConfigError("sweep eval.seeds: give at least one seed (or leave it out: every run)")
    eps = value.get("eps")
    if eps is not None:  # one radius; the run's norm bounds it (load_sweep)
        eps = coerce(eps, float, "sweep eval.eps")
    data = {key: item for key, item in value.items() if key not in ("seeds", "attack_seeds", "eps")}
    data.update(checkpoint="best.pt", seeds=value.get("attack_seeds", [0]), eps=None if eps is None else [eps])
    config = eval_config_from_dict(data, Names(prefix="sweep eval.", keys={"seeds": "attack_seeds"}))
    if track:
        return EvalStage(attacks="corruptions", n_examples=config.n_examples, seeds=seeds,
                         attack_seeds=config.seeds, batch_size=config.batch_size, probe=False,
                         threat_model="corruptions",
                         corruptions=None if config.corruptions is None else ",".join(config.corruptions),
                         severities=None if config.severities is None else ",".join(map(str, config.severities)))
    specs = parse_attacks(config.attacks)
    try:
        modules = attack_modules(specs)
    except UserError as error:
        raise ConfigError(f"sweep eval.attacks: {error}") from None
    return EvalStage(attacks=",".join(spec.key for spec in specs), n_examples=config.n_examples, eps=eps, seeds=seeds,
                     attack_seeds=config.seeds, batch_size=config.batch_size, probe=config.probe, modules=modules)


def _random_space(space: Any) -> dict[str, dict[str, list[float]]]:
    """``{field: {uniform|log_uniform: [low, high]}}`` with two finite numbers, low < high (log: low > 0)."""
    usage = "use {uniform: [low, high]} or {log_uniform: [low, high]}"
    if not isinstance(space, dict):
        raise ConfigError(f"sweep random.space: expected a mapping of config fields to ranges ({usage}), got {space!r}")
    checked = {}
    for key, spec in space.items():
        where = f"sweep random.space.{key}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("uniform", "log_uniform")):
            raise ConfigError(f"{where}: {usage}, got {spec!r}")
        ((kind, bounds),) = spec.items()
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise ConfigError(f"{where}.{kind}: expected two numbers [low, high], got {bounds!r}")
        low, high = coerce(bounds, list[float], f"{where}.{kind}")  # finite numbers, fractions allowed
        if not low < high:
            raise ConfigError(f"{where}.{kind} = [{low}, {high}]: needs low < high")
        if kind == "log_uniform" and low <= 0:
            raise ConfigError(f"{where}.log_uniform = [{low}, {high}]: needs low > 0")
        checked[str(key)] = {kind: [low, high]}
    return checked


def _previous_spelling(value: Any) -> str:
    """How run names spelled a value before :func:`spell` (``0.0`` as written): to find those run directories."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def expand(sweep: Sweep) -> list[list[str]]:
    """Every run's overrides: the grid's cartesian product, times ``random.samples`` draws if any."""
    return [[f"{key}={spell(value)}" for key, value in point.items()] for point in _points(sweep)]


def _points(sweep: Sweep) -> list[dict[str, Any]]:
    """Every run's values, ``key -> value``, in :func:`expand`'s order."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, combination)) for combination in itertools.product(*(sweep.grid[k] for k in keys))]
    if sweep.random_samples:
        rng = random.Random(sweep.random_seed)
        draws = []
        for _ in range(sweep.random_samples):
            draw = {}
            for key, spec in sweep.random_space.items():
                (kind, (low, high)), = spec.items()
                draw[key] = (math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "log_uniform"
                             else rng.uniform(low, high))
            draws.append(draw)
        points = [{**point, **draw} for point in points for draw in draws]
    return points


def run_id(overrides: list[str]) -> str:
    """A readable, filesystem-safe name: ``agent.gamma=0.1__seed=2``."""
    parts = ["".join(c if c.isalnum() or c in "._=-" else "_" for c in item) for item in overrides]
    return "__".join(parts) or "base"


def run_status(run_dir: Path) -> str:
    if (run_dir / "eval.json").exists() or (run_dir / "done.json").exists():
        return "done"
    if (run_dir / "diverged.json").exists():
        return "diverged"
    if (run_dir / "last.pt").exists():
        return "partial"
    return "pending"


def _command(config_path: Path, run_dir: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "robust_sparse.cli", "train", str(config_path), "--resume",
            "--out", str(run_dir), "--device", device]


def _child(device: str, threads: int, modules: tuple[str, ...] = ()) -> tuple[dict[str, str], str]:
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
                return -15
        with open(log_path, "a") as logfile:
            with self._lock:
                if self.stopping:
                    return -15
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


WATCH_SECONDS = 10.0  # how often the sweep reads its running runs' metrics.csv for the console
_WATCH = _Watch()


def _run_local(config_path: Path, run_dir: Path, modules: tuple[str, ...], device: str, threads: int) -> str:
    env, device = _child(device, threads, modules)
    _WATCH.start(run_dir, config_path)
    try:
        returncode = _CHILDREN.run(_command(config_path, run_dir, device), run_dir / "train.log", env)
    finally:
        _WATCH.poll()  # the last epoch's line before the run's status line
        _WATCH.stop(run_dir)
    if returncode == 3:
        write_atomic(run_dir / "diverged.json", json.dumps({"returncode": 3}))
        return "diverged"
    if returncode == 0 and not (run_dir / "eval.json").exists():
        write_atomic(run_dir / "done.json", "{}")
    return "done" if returncode == 0 else f"failed ({returncode}, see {run_dir / 'train.log'})"


EVAL_RESULT = "sweep_eval.json"  # in a run directory: the evaluation stage's settings and result rows


def eval_stage_done(run_dir: Path, stage: EvalStage) -> bool:
    """Whether ``run_dir`` holds this stage's result (a stage with other settings runs again; widening ``seeds``
    evaluates only the runs it adds)."""
    path = run_dir / EVAL_RESULT
    try:
        recorded = json.loads(path.read_text()).get("stage") if path.is_file() else None
    except json.JSONDecodeError:
        return False
    return isinstance(recorded, dict) and {k: v for k, v in recorded.items() if k != "seeds"} == stage.settings()


def _eval_command(run_dir: Path, stage: EvalStage, device: str) -> list[str]:
    command = [sys.executable, "-m", "robust_sparse.cli", "eval", str(run_dir / "best.pt"), "--attacks",
               stage.attacks, "--batch-size", str(stage.batch_size), "--results-dir", str(run_dir / "eval"),
               "--output", str(run_dir / f".{EVAL_RESULT}.output"), "--device", device]
    if stage.threat_model is not None:  # the corruptions track: no attacks, radius or probe
        command[5:7] = ["--threat-model", stage.threat_model]
        for flag, value in (("--corruptions", stage.corruptions), ("--severities", stage.severities),
                            ("--n-examples", stage.n_examples)):
            if value is not None:
                command += [flag, str(value)]
        return command
    if stage.n_examples is not None:
        command += ["--n-examples", str(stage.n_examples)]
    if stage.attack_seeds != [0]:
        command += ["--seeds", ",".join(map(str, stage.attack_seeds))]
    if stage.eps is not None:
        command += ["--eps", repr(stage.eps)]
    if not stage.probe:
        command.append("--no-probe")
    return command


def _run_eval(run_dir: Path, stage: EvalStage, modules: tuple[str, ...], device: str, threads: int) -> str:
    """The stage on one run: ``robust-sparse eval`` (resuming from its saved per-point flags), then the record."""
    env, device = _child(device, threads, modules)
    returncode = _CHILDREN.run(_eval_command(run_dir, stage, device), run_dir / "eval.log", env)
    output = run_dir / f".{EVAL_RESULT}.output"
    if returncode != 0 or not output.is_file():
        return f"failed ({returncode}, see {run_dir / 'eval.log'})"
    rows = json.loads(output.read_text())
    write_atomic(run_dir / EVAL_RESULT, json.dumps({"stage": stage.settings(),
                                                    "results": rows if isinstance(rows, list) else [rows]}, indent=2))
    output.unlink()
    return "done"


def _eval_status(run_dir: Path, status: str, stage: EvalStage, seed: int) -> str:
    if stage.seeds is not None and seed not in stage.seeds:
        return "-"  # not selected
    if eval_stage_done(run_dir, stage):
        return "done"
    return "pending" if status == "done" else "waits for training"


def run_sweep(sweep: Sweep, *, dry_run: bool = False, evaluate: bool = True) -> pd.DataFrame:
    """Prepare every run directory, launch what is not finished (training, then the evaluation stage if the sweep
    has one and ``evaluate``), and return the run index."""
    if sweep.backend == "slurm":  # no submitit, no sbatch, a bad jobs.json: refused before anything is written
        from robust_sparse.studies.slurm import check_submission

        check_submission(sweep.slurm, dry_run, sweep.out_dir)
    with rundir.locked(sweep.out_dir, rundir.Kind.SWEEP, "sweep out_dir"):  # one sweep at a time in a directory
        return _run_sweep(sweep, dry_run, evaluate)


def _run_sweep(sweep: Sweep, dry_run: bool, evaluate: bool) -> pd.DataFrame:
    out = sweep.out_dir
    recorded = out / "sweep.yaml"
    text = sweep.path.read_text()
    if recorded.exists() and _training_part(load_yaml(recorded.read_text(), str(recorded))) != _training_part(
            load_yaml(text, f"sweep file {sweep.path}")):
        raise ConfigError(f"{out} holds another sweep ({recorded} differs from {sweep.path}); use another out_dir")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_atomic(recorded, text)
    rows, todo = [], []
    for point, overrides in zip(_points(sweep), expand(sweep)):
        identifier = run_id(overrides)
        previous = run_id([f"{key}={_previous_spelling(value)}" for key, value in point.items()])
        if previous != identifier and (out / "runs" / previous).is_dir() and not (out / "runs" / identifier).exists():
            identifier = previous  # started when a grid's 0.0 was spelled 0.0 in run names: resumed where it is
        run_dir = out / "runs" / identifier
        config = load_config(sweep.base, sweep.overrides + overrides + [f"out_dir={run_dir}"])
        rundir.claim(run_dir, rundir.Kind.TRAIN, "sweep run", adopt=True)  # the sweep owns what is under runs/
        requested = run_dir / "requested.yaml"
        save_config(config, requested)
        status = run_status(run_dir)
        rows.append({"run_id": identifier, "overrides": " ".join(overrides), "status": status})
        if sweep.eval_stage is not None:
            rows[-1]["eval"] = _eval_status(run_dir, status, sweep.eval_stage, config.seed)
        if status in ("pending", "partial"):
            todo.append((len(rows) - 1, requested, run_dir, sweep.plugins))
    index = pd.DataFrame(rows)
    log.info("sweep %s: %d runs, %d to do", out, len(rows), len(todo))
    if dry_run:
        _write_index(index, out)
        return index
    _launch(sweep, todo, index, "status", _run_local)
    if sweep.eval_stage is not None:
        for row, (_, entry) in enumerate(index.iterrows()):  # runs that finished training just now count too
            if entry["eval"] == "waits for training" and entry["status"] == "done":
                index.loc[row, "eval"] = "pending"
        stage_todo = [(row, out / "runs" / entry["run_id"], sweep.eval_stage, sweep.plugins) for row, (_, entry)
                      in enumerate(index.iterrows()) if evaluate and entry["eval"] == "pending"]
        log.info("sweep %s: evaluation stage (%s), %d runs to evaluate", out, sweep.eval_stage.attacks,
                 len(stage_todo))
        _launch(sweep, stage_todo, index, "eval", _run_eval)
    _write_index(index, out)
    return index


def _launch(sweep: Sweep, todo: list[tuple], index: pd.DataFrame, column: str, job) -> None:
    """``job(*arguments, device, threads)`` for every ``(row, *arguments)`` of ``todo``; results in ``column``."""
    if not todo:
        return
    if sweep.backend == "slurm":
        from robust_sparse.studies.slurm import submit

        submit(sweep, todo, index, column, job, lambda: _write_index(index, sweep.out_dir))
        return
    threads = sweep.threads or max(1, (os.cpu_count() or 1) // sweep.parallel)
    _CHILDREN.reset()
    pool = ThreadPoolExecutor(max_workers=sweep.parallel)  # threads only wait on child processes
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(WATCH_SECONDS):
            _WATCH.poll()

    watcher = threading.Thread(target=watch, name="robust-sparse-sweep-watch", daemon=True)
    watcher.start()
    try:
        futures = {pool.submit(job, *arguments, sweep.devices[i % len(sweep.devices)], threads): row
                   for i, (row, *arguments) in enumerate(todo)}
        for future in as_completed(futures):
            index.loc[futures[future], column] = future.result()
            _write_index(index, sweep.out_dir)  # progress survives a killed sweep
            log.info("%s: %s %s", index.loc[futures[future], "run_id"], column, index.loc[futures[future], column])
    except BaseException:  # interrupted: no new run, the running ones stopped (they resume on a rerun)
        pool.shutdown(wait=False, cancel_futures=True)
        _CHILDREN.stop()
        raise
    finally:
        watching.set()
        pool.shutdown(wait=True)


def _training_part(data: Any) -> Any:
    """A sweep file without what may change between reruns: the evaluation stage, the thread count and how many
    runs go at once (each run is its own process with its own seed, so neither changes a result)."""
    return {k: v for k, v in data.items() if k not in ("eval", "threads", "parallel")} if isinstance(data, dict) \
        else data


def _write_index(index: pd.DataFrame, out: Path) -> None:
    """runs.csv, atomically: a killed sweep leaves the previous one (a rerun derives it again from the runs)."""
    write_atomic(out / "runs.csv", index.to_csv(index=False))
