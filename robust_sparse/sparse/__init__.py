"""Sparse training: one mask owner, pluggable topology engines, layer-wise density allocation.

:func:`build_sparsity` turns a config into a :class:`SparseMasker` attached to a model and its optimizer
(or None for dense training). Per-method defaults (anchors.md §D, bsrnet_spec.md):

========  ==========  =========  ==============  =============  ==========
method    growth      prune rate schedule        update every   init
========  ==========  =========  ==============  =============  ==========
set       random      0.3        constant        100            erk
rigl      gradient    0.3        cosine          100            erk
itop      random      0.5        cosine          1500           erk
bsrnet    random      (every step, zero crossing, global budget)  bsrnet
gse       |g| on      0.2        cosine          1000           gse_er
          candidates
ast       |g|         0.5        cosine (per     999 // K of a  erk at
                                 sub-net)        sub-net's own  ast_init_density
static    (never)                                               erk
========  ==========  =========  ==============  =============  ==========
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_sparse.config import Distribution, PruneScope, SparsityConfig, SparsityMethod
from robust_sparse.errors import ConfigError
from robust_sparse.sparse import density as allocation
from robust_sparse.sparse.engines import BSRNetEngine, Engine, PruneGrowEngine
from robust_sparse.sparse.masker import SparseMasker, sparsifiable
from robust_sparse.sparse.strategies import GROW, PRUNE

__all__ = ["SparseMasker", "build_sparsity", "sparsifiable", "METHOD_DEFAULTS"]

# growth, prune rate, schedule, update every
METHOD_DEFAULTS = {
    SparsityMethod.SET: ("random", 0.3, "constant", 100),
    SparsityMethod.RIGL: ("gradient", 0.3, "cosine", 100),
    SparsityMethod.ITOP: ("random", 0.5, "cosine", 1500),
}


def random_masks(shapes: dict[str, torch.Size], densities: dict[str, float], generator: torch.Generator,
                 device: torch.device, rounding=round) -> dict[str, torch.Tensor]:
    """Exactly ``rounding(density * numel)`` active positions per layer, uniformly at random."""
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        keep = min(numel, max(1, rounding(densities[name] * numel)))
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[:keep]] = True
        masks[name] = flat.view(shape).to(device)
    return masks


def magnitude_masks(params: dict[str, nn.Parameter], density: float, scope: PruneScope) -> dict[str, torch.Tensor]:
    """Keep the largest-magnitude weights: ``density`` of all of them (global) or of each layer."""
    if scope is PruneScope.LAYERWISE:
        return {name: _top_fraction(p.detach().abs(), density) for name, p in params.items()}
    scores = torch.cat([p.detach().abs().flatten() for p in params.values()])
    keep = max(1, round(density * scores.numel()))
    threshold_index = torch.topk(scores, keep, sorted=False).indices
    flat = torch.zeros_like(scores, dtype=torch.bool)
    flat[threshold_index] = True
    masks, offset = {}, 0
    for name, p in params.items():
        masks[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return masks


def _top_fraction(scores: torch.Tensor, density: float) -> torch.Tensor:
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores.flatten(), max(1, round(density * scores.numel())), sorted=False).indices] = True
    return flat.view_as(scores)


def _bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm layer, by buffer name."""
    return {name: buffer for name, buffer in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@torch.no_grad()
def _bsrnet_reinit(params: dict[str, nn.Parameter], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """BSR-Net's init: theta = |truncated He normal| (TF ``he_normal``: std sqrt(2/fan_in)/0.8796, cut at 2
    std), a fixed random sign per position; returns the signs. W = sign * theta is a plain truncated
    He normal draw, so we draw W and read the sign off it."""
    signs = {}
    for name, param in params.items():
        fan_in = param[0].numel()
        std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
        draw = nn.init.trunc_normal_(torch.empty(param.shape), 0.0, std, -2 * std, 2 * std, generator=generator)
        param.copy_(draw.to(param.device))
        signs[name] = torch.where(draw >= 0, 1.0, -1.0).to(param.device, param.dtype)
    return signs


def build_sparsity(config: SparsityConfig, model: nn.Module, model_name: str, optimizer: torch.optim.Optimizer,
                   total_steps: int, seed: int, *, score_batch=None) -> SparseMasker | None:
    """Attach the configured sparse training to ``model``/``optimizer``; None for dense training.

    ``score_batch`` (GSE only, required there): a callable returning the (images, labels) batch, on the
    model's device and already adversarial under AT, on which GSE scores its candidate connections.
    """
    method = config.method
    if method is SparsityMethod.NONE:
        return None
    params = sparsifiable(model, config.include_first, config.include_last)
    if not params:
        raise ConfigError(f"sparsity.method = {method.value}: model {model_name!r} has no sparsifiable "
                          "(conv or linear) layer")
    device = next(iter(params.values())).device
    generator = torch.Generator().manual_seed(seed + 7919)  # the initial topology
    engine_generator = torch.Generator(device=device).manual_seed(seed + 104729)
    shapes = {name: p.shape for name, p in params.items()}
    distribution = config.distribution or (Distribution.BSRNET if method is SparsityMethod.BSRNET else Distribution.ERK)

    if method is SparsityMethod.MAGNITUDE_PRUNE:
        from robust_sparse.checkpoint import load_checkpoint

        dense = load_checkpoint(config.dense_checkpoint, map_location=device)
        try:
            model.load_state_dict(dense["model"])
        except RuntimeError as error:
            raise ConfigError(f"sparsity.dense_checkpoint: weights do not fit {model_name}: "
                              f"{str(error).splitlines()[0]}") from None
        return SparseMasker(params, optimizer, magnitude_masks(params, config.density, config.prune_scope),
                            Engine())

    if method is SparsityMethod.AST:
        from robust_sparse.sparse.ast import AlternatingMasker, ASTSchedule

        count = len(config.ast_densities)
        update_every = config.update_every or max(1, 999 // count)  # the official 999 iterations, in a sub-net's
        schedule = ASTSchedule(
            config.ast_densities, config.ast_init_density, total_steps, update_every,
            offset=config.ast_offset if config.ast_offset is not None else update_every // count,
            end_fraction=config.end_fraction, prune_rate=config.prune_rate or 0.5)
        allocate = allocation.uniform if distribution is Distribution.UNIFORM else allocation.erk
        init = allocate(shapes, config.ast_init_density)
        layerwise = config.prune_scope is PruneScope.LAYERWISE
        return AlternatingMasker(params, optimizer, random_masks(shapes, init, generator, device), schedule,
                                 gc=config.ast_gc, gc_beta=config.ast_gc_beta, nested=config.ast_nested,
                                 bn_buffers=_bn_statistics(model) if config.ast_subnet_bn else None,
                                 prune_from=config.ast_prune_from,
                                 layer_densities=(lambda density: allocate(shapes, density)) if layerwise else None)

    if method is SparsityMethod.GSE and config.distribution is None:
        densities = allocation.gse_er(shapes, config.density)
    elif distribution is Distribution.BSRNET:
        densities = allocation.bsrnet_initial(model_name, shapes, config.density)
    elif distribution is Distribution.UNIFORM:
        densities = allocation.uniform(shapes, config.density)
    else:
        densities = allocation.erk(shapes, config.density)

    if method is SparsityMethod.BSRNET:
        signs = _bsrnet_reinit(params, generator)
        masks = random_masks(shapes, densities, generator, device, rounding=int)  # int(p * n), as the code does
        budget = int(config.density * sum(math.prod(s) for s in shapes.values()))
        engine: Engine = BSRNetEngine(
            signs=signs, budget=budget, noise_scale=config.noise_scale, temperature=config.temperature,
            l1=config.l1, regrow_value=config.regrow_value, generator=engine_generator,
            count_generator=torch.Generator().manual_seed(seed + 1299709))
    elif method is SparsityMethod.GSE:
        from robust_sparse.sparse import gse

        if score_batch is None:
            raise ConfigError("sparsity.method = gse: needs a score batch (build_sparsity(..., score_batch=...))")
        modules = gse.modules_of(model, list(params))
        unsupported = [name for name, module in modules.items() if not gse.supported(module)]
        if unsupported:
            raise ConfigError(f"sparsity.method = gse: layer {unsupported[0]} is not a Linear or zero-padded "
                              "Conv2d layer")
        engine = gse.GSEEngine(
            model=model, modules=modules, score_batch=score_batch, sampler=config.gse_sampler,
            candidates=config.gse_candidates, update_every=config.update_every or 1000,
            prune_rate=config.prune_rate or 0.2, end_step=max(1, int(config.end_fraction * total_steps)),
            generator=engine_generator, scope=config.gse_scope.value)
        masks = random_masks(shapes, densities, generator, device)
    elif method is SparsityMethod.STATIC:
        masks, engine = random_masks(shapes, densities, generator, device), Engine()
    else:
        growth, prune_rate, schedule, update_every = METHOD_DEFAULTS[method]
        growth = config.growth or growth
        engine = PruneGrowEngine(
            prune=PRUNE.get("magnitude"), grow=GROW.get(growth), grow_score=None if growth == "random" else growth,
            update_every=config.update_every or update_every, prune_rate=config.prune_rate or prune_rate,
            cosine=(config.prune_schedule or schedule) == "cosine",
            end_step=max(1, int(config.end_fraction * total_steps)), generator=engine_generator)
        masks = random_masks(shapes, densities, generator, device)
    return SparseMasker(params, optimizer, masks, engine)
