"""Topology engines: what happens to the masks after an optimizer step.

An engine sees the masker after every step and returns whether it changed any mask. Engines keep their
own state (random generator, BSR-Net's signs, SNFS's gradient momentum) and round-trip it through
``state_dict`` so that a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from robust_sparse import distributed
from robust_sparse.sparse.strategies import GrowFn, PruneFn, random_grow

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker


class Engine:
    """Static sparsity: the masks never change."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def wants_dense_grad(self, step: int) -> bool:
        """Should the gradient hooks show the engine the dense gradient of the backward before ``step``?"""
        return False

    def observe_dense_grad(self, name: str, grad: torch.Tensor) -> None:
        pass

    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


@torch.no_grad()
def _reset_optimizer_entries(masker: "SparseMasker", name: str, positions: torch.Tensor) -> None:
    param = masker.params[name]
    for value in masker.optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(positions, 0)


class PruneGrowEngine(Engine):
    """SET, RigL and ITOP: every ``update_every`` steps until ``end_step``, each layer drops a fraction of its
    active weights by ``prune`` and grows as many by ``grow``; grown weights and their optimizer state start
    at zero, so the layer's count of connections never changes.

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
            new_positions = grown_mask & ~kept
            param.masked_fill_(new_positions, 0.0)  # grown connections start at zero (RigL, SET-ITOP)
            _reset_optimizer_entries(masker, name, new_positions)
            masker.masks[name] = grown_mask
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


class BSRNetEngine(Engine):
    """Bayesian connectivity sampling (Özdenizci & Legenstein, ICML 2021), as its official code runs it.

    The official code trains a magnitude ``theta`` with a fixed random sign per position and uses
    ``W = sign * theta`` where ``theta > 0``. Because the sign is fixed, a gradient, momentum or decay step on
    theta is the same step on W, so we train W directly and read ``theta = sign * W``. After each optimizer step:

    1. an L1 prior (DEEP R's alpha; off by default, as in the official code) and Langevin noise
       ``std = lr * noise_scale`` (or ``sqrt(2 * lr * temperature)``) move the connections that were active
       before the step;
    2. a connection whose theta is no longer positive is pruned (zero crossing);
    3. the deficit to the global budget K is regrown at random: counts drawn multinomially with layer
       shares proportional to layer size, positions uniform among the layer's dormant ones (those pruned this
       step included), new theta = ``regrow_value`` (1e-12) with the position's fixed sign.

    Fixed official bug: a layer asked to regrow more than it has dormant crashed the TF code; here the excess
    is redrawn over the layers that still have room. Deviation: momentum of regrown positions is zero (the
    official code leaves it, and it is almost always zero there anyway).
    """

    def __init__(self, *, signs: dict[str, torch.Tensor], budget: int, noise_scale: float,
                 temperature: float | None, l1: float, regrow_value: float, generator: torch.Generator,
                 count_generator: torch.Generator) -> None:
        super().__init__(generator)
        # Layer counts are drawn on the CPU (a multinomial over a few layer sizes); positions and noise on the
        # parameters' device. Two generators, both seeded and saved.
        self.count_generator = count_generator
        self.signs, self.budget = signs, budget
        self.noise_scale, self.temperature, self.l1, self.regrow_value = noise_scale, temperature, l1, regrow_value

    def noise_std(self, lr: float) -> float:
        if self.temperature is not None:
            return math.sqrt(2 * lr * self.temperature)
        return lr * self.noise_scale

    @torch.no_grad()
    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        lr = masker.optimizer.param_groups[0]["lr"]  # the rate this step used: schedulers step afterwards
        std = self.noise_std(lr)
        for name, param in masker.params.items():
            sign, mask = self.signs[name], masker.masks[name]
            if self.l1:
                param.sub_(sign * (lr * self.l1) * mask)
            if std:
                noise = torch.randn(param.shape, generator=self.generator, device=self.generator.device)
                param.add_(sign * std * noise.to(param.device) * mask)
            masker.masks[name] = mask & (sign * param > 0)
        self.regrow(masker)
        return True

    @torch.no_grad()
    def regrow(self, masker: "SparseMasker") -> None:
        names = list(masker.params)
        for name, count in zip(names, self.regrowth_counts(masker, names)):
            if count:
                mask = masker.masks[name]
                grown = random_grow(mask, count, None, self.generator)
                new_positions = grown & ~mask
                param = masker.params[name]  # where, not boolean indexing: that reads the positions back
                param.copy_(torch.where(new_positions, self.signs[name] * self.regrow_value, param))
                _reset_optimizer_entries(masker, name, new_positions)
                masker.masks[name] = grown

    @torch.no_grad()
    def regrowth_counts(self, masker: "SparseMasker", names: list[str]) -> list[int]:
        """Connections each layer regrows, drawn on the CPU from the layers' dormant counts: reading those back
        (once, for all layers) is the one host sync of a BSR-Net step."""
        sizes = torch.tensor([masker.masks[n].numel() for n in names], dtype=torch.float64)
        room = torch.stack([(~masker.masks[n]).sum() for n in names]).cpu()
        deficit = self.budget - int(sizes.sum().item() - room.sum().item())
        grant = torch.zeros(len(names), dtype=torch.int64)
        while deficit > 0 and bool((room > grant).any()):
            weights = torch.where(room > grant, sizes, torch.zeros_like(sizes))
            draws = torch.multinomial(weights, deficit, replacement=True, generator=self.count_generator)
            wanted = grant + torch.bincount(draws, minlength=len(names))
            granted = torch.minimum(wanted, room)
            deficit -= int((granted - grant).sum())
            grant = granted
        return grant.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "count_generator": self.count_generator.get_state(),
                "signs": {n: s.clone() for n, s in self.signs.items()}, "budget": self.budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.count_generator.set_state(state["count_generator"])
        self.signs = {n: s.to(self.signs[n].device) for n, s in state["signs"].items()}
        self.budget = int(state["budget"])
