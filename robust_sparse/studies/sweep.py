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
Both run the same child processes (robust_sparse/studies/local.py): ``robust-sparse train --resume`` per run and,
for the evaluation stage, ``robust-sparse eval --config`` on the stage's EvalConfig, which the sweep writes
(atomically) to ``<run id>/sweep_eval.yaml`` with the run's own paths.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from robust_sparse import plugins

from robust_sparse.files import rundir
from robust_sparse.files.atomic import write_atomic
from robust_sparse.files.checkpoint import check_output_dir
from robust_sparse.config import (REGISTERED_SPARSITY_METHODS, coerce, from_dict, load_config, parse_override,
                                  read_yaml, save_config, spell)
from robust_sparse.config.validation import MAX_SEED, check_radius, check_range, max_workers
from robust_sparse.config.yaml_input import load_yaml
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.files import shipped
from robust_sparse.studies import local

if TYPE_CHECKING:  # imported where a stage is parsed: robust_sparse.eval pulls in torch
    from robust_sparse.eval.config import EvalConfig

log = logging.getLogger(__name__)

#: Runs a sweep may create without ``--yes`` (a grid typo can multiply them), and the most it may create at all.
CONFIRM_RUNS = 256
MAX_RUNS = 100_000


EVAL_KEYS = {"attacks", "n_examples", "eps", "seeds", "attack_seeds", "batch_size", "probe", "threat_model",
             "corruptions", "severities"}
CORRUPTION_KEYS = ("threat_model", "corruptions", "severities")  # the corruptions track (robust_sparse.eval.corruptions)


@dataclass
class EvalStage:
    """``robust-sparse eval`` on the best checkpoint of every finished run (or of the runs with ``seeds``): one
    EvalConfig for all of them, completed per run with the run's own paths (:meth:`for_run`) and written to a file
    in the run's folder that the evaluation child reads (robust_sparse.studies.local.run_evaluation)."""

    config: EvalConfig  # the sweep file's eval settings, checked by eval's own rules; attacks in canonical keys
    seeds: list[int] | None = None  # the runs to evaluate, by their training seed; None: every run
    modules: tuple[str, ...] = ()  # modules registering attacks from Python: the evaluation children import them

    def for_run(self, run_dir: Path) -> EvalConfig:
        """The run's evaluation: its best.pt, its per-point flags under eval/ (a killed stage resumes), its rows
        to a hidden file that becomes sweep_eval.json."""
        return dataclasses.replace(self.config, checkpoint=str(run_dir / "best.pt"),
                                   results_dir=str(run_dir / "eval"),
                                   output=str(run_dir / f".{local.EVAL_RESULT}.output"))

    def settings(self) -> dict[str, Any]:
        """What defines one run's evaluation, as sweep_eval.json records it (``seeds`` only selects the runs,
        ``modules`` says where attacks come from, so neither is part of it). Its keys and spellings are the ones
        sweeps have recorded from the start (the corruptions keys and ``attack_seeds`` only when set), so a stage
        recorded by an older sweep still matches and is not run again."""
        config = self.config
        track = config.corruptions_track
        settings: dict[str, Any] = {
            "attacks": "corruptions" if track else config.attacks, "n_examples": config.n_examples,
            "eps": None if track or config.eps is None else config.eps[0], "attack_seeds": config.seeds,
            "batch_size": config.batch_size, "probe": False if track else config.probe}
        if config.seeds == [0]:
            del settings["attack_seeds"]
        if track:
            settings["threat_model"] = config.threat_model.value
            if config.corruptions is not None:
                settings["corruptions"] = ",".join(config.corruptions)
            if config.severities is not None:
                settings["severities"] = ",".join(map(str, config.severities))
        return settings


class SweepBackend(str, Enum):
    LOCAL = "local"  # the standard library's process pool on this machine (robust_sparse/studies/local.py)
    SLURM = "slurm"  # submitit: one job per run (robust_sparse/studies/slurm.py)


@dataclass
class RandomSearch:
    """``random:``: ``samples`` draws (seeded by ``seed``) from ``space``, each combined with every grid point."""

    samples: int = 0
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # {field: {uniform|log_uniform: [low, high]}}


_DERIVED = {"derived": True}  # a Sweep field load_sweep fills, not a key of the sweep file


@dataclass
class Sweep:
    """A sweep: the sweep file's keys, each with its type and default (read by the training config's parser,
    robust_sparse.config.parsing.from_dict), then checked by :func:`load_sweep`, which holds the rules that span
    keys, resolves ``base`` (against the sweep file) and ``out_dir`` (or --out) to paths and fills the fields
    after ``eval``: what it derives, never keys of the file (:data:`FILE_KEYS`)."""

    base: str | None = None  # a config file relative to the sweep file, or a shipped one's name; None: the defaults
    overrides: list[str] = field(default_factory=list)  # key=value for every run
    grid: dict[str, Any] = field(default_factory=dict)  # config field -> the values to run (every combination)
    random: RandomSearch = field(default_factory=RandomSearch)
    out_dir: str | None = None  # required here or as --out
    parallel: int = 1  # runs at once (local) or the array's parallelism (slurm)
    threads: int = 0  # torch threads per local run; 0 = the machine's cores divided by parallel
    backend: SweepBackend = SweepBackend.LOCAL
    devices: list[str] = field(default_factory=lambda: ["auto"])  # auto, cpu, cuda or cuda:N, round robin
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit parameters (robust_sparse.studies.slurm.parameters)
    eval: dict[str, Any] | None = None  # the evaluation stage as written (:func:`_eval_stage` makes eval_stage)
    # derived by load_sweep, never read from the file
    path: Path | None = field(default=None, metadata=_DERIVED)  # the sweep file
    eval_stage: EvalStage | None = field(default=None, metadata=_DERIVED)
    # modules that registered the sparse methods and attacks the runs use by name, imported by every child
    # process (robust_sparse.plugins)
    plugins: tuple[str, ...] = field(default=(), metadata=_DERIVED)


#: The keys a sweep file may set: :class:`Sweep`'s fields but the derived ones.
FILE_KEYS = tuple(f.name for f in dataclasses.fields(Sweep) if not f.metadata.get("derived"))


#: Keys a sweep file may leave empty (``grid:`` with nothing after it) for their default.
EMPTY_MEANS_DEFAULT = ("grid", "random", "overrides", "slurm")


def read_sweep_file(path: str | Path) -> Sweep:
    """The sweep file as a :class:`Sweep`, not yet checked across keys (:func:`load_sweep`); a wrong type or an
    unknown key is one line naming ``sweep KEY``."""
    data = {key: value for key, value in read_yaml(path).items()
            if not (key in EMPTY_MEANS_DEFAULT and value is None)}
    unknown = sorted(set(map(str, data)) - set(FILE_KEYS))
    if unknown:  # the derived fields too: they are the sweep's to fill
        raise ConfigError(f"unknown field 'sweep {unknown[0]}'; known fields here: {', '.join(sorted(FILE_KEYS))}")
    if isinstance(data.get("random"), dict) and data["random"].get("space", {}) is None:
        data["random"] = {key: value for key, value in data["random"].items() if key != "space"}
    return from_dict(Sweep, data, "", names=lambda where: f"sweep {where}")


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
    if base_path is not None and not base_path.is_file():  # not beside the sweep file: a shipped config's name
        base_path = shipped.lookup(base, "sweep base", shipped.Kind.TRAIN, tried=base_path)
    backend = spec.backend
    parallel, threads = spec.parallel, spec.threads
    # local processes and their threads run on this machine: bounded by what it can start (data.workers' bound);
    # a Slurm array's parallelism is the cluster's to limit
    processes = max_workers()
    check_range("sweep parallel", parallel, 1, MAX_RUNS if backend is SweepBackend.SLURM else processes)
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
    if backend is SweepBackend.SLURM:  # submitit's names, checked and translated (robust_sparse.studies.slurm)
        from robust_sparse.studies import slurm as slurm_backend

        slurm = slurm_backend.parameters(slurm)
    eval_stage = _eval_stage(spec.eval)
    target = out_dir if out_dir is not None else spec.out_dir
    if target is None or not target.strip():
        raise ConfigError(f"sweep file {path}: out_dir is required and must not be empty (or pass --out)")
    check_output_dir(target, "sweep out_dir", "set another out_dir (sweep --out)")
    rundir.check_owned(target, rundir.Kind.SWEEP, "sweep out_dir")
    # the checked sweep: paths resolved (base against the sweep file), the random space checked, the stage parsed
    sweep = dataclasses.replace(spec, base=base_path, overrides=list(overrides),
                                random=RandomSearch(samples, seed, space), out_dir=Path(target), slurm=dict(slurm),
                                path=path, eval_stage=eval_stage)
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
        stage_eps = eval_stage.config.eps if eval_stage is not None and not eval_stage.config.corruptions_track \
            else None
        if stage_eps:  # the stage's radius under the run's norm
            check_radius(f"sweep eval.eps = {stage_eps[0]}", stage_eps[0], config.attack.norm)
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
    if track:  # no attacks, radius or probe
        return EvalStage(config, seeds=seeds)
    specs = parse_attacks(config.attacks)
    try:
        modules = attack_modules(specs)
    except UserError as error:
        raise ConfigError(f"sweep eval.attacks: {error}") from None
    # the attacks in canonical keys (pgd-50x10): the stage's record compares them as text
    return EvalStage(dataclasses.replace(config, attacks=",".join(spec.key for spec in specs)), seeds=seeds,
                     modules=modules)


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
    if sweep.random.samples:
        rng = random.Random(sweep.random.seed)
        draws = []
        for _ in range(sweep.random.samples):
            draw = {}
            for key, spec in sweep.random.space.items():
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


def _eval_status(run_dir: Path, status: str, stage: EvalStage, seed: int) -> str:
    if stage.seeds is not None and seed not in stage.seeds:
        return "-"  # not selected
    if local.eval_stage_done(run_dir, stage):
        return "done"
    return "pending" if status == "done" else "waits for training"


def run_sweep(sweep: Sweep, *, dry_run: bool = False, evaluate: bool = True) -> pd.DataFrame:
    """Prepare every run directory, launch what is not finished (training, then the evaluation stage if the sweep
    has one and ``evaluate``), and return the run index."""
    if sweep.backend is SweepBackend.SLURM:  # no submitit, no sbatch, a bad jobs.json: refused before anything is written
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
        status = local.run_status(run_dir)
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
    _launch(sweep, todo, index, "status", local.run_training)
    if sweep.eval_stage is not None:
        for row, (_, entry) in enumerate(index.iterrows()):  # runs that finished training just now count too
            if entry["eval"] == "waits for training" and entry["status"] == "done":
                index.loc[row, "eval"] = "pending"
        stage_todo = [(row, out / "runs" / entry["run_id"], sweep.eval_stage, sweep.plugins) for row, (_, entry)
                      in enumerate(index.iterrows()) if evaluate and entry["eval"] == "pending"]
        log.info("sweep %s: evaluation stage (%s), %d runs to evaluate", out, sweep.eval_stage.settings()["attacks"],
                 len(stage_todo))
        _launch(sweep, stage_todo, index, "eval", local.run_evaluation)
    _write_index(index, out)
    return index


def _launch(sweep: Sweep, todo: list[tuple], index: pd.DataFrame, column: str, job) -> None:
    """``job(*arguments, device, threads)`` for every ``(row, *arguments)`` of ``todo``; results in ``column``."""
    if not todo:
        return
    if sweep.backend is SweepBackend.SLURM:
        from robust_sparse.studies.slurm import submit

        submit(sweep, todo, index, column, job, lambda: _write_index(index, sweep.out_dir))
        return
    local.launch(todo, index, column, job, parallel=sweep.parallel, devices=sweep.devices, threads=sweep.threads,
                 write_index=lambda: _write_index(index, sweep.out_dir))


def _training_part(data: Any) -> Any:
    """A sweep file without what may change between reruns: the evaluation stage, the thread count and how many
    runs go at once (each run is its own process with its own seed, so neither changes a result)."""
    return {k: v for k, v in data.items() if k not in ("eval", "threads", "parallel")} if isinstance(data, dict) \
        else data


def _write_index(index: pd.DataFrame, out: Path) -> None:
    """runs.csv, atomically: a killed sweep leaves the previous one (a rerun derives it again from the runs)."""
    write_atomic(out / "runs.csv", index.to_csv(index=False))
