"""BSR-Net: Bayesian connectivity sampling (Özdenizci & Legenstein, ICML 2021), as its official code runs it.

Everything BSR-Net in one place: its initialisation (:func:`reinitialise`, :func:`bsrnet_initial` densities),
its engine (:class:`BSRNetEngine`) and how the config builds it (:func:`build`). It trains with the decoupled
SGDW of ``robust_sparse/optim.py`` (``optim.optimizer = sgdw``, set by default for this method), whose decay is
what drives connections across zero; AGENT uses that optimizer too, so it lives there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from robust_sparse.sparse.density import Shapes
from robust_sparse.sparse.masker import Engine
from robust_sparse.sparse.methods import Setup, SparseMethod, register
from robust_sparse.sparse.strategies import random_grow

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker


class BSRNetEngine(Engine):
    """Rewiring after every optimizer step.

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
            masker.set_mask(name, mask & (sign * param > 0))
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
                masker.reset(name, new_positions, weight=False)
                masker.set_mask(name, grown)

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


# ---- initialisation ------------------------------------------------------------------------------------


@torch.no_grad()
def reinitialise(params: dict[str, nn.Parameter], generator: torch.Generator) -> dict[str, torch.Tensor]:
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


def bsrnet_initial(model_name: str, shapes: Shapes, density: float) -> dict[str, float]:
    """BSR-Net's hand-set initial densities (its official code, IGITUGraz/SparseAdversarialTraining), p being the
    global density.

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


# ---- the method ----------------------------------------------------------------------------------------


def build(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    """Signs and weights drawn first, then the initial masks (``int(p * n)`` per layer, as the official code
    rounds), under a global budget of ``int(density * total)`` connections."""
    config, section = setup.config, setup.section
    densities = setup.densities()
    signs = reinitialise(setup.params, setup.generator)
    masks = setup.random_masks(densities, rounding=int)
    budget = int(config.density * sum(math.prod(s) for s in setup.shapes.values()))
    engine = BSRNetEngine(
        signs=signs, budget=budget, noise_scale=section.noise_scale, temperature=section.temperature,
        l1=section.l1, regrow_value=section.regrow_value, generator=setup.engine_generator,
        count_generator=torch.Generator().manual_seed(setup.seed + 1299709))
    return masks, engine


# its settings (section, rules, SGDW pairing): robust_sparse/config/builtin_methods.py
register(SparseMethod("bsrnet", build, allocations={
    "bsrnet": lambda setup, density: bsrnet_initial(setup.model_name, setup.shapes, density)}))
