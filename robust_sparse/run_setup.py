"""What a training run trains with: :func:`build_run` sets up the device, data, model, optimizer, objective, sparse
masker and AGENT from a config, in the same order for a fresh and a resumed run, and returns them as a :class:`Run`
(the training loop, :mod:`robust_sparse.train`, only reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robust_sparse import distributed
from robust_sparse.agent import AGENT, check_agent
from robust_sparse.config import Precision, SparseKernelsMode, TrainConfig
from robust_sparse.datasets.images import BatchLoader
from robust_sparse.datasets.splits import Splits, batch_loader, load_splits
from robust_sparse.errors import UserError
from robust_sparse.flops import FlopsCounter, dense_profile
from robust_sparse.kernels import SparseKernels
from robust_sparse.models import build_model
from robust_sparse.mvr import MVR
from robust_sparse.objectives import Objective, build_objective
from robust_sparse.optim import build_optimization
from robust_sparse.precision import Amp, maybe_compile
from robust_sparse.probe import GradientProbe
from robust_sparse.sparse import SparseMasker, TrainingData, build_sparsity, views_of


@dataclass
class Run:
    """What a run trains with, built by :func:`build_run` in the same order for a fresh and a resumed run."""

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
    kernels: SparseKernels | None = None  # train.sparse_kernels: the masked layers on the CSR kernels
    probe: GradientProbe | None = None  # probe.every > 0: the gradient-correlation probe (observes only)

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


def build_run(config: TrainConfig) -> Run:
    """Device, data, model, optimizer, objective, sparse masker and AGENT, seeded as the config says."""
    world = distributed.setup(distributed.resolve_device(config.device))  # a no-op without torchrun
    device = world.device
    # fp16 on a CPU (device auto without CUDA) is refused here, before any data is read
    amp = Amp(config.train.precision, device, channels_last=config.train.channels_last)
    if config.train.sync_bn and world.world_size > 1 and device.type != "cuda":
        raise UserError(f"train.sync_bn = true: SyncBatchNorm runs on CUDA devices only, this run is on {device} "
                        f"(set train.sync_bn=false)")
    Amp(config.eval.precision, device, where="eval.precision")
    distributed.barrier()  # every rank has checked the run directory (and its lock) before rank 0 locks it
    torch.manual_seed(config.seed)  # the same seed on every rank: same init, masks, signs, attack streams

    splits = load_splits(config.data, config.seed)
    info = splits.info
    model = build_model(config.model.name, info.num_classes, info.in_channels, info.mean, info.std,
                        config.model.kwargs, cifar_stem=config.model.cifar_stem).to(device)
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
    if masker is not None and isinstance(optimizer, MVR):  # its gradient at the previous weights, masked alike
        optimizer.attach(masker)
    agent = None
    if config.agent.enabled:  # wraps the base optimizer; the scheduler and sparse hooks stay on the base
        check_agent(config, len(splits.train), world.world_size, len(views_of(masker)))
        agent = AGENT(optimizer, model, config.agent, masker=masker)
    # Gradients of the training forward are averaged over ranks by DDP; attacks and AGENT's snapshot use the
    # plain module (gradients with respect to inputs, or AGENT's own all-reduce).
    trained = maybe_compile(DistributedDataParallel(model) if world.world_size > 1 else model, config.train.compile)
    flops = FlopsCounter(dense_profile(model, splits.train.example_shape), config, masker, agent,
                         world.world_size)
    kernels = build_kernels(config, model, masker, device)
    probe = GradientProbe(config, model, masker.masks if masker is not None else None) if config.probe.every else None
    return Run(config, world, amp, splits, model, trained, loader, optimizer, scheduler, objective, masker, agent,
               flops, kernels, probe)


def build_kernels(config: TrainConfig, model: nn.Module, masker: SparseMasker | None,
                  device: torch.device) -> SparseKernels | None:
    """The masked layers on the CSR kernels (``train.sparse_kernels``), or None where they cannot run.

    ``auto`` turns them on for a sparse fp32 run on the CPU without torch.compile, each layer where it measures
    faster; ``on`` for every sparse layer, and refuses the settings the kernels cannot serve.
    """
    mode = config.train.sparse_kernels
    if masker is None or mode is SparseKernelsMode.OFF:
        return None
    unsupported = ("the run is on " + device.type if device.type != "cpu" else
                   f"train.precision = {config.train.precision.value}" if config.train.precision is not Precision.FP32
                   else "train.compile = true" if config.train.compile else None)
    if unsupported is not None:
        if mode is SparseKernelsMode.ON:
            raise UserError(f"train.sparse_kernels = on: the CSR kernels need fp32 on the CPU without torch.compile, "
                            f"but {unsupported} (set train.sparse_kernels=auto or off)")
        return None
    return SparseKernels(model, masker, auto=mode is SparseKernelsMode.AUTO)
