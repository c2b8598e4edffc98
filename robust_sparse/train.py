"""The training loop: :func:`fit` reads top to bottom and returns the per-epoch metrics and the final evaluation.

What a run trains with (device, data, model, optimizer, objective, masker, AGENT) is built by
:mod:`robust_sparse.run_setup`; what a run directory holds, the checks before a run writes into it and what a
resume reads back are in :mod:`robust_sparse.run_record`; AGENT's side of the loop (its large-batch pass, its metrics columns) in
:mod:`robust_sparse.agent`; validation and the test evaluation in :mod:`robust_sparse.measure`.

A sparse masker trains one network or several sub-nets over one weight tensor (AST), its views: every view is
validated each epoch (``*_subnet{k}`` columns where there are several; the plain columns and the model selection
use their mean) and evaluated on test.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from torch import nn

from robust_sparse import distributed
from robust_sparse.chance import at_chance, chance_level

from robust_sparse.files import rundir
from robust_sparse.agent import AGENT, agent_metrics, full_grad_pass, full_grad_pass_length, objective_loss
from robust_sparse.files.atomic import write_atomic
from robust_sparse.files.checkpoint import load_checkpoint, save_checkpoint
from robust_sparse.config import TrackingConfig, TrainConfig, to_dict
from robust_sparse.config.parsing import describe_eps
from robust_sparse.datasets.images import BatchLoader
from robust_sparse.errors import DivergenceError
from robust_sparse.flops import FlopsCounter
from robust_sparse.kernels import SparseKernels
from robust_sparse.measure import evaluate_views, measure_validation, sparsity_metrics
from robust_sparse.mvr import MVR
from robust_sparse.objectives import Objective
from robust_sparse.precision import Amp
from robust_sparse.progress import progress as progress_bar
from robust_sparse.run_record import (Record, check_run, layer_densities, prepare_run_dir, refuse_to_overwrite,
                                      resume_state, rng_state, set_rng_state, write_evaluation, write_layer_densities,
                                      write_metrics)
from robust_sparse.run_setup import Run, build_run
from robust_sparse.sparse import SparseMasker, views_of
from robust_sparse.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    run_dir: Path
    metrics: pd.DataFrame
    evaluation: dict[str, Any] | None
    model: nn.Module | None = None  # with the best checkpoint's weights when an evaluation ran, else the last
    masker: SparseMasker | None = None
    agent: AGENT | None = None


def fit(config: TrainConfig, *, resume: bool = False, progress: bool = False) -> FitResult:
    """Train as ``config`` says, keep the best checkpoint by robust validation accuracy, evaluate it on test.

    Raises :class:`DivergenceError` (after saving metrics; ``best.pt`` is kept) if the loss is not finite or
    validation accuracy sits at chance for ``divergence.patience`` epochs.
    """
    check_run(config)
    refuse_to_overwrite(config, resume)
    # on every rank, before the process group forms: a directory another run holds stops them all at once
    rundir.check_unlocked(config.out_dir, rundir.Kind.TRAIN, "out_dir")
    run = build_run(config)
    # the run directory is this process's until fit returns (only the first rank writes into it)
    with rundir.locked(run.run_dir, rundir.Kind.TRAIN, "out_dir") if run.world.is_main else nullcontext():
        return _fit_locked(run, resume, progress)


def _fit_locked(run: Run, resume: bool, progress: bool) -> FitResult:
    config = run.config
    refuse_to_overwrite(config, resume)  # again, under the lock: another run may have finished meanwhile
    record = _resume(run) if resume else Record()
    if run.world.is_main:
        prepare_run_dir(config, record, sparse=run.masker is not None)
    tracker = Tracker(config.tracking if run.world.is_main else TrackingConfig(), config, run.run_dir)
    log.info("training %s on %s (%d train / %d val images) with %s on %s", config.model.name,
             config.data.dataset, len(run.splits.train), len(run.splits.val), config.objective.value,
             run.device)
    # which radius trains and tests, and whether it is the dataset's protocol one (a config may leave eps out)
    log.info("attack: %s eps=%.6g (%s), step size %.6g", config.attack.norm.value, config.attack.eps,
             describe_eps(config), config.attack.step_size)
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


def _resume(run: Run) -> Record:
    """Continue from ``last.pt`` (its config must match this one), or start afresh when there is none."""
    state = resume_state(run.config, run.device)
    if state is None:
        return Record()
    run.model.load_state_dict(state["model"])
    run.stepper.load_state_dict(state["optimizer"])
    if run.amp.scaler is not None and "grad_scaler" in state:
        run.amp.scaler.load_state_dict(state["grad_scaler"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.masker is not None:
        run.masker.load_state_dict(state["sparsity"])
    run.flops.load_state_dict(state.get("flops"))
    set_rng_state(state["rng"])
    record = Record.resumed(state, run.run_dir, sparse=run.masker is not None)
    if run.probe is not None:  # its FLOPs and per-layer rows so far, from the files the run wrote
        run.probe.resumed(record.history, run.run_dir, record.start_epoch)
    log.info("resuming %s after epoch %d", run.run_dir, record.start_epoch)
    return record


def _train_epoch(run: Run, record: Record, epoch: int, tracker: Tracker,
                 progress: bool) -> tuple[dict[str, Any], bool]:
    """AGENT's refresh when due, one epoch of training, validation of every view and the metrics row (into
    ``record``); returns the epoch's checkpoint and whether it is the new best."""
    config, agent, masker, device = run.config, run.agent, run.masker, run.device
    shown = progress and run.world.is_main
    run.loader.set_epoch(epoch)
    lr = run.optimizer.param_groups[0]["lr"]
    probing = run.probe is not None and run.world.is_main and run.probe.due(epoch)
    if probing:
        run.probe.start_epoch(epoch)
    if agent is not None and agent.due(epoch):
        batches = full_grad_pass(config, run.splits.train, run.objective, device, epoch, run.world)
        agent.refresh(progress_bar(batches, enabled=shown, desc="AGENT g_tilde pass",
                                   total=full_grad_pass_length(config, len(run.splits.train), run.world.world_size),
                                   unit="batch"),
                      objective_loss(run.objective, run.amp),
                      scale=run.amp.scaler.get_scale() if run.amp.scaler is not None else 1.0)
        run.flops.agent_refresh(agent)
    stats = train_one_epoch(run.trained, run.objective, run.stepper, run.scheduler, run.loader, agent=agent,
                            progress=shown, description=f"epoch {epoch + 1}/{config.optim.epochs}", amp=run.amp,
                            flops=run.flops, on_step=tracker.step_logger(epoch, len(run.loader)),
                            kernels=run.kernels)
    distributed.broadcast_buffers(run.model)  # as DDP does before each forward: validate and save one state
    probed = (run.probe.measure(run.objective, run.splits.train, epoch, device, run.flops, run.run_dir, shown)
              if probing else run.probe.skipped() if run.probe is not None else {})
    per_view = {}
    validated = config.val.max_examples > 0
    for view in views_of(masker) if validated else ():
        with view.activate():
            per_view[view.index] = measure_validation(run.model, run.splits.val, config, device, shown, run.amp)
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
        "images_per_second": stats.images / stats.seconds, "best": is_best and validated, **sparsity_metrics(masker),
        **run.flops.epoch_metrics(),
        **{f"val_{kind}_accuracy_subnet{k}": value for k, pair in per_view.items() if k is not None
           for kind, value in zip(("clean", "pgd"), pair)},
        **agent_metrics(agent, config, run.splits.train, run.objective, device, run.amp), **probed,
    })
    tracker.epoch(record.history[-1])
    log.info("epoch %d/%d  loss %.4f  train acc %.3f  %s  %.0f img/s",
             epoch + 1, config.optim.epochs, stats.loss, stats.accuracy,
             f"val clean {val_clean:.3f}  val pgd {val_robust:.3f}" if validated else "no validation",
             stats.images / stats.seconds)
    checkpoint = {
        "config": to_dict(config), "epoch": epoch + 1, "model": run.model.state_dict(),
        "optimizer": run.stepper.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rng_state(),
        "history": record.history, "best_key": list(record.best_key),
        # what the evaluation report needs to say whether a published row had the same training data
        "data_sizes": {"train": len(run.splits.train), "val": len(run.splits.val)},
        "flops": run.flops.state_dict(),
    }
    if run.amp.scaler is not None:
        checkpoint["grad_scaler"] = run.amp.scaler.state_dict()
    if masker is not None:
        record.layer_rows += layer_densities(masker, epoch + 1)
        checkpoint["sparsity"] = masker.state_dict()
        checkpoint["layer_density"] = record.layer_rows
    if is_best and validated:
        record.best_key = (val_robust, val_clean)
        checkpoint["best_key"] = list(record.best_key)
    return checkpoint, is_best


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
    kernels: SparseKernels | None = None,
) -> EpochStats:
    """One epoch. ``amp`` (train.precision): autocast of the training forward and AGENT's snapshot forward
    (the objective's attack autocasts its own forwards), and for fp16 the GradScaler that steps ``optimizer``;
    ``flops`` counts every step's FLOPs (robust_sparse.flops); ``on_step(step, loss)`` is called after every step
    with the batch's loss (tracking.step_loss); ``kernels`` (train.sparse_kernels) runs the attack and, where the
    engine allows, the training pass on the sparse CSR kernels."""
    amp = amp if amp is not None else Amp("fp32", loader.device)
    scaler = amp.scaler
    base = optimizer.base if isinstance(optimizer, AGENT) else optimizer
    mvr = base if isinstance(base, MVR) else None
    model.train()
    device_loss = torch.zeros((), device=loader.device)
    device_correct = torch.zeros((), device=loader.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = progress_bar(loader, enabled=progress, desc=description, unit="batch")
    for step, (images, labels) in enumerate(bar, start=1):
        images = amp.format(images)
        with kernels.inputs_only() if kernels is not None else nullcontext():
            adversarial = objective.perturb(images, labels)  # the inner maximisation, model in eval mode
        with amp.autocast(), kernels.training_pass() if kernels is not None else nullcontext():
            loss, logits = objective.loss(model, images, labels, adversarial)
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if agent is not None:  # g_old: the snapshot's gradient on the same (adversarial) batch, scaled as g_new
            agent.snapshot_backward(lambda snapshot: _scaled_loss(objective, snapshot, images, labels, adversarial,
                                                                  amp))
        if mvr is not None:  # MVR: the gradient at the previous weights on this batch
            mvr.previous_backward(lambda previous: _scaled_loss(objective, previous, images, labels, adversarial,
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
            flops.training_step(len(labels), previous_gradient=mvr is not None and mvr.took_previous_gradient)
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


def _save_epoch(run: Run, record: Record, checkpoint: dict[str, Any], is_best: bool) -> None:
    """layer_density.csv, best.pt (when it is the best), last.pt and the metrics; the ranks hold identical
    state, so one of them writes it."""
    if not run.world.is_main:
        return
    if run.masker is not None:
        write_layer_densities(record.layer_rows, run.run_dir / "layer_density.csv")
    if is_best:
        save_checkpoint(checkpoint, run.best_path)
    save_checkpoint(checkpoint, run.last_path)
    write_metrics(record.history, run.run_dir)


def _stop_if_diverged(run: Run, record: Record, tracker: Tracker) -> None:
    """Validation accuracy at chance for ``divergence.patience`` epochs in a row: stop, keeping best.pt."""
    config = run.config
    classes, margin = run.splits.info.num_classes, config.divergence.chance_margin
    chance = chance_level(classes, margin)
    recent = record.history[-config.divergence.patience:]
    if len(recent) == config.divergence.patience and all(at_chance(row["val_clean_accuracy"], classes, margin)
                                                         for row in recent):
        tracker.close()
        raise DivergenceError(
            f"validation accuracy stayed at chance (< {chance:.3f}) for {len(recent)} epochs; "
            f"stopped after epoch {recent[-1]['epoch']}, best checkpoint kept at {run.best_path}"
        )


def _evaluate_best(run: Run, tracker: Tracker, progress: bool) -> dict[str, Any] | None:
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
    rows = evaluate_views(run.model, masker, run.splits.test, config, run.device, run.flops, progress)
    evaluation = {"checkpoint": str(run.best_path), "epoch": best["epoch"],
                  **{key: value for key, value in rows[0].items() if key not in ("subnet", "density")}}
    if rows[0]["subnet"] is not None:  # several sub-nets: the densest one's figures on top, every one in the table
        evaluation["subnets"] = rows
    write_evaluation(evaluation, run.run_dir)
    log.info("test (first %d, best epoch %d): clean %.3f  PGD-%d %.3f", evaluation["n_examples"],
             evaluation["epoch"], evaluation["clean_accuracy"], config.eval.pgd_steps, evaluation["pgd_accuracy"])
    tracker.final(evaluation)
    return evaluation


def _report_flops(run: Run) -> None:
    """layer_flops.csv, and the run's training and inference FLOPs against dense as fit's last line (of the
    evaluated masks: best.pt's when an evaluation ran)."""
    if not run.world.is_main:
        return
    write_atomic(run.run_dir / "layer_flops.csv", run.flops.layer_table().to_csv(index=False))
    train = run.flops.train_flops
    share = f"{run.probe.flops / train:.3f}x training, " if run.probe is not None and train > 0 else ""
    probe = "" if run.probe is None else f"; gradient probe {run.probe.flops:.3e} FLOPs ({share}not counted in it)"
    log.info("FLOPs: %s%s", run.flops.describe(views_of(run.masker)[0].masks), probe)
