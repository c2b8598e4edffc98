"""AST: alternating sparse training of K sub-networks that share one weight tensor (Yang et al., NeurIPS 2022).

Sub-net ``k`` is the shared weight ``W`` seen through its own mask ``M_k`` (densities ``d_0 > d_1 > ...``).
Iteration ``t`` trains sub-net ``t mod K`` only, so K sub-nets cost one sparse training run.

How this module realises it without touching the model's forward:

* between optimizer steps the model *holds* the sub-net of the next iteration: ``W ⊙ M_k``. The values
  the mask hides (other sub-nets' weights) and the matching optimizer buffers wait in a stash;
* after the step, everything outside ``M_k`` is put back from the stash, so training sub-net ``k`` never
  changes a weight, or the optimizer state, outside its mask (the official code lets shared momentum and
  weight decay move other sub-nets' weights; we do not);
* biases, BatchNorm's affine parameters and every dense parameter are shared, as in the official code;
  BatchNorm's running statistics too, unless ``ast.subnet_bn`` keeps one set per sub-net (the statistics of a
  1% sub-net are not those of a 10% one: shared statistics cost accuracy at evaluation).

Topology, per sub-net and on its own iteration count ``i`` (events every ``update_every`` of its steps,
delayed by ``k * offset`` so that the sub-nets rewire at different times, until ``end_fraction`` of its steps):

1. gradual magnitude pruning with the cubic schedule ``d(i) = d_k + (d_init - d_k) (1 - i / i_last)^3``,
   one global ``|W|`` threshold across layers (official; ``prune_scope: layerwise`` prunes each layer to its
   ERK/uniform share of ``d(i)`` instead, which keeps a small network's widest layer from being pruned away
   at 99%); it reaches ``d_k`` exactly at the last event. Where the threshold is taken:
   ``ast.prune_from: subnet`` (default) among sub-net ``k``'s own active weights, so pruning only removes;
   ``ast.prune_from: shared`` (the official code, ``Mask.pruning``) over every position of the shared
   tensor, so ``M_k`` becomes the top ``|W|`` of the shared weights and may take in positions that another
   sub-net trained;
2. RigL-style prune and regrow: each layer drops its ``p_i`` fraction of smallest ``|W|`` and grows as many
   inactive positions of largest dense ``|grad|``; ``p_i`` cosine-decays from ``prune_rate`` to 0.005.
   A grown position that another sub-net uses keeps the shared value; one that no sub-net uses starts at
   zero with reset optimizer state (RigL); positions no sub-net uses any more are zeroed.

Gradient correction (our implementation from the paper's description: the official code's version never
projects, docs/papers.md says why): every sub-net keeps a running gradient ``G_k <- beta G_k + (1 - beta) g``
per layer (of its raw, uncorrected masked gradients). Per layer, with ``G = G_{k-1} ⊙ M_k`` (the previous
sub-net's running gradient on the positions sub-net ``k`` trains), the step's gradient ``g`` itself is
projected PCGrad-style when it conflicts: if ``<g, G> < 0``, ``g <- g - <g, G> / ||G||^2 G``, so that
``<g, G_{k-1}> = <g, G> = 0`` afterwards and ``g`` stays inside ``M_k``. It runs as an optimizer
step-pre-hook, so under DDP it sees the averaged gradient, and under AGENT the corrected one.

Optional nesting (not in the official code) keeps ``M_k`` inside ``M_{k-1}``: pruning and growth of
sub-net ``k`` only consider its parent's positions, and a position the parent drops leaves its children
too; the next event of a child tops it back up to its target count from its parent's positions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn

from robust_sparse import distributed
from robust_sparse.errors import CheckpointError, ConfigError, UserError
from robust_sparse.config import PruneScope
from robust_sparse.sparse.masker import Engine, SparseMasker, View
from robust_sparse.sparse.methods import SavedView, Setup, SparseMethod, register
from robust_sparse.sparse.strategies import set_top


def gradient_correction(grad: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PCGrad's projection: ``grad`` itself projected off ``reference`` when the two conflict.

    ``g - <g, G> / ||G||^2 G`` if ``<g, G> < 0``, else ``g`` unchanged; after a projection ``<g', G> = 0``.
    Branch-free (no host sync): the coefficient is zero when ``<grad, reference> >= 0``.
    """
    dot = (grad * reference).sum()
    norm = reference.square().sum().clamp_min(torch.finfo(grad.dtype).tiny)
    coefficient = torch.where(dot < 0, dot / norm, torch.zeros_like(dot))
    return grad - coefficient * reference


def cubic_density(step: int, last_step: int, initial: float, final: float) -> float:
    """Zhu & Gupta's gradual pruning schedule: ``initial`` at step 0, ``final`` from ``last_step`` on."""
    progress = min(1.0, step / last_step)
    return final + (initial - final) * (1.0 - progress) ** 3


class ASTSchedule:
    """When sub-net ``k`` rewires (in its own step count ``i``, 1-based) and to what density."""

    def __init__(self, densities: list[float], init_density: float, total_steps: int, update_every: int,
                 offset: int, end_fraction: float, prune_rate: float) -> None:
        self.densities, self.init_density = list(densities), init_density
        self.update_every, self.offset, self.prune_rate = update_every, offset, prune_rate
        count = len(densities)
        self.subnet_steps = [len(range(k, total_steps, count)) for k in range(count)]
        self.last_event = []
        for k, steps in enumerate(self.subnet_steps):
            end = int(end_fraction * steps)
            first = k * offset + update_every
            if first > end:
                raise ConfigError(
                    f"sparsity.update_every = {update_every}: sub-net {k} (density {densities[k]}) would never "
                    f"prune: its first rewiring step {first} comes after its last {end} of {steps}; lower "
                    "update_every or sparsity.ast.offset, or train longer")
            self.last_event.append(first + (end - first) // update_every * update_every)

    def is_event(self, k: int, i: int) -> bool:
        first = k * self.offset + self.update_every
        return first <= i <= self.last_event[k] and (i - first) % self.update_every == 0

    def density(self, k: int, i: int) -> float:
        return cubic_density(i, self.last_event[k], self.init_density, self.densities[k])

    def regrow_fraction(self, k: int, i: int) -> float:
        low = 0.005  # the official CosineDecay's floor
        if self.prune_rate <= low:
            return self.prune_rate
        return low + (self.prune_rate - low) / 2 * (1 + math.cos(math.pi * i / self.subnet_steps[k]))


class ASTEngine(Engine):
    """AST's engine: K sub-net masks over the same parameters, one of them active (the masker's ``masks``).

    ``subnet_masks[k]`` are the K topologies, :meth:`views` one view per sub-net. The masker's ``masks`` dict
    has its entries replaced when the active sub-net changes, so holders of it (AGENT) always see the active
    sub-net.
    """

    def __init__(self, schedule: ASTSchedule, *, gc: bool, gc_beta: float, nested: bool,
                 layer_densities: Callable[[float], dict[str, float]] | None = None,
                 bn_buffers: dict[str, torch.Tensor] | None = None, prune_from: str = "subnet") -> None:
        super().__init__()  # no generator: AST's topology is deterministic given the weights and gradients
        if prune_from not in ("subnet", "shared"):
            raise ValueError(f"prune_from = {prune_from!r}: must be subnet or shared")
        self.schedule, self.gc, self.gc_beta, self.nested = schedule, gc, gc_beta, nested
        self.prune_from = prune_from  # where the magnitude threshold is taken (module docstring, step 1)
        self.layer_densities = layer_densities  # None: one global |W| threshold (official)
        # Per-sub-net BatchNorm statistics: the model's buffers hold the active sub-net's; the others wait here.
        self.bn_buffers = bn_buffers
        self._bn = [{n: b.clone() for n, b in bn_buffers.items()} for _ in schedule.densities] if bn_buffers else None
        self.count = len(schedule.densities)
        self.subnet_masks: list[dict[str, torch.Tensor]] = []
        self.active = 0
        # While a sub-net is materialised: name -> the full weight, and its optimizer buffers; empty otherwise
        self._stash: dict[str, torch.Tensor] = {}
        self._stash_state: dict[str, dict[str, torch.Tensor]] = {}
        self._running: list[dict[str, torch.Tensor]] = [{} for _ in range(self.count)]
        self._dense_grads: dict[str, torch.Tensor] = {}
        self.masker: SparseMasker | None = None

    @property
    def params(self) -> dict[str, nn.Parameter]:
        return self.masker.params

    def attach(self, masker: SparseMasker) -> None:
        self.masker = masker
        self.subnet_masks = [{name: mask.clone() for name, mask in masker.masks.items()}
                             for _ in range(self.count)]  # every sub-net starts from the same mask
        with torch.no_grad():  # positions no sub-net uses hold zero in the shared tensor
            for name, param in masker.params.items():
                param.mul_(self.subnet_masks[0][name])

    # ---- which sub-net, which step ----------------------------------------------------------------------

    def subnet_step(self, step: int) -> tuple[int, int]:
        """Global optimizer step ``step`` (1-based) trains sub-net ``k``; it is that sub-net's ``i``-th step."""
        return (step - 1) % self.count, (step - 1) // self.count + 1

    # ---- hooks ------------------------------------------------------------------------------------------

    def wants_dense_grad(self, step: int) -> bool:
        return self.schedule.is_event(*self.subnet_step(step))  # growth needs the dense gradient of this step

    def observe_dense_grad(self, name: str, grad: torch.Tensor) -> None:
        self._dense_grads[name] = grad.detach().clone()

    @torch.no_grad()
    def before_step(self, masker: SparseMasker) -> None:
        if not self.gc or self.count == 1:
            return
        k = self.active
        previous = (k - 1) % self.count
        for name, param in masker.params.items():
            if param.grad is None:
                continue
            own = self._running[k].get(name)
            grad = param.grad * masker.masks[name]
            own = grad * (1 - self.gc_beta) if own is None else own.mul_(self.gc_beta).add_(grad, alpha=1 - self.gc_beta)
            self._running[k][name] = own
            other = self._running[previous].get(name)
            if other is not None:  # the reference restricted to M_k: the projected gradient stays inside M_k
                param.grad = gradient_correction(grad, other * masker.masks[name])

    def after_step(self, masker: SparseMasker, step: int) -> bool:
        """Put back what the trained sub-net hid and rewire it on its events; :meth:`apply` then materialises
        the next sub-net. Exploration is counted here (every sub-net's positions), so False."""
        k, i = self.subnet_step(step)
        self._restore_hidden()
        if self.schedule.is_event(k, i):
            self._rewire(k, i)
        return False

    def apply(self, masker: SparseMasker) -> None:
        """(Re)materialise the sub-net the next step trains from the full weights."""
        if self._stash:
            self._restore_hidden()
        self._select(masker.step % self.count)

    # ---- materialising a sub-net ------------------------------------------------------------------------

    @torch.no_grad()
    def _select(self, k: int) -> None:
        """Make the model sub-net ``k``: stash the full weights and buffers, zero what ``M_k`` hides."""
        if self._bn is not None:  # swap in sub-net k's BatchNorm statistics
            for name, buffer in self.bn_buffers.items():
                self._bn[self.active][name] = buffer.clone()
                buffer.copy_(self._bn[k][name])
        self.active = k
        masker = self.masker
        for name, param in masker.params.items():
            mask = self.subnet_masks[k][name]
            masker.set_mask(name, mask)
            buffers = masker.optimizer_buffers(param)
            self._stash[name] = param.detach().clone()
            self._stash_state[name] = {key: value.clone() for key, value in buffers.items()}
            param.mul_(mask)
            for value in buffers.values():
                value.mul_(mask)

    @torch.no_grad()
    def _restore_hidden(self) -> None:
        """Put back every weight and buffer entry outside the active mask (a buffer born this step: zero)."""
        masker = self.masker
        for name, param in masker.params.items():
            hidden = ~masker.masks[name]
            param.copy_(torch.where(hidden, self._stash[name], param))
            saved = self._stash_state.get(name, {})
            for key, value in masker.optimizer_buffers(param).items():
                value.copy_(torch.where(hidden, saved[key], value) if key in saved else value * ~hidden)
        self._stash, self._stash_state = {}, {}

    def views(self, masker: SparseMasker) -> list[View]:
        return [View(k, self.subnet_masks[k], activate=partial(self.as_subnet, k), on=partial(self.view, k=k))
                for k in range(self.count)]

    @property
    def active_view(self) -> int:
        return self.active

    def full_weights(self, masker: SparseMasker | None = None):
        return self._full_weights()

    @contextmanager
    def _full_weights(self) -> Iterator[None]:
        """Inside, the model holds the full shared weights (every sub-net's); the active sub-net after."""
        self._restore_hidden()
        try:
            yield
        finally:
            self._select(self.active)

    @contextmanager
    def as_subnet(self, k: int) -> Iterator[None]:
        """Inside, the model is sub-net ``k`` (for validation and evaluation between steps)."""
        active = self.active
        self._restore_hidden()
        self._select(k)
        if self.bn_buffers:  # ranks updated their stored statistics on their own shards: use rank 0's
            for buffer in self.bn_buffers.values():
                distributed.broadcast(buffer)
        try:
            yield
        finally:
            self._restore_hidden()
            self._select(active)

    @contextmanager
    def view(self, module: nn.Module, k: int) -> Iterator[None]:
        """Inside, ``module`` (a copy of the model holding full weights, e.g. AGENT's snapshot) is sub-net ``k``."""
        named = dict(module.named_parameters())
        saved = {name: named[name].detach().clone() for name in self.params}
        with torch.no_grad():
            for name in self.params:
                named[name].mul_(self.subnet_masks[k][name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.params:
                    named[name].copy_(saved[name])

    # ---- topology ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _rewire(self, k: int, i: int) -> None:
        """Sub-net ``k``'s event at its step ``i``: cubic magnitude pruning, then prune-and-regrow per layer."""
        distributed.all_reduce_mean(list(self._dense_grads.values()))  # hooks saw this rank's gradient only
        masks = self.subnet_masks[k]
        allowed = self.subnet_masks[k - 1] if self.nested and k > 0 else None
        old = {name: mask.clone() for name, mask in masks.items()}
        if allowed is not None:
            for name in masks:
                masks[name] = masks[name] & allowed[name]
        for names, target in self._groups(self.schedule.density(k, i)):
            active = sum(int(masks[n].sum()) for n in names)
            if self.prune_from == "shared":  # official: the top |W| of the whole shared tensor (the parent's if nested)
                for n in names:
                    masks[n] = torch.zeros_like(masks[n])
                self._keep_top(masks, names, target, {n: self.params[n].detach() for n in names}, allowed=allowed)
            elif active > target:
                self._keep_top(masks, names, target, {n: self.params[n].detach() for n in names}, allowed=None)
            elif active < target:  # nested: the parent dropped positions; top up from its others by |grad|
                self._keep_top(masks, names, target, self._dense_grads, allowed=allowed)
        fraction = self.schedule.regrow_fraction(k, i)
        for name, param in self.params.items():
            mask = masks[name]
            candidates = ~mask if allowed is None else allowed[name] & ~mask
            count = min(int(fraction * int(mask.sum())), int(candidates.sum()))
            if count == 0:
                continue
            kept = set_top(mask, torch.where(mask, -param.abs(), torch.full_like(param, -torch.inf)), count, False)
            score = self._dense_grads.get(name)
            score = torch.zeros_like(param) if score is None else score.abs()
            masks[name] = set_top(kept, torch.where(candidates, score, torch.full_like(param, -torch.inf)),
                                   count, True)
        if self.nested:  # a position a parent dropped leaves its children, who refill from the parent by |W|
            weights = {name: p.detach() for name, p in self.params.items()}
            for child in range(k + 1, self.count):
                child_masks, parent = self.subnet_masks[child], self.subnet_masks[child - 1]
                before = {name: int(mask.sum()) for name, mask in child_masks.items()}
                for name in child_masks:
                    child_masks[name] = child_masks[name] & parent[name]
                for names, _ in self._groups(1.0):
                    target = sum(before[n] for n in names)
                    if sum(int(child_masks[n].sum()) for n in names) < target:
                        self._keep_top(child_masks, names, target, weights, allowed=parent)
        self._settle_weights(k, old)
        self._dense_grads.clear()

    def _groups(self, density: float) -> list[tuple[list[str], int]]:
        """Where the pruning threshold applies, with its target count: all layers at once (the official global
        |W| threshold), or each layer alone at its share of ``density`` (``layer_densities``, e.g. ERK)."""
        if self.layer_densities is None:
            total = sum(p.numel() for p in self.params.values())
            return [(list(self.params), max(1, round(density * total)))]
        shares = self.layer_densities(density)
        return [([name], max(1, round(shares[name] * p.numel()))) for name, p in self.params.items()]

    def _keep_top(self, masks: dict[str, torch.Tensor], names: list[str], target: int,
                  scores: dict[str, torch.Tensor], allowed: dict[str, torch.Tensor] | None) -> None:
        """Make ``names``' masks hold ``target`` positions: prune to the largest ``|scores|`` among the active
        ones (``allowed`` None), or grow the largest ``|scores|`` among the ``allowed`` inactive ones."""
        flat = torch.cat([masks[n].flatten() for n in names])
        values = torch.cat([scores[n].abs().flatten() if n in scores else torch.zeros(masks[n].numel(), device=flat.device)
                            for n in names])
        if allowed is None and int(flat.sum()) > target:
            chosen = set_top(torch.zeros_like(flat), torch.where(flat, values, torch.full_like(values, -torch.inf)),
                              target, True)
        else:
            room = torch.cat([allowed[n].flatten() for n in names]) & ~flat if allowed is not None else ~flat
            grow = min(target - int(flat.sum()), int(room.sum()))
            chosen = set_top(flat, torch.where(room, values, torch.full_like(values, -torch.inf)), grow, True)
        offset = 0
        for name in names:
            masks[name] = chosen[offset:offset + masks[name].numel()].view_as(masks[name]).clone()
            offset += masks[name].numel()

    @torch.no_grad()
    def _settle_weights(self, k: int, old: dict[str, torch.Tensor]) -> None:
        """Zero (weight and optimizer state) what no sub-net uses, and what sub-net ``k`` grew that nobody used."""
        for name in self.params:
            used_before = old[name].clone()
            for j in range(self.count):
                if j != k:
                    used_before |= self.subnet_masks[j][name]
            used_now = torch.zeros_like(used_before)
            for j in range(self.count):
                used_now |= self.subnet_masks[j][name]
            self.masker.reset(name, (self.subnet_masks[k][name] & ~used_before) | ~used_now)
            self.masker.mark_explored(name, used_now)

    def at_target_density(self, masker: SparseMasker) -> bool:
        return self.pruning_done()

    def pruning_done(self) -> bool:
        """Every sub-net has had its last pruning event: the masks have their target densities."""
        last = max((i - 1) * self.count + k + 1 for k, i in enumerate(self.schedule.last_event))
        return self.masker.step >= last

    # ---- reporting --------------------------------------------------------------------------------------

    def subnet_counts(self, k: int) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.subnet_masks[k].items()}

    def subnet_density(self, k: int) -> float:
        return sum(self.subnet_counts(k).values()) / sum(m.numel() for m in self.subnet_masks[k].values())

    # ---- persistence: in the masker's state dict (the checkpoint format of the first AST version) -----------

    def masker_state(self, masker: SparseMasker) -> dict[str, Any]:
        state = {
            "active": self.active,
            "subnet_masks": [{name: mask.clone() for name, mask in masks.items()} for masks in self.subnet_masks],
            "full_weights": {name: self._full(name, param.detach(), self._stash[name])
                             for name, param in masker.params.items()},
            "full_optimizer_state": {name: {key: self._full(name, value, saved[key]) if key in saved else value.clone()
                                            for key, value in masker.optimizer_buffers(param).items()}
                                     for name, param in masker.params.items()
                                     for saved in [self._stash_state.get(name, {})]},
            "running_gradients": [{name: g.clone() for name, g in running.items()} for running in self._running],
        }
        if self._bn is not None:
            current = {name: buffer.clone() for name, buffer in self.bn_buffers.items()}
            state["batchnorm"] = [current if k == self.active else {n: b.clone() for n, b in saved.items()}
                                  for k, saved in enumerate(self._bn)]
        return state

    def _full(self, name: str, current: torch.Tensor, stashed: torch.Tensor) -> torch.Tensor:
        """The full tensor: the live values inside the active mask, the stashed ones outside."""
        return torch.where(self.masker.masks[name], current, stashed)

    @torch.no_grad()
    def load_masker_state(self, masker: SparseMasker, state: dict[str, Any]) -> bool:
        """Restore the topology, the full weights and the full optimizer state (load the optimizer first: its
        own state dict holds the materialised sub-net only); the masker has restored its step and explored set."""
        if "subnet_masks" not in state or len(state["subnet_masks"]) != self.count:
            raise ValueError(f"the saved sparsity state is not an AST state with {self.count} sub-nets")
        self.active = int(state["active"])
        for k, saved in enumerate(state["subnet_masks"]):
            if set(saved) != set(masker.params):
                raise ValueError("the saved masks are for other parameters")
            self.subnet_masks[k] = {name: saved[name].to(p.device, torch.bool) for name, p in masker.params.items()}
        for name in masker.params:
            masker.set_mask(name, self.subnet_masks[self.active][name])
        for name, param in masker.params.items():
            param.copy_(state["full_weights"][name])
            saved = state["full_optimizer_state"].get(name, {})
            for key, value in masker.optimizer_buffers(param).items():
                if key in saved:
                    value.copy_(saved[key])
        device = next(iter(masker.params.values())).device
        self._running = [{name: g.to(device) for name, g in running.items()} for running in state["running_gradients"]]
        if self._bn is not None:
            if "batchnorm" not in state:
                raise ValueError("the saved AST state has no per-sub-net BatchNorm statistics (sparsity.ast.subnet_bn)")
            self._bn = [{n: b.to(device) for n, b in saved.items()} for saved in state["batchnorm"]]
            for name, buffer in self.bn_buffers.items():
                buffer.copy_(self._bn[self.active][name])
        self._stash, self._stash_state = {}, {}  # the loaded full weights replace whatever was stashed
        self._select(self.active)
        return True


def subnet_weights(checkpoint: dict[str, Any], k: int) -> dict[str, torch.Tensor]:
    """The plain ``state_dict`` of sub-net ``k`` from a robust-sparse AST checkpoint."""
    sparsity = checkpoint.get("sparsity") or {}
    subnets = sparsity.get("subnet_masks")
    if not subnets:
        raise CheckpointError("this checkpoint has no AST sub-nets (train with sparsity.method=ast)")
    if not 0 <= k < len(subnets):
        raise UserError(f"--subnet {k}: this checkpoint has sub-nets 0..{len(subnets) - 1}")
    state = dict(checkpoint["model"])
    if sparsity.get("batchnorm"):  # per-sub-net BatchNorm statistics
        state.update(sparsity["batchnorm"][k])
    full = sparsity.get("full_weights", {})
    for name, mask in subnets[k].items():
        weight = full.get(name, state[name])
        state[name] = weight * mask.to(weight.device)
    return state


def saved_views(checkpoint: dict[str, Any]) -> list[SavedView]:
    """One view per sub-net of an AST checkpoint, densest first."""
    subnets = (checkpoint.get("sparsity") or {}).get("subnet_masks")
    if not subnets:
        raise CheckpointError("this AST checkpoint has no sub-nets (sparsity.subnet_masks)")
    return [SavedView(k, subnet_weights(checkpoint, k), masks) for k, masks in enumerate(subnets)]


def _bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm layer, by buffer name."""
    return {name: buffer for name, buffer in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def build(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    """Every sub-net starts from one random mask at ``ast.init_density`` (ERK or uniform)."""
    config, ast = setup.config, setup.section
    count = len(ast.densities)
    update_every = config.update_every or max(1, 999 // count)  # the official 999 iterations, in a sub-net's
    schedule = ASTSchedule(
        ast.densities, ast.init_density, setup.total_steps, update_every,
        offset=ast.offset if ast.offset is not None else update_every // count,
        end_fraction=config.end_fraction, prune_rate=setup.setting("prune_rate"))
    layerwise = config.prune_scope is PruneScope.LAYERWISE
    engine = ASTEngine(schedule, gc=ast.gc, gc_beta=ast.gc_beta, nested=ast.nested,
                       bn_buffers=_bn_statistics(setup.model) if ast.subnet_bn else None,
                       prune_from=ast.prune_from.value, layer_densities=partial(setup.densities) if layerwise else None)
    return setup.random_masks(setup.densities(ast.init_density)), engine


# its settings (section, rules, defaults): robust_sparse/config/builtin_methods.py
register(SparseMethod("ast", build, saved_views=saved_views))
