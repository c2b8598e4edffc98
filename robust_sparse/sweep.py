"""``robust-sparse sweep``: a base config times a grid (and optional random samples) of config fields.

The sweep directory is the single source of truth::

    SWEEP_DIR/sweep.yaml            the sweep file as given (a re-run must match it)
    SWEEP_DIR/runs.csv              one row per run: run id, overrides, status
    SWEEP_DIR/runs/<run id>/        an ordinary run directory (config.yaml, metrics.csv, last.pt, eval.json)

Runs are idempotent: a run with ``eval.json`` (or a recorded divergence) is skipped, a run with ``last.pt`` but
no result is resumed, anything else starts fresh. Execution uses existing engines: the standard library's
process pool on one machine (``backend: local``, N runs at once, devices assigned round robin) or submitit for
Slurm clusters (``backend: slurm``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from robust_sparse.config import load_config, parse_override, read_yaml, save_config
from robust_sparse.errors import ConfigError

log = logging.getLogger(__name__)

SWEEP_KEYS = {"base", "overrides", "grid", "random", "out_dir", "parallel", "backend", "devices", "slurm"}


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


def load_sweep(path: str | Path, out_dir: str | None = None) -> Sweep:
    """Read and validate a sweep file; every problem is a one-line ConfigError naming the key."""
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(SWEEP_KEYS))}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"sweep file {path}: grid must map config fields to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid {key!r}: needs a non-empty list of values, got {values!r}")
    random_part = data.get("random") or {}
    space = random_part.get("space", {}) if isinstance(random_part, dict) else {}
    samples = int(random_part.get("samples", 0)) if isinstance(random_part, dict) else 0
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("uniform", "log_uniform")
                and len(next(iter(spec.values()))) == 2):
            raise ConfigError(f"sweep random.space {key!r}: use {{uniform: [low, high]}} or {{log_uniform: [low, high]}}")
    if not grid and not (space and samples > 0):
        raise ConfigError(f"sweep file {path}: the grid is empty (give grid values or random samples)")
    base = data.get("base")
    base_path = (path.parent / base).resolve() if base else None
    if base_path is not None and not base_path.is_file():
        raise ConfigError(f"sweep base: config file not found: {base_path}")
    backend = data.get("backend", "local")
    if backend not in ("local", "slurm"):
        raise ConfigError(f"sweep backend {backend!r}: must be local or slurm")
    parallel = data.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"sweep parallel = {parallel!r}: must be an integer >= 1")
    target = out_dir or data.get("out_dir")
    if not target:
        raise ConfigError(f"sweep file {path}: out_dir is required (or pass --out)")
    sweep = Sweep(path=path, base=base_path, overrides=list(data.get("overrides") or []), grid=grid,
                  random_space=space, random_samples=samples, random_seed=int(random_part.get("seed", 0))
                  if isinstance(random_part, dict) else 0, out_dir=Path(target), parallel=parallel,
                  backend=backend, devices=[str(d) for d in data.get("devices", ["auto"])],
                  slurm=dict(data.get("slurm") or {}))
    for overrides in expand(sweep):  # type errors, unknown fields and ranges surface before anything runs
        load_config(sweep.base, sweep.overrides + overrides)
    return sweep


def _format(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def expand(sweep: Sweep) -> list[list[str]]:
    """Every run's overrides: the grid's cartesian product, times ``random.samples`` draws if any."""
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
    return [[f"{key}={_format(value)}" for key, value in point.items()] for point in points]


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
    return [sys.executable, "-m", "robust_sparse.cli", "train", str(config_path), "--resume", "--no-progress",
            "--out", str(run_dir), "--device", device]


def _run_local(config_path: Path, run_dir: Path, device: str, threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device.startswith("cuda:"):  # one GPU per run: the child sees only its own
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        device = "cuda"
    with open(run_dir / "train.log", "a") as logfile:
        result = subprocess.run(_command(config_path, run_dir, device), stdout=logfile, stderr=subprocess.STDOUT,
                                env=env)
    if result.returncode == 3:
        (run_dir / "diverged.json").write_text(json.dumps({"returncode": 3}))
        return "diverged"
    if result.returncode == 0 and not (run_dir / "eval.json").exists():
        (run_dir / "done.json").write_text("{}")
    return "done" if result.returncode == 0 else f"failed ({result.returncode}, see {run_dir / 'train.log'})"


def run_sweep(sweep: Sweep, *, dry_run: bool = False) -> pd.DataFrame:
    """Prepare every run directory, launch what is not finished, and return the run index."""
    out = sweep.out_dir
    recorded = out / "sweep.yaml"
    text = sweep.path.read_text()
    if recorded.exists() and yaml.safe_load(recorded.read_text()) != yaml.safe_load(text):
        raise ConfigError(f"{out} holds another sweep ({recorded} differs from {sweep.path}); use another out_dir")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    recorded.write_text(text)
    rows, todo = [], []
    for overrides in expand(sweep):
        identifier = run_id(overrides)
        run_dir = out / "runs" / identifier
        config = load_config(sweep.base, sweep.overrides + overrides + [f"out_dir={run_dir}"])
        run_dir.mkdir(parents=True, exist_ok=True)
        requested = run_dir / "requested.yaml"
        save_config(config, requested)
        status = run_status(run_dir)
        rows.append({"run_id": identifier, "overrides": " ".join(overrides), "status": status})
        if status in ("pending", "partial"):
            todo.append((len(rows) - 1, requested, run_dir))
    index = pd.DataFrame(rows)
    log.info("sweep %s: %d runs, %d to do", out, len(rows), len(todo))
    if dry_run or not todo:
        index.to_csv(out / "runs.csv", index=False)
        return index
    if sweep.backend == "slurm":
        _submit_slurm(sweep, todo, index)
    else:
        threads = max(1, (os.cpu_count() or 1) // sweep.parallel)
        with ThreadPoolExecutor(max_workers=sweep.parallel) as pool:  # threads only wait on child processes
            futures = {pool.submit(_run_local, requested, run_dir, sweep.devices[i % len(sweep.devices)], threads): row
                       for i, (row, requested, run_dir) in enumerate(todo)}
            for future in as_completed(futures):
                index.loc[futures[future], "status"] = future.result()
                index.to_csv(out / "runs.csv", index=False)  # progress survives a killed sweep
                log.info("%s: %s", index.loc[futures[future], "run_id"], index.loc[futures[future], "status"])
    index.to_csv(out / "runs.csv", index=False)
    return index


def _submit_slurm(sweep: Sweep, todo: list, index: pd.DataFrame) -> None:
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweep backend slurm needs submitit: pip install 'robust-sparse[cluster]'") from None
    parameters = dict(sweep.slurm)  # e.g. {partition: gpu, gpus_per_node: 1, cpus_per_task: 8, timeout_min: 600}
    executor = submitit.AutoExecutor(folder=str(sweep.out_dir / "slurm"), cluster=parameters.pop("cluster", None))
    executor.update_parameters(slurm_array_parallelism=sweep.parallel, **parameters)
    threads = int(parameters.get("cpus_per_task", 1))
    jobs = []
    with executor.batch():  # one job array; each job runs the same resumable command as the local backend
        for row, requested, run_dir in todo:
            jobs.append((row, executor.submit(_run_local, requested, run_dir, "auto", threads)))
    for row, job in jobs:
        index.loc[row, "status"] = job.result()
