"""SET, RigL and ITOP: one prune-and-regrow engine, the three methods being its registered defaults.

* SET (Mocanu et al. 2018): magnitude death, random growth, a constant drop fraction;
* RigL (Evci et al. 2020): magnitude death, growth by dense-gradient magnitude, cosine drop fraction;
* ITOP (Liu et al. 2021): SET's updates at a slower pace and a larger fraction, for in-time
  over-parameterisation (the exploration rate).

``sparsity.growth = momentum`` with any of them is SNFS's growth criterion. Every field left at None in the
config takes the method's default (the papers' and their code's; docs/papers.md), declared with its settings in
robust_sparse/config/builtin_methods.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from robust_sparse import distributed
from robust_sparse.config import PruneSchedule
from robust_sparse.sparse.masker import Engine
from robust_sparse.sparse.methods import Setup, SparseMethod, register
from robust_sparse.sparse.strategies import GROW, PRUNE, GrowFn, PruneFn

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker


class PruneGrowEngine(Engine):
    """Every ``update_every`` steps until ``end_step``, each layer drops a fraction of its active weights by
    ``prune`` and grows as many by ``grow``; grown weights and their optimizer state start at zero, so the
    layer's count of connections never changes.

    The fraction is ``prune_rate`` (constant) or ``prune_rate/2 * (1 + cos(pi * step / end_step))`` (cosine).
    """

    def __init__(self, *, prune: PruneFn, grow: GrowFn, grow_score: str | None, update_every: int,
                 prune_rate: float, cosine: bool, end_step: int, generator: torch.Generator,
                 momentum: float = 0.9) -> None:
        super().__init__(generator)
        self.prune, self.grow, self.grow_score = prune, grow, grow_score
        self.update_every, self.prune_rate, self.cosine, self.end_step = update_every, prune_rate, cosine, end_step
        self.momentum = momentum
        self.scores: dict[str, torch.Tensor] = {}

    def is_update_step(self, step: int) -> bool:
        return step % self.update_every == 0 and step <= self.end_step

    def rate(self, step: int) -> float:
        if not self.cosine:
            return self.prune_rate
        return self.prune_rate / 2 * (1 + math.cos(math.pi * min(step, self.end_step) / self.end_step))

    def wants_dense_grad(self, step: int) -> bool:
        if self.grow_score == "momentum":  # a running average of dense gradients needs every one of them
            return step <= self.end_step
        return self.grow_score == "gradient" and self.is_update_step(step)

    def observe_dense_grad(self, name: str, grad: torch.Tensor) -> None:
        if self.grow_score == "gradient":
            self.scores[name] = grad.detach().clone()
        elif name in self.scores:
            self.scores[name].mul_(self.momentum).add_(grad.detach())
        else:
            self.scores[name] = grad.detach().clone()

    @torch.no_grad()
    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        if not self.is_update_step(step):
            return False
        rate = self.rate(step)
        distributed.all_reduce_mean(list(self.scores.values()))  # hooks saw this rank's gradient only
        for name, param in masker.params.items():
            mask = masker.masks[name]
            count = int(rate * int(mask.sum()))
            kept = self.prune(param, mask, count)
            grown_mask = self.grow(kept, count, self.scores.get(name), self.generator)
            masker.reset(name, grown_mask & ~kept)  # grown connections start at zero (RigL, SET-ITOP)
            masker.set_mask(name, grown_mask)
        if self.grow_score == "gradient":
            self.scores.clear()
        return True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.grow_score == "momentum":
            state["scores"] = {name: score.clone() for name, score in self.scores.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores = {name: score.clone() for name, score in state.get("scores", {}).items()}


def build(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    growth = setup.setting("growth").value
    engine = PruneGrowEngine(
        prune=PRUNE.get("magnitude"), grow=GROW.get(growth), grow_score=None if growth == "random" else growth,
        update_every=setup.setting("update_every"), prune_rate=setup.setting("prune_rate"),
        cosine=setup.setting("prune_schedule") is PruneSchedule.COSINE, end_step=setup.end_step,
        generator=setup.engine_generator)
    return setup.random_masks(setup.densities()), engine


# each one's published settings (its defaults): robust_sparse/config/builtin_methods.py
for _name in ("set", "rigl", "itop"):
    register(SparseMethod(_name, build))
