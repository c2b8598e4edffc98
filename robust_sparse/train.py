"""The training loop: ``fit`` reads top to bottom and returns the per-epoch metrics and the final evaluation.

A run directory holds everything a run produces::

    config.yaml      the resolved config            metrics.csv / metrics.json   one row per epoch
    last.pt          written after every epoch      best.pt     best robust validation accuracy
    eval.json        test-set clean/PGD accuracy of best.pt after training
    layer_density.csv  sparse runs: per-layer active connections after every epoch
    subnets.csv      AST runs: the test evaluation of every sub-net

AST runs (several sub-nets over one weight tensor) validate every sub-net each epoch (``*_subnet{k}`` columns;
the plain columns and the model selection use their mean) and evaluate every sub-net on test.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robust_sparse import distributed
from robust_sparse.accuracy import evaluate_pgd
from robust_sparse.agent import AGENT
from robust_sparse.checkpoint import load_checkpoint, remove_temporaries, save_checkpoint, write_atomic
from robust_sparse.config import (DeviceChoice, OptimizerName, Schedule, TrackingConfig, TrainConfig, config_from_dict,
                                  save_config, to_dict)
from robust_sparse.data import BatchLoader, ImageSet, load_splits
from robust_sparse.errors import DivergenceError, UserError
from robust_sparse.models import build_model
from robust_sparse.objectives import Objective, build_objective
from robust_sparse.optim import SGDW
from robust_sparse.precision import Amp, maybe_compile
from robust_sparse.progress import progress as progress_bar
from robust_sparse.sparse import SparseMasker, build_sparsity
from robust_sparse.sparse.ast import AlternatingMasker
from robust_sparse.sparse.gse import balanced_batch
from robust_sparse.tracking import Tracker

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
        if config.sparsity.method.value == "bsrnet" and optim.weight_decay > 0:
            log.warning("sparsity.method = bsrnet runs with coupled weight decay (optim.optimizer = sgd); the paper "
                        "uses decoupled decay not scaled by the learning rate: set optim.optimizer = sgdw")
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
) -> EpochStats:
    """One epoch. ``amp`` (train.precision): autocast of the training forward and AGENT's snapshot forward
    (the objective's attack autocasts its own forwards), and for fp16 the GradScaler that steps ``optimizer``."""
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
        # Accumulate on the device; reading a value back costs a sync, so do it only every few batches.
        device_loss += loss.detach() * len(labels)
        device_correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if step % check_every == 0 or step == len(loader):
            running = device_loss.item() / seen
            if not math.isfinite(running):
                raise DivergenceError(f"training loss became {running} in {description}, batch {step}")
            bar.set_postfix(loss=f"{running:.3f}", acc=f"{device_correct.item() / seen:.3f}")
    return EpochStats(device_loss.item() / seen, device_correct.item() / seen, seen, time.perf_counter() - start)


def _scaled_loss(objective: Objective, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 adversarial: torch.Tensor | None, amp: Amp) -> torch.Tensor:
    with amp.autocast():
        loss = objective.loss(model, images, labels, adversarial)[0]
    return loss if amp.scaler is None else amp.scaler.scale(loss)


def validate(model: nn.Module, data: ImageSet, config: TrainConfig, device: torch.device,
             progress: bool = False, amp: Amp | None = None) -> tuple[float, float]:
    """Clean and PGD accuracy on (at most ``val.max_examples`` of) the held-out validation split; ``amp``:
    autocast of the model's forwards (train.precision)."""
    subset = data.take(slice(0, config.val.max_examples))
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
    test = test.take(slice(0, config.eval.n_examples))
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


def fit(config: TrainConfig, *, resume: bool = False, progress: bool = False) -> FitResult:
    """Train as ``config`` says, keep the best checkpoint by robust validation accuracy, evaluate it on test.

    Raises :class:`DivergenceError` (after saving metrics; ``best.pt`` is kept) if the loss is not finite or
    validation accuracy sits at chance for ``divergence.patience`` epochs.
    """
    run_dir = Path(config.out_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if not resume and (last_path.exists() or best_path.exists()):
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another out_dir")
    world = distributed.setup(resolve_device(config.device))  # a no-op without torchrun
    device = world.device
    # fp16 on a CPU (device auto without CUDA) is refused here, before any data is read
    amp = Amp(config.train.precision, device, channels_last=config.train.channels_last)
    Amp(config.eval.precision, device, where="eval.precision")
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes into it
    torch.manual_seed(config.seed)  # the same seed on every rank: same init, masks, signs, attack streams

    splits = load_splits(config.data, config.seed)
    info = splits.info
    model = build_model(config.model.name, info.num_classes, info.in_channels, info.mean, info.std).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = BatchLoader(splits.train, config.data.batch_size, device, shuffle=True, seed=config.seed, info=info,
                         augment_batches=config.data.augment, drop_last=len(splits.train) > config.data.batch_size,
                         rank=world.rank, world_size=world.world_size)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    masker = build_sparsity(config.sparsity, model, config.model.name, optimizer,
                            config.optim.epochs * len(loader), config.seed,
                            score_batch=lambda: balanced_batch(  # GSE; objective, masker are bound when called
                                splits.train, config.sparsity.gse_samples_per_class, device,
                                config.seed + masker.step, objective.perturb))
    # the attack runs the (compiled, if train.compile) plain model's forwards under train.precision's autocast
    objective = build_objective(config, maybe_compile(model, config.train.compile), autocast=amp.autocast)
    if masker is not None and amp.scaler is not None:
        masker.grad_scale = amp.scale
    subnets = masker if isinstance(masker, AlternatingMasker) else None
    agent = None
    if config.agent.enabled:  # wraps the base optimizer; the scheduler and sparse hooks stay on the base
        if subnets is not None and 0 < config.agent.full_grad_batches < subnets.count:
            raise UserError(f"agent.full_grad_batches = {config.agent.full_grad_batches}: AST gives each of its "
                            f"{subnets.count} sub-nets its own g_tilde batches; use >= {subnets.count} (or 0 = all)")
        # The g_tilde pass drops the last partial batch; under torchrun each rank runs its share of it.
        rank_batches = _agent_pass_batches(config, len(splits.train), world.world_size)
        if config.agent.gamma > 0 and (rank_batches < 1 or rank_batches * world.world_size < 2):
            raise UserError(f"agent: the g_tilde pass needs at least 2 full batches of {config.data.batch_size} "
                            f"training images (one per rank), the split has {len(splits.train)}; lower "
                            "data.batch_size")
        agent = AGENT(optimizer, model, config.agent, masks=masker.masks if masker is not None else None,
                      subnets=subnets)
    stepper = agent if agent is not None else optimizer
    # Gradients of the training forward are averaged over ranks by DDP; attacks and AGENT's snapshot use the
    # plain module (gradients with respect to inputs, or AGENT's own all-reduce).
    trained = maybe_compile(DistributedDataParallel(model) if world.world_size > 1 else model, config.train.compile)

    history: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []  # layer_density.csv; kept in the checkpoint, so a resume rewrites it
    best_key = (-1.0, -1.0)
    start_epoch = 0
    if resume and not last_path.exists():
        log.warning("--resume: %s holds no last.pt; starting a fresh run", run_dir)
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device)
        # Through today's schema, so that a field added since the run started compares at its default.
        try:
            saved = to_dict(config_from_dict(state["config"]))
        except UserError as error:
            raise UserError(f"cannot resume {last_path}: its saved config does not load ({error})") from None
        difference = _difference(_comparable(saved), _comparable(to_dict(config)))
        if difference is not None:
            raise UserError(f"cannot resume {last_path}: its config differs from this one in {difference}")
        model.load_state_dict(state["model"])
        stepper.load_state_dict(state["optimizer"])
        if amp.scaler is not None and "grad_scaler" in state:
            amp.scaler.load_state_dict(state["grad_scaler"])
        scheduler.load_state_dict(state["scheduler"])
        if masker is not None:
            masker.load_state_dict(state["sparsity"])
        _set_rng_state(state["rng"])
        history, best_key, start_epoch = state["history"], tuple(state["best_key"]), state["epoch"]
        if masker is not None:
            layer_rows = _saved_layer_densities(state, run_dir / "layer_density.csv")
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(run_dir)  # of writes a kill interrupted
        save_config(config, run_dir / "config.yaml")
        if history:  # a kill may have cut the writes after the checkpoint: rewrite them from it
            _write_metrics(history, run_dir)
            if masker is not None:
                _write_layer_densities(layer_rows, run_dir / "layer_density.csv")
    tracker = Tracker(config.tracking if world.is_main else TrackingConfig(), config, run_dir)
    log.info("training %s on %s (%d train / %d val images) with %s on %s", config.model.name,
             config.data.dataset.value, len(splits.train), len(splits.val), config.objective.value, device)

    chance = 1.0 / info.num_classes + config.divergence.chance_margin
    for epoch in range(start_epoch, config.optim.epochs):
        loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        if agent is not None and agent.due(epoch):
            batches = _agent_batches(config, splits.train, objective, device, epoch, world)
            agent.refresh(progress_bar(batches, enabled=progress and world.is_main, desc="AGENT g_tilde pass",
                                       total=_agent_pass_batches(config, len(splits.train), world.world_size),
                                       unit="batch"),
                          _objective_loss(objective, amp),
                          scale=amp.scaler.get_scale() if amp.scaler is not None else 1.0)
        stats = train_one_epoch(trained, objective, stepper, scheduler, loader, agent=agent,
                                progress=progress and world.is_main,
                                description=f"epoch {epoch + 1}/{config.optim.epochs}", amp=amp)
        distributed.broadcast_buffers(model)  # as DDP does before each forward: validate and save one state
        per_subnet = {}
        for k, as_subnet in _subnet_views(masker):
            with as_subnet:
                per_subnet[k] = validate(model, splits.val, config, device, progress and world.is_main, amp)
        val_clean = sum(clean for clean, _ in per_subnet.values()) / len(per_subnet)
        val_robust = sum(robust for _, robust in per_subnet.values()) / len(per_subnet)
        # AST prunes gradually: a checkpoint counts only once every sub-net has reached its target density.
        eligible = subnets is None or subnets.pruning_done()
        is_best = eligible and (val_robust, val_clean) > best_key
        history.append({
            "epoch": epoch + 1, "lr": lr, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
            "val_clean_accuracy": val_clean, "val_pgd_accuracy": val_robust, "train_seconds": stats.seconds,
            "images_per_second": stats.images / stats.seconds, "best": is_best, **_sparsity_metrics(masker),
            **{f"val_{kind}_accuracy_subnet{k}": value for k, pair in per_subnet.items() if k is not None
               for kind, value in zip(("clean", "pgd"), pair)},
            **_agent_metrics(agent, config, splits.train, objective, device, amp),
        })
        tracker.epoch(history[-1])
        log.info("epoch %d/%d  loss %.4f  train acc %.3f  val clean %.3f  val pgd %.3f  %.0f img/s",
                 epoch + 1, config.optim.epochs, stats.loss, stats.accuracy, val_clean, val_robust,
                 stats.images / stats.seconds)
        checkpoint = {
            "config": to_dict(config), "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": stepper.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
            "history": history, "best_key": list(best_key),
            # what the evaluation report needs to say whether a published row had the same training data
            "data_sizes": {"train": len(splits.train), "val": len(splits.val)},
        }
        if amp.scaler is not None:
            checkpoint["grad_scaler"] = amp.scaler.state_dict()
        if masker is not None:
            layer_rows += _layer_densities(masker, epoch + 1)
            checkpoint["sparsity"] = masker.state_dict()
            checkpoint["layer_density"] = layer_rows
        if is_best:
            best_key = (val_robust, val_clean)
            checkpoint["best_key"] = list(best_key)
        if world.is_main:  # the ranks hold identical state; one of them writes it
            if masker is not None:
                _write_layer_densities(layer_rows, run_dir / "layer_density.csv")
            if is_best:
                save_checkpoint(checkpoint, best_path)
            save_checkpoint(checkpoint, last_path)
            _write_metrics(history, run_dir)
        recent = history[-config.divergence.patience:]
        if len(recent) == config.divergence.patience and all(row["val_clean_accuracy"] < chance for row in recent):
            tracker.close()
            raise DivergenceError(
                f"validation accuracy stayed at chance (< {chance:.3f}) for {len(recent)} epochs; "
                f"stopped after epoch {epoch + 1}, best checkpoint kept at {best_path}"
            )

    metrics = pd.DataFrame(history)
    evaluation = None
    distributed.barrier()  # best.pt is on disk before anyone reads it
    if world.is_main and config.eval.n_examples > 0:
        best = load_checkpoint(best_path, map_location=device)
        model.load_state_dict(best["model"])
        if masker is not None:
            masker.load_state_dict(best["sparsity"])
        rows = []
        for k, as_subnet in _subnet_views(masker):
            with as_subnet:
                rows.append({"subnet": k, "density": masker.subnet_density(k) if k is not None else None,
                             **evaluate_test(model, splits.test, config, device, progress)})
        evaluation = {"checkpoint": str(best_path), "epoch": best["epoch"],
                      **{key: value for key, value in rows[0].items() if key not in ("subnet", "density")}}
        if subnets is not None:  # the densest sub-net's figures on top; every sub-net in the table
            evaluation["subnets"] = rows
            write_atomic(run_dir / "subnets.csv", pd.DataFrame(rows).to_csv(index=False))
        write_atomic(run_dir / "eval.json", json.dumps(evaluation, indent=2))
        log.info("test (first %d, best epoch %d): clean %.3f  PGD-%d %.3f", evaluation["n_examples"],
                 evaluation["epoch"], evaluation["clean_accuracy"], config.eval.pgd_steps, evaluation["pgd_accuracy"])
        tracker.final(evaluation)
    tracker.close()
    return FitResult(run_dir, metrics, evaluation, model=model, masker=masker, agent=agent)


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
    loader = BatchLoader(train, config.data.batch_size, device, shuffle=True, seed=config.seed + 1, drop_last=True,
                         rank=world.rank, world_size=world.world_size)
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
        images = train.images[: config.data.batch_size].to(device).float().div_(255)
        labels = train.labels[: config.data.batch_size].to(device)
        adversarial = objective.perturb(images, labels)
        inputs = images if adversarial is None else adversarial
        chunks = [(x, y, a) for x, y, a in zip(images.chunk(config.agent.probe_chunks),
                                                 labels.chunk(config.agent.probe_chunks),
                                                 inputs.chunk(config.agent.probe_chunks))]
        ratio = agent.variance_ratio(chunks, _objective_loss(objective, amp))
    return {**metrics, "agent_variance_ratio": ratio}


def _subnet_views(masker: SparseMasker | None):
    """(sub-net index, context that makes the model that sub-net): AST's sub-nets, else the model itself."""
    if isinstance(masker, AlternatingMasker):
        return [(k, masker.as_subnet(k)) for k in range(masker.count)]
    return [(None, nullcontext())]


def _sparsity_metrics(masker: SparseMasker | None) -> dict[str, float]:
    if masker is None:
        return {}
    if isinstance(masker, AlternatingMasker):
        densities = {f"density_subnet{k}": masker.subnet_density(k) for k in range(masker.count)}
        return {"density": densities["density_subnet0"], **densities, "exploration_rate": masker.exploration_rate()}
    return {"density": masker.global_density(), "exploration_rate": masker.exploration_rate()}


def _layer_densities(masker: SparseMasker, epoch: int) -> list[dict[str, Any]]:
    """This epoch's rows of layer_density.csv: active connections per layer (and sub-net)."""
    if isinstance(masker, AlternatingMasker):
        counts = [(k, masker.subnet_counts(k)) for k in range(masker.count)]
    else:
        counts = [(None, masker.active_counts())]
    return [{"epoch": epoch, **({"subnet": k} if k is not None else {}), "layer": name, "active": int(count),
             "total": masker.masks[name].numel(), "density": int(count) / masker.masks[name].numel()}
            for k, layer_counts in counts for name, count in layer_counts.items()]


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
