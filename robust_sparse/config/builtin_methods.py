"""The built-in sparse methods' settings: each one's section (``sparsity.<name>.*``), rules and defaults.

The methods themselves (masks, engines, allocations) are in robust_sparse/sparse/, one file each, registered
under the same names; robust_sparse/config/sparsity.py says why their settings live here. Declared in the order
of those files, which is the order ``to_dict`` writes the sections in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from robust_sparse.config.sparsity import Growth, MethodSettings, PruneSchedule, PruneScope, SparsityConfig, declare
from robust_sparse.config.validation import MAX_BATCH, check_range
from robust_sparse.errors import ConfigError

# ---- AST (sparse/ast.py) --------------------------------------------------------------------------------


class ASTPruneFrom(str, Enum):
    SUBNET = "subnet"  # the cubic pruning's |W| threshold among the sub-net's own active weights
    SHARED = "shared"  # the official code: over every position of the shared tensor


@dataclass
class ASTConfig:
    """``sparsity.ast.*``; AST also uses update_every = delta T in each sub-net's own steps, prune_rate = the
    initial regrowth fraction, end_fraction and prune_scope. Its sub-nets' densities are ``densities``:
    ``sparsity.density`` is not used."""

    densities: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.02])  # sub-net targets, densest first
    init_density: float = 1.0  # every sub-net starts from this (ERK) density: 1.0 = dense, as the official recipe
    offset: int | None = None  # sub-net k's rewiring is delayed by k * offset of its own steps; None = delta T / K
    gc: bool = True  # gradient correction (projection on conflict with the previous sub-net's running gradient)
    gc_beta: float = 0.9  # momentum of each sub-net's running gradient
    nested: bool = False  # enforce mask_k within mask_{k-1} (not in the official code)
    subnet_bn: bool = False  # BatchNorm running statistics per sub-net (the official code shares them)
    # where the cubic pruning's |W| threshold is taken (shared: so other sub-nets' weights can enter M_k)
    prune_from: ASTPruneFrom = ASTPruneFrom.SUBNET


def validate_ast(sparsity: SparsityConfig) -> None:
    ast = sparsity.section("ast")
    densities = ast.densities
    rules = (
        (len(densities) >= 1, "sparsity.ast.densities: give at least one sub-net density"),
        (all(0 < d <= 1 for d in densities), f"sparsity.ast.densities = {densities}: each must be in (0, 1]"),
        (densities == sorted(densities, reverse=True),
         f"sparsity.ast.densities = {densities}: list the sub-nets densest first"),
        (not densities or densities[0] <= ast.init_density <= 1,
         f"sparsity.ast.init_density = {ast.init_density}: must be in [{densities[0] if densities else 0}, 1] "
         "(pruning only removes connections)"),
        (ast.offset is None or ast.offset >= 0, f"sparsity.ast.offset = {ast.offset}: must be >= 0"),
        (0 <= ast.gc_beta < 1, f"sparsity.ast.gc_beta = {ast.gc_beta}: must be in [0, 1)"),
    )
    for holds, message in rules:
        if not holds:
            raise ConfigError(message)


# ---- BSR-Net (sparse/bsrnet.py) -------------------------------------------------------------------------


@dataclass
class BSRNetConfig:
    """``sparsity.bsrnet.*``: BSR-Net's rewiring."""

    noise_scale: float = 1e-6  # Langevin noise std = lr * noise_scale (the official --noise_scaling)
    temperature: float | None = None  # if set, noise std = sqrt(2 * lr * T) instead (DEEP R's form)
    l1: float = 0.0  # DEEP R's prior alpha: theta -= lr * l1 on active connections; 0 as in the official code
    regrow_value: float = 1e-12  # theta of a regrown connection


def validate_bsrnet(sparsity: SparsityConfig) -> None:
    section = sparsity.section("bsrnet")
    for name, value, rule in (("noise_scale", section.noise_scale, ">= 0"),
                              ("temperature", section.temperature, ">= 0"), ("l1", section.l1, ">= 0"),
                              ("regrow_value", section.regrow_value, "> 0")):
        if value is not None and not (value > 0 if rule == "> 0" else value >= 0):
            raise ConfigError(f"sparsity.bsrnet.{name} = {value}: must be {rule}")


# ---- gradual magnitude pruning (sparse/gmp.py) -----------------------------------------------------------


@dataclass
class GMPConfig:
    """``sparsity.gmp.*``; GMP also uses update_every (the paper's Δt), end_fraction (where the final density is
    reached) and prune_scope."""

    start_fraction: float = 0.0  # t0: pruning starts after this fraction of training
    initial_density: float = 1.0  # d_i: 1.0 = dense, as in the paper


def validate_gmp(sparsity: SparsityConfig) -> None:
    section = sparsity.section("gmp")
    if not 0 <= section.start_fraction < sparsity.end_fraction:
        raise ConfigError(f"sparsity.gmp.start_fraction = {section.start_fraction}: must be in [0, "
                          f"sparsity.end_fraction = {sparsity.end_fraction})")
    if not sparsity.density <= section.initial_density <= 1:
        raise ConfigError(f"sparsity.gmp.initial_density = {section.initial_density}: must be in "
                          f"[sparsity.density = {sparsity.density}, 1] (pruning only removes connections)")


# ---- GSE (sparse/gse.py) --------------------------------------------------------------------------------


class GSESampler(str, Enum):
    UNIFORM = "uniform"
    GRABO = "grabo"  # output-gradient x input marginals


@dataclass
class GSEConfig:
    """``sparsity.gse.*``; GSE also uses update_every, prune_rate = alpha0 and end_fraction, with a cosine
    schedule and GSE's Erdős–Rényi allocation."""

    sampler: GSESampler = GSESampler.GRABO  # the candidates' distribution
    candidate_multiple: float = 1.0  # the paper's gamma: candidates sampled per layer, times its active count
    samples_per_class: int = 10  # size of the class-balanced batch that scores the candidates
    # "layerwise": each layer grows and prunes its own alpha_t share (its count is fixed); "global" (the official
    # code's default scope): one |g| ranking for growth and one |W| ranking for pruning across all layers
    scope: PruneScope = PruneScope.LAYERWISE


def validate_gse(sparsity: SparsityConfig) -> None:
    section = sparsity.section("gse")
    if not section.candidate_multiple > 0:
        raise ConfigError(f"sparsity.gse.candidate_multiple = {section.candidate_multiple}: must be > 0")
    check_range("sparsity.gse.samples_per_class", section.samples_per_class, 1, MAX_BATCH)


# ---- magnitude pruning of a trained dense model (sparse/static.py) ---------------------------------------


@dataclass
class MagnitudePruneConfig:
    """``sparsity.magnitude_prune.*``."""

    dense_checkpoint: str = ""  # a robust-sparse checkpoint of the trained dense model


def validate_magnitude_prune(sparsity: SparsityConfig) -> None:
    if not sparsity.section("magnitude_prune").dense_checkpoint:
        raise ConfigError("sparsity.magnitude_prune.dense_checkpoint: magnitude_prune needs the trained dense "
                          "model's checkpoint")


# ---- the declarations, in the order of the method files --------------------------------------------------

declare(MethodSettings("ast", ASTConfig, validate_ast, defaults={"prune_rate": 0.5},
                       ignores_density="its sub-nets' densities are sparsity.ast.densities"))
# tfa SGDW, as the official code: decay decoupled from the gradient and not scaled by lr (robust_sparse/optim.py)
declare(MethodSettings("bsrnet", BSRNetConfig, validate_bsrnet, defaults={"distribution": "bsrnet"},
                       optimizer="sgdw", distributions={"bsrnet": "it sets initial densities"}))
declare(MethodSettings("gmp", GMPConfig, validate_gmp, defaults={"update_every": 100}))
declare(MethodSettings("gse", GSEConfig, validate_gse,
                       defaults={"update_every": 1000, "prune_rate": 0.2, "distribution": "gse_er"},
                       distributions={"gse_er": None}))
# SET, RigL and ITOP (sparse/prune_regrow.py): one engine, the papers' and their code's settings (docs/papers.md)
declare(MethodSettings("set", defaults={"growth": Growth.RANDOM, "prune_rate": 0.3,
                                        "prune_schedule": PruneSchedule.CONSTANT, "update_every": 100}))
declare(MethodSettings("rigl", defaults={"growth": Growth.GRADIENT, "prune_rate": 0.3,
                                         "prune_schedule": PruneSchedule.COSINE, "update_every": 100}))
declare(MethodSettings("itop", defaults={"growth": Growth.RANDOM, "prune_rate": 0.5,
                                         "prune_schedule": PruneSchedule.COSINE, "update_every": 1500}))
declare(MethodSettings("static"))
declare(MethodSettings("magnitude_prune", MagnitudePruneConfig, validate_magnitude_prune))
