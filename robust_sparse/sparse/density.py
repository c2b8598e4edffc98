"""Layer-wise density allocation: uniform, ERK, GSE's Erdős–Rényi, and BSR-Net's per-architecture initial densities.

Every function maps ``{layer name: shape}`` to ``{layer name: density}`` so that the total number of
active connections is (up to rounding) ``density * total``, except BSR-Net's, which sets *initial*
densities only, at most the budget: its global budget K is held by rewiring from the first step on.
"""

from __future__ import annotations

import math
from typing import Callable

from robust_sparse.errors import ConfigError

Shapes = dict[str, tuple[int, ...]]


def uniform(shapes: Shapes, density: float, dense_layers: frozenset[str] = frozenset()) -> dict[str, float]:
    """The same density everywhere, with ``dense_layers`` kept dense and the budget spread over the rest."""
    total = sum(math.prod(s) for s in shapes.values())
    dense = sum(math.prod(shapes[n]) for n in dense_layers)
    sparse_total = total - dense
    if sparse_total <= 0:
        raise ConfigError("sparsity: every sparsifiable layer is dense; nothing left to sparsify")
    rest = (density * total - dense) / sparse_total
    if rest <= 0:
        raise ConfigError(f"sparsity.density = {density}: smaller than the layers kept dense already use")
    return {name: 1.0 if name in dense_layers else min(1.0, rest) for name in shapes}


def erk(shapes: Shapes, density: float, dense_layers: frozenset[str] = frozenset()) -> dict[str, float]:
    """Erdős–Rényi-Kernel (Evci et al. 2020): density ∝ (sum of dims) / (product of dims).

    Layers whose ERK density would exceed 1 are made dense and the scale is solved again for the rest.
    """
    return _proportional(shapes, density, lambda s: sum(s) / math.prod(s), "ERK", dense_layers)


def _proportional(shapes: Shapes, density: float, score: Callable[[tuple[int, ...]], float], label: str,
                  dense_layers: frozenset[str] = frozenset()) -> dict[str, float]:
    """Layer densities ``scale * score(shape)`` meeting the global ``density``; a layer the scale would push
    above 1 is made dense and the scale is solved again for the others."""
    dense = set(dense_layers)
    while True:
        budget = density * sum(math.prod(s) for s in shapes.values())
        budget -= sum(math.prod(shapes[n]) for n in dense)
        raw = {n: score(s) for n, s in shapes.items() if n not in dense}
        if not raw:
            raise ConfigError(f"sparsity.density = {density}: {label} made every layer dense")
        scale = budget / sum(raw[n] * math.prod(shapes[n]) for n in raw)
        overflowing = {n for n in raw if scale * raw[n] > 1}
        if not overflowing:
            break
        dense |= overflowing
    return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}


def bsrnet_initial(model_name: str, shapes: Shapes, density: float) -> dict[str, float]:
    """BSR-Net's hand-set initial densities (bsrnet_spec.md §1.2), p being the global density.

    VGG-16: conv1-2 0.6, conv3-4 0.2, the rest 0.5p, classifier 0.6. ResNet: stem 0.6, every conv of the
    first (64-channel) stage 0.2, later stages 0.5p, classifier 0.6. WRN: stem 0.6, first group 0.1, later
    groups 0.5p, classifier 0.6. Other models: first and last layer 0.6, the rest 0.5p.

    Where the hand-set layers hold most of the weights (small models, very low p) these densities exceed the
    budget ``p * total``, which rewiring only tops up and never cuts: then every density is scaled down by the
    same factor so that the initial count is the budget.
    """
    names = list(shapes)
    rule = _BSRNET_RULES.get(model_name.split("_")[0].rstrip("0123456789"), _bsrnet_generic)
    densities = rule(names, density)
    densities[names[0]] = densities[names[-1]] = 0.6
    densities = {n: min(1.0, d) for n, d in densities.items()}
    budget = density * sum(math.prod(s) for s in shapes.values())
    active = sum(densities[n] * math.prod(s) for n, s in shapes.items())
    scale = min(1.0, budget / active)
    return {n: d * scale for n, d in densities.items()}


def _bsrnet_generic(names: list[str], p: float) -> dict[str, float]:
    return {n: 0.5 * p for n in names}


def _bsrnet_vgg(names: list[str], p: float) -> dict[str, float]:
    return {n: 0.6 if i < 2 else 0.2 if i < 4 else 0.5 * p for i, n in enumerate(names)}


def _first_stage_rule(stage_density: float) -> Callable[[list[str], float], dict[str, float]]:
    def rule(names: list[str], p: float) -> dict[str, float]:
        # The first stage/group is the first residual container in registration order ("layer1.",
        # "block1.", ...): whatever follows the stem and precedes the second container.
        first_container = names[1].split(".")[0] if len(names) > 2 else None
        return {n: stage_density if first_container and n.split(".")[0] == first_container else 0.5 * p
                for n in names}

    return rule


_BSRNET_RULES = {
    "vgg": _bsrnet_vgg,
    "resnet": _first_stage_rule(0.2),
    "preact": _first_stage_rule(0.2),
    "wrn": _first_stage_rule(0.1),
}


def gse_er(shapes: Shapes, density: float) -> dict[str, float]:
    """GSE's Erdős–Rényi (Heddes et al. 2024; not ERK): density ∝ (fan_in + fan_out) / (fan_in * fan_out), with
    fan_in = C_in * k_h * k_w and fan_out = C_out, clipped to 1.

    The scale is solved so that the global density is ``density``; layers the clip makes dense are taken
    out and the scale is solved again for the rest (the official code clips without re-solving, so it falls
    short of the budget whenever a layer is clipped).
    """
    def fans(shape: tuple[int, ...]) -> float:
        fan_out, fan_in = shape[0], math.prod(shape[1:])
        return (fan_in + fan_out) / (fan_in * fan_out)

    return _proportional(shapes, density, fans, "GSE's Erdős–Rényi")
