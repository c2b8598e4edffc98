"""A training run's directory: the checks before a run writes into it, what a resume reads back, and its tables.

A run directory holds everything a run produces::

    config.yaml      the resolved config            metrics.csv / metrics.json   one row per epoch
    last.pt          written after every epoch      best.pt     best robust validation accuracy
    eval.json        test-set clean/PGD accuracy of best.pt after training
    layer_density.csv  sparse runs: per-layer active connections after every epoch
    subnets.csv      runs of several sub-nets (AST): the test evaluation of every sub-net
    layer_flops.csv  training FLOPs per layer (robust_sparse.flops says how they are counted)

Every file is written atomically, and every checkpoint carries the run's :class:`Record` (its metrics rows,
layer densities and best key), so a killed run resumes from ``last.pt`` and rewrites whatever the kill cut
short. Who owns and locks the directory is :mod:`robust_sparse.files.rundir`'s business; the loop that fills it is
:func:`robust_sparse.train.fit`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from robust_sparse.files import rundir
from robust_sparse.files.atomic import remove_temporaries, write_atomic
from robust_sparse.files.checkpoint import check_output_dir, load_checkpoint
from robust_sparse.config import TrainConfig, config_from_dict, save_config, to_dict
from robust_sparse.datasets.splits import check_data_root
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.models import check_model_name, split_spec
from robust_sparse.tracking import check_trackers

if TYPE_CHECKING:
    from robust_sparse.sparse import SparseMasker

log = logging.getLogger(__name__)


# ---- before a run writes ---------------------------------------------------------------------------------


def check_run(config: TrainConfig) -> None:
    """What a config names, checked before any data is read (validation sees only its values, so that a stored
    config loads anywhere): the model is registered, the trackers are installed, the data and output
    directories are usable. Each check lives with the code that uses the thing; every failure is one line."""
    check_model_name(config.model.name)
    if config.model.cifar_stem and split_spec(config.model.name) is None:
        raise ConfigError(f"model.cifar_stem: {config.model.name!r} is this toolkit's own model; the CIFAR stem is "
                          "for torchvision:/timm: ResNet-family models (or set model.cifar_stem: false)")
    from robust_sparse.agent import inactive_reason

    reason = inactive_reason(config.agent, config.optim.epochs)
    if reason:  # legal (a smoke run), but a gamma study of it would compare identical runs: say so before training
        log.warning("%s", reason)
    check_trackers(config.tracking)
    check_data_root(config.data)
    check_output_dir(config.out_dir, "out_dir", "set another out_dir (train --out)")


def refuse_to_overwrite(config: TrainConfig, resume: bool) -> None:
    """The run directory is absent, empty or a run's (:mod:`robust_sparse.files.rundir`) and writable; a fresh run
    never replaces a checkpoint, and ``--resume`` needs the one it continues from (``last.pt``)."""
    run_dir = Path(config.out_dir)
    rundir.check_owned(config.out_dir, rundir.Kind.TRAIN, "out_dir")
    if not resume and ((run_dir / "last.pt").exists() or (run_dir / "best.pt").exists()):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another out_dir")
    if resume and not (run_dir / "last.pt").exists() and (run_dir / "best.pt").exists() and not _killed_in_epoch_1(
            run_dir):
        held = ", ".join(sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")))
        raise UserError(f"--resume: {run_dir} holds no last.pt to continue from (it holds {held}); a fresh run "
                        "would replace best.pt: evaluate it, or train into another out_dir")


def _killed_in_epoch_1(run_dir: Path) -> bool:
    """best.pt without last.pt, as a kill between the two writes of the first epoch leaves it (no metrics yet):
    the fresh run writes that best.pt again. Any other best.pt without last.pt is a run that cannot continue."""
    return not (run_dir / "metrics.csv").exists() and load_checkpoint(run_dir / "best.pt").get("epoch") == 1


# ---- what the epochs produced, and resuming it -----------------------------------------------------------


@dataclass
class Record:
    """What the epochs produced so far; every checkpoint carries it, so a resumed run continues it."""

    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv, one row per epoch
    layer_rows: list[dict[str, Any]] = field(default_factory=list)  # layer_density.csv (sparse runs)
    best_key: tuple[float, float] = (-1.0, -1.0)  # (robust, clean) validation accuracy of best.pt
    start_epoch: int = 0

    @classmethod
    def resumed(cls, state: dict[str, Any], run_dir: Path, sparse: bool) -> "Record":
        """The record a checkpoint carries (``sparse``: with its layer densities)."""
        record = cls(state["history"], [], tuple(state["best_key"]), state["epoch"])
        if sparse:
            record.layer_rows = saved_layer_densities(state, run_dir / "layer_density.csv")
        return record


def resume_state(config: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """``last.pt`` of the run directory, on ``device``, whose config must match ``config`` but for where the
    run executes and is stored; None (and a warning that the run starts afresh) when there is none."""
    last = Path(config.out_dir) / "last.pt"
    if not last.exists():
        # the normal first start of a sweep's run (it always passes --resume): information, not a warning
        log.info("--resume: %s holds no last.pt yet; starting a fresh run", Path(config.out_dir))
        return None
    state = load_checkpoint(last, map_location=device)
    # Through today's schema, so that a field added since the run started compares at its default.
    try:
        saved = to_dict(config_from_dict(state["config"]))
    except UserError as error:
        raise UserError(f"cannot resume {last}: its saved config does not load ({error})") from None
    difference = _difference(_comparable(saved), _comparable(to_dict(config)))
    if difference is not None:
        raise UserError(f"cannot resume {last}: its config differs from this one in {difference}")
    workers = (saved.get("data") or {}).get("workers"), config.data.workers
    if workers[0] != workers[1] and config.data.augment:
        log.warning("--resume with data.workers %s (the run started with %s): loader workers draw the random crops, "
                    "so from here on the crops differ from an uninterrupted run's; everything else resumes exactly",
                    workers[1], workers[0])
    return state


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match to resume: everything but where the run executes (device, loader workers), where
    it is stored (a run directory can be moved or copied), where its metrics are mirrored (tracking may be turned
    on later) and the gradient probe (it observes without changing the trajectory)."""
    comparable = {key: value for key, value in config.items()
                  if key not in ("device", "out_dir", "tracking", "probe")}
    if isinstance(comparable.get("train"), dict):  # the same arithmetic laid out, compiled or computed from the
        # non-zeros otherwise (train.sparse_kernels: equal within float rounding) may resume
        comparable["train"] = {key: value for key, value in comparable["train"].items()
                               if key not in ("channels_last", "compile", "sparse_kernels")}
    if isinstance(comparable.get("data"), dict):  # loader processes are where it runs, and a run moved to a
        # smaller machine must fit its bound there (resume_state warns: workers draw the augmentation's crops)
        comparable["data"] = {key: value for key, value in comparable["data"].items() if key != "workers"}
    return comparable


def _difference(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> str | None:
    """The first field (dotted name) whose value differs, with both values; None if none does."""
    for key in [*saved, *(key for key in current if key not in saved)]:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found = _difference(old, new, f"{prefix}{key}.")
            if found is not None:
                return found
        elif old != new:
            return f"{prefix}{key} (saved {old!r}, now {new!r})"
    return None


def prepare_run_dir(config: TrainConfig, record: Record, sparse: bool) -> None:
    """The run directory with this config; after a kill, the files the checkpoint outlived rewritten from it."""
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run_dir)  # of writes a kill interrupted
    save_config(config, run_dir / "config.yaml")
    if record.history:  # a kill may have cut the writes after the checkpoint: rewrite them from it
        write_metrics(record.history, run_dir)
        if sparse:
            write_layer_densities(record.layer_rows, run_dir / "layer_density.csv")


def rng_state() -> dict[str, Any]:
    """The generators' state a checkpoint carries (torch's, and every CUDA device's), so a resume continues
    the same random streams."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the tables --------------------------------------------------------------------------------------------


def layer_densities(masker: "SparseMasker", epoch: int) -> list[dict[str, Any]]:
    """This epoch's rows of layer_density.csv: active connections per layer (and sub-net)."""
    return [{"epoch": epoch, **({"subnet": view.index} if view.index is not None else {}), "layer": name,
             "active": int(count), "total": view.masks[name].numel(), "density": int(count) / view.masks[name].numel()}
            for view in masker.views() for name, count in view.counts().items()]


def saved_layer_densities(state: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The layer densities up to the checkpoint's epoch: from the checkpoint, else (a checkpoint written before
    it held them) from the CSV."""
    if "layer_density" in state:
        return list(state["layer_density"])
    try:
        frame = pd.read_csv(path)
        return frame[frame["epoch"] <= state["epoch"]].to_dict("records")
    except (OSError, ValueError, KeyError) as error:  # missing, empty (EmptyDataError) or damaged
        log.warning("%s is unreadable (%s); it restarts at epoch %d", path, error, state["epoch"] + 1)
        return []


def write_layer_densities(rows: list[dict[str, Any]], path: Path) -> None:
    write_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def write_metrics(history: list[dict[str, Any]], run_dir: Path) -> pd.DataFrame:
    """metrics.csv and metrics.json, one row per epoch."""
    frame = pd.DataFrame(history)
    write_atomic(run_dir / "metrics.csv", frame.to_csv(index=False))
    write_atomic(run_dir / "metrics.json", frame.to_json(orient="records", indent=2))
    return frame


def write_evaluation(evaluation: dict[str, Any], run_dir: Path) -> None:
    """eval.json, and subnets.csv with every sub-net's row where the evaluation has several."""
    if "subnets" in evaluation:
        write_atomic(run_dir / "subnets.csv", pd.DataFrame(evaluation["subnets"]).to_csv(index=False))
    write_atomic(run_dir / "eval.json", json.dumps(evaluation, indent=2))
