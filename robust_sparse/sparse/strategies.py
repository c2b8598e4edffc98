"""Prune and grow strategies: small pure functions, registered by name.

Signatures (all tensors of one layer, flattened views are fine):

* prune: ``(weight, mask, count) -> mask`` drops ``count`` active connections;
* grow:  ``(mask, count, score, generator) -> mask`` activates ``count`` dormant connections, where ``score``
  is the layer's dense gradient (``gradient``), momentum (``momentum``) or None (``random``).

Ties are broken by position, so a strategy is a deterministic function of its inputs and the generator.
"""

from __future__ import annotations

from typing import Callable

import torch

from robust_sparse.registry import Registry

PruneFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
GrowFn = Callable[[torch.Tensor, int, "torch.Tensor | None", torch.Generator], torch.Tensor]

PRUNE = Registry[PruneFn]("prune strategy")
GROW = Registry[GrowFn]("grow strategy")


def set_top(mask: torch.Tensor, scores: torch.Tensor, count: int, value: bool) -> torch.Tensor:
    """Set ``mask`` to ``value`` at the ``count`` highest ``scores`` (scores of ineligible places are -inf)."""
    if count <= 0:
        return mask
    flat = mask.clone().view(-1)
    flat[torch.topk(scores.view(-1), count, sorted=False).indices] = value
    return flat.view_as(mask)


@PRUNE.register("magnitude")
def smallest_magnitude(weight: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """Drop the ``count`` active weights of smallest magnitude (SET, RigL, ITOP)."""
    scores = torch.where(mask, -weight.abs(), torch.full_like(weight, -torch.inf))
    return set_top(mask, scores, count, False)


@GROW.register("random")
def random_grow(mask: torch.Tensor, count: int, score: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Activate ``count`` dormant connections uniformly at random (SET, SET-ITOP, BSR-Net)."""
    noise = torch.rand(mask.shape, generator=generator, device=generator.device).to(mask.device)
    return set_top(mask, torch.where(mask, torch.full_like(noise, -torch.inf), noise), count, True)


def _grow_by_magnitude(mask: torch.Tensor, count: int, score: torch.Tensor | None) -> torch.Tensor:
    if score is None:
        raise ValueError("this grow strategy needs a score tensor (dense gradient or momentum)")
    return set_top(mask, torch.where(mask, torch.full_like(score, -torch.inf), score.abs()), count, True)


@GROW.register("gradient")
def gradient_grow(mask, count, score, generator):
    """Activate the dormant connections with the largest dense-gradient magnitude (RigL, RigL-ITOP)."""
    return _grow_by_magnitude(mask, count, score)


@GROW.register("momentum")
def momentum_grow(mask, count, score, generator):
    """Activate the dormant connections with the largest momentum magnitude (SNFS)."""
    return _grow_by_magnitude(mask, count, score)
