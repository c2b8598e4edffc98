"""Validation: every rule names its field and the allowed range, and fails with a one-line ConfigError."""

from __future__ import annotations

import os

from robust_sparse.config.schema import (AgentConfig, AgentEstimator, AgentVariant, DeviceChoice, Norm, OptimizerName,
                                         Precision, SparseKernelsMode, SparsityConfig, TrainConfig, distribution_owners,
                                         sparse_methods)
from robust_sparse import plugins
from robust_sparse.datasets import DATASETS
from robust_sparse.errors import ConfigError


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Sane ranges of the integer fields: a value past them is a typo (1e12 epochs, a 2**64 seed), refused before any
# work rather than running for ever or failing deep in numpy/torch.
MAX_SEED = 2**32 - 1  # what numpy and torch seed generators accept
MAX_EPOCHS = 100_000
MAX_WANDB_GROUP = 128  # a W&B group name shows in its sidebar: one this long is a pasted path, not a name
MAX_BATCH = 1_000_000
MAX_EXAMPLES = 100_000_000  # images in a split or an evaluation
MAX_STEPS = 100_000  # attack iterations, restarts
MAX_ITERATIONS = 100_000_000  # training steps (sparsity.update_every)
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; the output layer of a larger count is a typo's allocation
# The crop a streamed dataset is trained and tested at: 4x the largest crops models use (ViTs at 518, EfficientNets
# at 800 stay inside); data.image_size=100000 would allocate 120 GB for one decoded image.
MAX_IMAGE_SIZE = 2048
WORKERS_PER_CPU = 4  # DataLoader processes per CPU: more only wait for the CPUs and hold memory each
# A sweep is checked on the machine that submits it, which may have fewer CPUs than the nodes its runs get: a
# small machine still accepts the worker counts of a large node.
MIN_MAX_WORKERS = 64
MAX_RATIO = 1_000_000.0  # trades_beta and the learning-rate factors: weights of a loss or a rate, not magnitudes


def max_workers() -> int:
    """The most DataLoader worker processes a run may ask for on this machine."""
    return max(MIN_MAX_WORKERS, WORKERS_PER_CPU * (os.cpu_count() or 1))


def _memory_bytes() -> int | None:
    """This machine's physical memory (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_radius(subject: str, value: float, norm: Norm | str | None, *, positive: bool = False) -> None:
    """The one rule for a radius or step size in pixel units (inputs are in [0, 1]): >= 0 (> 0 with ``positive``)
    and finite, and <= 1 under linf (an L2 ball may be larger). ``norm`` None: not known yet (a checkpoint's); the
    rule is applied again once it is. ``subject`` names it as the user gave it: ``attack.eps = 2.0``, ``--eps 2``."""
    _check(value < float("inf") and (value > 0 if positive else value >= 0),
           f"{subject}: must be {'> 0' if positive else '>= 0'} (pixel units, inputs in [0,1])")
    _check(getattr(norm, "value", norm) != Norm.LINF.value or value <= 1,
           f"{subject}: must be <= 1 for linf (inputs are in [0,1])")


def check_range(where: str, value: int, low: int, high: int) -> None:
    """``where = value: must be in low..high`` unless it is; also used for the eval flags."""
    _check(low <= value <= high, f"{where} = {value}: must be in {low}..{high}")


def _integer_ranges(config: TrainConfig) -> None:
    for where, value, low, high in (
            ("seed", config.seed, 0, MAX_SEED), ("optim.epochs", config.optim.epochs, 1, MAX_EPOCHS),
            ("data.batch_size", config.data.batch_size, 1, MAX_BATCH),
            ("data.eval_batch_size", config.data.eval_batch_size, 1, MAX_BATCH),
            ("data.val_size", config.data.val_size, 0, MAX_EXAMPLES),
            ("data.num_classes", config.data.num_classes, 0, MAX_CLASSES),
            ("data.train_limit", config.data.train_limit, 0, MAX_EXAMPLES),
            ("attack.steps", config.attack.steps, 1, MAX_STEPS), ("val.pgd_steps", config.val.pgd_steps, 1, MAX_STEPS),
            ("val.max_examples", config.val.max_examples, 0, MAX_EXAMPLES),
            ("eval.n_examples", config.eval.n_examples, 0, MAX_EXAMPLES),
            ("eval.pgd_steps", config.eval.pgd_steps, 1, MAX_STEPS),
            ("eval.restarts", config.eval.restarts, 1, MAX_STEPS),
            ("eval.autoattack_examples", config.eval.autoattack_examples, 0, MAX_EXAMPLES),
            ("divergence.patience", config.divergence.patience, 1, MAX_EPOCHS),
            ("agent.snapshot_every", config.agent.snapshot_every, 1, MAX_EPOCHS),
            ("agent.full_grad_batches", config.agent.full_grad_batches, 0, MAX_EXAMPLES),
            ("agent.probe_chunks", config.agent.probe_chunks, 0, MAX_BATCH),
            ("probe.every", config.probe.every, 0, MAX_EPOCHS), ("probe.batches", config.probe.batches, 2, MAX_BATCH),
            ("probe.seed", config.probe.seed, 0, MAX_SEED)):
        check_range(where, value, low, high)
    if config.data.split_seed is not None:  # unset: the run's seed draws the split
        check_range("data.split_seed", config.data.split_seed, 0, MAX_SEED)
    if config.sparsity.update_every is not None:
        check_range("sparsity.update_every", config.sparsity.update_every, 1, MAX_ITERATIONS)


def check_batch_memory(subject: str, batch: int, channels: int, image_size: int, size_field: str) -> None:
    """One batch of float32 images must fit this machine's memory (one line naming ``subject`` and the largest
    batch that fits otherwise): a batch size that holds for MNIST is hundreds of GB at ImageNet's crops.
    ``size_field`` says where ``image_size`` came from (``data.image_size = 224``, ``imagenet``)."""
    memory = _memory_bytes()
    if memory is None:
        return
    one = channels * image_size * image_size * 4
    _check(batch * one <= memory, f"{subject}: one batch of {channels}x{image_size}x{image_size} float32 images is "
           f"{batch * one / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of memory; must be <= "
           f"{max(1, memory // one)} at {size_field}")


def _batch_memory(data) -> None:
    """A streamed dataset's batches at data.image_size (the in-memory datasets hold their whole split already)."""
    if data.dataset not in DATASETS or not DATASETS.get(data.dataset).streamed:
        return
    for where, batch in (("data.batch_size", data.batch_size), ("data.eval_batch_size", data.eval_batch_size)):
        check_batch_memory(f"{where} = {batch}", batch, 3, data.image_size, f"data.image_size = {data.image_size}")


def check_dataset(data) -> None:
    """data.dataset names a registered dataset (robust_sparse/datasets/), and data.num_classes fits it: the class
    count of a dataset whose record has none (imagefolder), else 0 or the record's own."""
    _check(data.dataset in DATASETS, f"data.dataset: {data.dataset!r} is not one of {', '.join(DATASETS.names())}")
    classes = DATASETS.get(data.dataset).num_classes
    _check(classes != 0 or data.num_classes >= 1,
           f"data.num_classes: data.dataset = {data.dataset} needs the class count (>= 1)")
    _check(classes == 0 or data.num_classes in (0, classes), f"data.num_classes = {data.num_classes}: "
           f"{data.dataset} has {classes} classes (leave it 0 or set {classes})")


def validate(config: TrainConfig, *, machine: bool = True) -> None:
    """The values alone. What they name (registered models, installed trackers, data and output directories)
    is checked where it is used, before any data is read: ``robust_sparse.run_record.check_run``. ``machine``:
    also the bounds of this machine (worker processes per CPU, a batch within its memory), for a config about to
    run here; off for a config saved in a checkpoint, which another machine wrote and this one only reads."""
    data, attack, optim = config.data, config.attack, config.optim
    project = config.tracking.wandb.project
    _check(project is None or bool(project.strip()), "tracking.wandb.project: give a project name, or leave it out")
    group = config.tracking.wandb.group
    _check(group is None or 0 < len(group.strip()) <= MAX_WANDB_GROUP,
           f"tracking.wandb.group: give a group name of 1 to {MAX_WANDB_GROUP} characters, or leave it out")
    _check(data.batch_size >= 1, f"data.batch_size = {data.batch_size}: must be >= 1")
    _check(data.eval_batch_size >= 1, f"data.eval_batch_size = {data.eval_batch_size}: must be >= 1")
    _check(data.val_size >= 0, f"data.val_size = {data.val_size}: must be >= 0")
    _check(data.train_limit >= 0, f"data.train_limit = {data.train_limit}: must be >= 0 (0 = all)")
    _check(data.workers >= 0, f"data.workers = {data.workers}: must be >= 0 (0 = read in the training process)")
    _check(not machine or data.workers <= max_workers(), f"data.workers = {data.workers}: must be in "
           f"0..{max_workers()} (the larger of {MIN_MAX_WORKERS} and {WORKERS_PER_CPU} per CPU; this machine has "
           f"{os.cpu_count() or 1})")
    _check(data.image_size >= 8, f"data.image_size = {data.image_size}: must be >= 8 (pixels)")
    _check(data.image_size <= MAX_IMAGE_SIZE, f"data.image_size = {data.image_size}: must be in 8..{MAX_IMAGE_SIZE} "
           "(pixels)")
    check_dataset(data)
    check_radius(f"attack.eps = {attack.eps}", attack.eps, attack.norm)
    check_radius(f"attack.step_size = {attack.step_size}", attack.step_size, attack.norm, positive=True)
    _check(attack.steps >= 1, f"attack.steps = {attack.steps}: must be >= 1")
    _check(0 <= config.trades_beta <= MAX_RATIO, f"trades_beta = {config.trades_beta}: must be in 0..{MAX_RATIO:g}")
    _check(optim.epochs >= 1, f"optim.epochs = {optim.epochs}: must be >= 1")
    _check(0 < optim.lr < float("inf"), f"optim.lr = {optim.lr}: must be a finite number > 0")
    _check(0 <= optim.momentum < 1, f"optim.momentum = {optim.momentum}: must be in [0, 1)")
    _check(optim.weight_decay >= 0, f"optim.weight_decay = {optim.weight_decay}: must be >= 0")
    # the fraction of every weight removed per step (sgdw: decoupled, not scaled by lr): 1 or more zeroes them
    shrink = optim.weight_decay if optim.optimizer is OptimizerName.SGDW else optim.lr * optim.weight_decay
    _check(shrink < 1, f"optim.weight_decay = {optim.weight_decay}: must be < 1 for sgdw, and optim.lr * "
           "optim.weight_decay < 1 for sgd (the fraction of each weight removed every step)")
    _check(not optim.nesterov or optim.momentum > 0, "optim.nesterov: needs optim.momentum > 0")
    _check(len(optim.milestones) == len(optim.factors),
           f"optim.milestones and optim.factors: need the same length, got {len(optim.milestones)} "
           f"and {len(optim.factors)}")
    _check(all(0 < m < 1 for m in optim.milestones), f"optim.milestones = {optim.milestones}: each must be a "
           "fraction of training in (0, 1)")
    _check(optim.milestones == sorted(optim.milestones), f"optim.milestones = {optim.milestones}: must increase")
    _check(all(0 < f <= MAX_RATIO for f in optim.factors),
           f"optim.factors = {optim.factors}: each must be > 0 and <= {MAX_RATIO:g}")
    _check(config.val.pgd_steps >= 1, f"val.pgd_steps = {config.val.pgd_steps}: must be >= 1")
    _check(config.val.max_examples >= 0,
           f"val.max_examples = {config.val.max_examples}: must be >= 0 (0 = no validation: the last epoch is selected)")
    _check(config.eval.n_examples >= 0, f"eval.n_examples = {config.eval.n_examples}: must be >= 0 (0 = skip)")
    _check(config.eval.pgd_steps >= 1, f"eval.pgd_steps = {config.eval.pgd_steps}: must be >= 1")
    _check(config.eval.autoattack_examples >= 0,
           f"eval.autoattack_examples = {config.eval.autoattack_examples}: must be >= 0 (0 = no AutoAttack)")
    _check(config.eval.restarts >= 1, f"eval.restarts = {config.eval.restarts}: must be >= 1")
    if config.eval.eps is not None:
        check_radius(f"eval.eps = {config.eval.eps}", config.eval.eps, attack.norm)
    _check(config.divergence.patience >= 1, f"divergence.patience = {config.divergence.patience}: must be >= 1")
    _check(0 <= config.divergence.chance_margin < 1,
           f"divergence.chance_margin = {config.divergence.chance_margin}: must be in [0, 1)")
    _check(config.seed >= 0, f"seed = {config.seed}: must be >= 0")
    for where, precision in (("train.precision", config.train.precision), ("eval.precision", config.eval.precision)):
        _check(precision is not Precision.FP16 or config.device is not DeviceChoice.CPU,
               f"{where} = fp16: needs a CUDA device (fp16 autocast with a GradScaler); use bf16 on the CPU")
    _check(config.train.precision is not Precision.FP16 or config.sparsity.growth != "momentum",
           "train.precision = fp16: sparsity.growth = momentum would add the gradient of a step the GradScaler "
           "skips (an overflow) to its running average; use bf16 or fp32")
    on = config.train.sparse_kernels is SparseKernelsMode.ON
    _check(not on or config.device is not DeviceChoice.CUDA,
           "train.sparse_kernels = on: the CSR kernels run on the CPU; this run is on cuda (use auto or off)")
    _check(not on or config.train.precision is Precision.FP32,
           f"train.sparse_kernels = on: the CSR kernels compute in fp32; train.precision = "
           f"{config.train.precision.value} (use fp32, or sparse_kernels auto/off)")
    _check(not on or not config.train.compile,
           "train.sparse_kernels = on: torch.compile cannot trace the CSR kernels; set train.compile=false "
           "or sparse_kernels auto/off")
    _check(bool(config.out_dir.strip()), "out_dir: must not be empty")
    _check(bool(config.data.root.strip()), "data.root: must not be empty (a folder, e.g. data)")
    _integer_ranges(config)
    if machine:
        _batch_memory(data)
    _check(0 < config.probe.perturbation < float("inf"),
           f"probe.perturbation = {config.probe.perturbation}: must be a finite number > 0 (a fraction of each "
           "layer's active-weight RMS, e.g. 0.01)")
    mvr = optim.optimizer is OptimizerName.MVR
    _check(not mvr or config.train.precision is not Precision.FP16,
           "optim.optimizer = mvr: its gradient at the previous weights would carry fp16's loss scale past the "
           "GradScaler; use train.precision = bf16 or fp32")
    _check(not mvr or not optim.nesterov, "optim.nesterov: not used by optim.optimizer = mvr (leave it false)")
    _validate_sparsity(config.sparsity)
    _validate_agent(config.agent)


def _validate_agent(agent: AgentConfig) -> None:
    _check(0 <= agent.gamma <= 1, f"agent.gamma = {agent.gamma}: must be in [0, 1]")
    _check(0 < agent.alpha <= 1, f"agent.alpha = {agent.alpha}: must be in (0, 1]")
    _check(0 <= agent.fixed_c <= 1, f"agent.fixed_c = {agent.fixed_c}: must be in [0, 1]")
    _check(agent.snapshot_every >= 1, f"agent.snapshot_every = {agent.snapshot_every}: must be >= 1")
    _check(agent.full_grad_batches >= 0, f"agent.full_grad_batches = {agent.full_grad_batches}: must be >= 0 "
           "(0 = the whole training split)")
    _check(agent.estimator is not AgentEstimator.PAPER or agent.full_grad_batches != 1,
           "agent.full_grad_batches = 1: the paper estimator's covariance needs at least 2 batches (or 0 = all)")
    _check(agent.probe_chunks == 0 or agent.probe_chunks >= 2,
           f"agent.probe_chunks = {agent.probe_chunks}: must be 0 (off) or >= 2")
    _check(agent.variant is not AgentVariant.NO_GAMMA or agent.estimator is not AgentEstimator.FIXED,
           "agent.variant = no_gamma: keeps the adaptive c_t, but agent.estimator = fixed; use estimator paper or "
           "official (or variant fixed_c for a constant weight)")


def _validate_sparsity(sparsity: SparsityConfig) -> None:
    """The rules every method shares; then the method's own, from its record (sparse/methods.py)."""
    methods = sparse_methods()
    method = sparsity.method
    if method != "none" and method not in methods:
        plugins.import_from_environment()  # a sweep's run, or $ROBUST_SPARSE_PLUGINS set by hand
    known = ["none", *methods.names()]
    _check(method in known, f"sparsity.method: {method!r} is not one of {', '.join(known)} (or a name registered "
           "with robust_sparse.register_sparsity_method)")
    owners = distribution_owners()
    _check(sparsity.distribution is None or sparsity.distribution in owners,
           f"sparsity.distribution: {sparsity.distribution!r} is not one of {', '.join(owners)}")
    if method == "none":
        return
    record = methods.get(method)
    _check(record.ignores_density is None or sparsity.density == SparsityConfig.density,
           f"sparsity.density = {sparsity.density}: not used by sparsity.method = {method} "
           f"({record.ignores_density}); leave it out")
    _check(0 < sparsity.density <= 1, f"sparsity.density = {sparsity.density}: must be in (0, 1]")
    _check(sparsity.update_every is None or sparsity.update_every >= 1,
           f"sparsity.update_every = {sparsity.update_every}: must be >= 1")
    _check(sparsity.prune_rate is None or 0 < sparsity.prune_rate < 1,
           f"sparsity.prune_rate = {sparsity.prune_rate}: must be in (0, 1)")
    _check(0 < sparsity.end_fraction <= 1, f"sparsity.end_fraction = {sparsity.end_fraction}: must be in (0, 1]")
    owner = owners.get(sparsity.distribution)
    if owner is not None:
        why = owner.distributions[sparsity.distribution]  # None: any method may use it
        _check(why is None or owner is record,
               f"sparsity.distribution = {sparsity.distribution}: only for sparsity.method = {owner.name} ({why})")
    if record.validate is not None:
        record.validate(sparsity)
