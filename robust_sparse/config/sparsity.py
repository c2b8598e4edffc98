"""The sparsity section of the run configuration: the method, its budget and topology updates, and each
method's own settings in its section (``sparsity.bsrnet.*``, ``sparsity.gse.*``, ``sparsity.ast.*``,
``sparsity.magnitude_prune.*``); the flat names of the first versions map onto them (parsing.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


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
REGISTERED_SPARSITY_METHODS: dict[str, str] = {}  # name -> the module that registered it

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
