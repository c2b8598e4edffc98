"""Layer-wise density allocation shared by the methods: uniform and ERK, and the proportional solver behind
ERK and GSE's Erdős–Rényi (gse.py). BSR-Net's hand-set initial densities live in bsrnet.py.

Every function maps ``{layer name: shape}`` to ``{layer name: density}`` so that the total number of
active connections is (up to rounding) ``density * total``.
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
    return proportional(shapes, density, lambda s: sum(s) / math.prod(s), "ERK", dense_layers)


def proportional(shapes: Shapes, density: float, score: Callable[[tuple[int, ...]], float], label: str,
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
