"""Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune", 2017): from a dense (or
``gmp.initial_density``) start, prune the smallest-magnitude weights every ``update_every`` steps so that the
density follows the cubic schedule

    d_t = d_f + (d_i - d_f) (1 - (t - t0) / (t_end - t0))^3    for t0 <= t <= t_end,

the paper's ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3`` written in densities (d = 1 - s): ``d_i`` is
``gmp.initial_density``, ``d_f`` is ``sparsity.density``, ``t0`` is ``gmp.start_fraction`` of training and
``t_end = t0 + n Δt`` the last update step at or before ``sparsity.end_fraction`` of it. Pruned connections never
come back; after ``t_end`` the mask is fixed and training fine-tunes the pruned network. ``prune_scope: global``
(the default) takes one |W| threshold over all layers, ``layerwise`` prunes each layer to ``d_t`` as the paper
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from robust_sparse.config import PruneScope
from robust_sparse.errors import ConfigError
from robust_sparse.sparse.masker import Engine
from robust_sparse.sparse.methods import Setup, SparseMethod, register
from robust_sparse.sparse.strategies import set_top

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker


@dataclass(frozen=True)
class GMPSchedule:
    """When to prune (every ``every`` steps from ``start`` to ``stop``) and to what density."""

    start: int  # t0
    stop: int  # t_end = t0 + n * every, the last update step
    every: int  # Δt
    initial: float  # d_i
    final: float  # d_f

    @classmethod
    def over(cls, total_steps: int, start_fraction: float, end_step: int, every: int, initial: float,
             final: float) -> "GMPSchedule":
        start = int(start_fraction * total_steps)
        if start + every > end_step:
            raise ConfigError(f"sparsity.update_every = {every}: gradual magnitude pruning would never prune (it "
                              f"starts at step {start}, its last step is {end_step}); lower update_every or "
                              "sparsity.gmp.start_fraction, or raise sparsity.end_fraction")
        return cls(start, start + (end_step - start) // every * every, every, initial, final)

    def is_update_step(self, step: int) -> bool:
        return self.start < step <= self.stop and (step - self.start) % self.every == 0

    def density(self, step: int) -> float:
        progress = min(1.0, max(0.0, (step - self.start) / (self.stop - self.start)))
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3


def keep_largest(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], density: float,
                 scope: PruneScope) -> dict[str, torch.Tensor]:
    """The masks with only the largest-|W| active weights left: ``round(density * numel)`` of each layer
    (layerwise), or of all layers together under one threshold (global). Never activates a position."""
    groups = [[name] for name in masks] if scope is PruneScope.LAYERWISE else [list(masks)]
    kept = {}
    for names in groups:
        flat_mask = torch.cat([masks[n].flatten() for n in names])
        scores = torch.cat([weights[n].detach().abs().flatten() for n in names])
        target = max(1, round(density * flat_mask.numel()))
        chosen = set_top(torch.zeros_like(flat_mask), torch.where(flat_mask, scores, -torch.inf),
                         min(target, int(flat_mask.sum())), True)
        offset = 0
        for name in names:
            kept[name] = chosen[offset:offset + masks[name].numel()].view_as(masks[name])
            offset += masks[name].numel()
    return kept


class GMPEngine(Engine):
    """Prunes on the schedule's update steps; deterministic given the weights, so it keeps no state."""

    def __init__(self, schedule: GMPSchedule, scope: PruneScope) -> None:
        super().__init__()
        self.schedule, self.scope = schedule, scope

    @torch.no_grad()
    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        if not self.schedule.is_update_step(step):
            return False
        kept = keep_largest(masker.params, masker.masks, self.schedule.density(step), self.scope)
        for name, mask in kept.items():
            masker.set_mask(name, mask)
        return True

    def at_target_density(self, masker: "SparseMasker") -> bool:
        return masker.step >= self.schedule.stop


def build(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    config, section = setup.config, setup.section
    schedule = GMPSchedule.over(setup.total_steps, section.start_fraction, setup.end_step,
                                setup.setting("update_every"), section.initial_density, config.density)
    return setup.random_masks(setup.densities(section.initial_density)), GMPEngine(schedule, config.prune_scope)


# its settings (section, rules, defaults): robust_sparse/config/builtin_methods.py
register(SparseMethod("gmp", build))

