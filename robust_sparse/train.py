"""The training loop: ``fit`` reads top to bottom and returns the per-epoch metrics and the final evaluation.

A run directory holds everything a run produces::

    config.yaml      the resolved config            metrics.csv / metrics.json   one row per epoch
    last.pt          written after every epoch      best.pt     best robust validation accuracy
    eval.json        test-set clean/PGD accuracy of best.pt after training
    layer_density.csv  sparse runs: per-layer active connections after every epoch
    subnets.csv      runs of several sub-nets (AST): the test evaluation of every sub-net
    layer_flops.csv  training FLOPs per layer (robust_sparse.flops says how they are counted)

A sparse masker trains one network or several sub-nets over one weight tensor (AST), its views: every view is
validated each epoch (``*_subnet{k}`` columns where there are several; the plain columns and the model selection
use their mean) and evaluated on test.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robust_sparse import distributed, rundir
from robust_sparse.accuracy import evaluate_pgd
from robust_sparse.agent import AGENT
from robust_sparse.checkpoint import (check_output_dir, load_checkpoint, remove_temporaries, save_checkpoint,
                                      write_atomic)
from robust_sparse.config import (DeviceChoice, OptimizerName, Schedule, TrackingConfig, TrainConfig, config_from_dict,
                                  save_config, sparse_methods, to_dict)
from robust_sparse.data import BatchLoader, ImageSet, Splits, batch_loader, check_data_root, in_memory, load_splits
from robust_sparse.errors import DivergenceError, UserError
from robust_sparse.flops import FlopsCounter, dense_profile
from robust_sparse.models import build_model, check_model_name
from robust_sparse.objectives import Objective, build_objective
from robust_sparse.optim import SGDW
from robust_sparse.precision import Amp, maybe_compile
from robust_sparse.progress import progress as progress_bar
from robust_sparse.sparse import SparseMasker, TrainingData, build_sparsity, views_of
from robust_sparse.tracking import Tracker, check_trackers

log = logging.getLogger(__name__)


def resolve_device(choice: DeviceChoice | str) -> torch.device:
    choice = DeviceChoice(choice)
    if choice is DeviceChoice.CUDA and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA device is available (use --device cpu or auto)")
    if choice is DeviceChoice.CPU or (choice is DeviceChoice.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def lr_factor(config: TrainConfig, progress: float) -> float:
    """Multiplier of the base learning rate after ``progress`` (a fraction in [0,1]) of all iterations."""
    optim = config.optim
    if optim.schedule is Schedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if optim.schedule is Schedule.PIECEWISE:
        passed = [factor for milestone, factor in zip(optim.milestones, optim.factors) if progress >= milestone]
        return passed[-1] if passed else 1.0
    return 1.0


def build_optimization(config: TrainConfig, model: nn.Module, steps_per_epoch: int):
    optim = config.optim
    if optim.optimizer is OptimizerName.SGDW:
        optimizer: torch.optim.Optimizer = SGDW(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                                weight_decay=optim.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                    weight_decay=optim.weight_decay, nesterov=optim.nesterov)
        methods, method = sparse_methods(), config.sparsity.method
        paired = methods.get(method).optimizer if method in methods else None
        if paired == OptimizerName.SGDW.value and optim.weight_decay > 0:
            log.warning("sparsity.method = %s runs with coupled weight decay (optim.optimizer = sgd); the method "
                        "pairs with decoupled decay not scaled by the learning rate: set optim.optimizer = sgdw",
                        method)
    total = config.optim.epochs * steps_per_epoch
    # Stepped once per iteration, so milestones fall where the papers put them (BSR-Net counts iterations).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step / total))
    return optimizer, scheduler


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: BatchLoader,
    *,
    agent: AGENT | None = None,
    progress: bool = False,
    description: str = "train",
    check_every: int = 25,
    amp: Amp | None = None,
    flops: FlopsCounter | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> EpochStats:
    """One epoch. ``amp`` (train.precision): autocast of the training forward and AGENT's snapshot forward
    (the objective's attack autocasts its own forwards), and for fp16 the GradScaler that steps ``optimizer``;
    ``flops`` counts every step's FLOPs (robust_sparse.flops); ``on_step(step, loss)`` is called after every step
    with the batch's loss (tracking.step_loss)."""
    amp = amp if amp is not None else Amp("fp32", loader.device)
    scaler = amp.scaler
    model.train()
    device_loss = torch.zeros((), device=loader.device)
    device_correct = torch.zeros((), device=loader.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(loader, enabled=progress, desc=description, unit="batch")
    for step, (images, labels) in enumerate(bar, start=1):
        images = amp.format(images)
        adversarial = objective.perturb(images, labels)  # the inner maximisation, model in eval mode
        with amp.autocast():
            loss, logits = objective.loss(model, images, labels, adversarial)
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if agent is not None:  # g_old: the snapshot's gradient on the same (adversarial) batch, scaled as g_new
            agent.snapshot_backward(lambda snapshot: _scaled_loss(objective, snapshot, images, labels, adversarial,
                                                                  amp))
        if scaler is None:
            optimizer.step()
        else:  # the correction in the scaled space, then unscale, overflow check, step (or skip), new scale
            if agent is not None:
                agent.correct(amp.scale())
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        if flops is not None:
            flops.training_step(len(labels))
        if on_step is not None:
            on_step(step, loss.detach())
        # Accumulate on the device; reading a value back costs a sync, so do it only every few batches.
        device_loss += loss.detach() * len(labels)
        device_correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if step % check_every == 0 or step == len(loader):
            running = device_loss.item() / seen
            if not math.isfinite(running):
                raise DivergenceError(f"training loss became {running} in {description}, batch {step}")
            bar.set_postfix(loss=f"{running:.3f}", acc=f"{device_correct.item() / seen:.3f}")
    seconds = time.perf_counter() - start
    # Under torchrun the epoch's figures are the whole run's: sums over every rank's examples, and the images of
    # all ranks over the slowest rank's wall time (no-ops on one process).
    loss_sum, correct, images = distributed.sum_over_ranks(
        torch.stack([device_loss.double(), device_correct.double(), torch.tensor(float(seen), device=loader.device,
                                                                                dtype=torch.float64)])).tolist()
    return EpochStats(loss_sum / images, correct / images, int(images),
                      distributed.max_over_ranks(seconds, loader.device))


def _scaled_loss(objective: Objective, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 adversarial: torch.Tensor | None, amp: Amp) -> torch.Tensor:
    with amp.autocast():
        loss = objective.loss(model, images, labels, adversarial)[0]
    return loss if amp.scaler is None else amp.scaler.scale(loss)


def validate(model: nn.Module, data: ImageSet, config: TrainConfig, device: torch.device,
             progress: bool = False, amp: Amp | None = None) -> tuple[float, float]:
    """Clean and PGD accuracy on (at most ``val.max_examples`` of) the held-out validation split; ``amp``:
    autocast of the model's forwards (train.precision)."""
    subset = in_memory(data.take(slice(0, config.val.max_examples)), config.data.workers)
    images = subset.images.to(device).float().div_(255)
    result = evaluate_pgd(
        model, images, subset.labels.to(device), eps=config.attack.eps, norm=config.attack.norm.value,
        steps=config.val.pgd_steps, batch_size=config.data.eval_batch_size, progress=progress,
        description=f"validation PGD-{config.val.pgd_steps}",
        **({"autocast": amp.autocast} if amp is not None else {}),
    )
    return result.clean_accuracy, result.robust_accuracy


def evaluate_test(model: nn.Module, test: ImageSet, config: TrainConfig, device: torch.device,
                  progress: bool = False) -> dict[str, Any]:
    """The short post-training evaluation: clean and PGD accuracy on the first ``eval.n_examples`` test points,
    in ``eval.precision`` (fp32 by default, whatever the training precision)."""
    test = in_memory(test.take(slice(0, config.eval.n_examples)), config.data.workers)
    eps = config.eval.eps if config.eval.eps is not None else config.attack.eps
    amp = Amp(config.eval.precision, device, where="eval.precision")
    start = time.perf_counter()
    result = evaluate_pgd(
        model, test.images.to(device).float().div_(255), test.labels.to(device), eps=eps,
        norm=config.attack.norm.value, steps=config.eval.pgd_steps, restarts=config.eval.restarts,
        batch_size=config.data.eval_batch_size, progress=progress,
        description=f"test PGD-{config.eval.pgd_steps}x{config.eval.restarts}", autocast=amp.autocast,
    )
    return {
        "dataset": config.data.dataset.value, "model": config.model.name, "n_examples": len(test),
        "norm": config.attack.norm.value, "eps": eps, "pgd_steps": config.eval.pgd_steps,
        "restarts": config.eval.restarts, "clean_accuracy": result.clean_accuracy,
        "pgd_accuracy": result.robust_accuracy, "seconds": time.perf_counter() - start, "device": str(device),
        "precision": config.eval.precision.value,
    }


@dataclass
class FitResult:
    run_dir: Path
    metrics: pd.DataFrame
    evaluation: dict[str, Any] | None
    model: nn.Module | None = None  # with the best checkpoint's weights when an evaluation ran, else the last
    masker: SparseMasker | None = None
    agent: AGENT | None = None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match to resume: everything but where the run executes, where it is stored (a run
    directory can be moved or copied) and where its metrics are mirrored (tracking may be turned on later)."""
    comparable = {key: value for key, value in config.items() if key not in ("device", "out_dir", "tracking")}
    if isinstance(comparable.get("train"), dict):  # the same arithmetic laid out or compiled otherwise may resume
        comparable["train"] = {key: value for key, value in comparable["train"].items()
                               if key not in ("channels_last", "compile")}
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


def check_run(config: TrainConfig) -> None:
    """What a config names, checked before any data is read (validation sees only its values, so that a stored
    config loads anywhere): the model is registered, the trackers are installed, the data and output
    directories are usable. Each check lives with the code that uses the thing; every failure is one line."""
    check_model_name(config.model.name)
    check_trackers(config.tracking)
    check_data_root(config.data)
    check_output_dir(config.out_dir, "out_dir", "set another out_dir (train --out)")


def fit(config: TrainConfig, *, resume: bool = False, progress: bool = False) -> FitResult:
    """Train as ``config`` says, keep the best checkpoint by robust validation accuracy, evaluate it on test.

    Raises :class:`DivergenceError` (after saving metrics; ``best.pt`` is kept) if the loss is not finite or
    validation accuracy sits at chance for ``divergence.patience`` epochs.
    """
    check_run(config)
    _refuse_to_overwrite(config, resume)
    run = _build(config)
    # the run directory is this process's until fit returns (only the first rank writes into it)
    with rundir.locked(run.run_dir, rundir.Kind.TRAIN, "out_dir") if run.world.is_main else nullcontext():
        return _fit_locked(run, resume, progress)


def _fit_locked(run: _Run, resume: bool, progress: bool) -> FitResult:
    config = run.config
    _refuse_to_overwrite(config, resume)  # again, under the lock: another run may have finished meanwhile
    record = _resume(run) if resume else _Record()
    _prepare_run_dir(run, record)
    tracker = Tracker(config.tracking if run.world.is_main else TrackingConfig(), config, run.run_dir)
    log.info("training %s on %s (%d train / %d val images) with %s on %s", config.model.name,
             config.data.dataset.value, len(run.splits.train), len(run.splits.val), config.objective.value,
             run.device)
    if config.val.max_examples == 0:
        log.info("val.max_examples = 0: no validation; the last epoch is selected (best.pt)")
    for epoch in range(record.start_epoch, config.optim.epochs):
        checkpoint, is_best = _train_epoch(run, record, epoch, tracker, progress)
        _save_epoch(run, record, checkpoint, is_best)
        _stop_if_diverged(run, record, tracker)
    evaluation = _evaluate_best(run, tracker, progress)
    tracker.close()
    _report_flops(run)
    return FitResult(run.run_dir, pd.DataFrame(record.history), evaluation, model=run.model, masker=run.masker,
                     agent=run.agent)


@dataclass
class _Run:
    """What a run trains with, built by :func:`_build` in the same order for a fresh and a resumed run."""

    config: TrainConfig
    world: distributed.Context
    amp: Amp  # train.precision
    splits: Splits
    model: nn.Module  # the plain module: state dicts, attacks, AGENT's snapshot, validation
    trained: nn.Module  # what the training forward runs: DDP-wrapped under torchrun, compiled if train.compile
    loader: BatchLoader
    optimizer: torch.optim.Optimizer  # the base optimizer: the scheduler and the sparse hooks sit on it
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    masker: SparseMasker | None
    agent: AGENT | None
    flops: FlopsCounter

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def stepper(self) -> torch.optim.Optimizer:
        """What steps: AGENT wrapping the base optimizer, or the base optimizer."""
        return self.agent if self.agent is not None else self.optimizer

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"


@dataclass
class _Record:
    """What the epochs produced so far; every checkpoint carries it, so a resumed run continues it."""

    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv, one row per epoch
    layer_rows: list[dict[str, Any]] = field(default_factory=list)  # layer_density.csv (sparse runs)
    best_key: tuple[float, float] = (-1.0, -1.0)  # (robust, clean) validation accuracy of best.pt
    start_epoch: int = 0


def _refuse_to_overwrite(config: TrainConfig, resume: bool) -> None:
    """The run directory is absent, empty or a run's (:mod:`robust_sparse.rundir`) and writable; a fresh run
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


def _build(config: TrainConfig) -> _Run:
    """Device, data, model, optimizer, objective, sparse masker and AGENT, seeded as the config says."""
    world = distributed.setup(resolve_device(config.device))  # a no-op without torchrun
    device = world.device
    # fp16 on a CPU (device auto without CUDA) is refused here, before any data is read
    amp = Amp(config.train.precision, device, channels_last=config.train.channels_last)
    if config.train.sync_bn and world.world_size > 1 and device.type != "cuda":
        raise UserError(f"train.sync_bn = true: SyncBatchNorm runs on CUDA devices only, this run is on {device} "
                        f"(set train.sync_bn=false)")
    Amp(config.eval.precision, device, where="eval.precision")
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes into it
    torch.manual_seed(config.seed)  # the same seed on every rank: same init, masks, signs, attack streams

    splits = load_splits(config.data, config.seed)
    info = splits.info
    model = build_model(config.model.name, info.num_classes, info.in_channels, info.mean, info.std,
                        config.model.kwargs).to(device)
    if config.train.sync_bn and world.world_size > 1:  # batch statistics over every rank's shard of the batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = batch_loader(splits.train, config.data.batch_size, device, shuffle=True, seed=config.seed, info=info,
                          augment_batches=config.data.augment, drop_last=len(splits.train) > config.data.batch_size,
                          rank=world.rank, world_size=world.world_size, workers=config.data.workers)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    # the attack runs the (compiled, if train.compile) plain model's forwards under train.precision's autocast
    objective = build_objective(config, maybe_compile(model, config.train.compile), autocast=amp.autocast)
    masker = build_sparsity(config.sparsity, model, config.model.name, optimizer,
                            config.optim.epochs * len(loader), config.seed,
                            data=TrainingData(splits.train, device, config.seed, objective.perturb))
    if masker is not None and amp.scaler is not None:
        masker.grad_scale = amp.scale
    agent = None
    if config.agent.enabled:  # wraps the base optimizer; the scheduler and sparse hooks stay on the base
        check_agent(config, len(splits.train), world.world_size, len(views_of(masker)))
        agent = AGENT(optimizer, model, config.agent, masker=masker)
    # Gradients of the training forward are averaged over ranks by DDP; attacks and AGENT's snapshot use the
    # plain module (gradients with respect to inputs, or AGENT's own all-reduce).
    trained = maybe_compile(DistributedDataParallel(model) if world.world_size > 1 else model, config.train.compile)
    flops = FlopsCounter(dense_profile(model, splits.train.example_shape), config, masker, agent,
                         world.world_size)
    return _Run(config, world, amp, splits, model, trained, loader, optimizer, scheduler, objective, masker, agent,
                flops)


def check_agent(config: TrainConfig, train_images: int, world_size: int, views: int) -> None:
    """AGENT's settings against what the run has: its g_tilde pass drops the last partial batch and, under
    torchrun, each rank runs its share of it; several sub-nets (``views``) each need batches of their own."""
    agent = config.agent
    if views > 1 and 0 < agent.full_grad_batches < views:
        raise UserError(f"agent.full_grad_batches = {agent.full_grad_batches}: each of the {views} sub-nets "
                        f"gets its own g_tilde batches; use >= {views} (or 0 = all)")
    rank_batches = _agent_pass_batches(config, train_images, world_size)
    if agent.gamma > 0 and (rank_batches < 1 or rank_batches * world_size < 2):
        raise UserError(f"agent: the g_tilde pass needs at least 2 full batches of {config.data.batch_size} "
                        f"training images (one per rank), the split has {train_images}; lower data.batch_size")


def _resume(run: _Run) -> _Record:
    """Continue from ``last.pt`` (its config must match this one), or start afresh when there is none."""
    if not run.last_path.exists():
        log.warning("--resume: %s holds no last.pt; starting a fresh run", run.run_dir)
        return _Record()
    state = load_checkpoint(run.last_path, map_location=run.device)
    # Through today's schema, so that a field added since the run started compares at its default.
    try:
        saved = to_dict(config_from_dict(state["config"]))
    except UserError as error:
        raise UserError(f"cannot resume {run.last_path}: its saved config does not load ({error})") from None
    difference = _difference(_comparable(saved), _comparable(to_dict(run.config)))
    if difference is not None:
        raise UserError(f"cannot resume {run.last_path}: its config differs from this one in {difference}")
    run.model.load_state_dict(state["model"])
    run.stepper.load_state_dict(state["optimizer"])
    if run.amp.scaler is not None and "grad_scaler" in state:
        run.amp.scaler.load_state_dict(state["grad_scaler"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.masker is not None:
        run.masker.load_state_dict(state["sparsity"])
    run.flops.load_state_dict(state.get("flops"))
    _set_rng_state(state["rng"])
    record = _Record(state["history"], [], tuple(state["best_key"]), state["epoch"])
    if run.masker is not None:
        record.layer_rows = _saved_layer_densities(state, run.run_dir / "layer_density.csv")
    log.info("resuming %s after epoch %d", run.run_dir, record.start_epoch)
    return record


def _prepare_run_dir(run: _Run, record: _Record) -> None:
    """The run directory with this config; after a kill, the files the checkpoint outlived rewritten from it."""
    if not run.world.is_main:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(run.run_dir)  # of writes a kill interrupted
    save_config(run.config, run.run_dir / "config.yaml")
    if record.history:  # a kill may have cut the writes after the checkpoint: rewrite them from it
        _write_metrics(record.history, run.run_dir)
        if run.masker is not None:
            _write_layer_densities(record.layer_rows, run.run_dir / "layer_density.csv")


def _train_epoch(run: _Run, record: _Record, epoch: int, tracker: Tracker,
                 progress: bool) -> tuple[dict[str, Any], bool]:
    """AGENT's refresh when due, one epoch of training, validation of every view and the metrics row (into
    ``record``); returns the epoch's checkpoint and whether it is the new best."""
    config, agent, masker, device = run.config, run.agent, run.masker, run.device
    shown = progress and run.world.is_main
    run.loader.set_epoch(epoch)
    lr = run.optimizer.param_groups[0]["lr"]
    if agent is not None and agent.due(epoch):
        batches = _agent_batches(config, run.splits.train, run.objective, device, epoch, run.world)
        agent.refresh(progress_bar(batches, enabled=shown, desc="AGENT g_tilde pass",
                                   total=_agent_pass_batches(config, len(run.splits.train), run.world.world_size),
                                   unit="batch"),
                      _objective_loss(run.objective, run.amp),
                      scale=run.amp.scaler.get_scale() if run.amp.scaler is not None else 1.0)
        run.flops.agent_refresh(agent)
    stats = train_one_epoch(run.trained, run.objective, run.stepper, run.scheduler, run.loader, agent=agent,
                            progress=shown, description=f"epoch {epoch + 1}/{config.optim.epochs}", amp=run.amp,
                            flops=run.flops, on_step=tracker.step_logger(epoch, len(run.loader)))
    distributed.broadcast_buffers(run.model)  # as DDP does before each forward: validate and save one state
    per_view = {}
    validated = config.val.max_examples > 0
    for view in views_of(masker) if validated else ():
        with view.activate():
            per_view[view.index] = validate(run.model, run.splits.val, config, device, shown, run.amp)
        run.flops.validation(view.masks, min(len(run.splits.val), config.val.max_examples), per_view[view.index][0])
    val_clean = sum(clean for clean, _ in per_view.values()) / len(per_view) if validated else float("nan")
    val_robust = sum(robust for _, robust in per_view.values()) / len(per_view) if validated else float("nan")
    # A gradually pruned run (AST) counts a checkpoint only once every mask has reached its target density.
    eligible = masker is None or masker.at_target_density()
    # Without validation every eligible epoch replaces best.pt, so the last one is selected; its history does not
    # mark it "best" (by validation), so the evaluation reads it as the latest epoch (eval.leaderboard).
    is_best = eligible and (not validated or (val_robust, val_clean) > record.best_key)
    record.history.append({
        "epoch": epoch + 1, "lr": lr, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
        "val_clean_accuracy": val_clean, "val_pgd_accuracy": val_robust, "train_seconds": stats.seconds,
        "images_per_second": stats.images / stats.seconds, "best": is_best and validated, **_sparsity_metrics(masker),
        **run.flops.epoch_metrics(),
        **{f"val_{kind}_accuracy_subnet{k}": value for k, pair in per_view.items() if k is not None
           for kind, value in zip(("clean", "pgd"), pair)},
        **_agent_metrics(agent, config, run.splits.train, run.objective, device, run.amp),
    })
    tracker.epoch(record.history[-1])
    log.info("epoch %d/%d  loss %.4f  train acc %.3f  %s  %.0f img/s",
             epoch + 1, config.optim.epochs, stats.loss, stats.accuracy,
             f"val clean {val_clean:.3f}  val pgd {val_robust:.3f}" if validated else "no validation",
             stats.images / stats.seconds)
    checkpoint = {
        "config": to_dict(config), "epoch": epoch + 1, "model": run.model.state_dict(),
        "optimizer": run.stepper.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": _rng_state(),
        "history": record.history, "best_key": list(record.best_key),
        # what the evaluation report needs to say whether a published row had the same training data
        "data_sizes": {"train": len(run.splits.train), "val": len(run.splits.val)},
        "flops": run.flops.state_dict(),
    }
    if run.amp.scaler is not None:
        checkpoint["grad_scaler"] = run.amp.scaler.state_dict()
    if masker is not None:
        record.layer_rows += _layer_densities(masker, epoch + 1)
        checkpoint["sparsity"] = masker.state_dict()
        checkpoint["layer_density"] = record.layer_rows
    if is_best and validated:
        record.best_key = (val_robust, val_clean)
        checkpoint["best_key"] = list(record.best_key)
    return checkpoint, is_best


def _save_epoch(run: _Run, record: _Record, checkpoint: dict[str, Any], is_best: bool) -> None:
    """layer_density.csv, best.pt (when it is the best), last.pt and the metrics; the ranks hold identical
    state, so one of them writes it."""
    if not run.world.is_main:
        return
    if run.masker is not None:
        _write_layer_densities(record.layer_rows, run.run_dir / "layer_density.csv")
    if is_best:
        save_checkpoint(checkpoint, run.best_path)
    save_checkpoint(checkpoint, run.last_path)
    _write_metrics(record.history, run.run_dir)


def _stop_if_diverged(run: _Run, record: _Record, tracker: Tracker) -> None:
    """Validation accuracy at chance for ``divergence.patience`` epochs in a row: stop, keeping best.pt."""
    config = run.config
    chance = 1.0 / run.splits.info.num_classes + config.divergence.chance_margin
    recent = record.history[-config.divergence.patience:]
    if len(recent) == config.divergence.patience and all(row["val_clean_accuracy"] < chance for row in recent):
        tracker.close()
        raise DivergenceError(
            f"validation accuracy stayed at chance (< {chance:.3f}) for {len(recent)} epochs; "
            f"stopped after epoch {recent[-1]['epoch']}, best checkpoint kept at {run.best_path}"
        )


def _evaluate_best(run: _Run, tracker: Tracker, progress: bool) -> dict[str, Any] | None:
    """Test clean and PGD accuracy of best.pt, of every view (eval.json, subnets.csv with several); None when
    ``eval.n_examples`` is 0 (and on ranks other than the first)."""
    config, masker = run.config, run.masker
    distributed.barrier()  # best.pt is on disk before anyone reads it
    if not run.world.is_main or config.eval.n_examples <= 0:
        return None
    best = load_checkpoint(run.best_path, map_location=run.device)
    run.model.load_state_dict(best["model"])
    if masker is not None:
        masker.load_state_dict(best["sparsity"])
    rows = []
    for view in views_of(masker):
        with view.activate():
            rows.append({"subnet": view.index, "density": view.density() if view.index is not None else None,
                         **evaluate_test(run.model, run.splits.test, config, run.device, progress)})
        rows[-1].update(_evaluation_flops(run, view.masks, rows[-1]))
    evaluation = {"checkpoint": str(run.best_path), "epoch": best["epoch"],
                  **{key: value for key, value in rows[0].items() if key not in ("subnet", "density")}}
    if rows[0]["subnet"] is not None:  # several sub-nets: the densest one's figures on top, every one in the table
        evaluation["subnets"] = rows
        write_atomic(run.run_dir / "subnets.csv", pd.DataFrame(rows).to_csv(index=False))
    write_atomic(run.run_dir / "eval.json", json.dumps(evaluation, indent=2))
    log.info("test (first %d, best epoch %d): clean %.3f  PGD-%d %.3f", evaluation["n_examples"],
             evaluation["epoch"], evaluation["clean_accuracy"], config.eval.pgd_steps, evaluation["pgd_accuracy"])
    tracker.final(evaluation)
    return evaluation


def _evaluation_flops(run: _Run, masks: dict[str, torch.Tensor], row: dict[str, Any]) -> dict[str, Any]:
    """The FLOPs fields of one evaluated network: the run's training cost, its inference cost at ``masks`` (both
    against dense) and the cost of this evaluation."""
    cost = run.flops.evaluation(masks, row["n_examples"], row["clean_accuracy"], row["pgd_steps"], row["restarts"],
                                row["eps"])
    return {**run.flops.summary(masks), "eval_flops": cost}


def _report_flops(run: _Run) -> None:
    """layer_flops.csv, and the run's training and inference FLOPs against dense as fit's last line (of the
    evaluated masks: best.pt's when an evaluation ran)."""
    if not run.world.is_main:
        return
    write_atomic(run.run_dir / "layer_flops.csv", run.flops.layer_table().to_csv(index=False))
    log.info("FLOPs: %s", run.flops.describe(views_of(run.masker)[0].masks))


def _objective_loss(objective: Objective, amp: Amp | None = None):
    """``loss(model, images, labels, model_inputs)``: the objective's batch-mean loss, for AGENT's passes (the
    forward under ``amp``'s autocast; unscaled)."""

    def loss(model, images, labels, inputs):
        with amp.autocast() if amp is not None else nullcontext():
            return objective.loss(model, images, labels, inputs)[0]

    return loss


def _agent_pass_batches(config: TrainConfig, images: int, world_size: int) -> int:
    """Batches of AGENT's g_tilde pass each rank runs: its share of ``agent.full_grad_batches`` (rounded up, the
    same on every rank), at most its shard of the training split in full batches."""
    shard = (images // world_size) // config.data.batch_size
    return min(math.ceil(config.agent.full_grad_batches / world_size) or shard, shard)


def _agent_batches(config: TrainConfig, train: ImageSet, objective: Objective, device: torch.device, epoch: int,
                   world: distributed.Context = distributed.Context()):
    """The large-batch pass of AGENT: unaugmented training batches, clean (official) or adversarial inputs.

    Under torchrun each rank takes its own shard of the split, as the training loader does, and runs
    1/world_size of the pass; AGENT all-reduces what the ranks computed.
    """
    loader = batch_loader(train, config.data.batch_size, device, shuffle=True, seed=config.seed + 1, drop_last=True,
                          rank=world.rank, world_size=world.world_size, workers=config.data.workers)
    loader.set_epoch(epoch)
    limit = _agent_pass_batches(config, len(train), world.world_size)
    for index, (images, labels) in enumerate(loader):
        if index == limit:
            return
        inputs = images if config.agent.full_grad_inputs == "clean" else objective.perturb(images, labels)
        yield images, labels, images if inputs is None else inputs


def _agent_metrics(agent: AGENT | None, config: TrainConfig, train: ImageSet, objective: Objective,
                   device: torch.device, amp: Amp | None = None) -> dict[str, float]:
    if agent is None:
        return {}
    metrics = agent.epoch_metrics()
    ratio = float("nan")
    if config.agent.probe_chunks and agent.active():
        # A fixed probe batch (the first training images), attacked afresh, split into sub-batches.
        probe = in_memory(train.take(slice(0, config.data.batch_size)), config.data.workers)
        images = probe.images.to(device).float().div_(255)
        labels = probe.labels.to(device)
        adversarial = objective.perturb(images, labels)
        inputs = images if adversarial is None else adversarial
        chunks = [(x, y, a) for x, y, a in zip(images.chunk(config.agent.probe_chunks),
                                                 labels.chunk(config.agent.probe_chunks),
                                                 inputs.chunk(config.agent.probe_chunks))]
        ratio = agent.variance_ratio(chunks, _objective_loss(objective, amp))
    return {**metrics, "agent_variance_ratio": ratio}


def _sparsity_metrics(masker: SparseMasker | None) -> dict[str, float]:
    """Density (of the first view, the densest sub-net where there are several, each in its own column too)
    and the exploration rate."""
    if masker is None:
        return {}
    views = masker.views()
    per_view = {f"density_subnet{view.index}": view.density() for view in views if view.index is not None}
    return {"density": views[0].density(), **per_view, "exploration_rate": masker.exploration_rate()}


def _layer_densities(masker: SparseMasker, epoch: int) -> list[dict[str, Any]]:
    """This epoch's rows of layer_density.csv: active connections per layer (and sub-net)."""
    return [{"epoch": epoch, **({"subnet": view.index} if view.index is not None else {}), "layer": name,
             "active": int(count), "total": view.masks[name].numel(), "density": int(count) / view.masks[name].numel()}
            for view in masker.views() for name, count in view.counts().items()]


def _saved_layer_densities(state: dict[str, Any], path: Path) -> list[dict[str, Any]]:
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


def _write_layer_densities(rows: list[dict[str, Any]], path: Path) -> None:
    write_atomic(path, pd.DataFrame(rows).to_csv(index=False))


def _write_metrics(history: list[dict[str, Any]], run_dir: Path) -> pd.DataFrame:
    frame = pd.DataFrame(history)
    write_atomic(run_dir / "metrics.csv", frame.to_csv(index=False))
    write_atomic(run_dir / "metrics.json", frame.to_json(orient="records", indent=2))
    return frame
