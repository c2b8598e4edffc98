"""GSE: always-sparse training by growing connections with guided stochastic exploration.

Heddes, Srinivasa, Givargis & Nicolau, arXiv 2401.06898 (2024); code mikeheddes/guided-stochastic-exploration
(its settings: docs/papers.md). Every ``update_every`` steps until ``end_step``, each sparse layer

1. samples ``candidate_multiple * nnz`` candidate positions (the paper's gamma; with replacement,
   deduplicated) from a uniform distribution or GraBo's ``p_out(i) * p_in(j)`` (p_out ∝ Σ|∂L/∂out_i|,
   p_in ∝ Σ|in_j|); a layer whose density is at least 0.5 takes all of its positions as candidates;
2. scores the candidates by |∂L/∂W| on a small class-balanced batch (``score_batch(step)``, adversarial under AT:
   the record's ``batch_source``, :func:`score_batches`), computed from the layer's input and output gradient captured by module hooks, *only at the candidates*:
   Linear ``g_ij = Σ_b δ[b,i] x[b,j]``, Conv2d ``g_{o,c} = Σ_{b,p} δ[b,o,p] U[b,c,p]`` with U the unfolded
   input. No dense weight gradient of a layer below the 0.5 threshold is ever formed, and no parameter's
   ``.grad`` is touched (``torch.autograd.grad`` with respect to the layer outputs);
3. grows the top ``alpha_t * nnz`` dormant candidates by |g| (weights and optimizer state start at zero),
   then prunes as many of the smallest-|W| previously active connections (grown ones are protected).
   ``alpha_t = alpha0/2 (1 + cos(pi t / T_end))``. Scope ``layerwise`` (our default): each layer does this
   with its own ``nnz``, so each layer keeps its count. Scope ``global`` (the official code's default,
   ``Config.scope = "global"``): one ranking of all layers' dormant candidates by |g| grows
   ``alpha_t * N`` (N = all active connections), one ranking of all previously active connections by |W|
   prunes as many; layer counts move, the global count stays exactly N.

Deviation from the reference code (which computes the dense gradient and masks it to the sample): the
candidate gradients are computed directly, as the paper intends. Robust training: the score batch is
attacked with the training objective's attack (our choice; GSE itself is standard training only).

Multi-rank: the GraBo marginals and the candidate scores are averaged over ranks, and every rank samples
with the same seeded generator, so every rank makes the same topology change.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.nn import functional as F

from robust_sparse import distributed
from robust_sparse.config.builtin_methods import GSESampler
from robust_sparse.errors import ConfigError
from robust_sparse.sparse.density import Shapes, proportional
from robust_sparse.sparse.masker import Engine
from robust_sparse.sparse.methods import BatchSource, Setup, SparseMethod, TrainingData, register

if TYPE_CHECKING:
    from robust_sparse.datasets.images import ImageSet
    from robust_sparse.sparse.masker import SparseMasker


DENSE_THRESHOLD = 0.5  # a layer at least this dense takes every position as a candidate
SAMPLERS = tuple(sampler.value for sampler in GSESampler)  # "uniform", "grabo"
_CHUNK = 1 << 14  # candidates per gather chunk (bounds the B x chunk x L temporary of a conv layer)

ScoreBatch = BatchSource  # optimizer step -> (images, labels)


def supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
                                             and not isinstance(module.padding, str))


# ---- per-layer geometry: inputs as (rows, fan_in [, positions]) and output gradients as (rows, out [, positions])


def _unfold(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Linear: (N, fan_in); Conv2d: (B, groups*fan_in, L) — im2col of the input."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    return F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)


def _flat_delta(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Linear: (N, out); Conv2d: (B, out, L)."""
    if isinstance(module, nn.Linear):
        return delta.reshape(-1, delta.shape[-1])
    return delta.flatten(2)


def marginals(module: nn.Module, inputs: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GraBo's (Σ|δ_out_i|, Σ|in_j|) over the batch (and positions), of lengths (out, fan_in)."""
    unfolded, d = _unfold(module, inputs), _flat_delta(module, delta)
    if isinstance(module, nn.Linear):
        return d.abs().sum(0), unfolded.abs().sum(0)
    groups, fan_in = module.groups, module.weight[0].numel()
    p_in = unfolded.abs().sum((0, 2)).view(groups, fan_in).sum(0)
    return d.abs().sum((0, 2)), p_in


def candidate_gradients(module: nn.Module, inputs: torch.Tensor, delta: torch.Tensor,
                        flat_index: torch.Tensor) -> torch.Tensor:
    """∂L/∂W at the flat positions ``flat_index`` of the (out, fan_in) view of the weight, from the layer's
    input and output gradient; never forms the dense (out, fan_in) gradient."""
    fan_in = module.weight[0].numel()
    rows, cols = flat_index // fan_in, flat_index % fan_in
    unfolded, d = _unfold(module, inputs), _flat_delta(module, delta)
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        cols = cols + (rows // (module.out_channels // module.groups)) * fan_in
    out = torch.empty(flat_index.numel(), dtype=delta.dtype, device=delta.device)
    for start in range(0, flat_index.numel(), _CHUNK):
        r, c = rows[start:start + _CHUNK], cols[start:start + _CHUNK]
        if isinstance(module, nn.Linear):
            out[start:start + _CHUNK] = (d[:, r] * unfolded[:, c]).sum(0)
        else:
            out[start:start + _CHUNK] = (d[:, r, :] * unfolded[:, c, :]).sum((0, 2))
    return out


def dense_gradient(module: nn.Module, inputs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The full (out, fan_in) gradient, for layers at or above the density threshold only."""
    unfolded, d = _unfold(module, inputs), _flat_delta(module, delta)
    if isinstance(module, nn.Linear):
        return d.t() @ unfolded
    if module.groups == 1:
        return torch.einsum("bol,bcl->oc", d, unfolded)
    g, per_out, fan_in = module.groups, module.out_channels // module.groups, module.weight[0].numel()
    d = d.view(d.shape[0], g, per_out, -1)
    unfolded = unfolded.view(unfolded.shape[0], g, fan_in, -1)
    return torch.einsum("bgol,bgcl->goc", d, unfolded).reshape(module.out_channels, fan_in)


# ---- the engine ---------------------------------------------------------------------------------------


class GSEEngine(Engine):
    """Grow-then-prune with candidate sampling (see the module docstring).

    Args:
        model: the plain (non-DDP) model whose layers own the sparse parameters.
        modules: parameter name -> the Linear/Conv2d module whose ``weight`` it is.
        score_batch: ``score_batch(step)`` returns the (images, labels) to score on at optimizer step ``step``,
            on the model's device, already adversarial under AT.
        sampler: "uniform" or "grabo".
        candidate_multiple: candidates per layer as a multiple of its active count (the paper's gamma).
        scope: "layerwise" (each layer keeps its count) or "global" (one growth and one prune ranking over all
            layers: the official code's default; the global count stays exact).
    """

    def __init__(self, *, model: nn.Module, modules: dict[str, nn.Module], score_batch: ScoreBatch,
                 sampler: str, candidate_multiple: float, update_every: int, prune_rate: float, end_step: int,
                 generator: torch.Generator, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 scope: str = "layerwise") -> None:
        super().__init__(generator)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown GSE sampler {sampler!r}")
        if scope not in ("layerwise", "global"):
            raise ValueError(f"unknown GSE scope {scope!r}")
        self.scope = scope
        self.model, self.modules, self.score_batch, self.loss = model, modules, score_batch, loss
        self.sampler, self.candidate_multiple = sampler, candidate_multiple
        self.update_every, self.prune_rate, self.end_step = update_every, prune_rate, end_step
        self.last_update: dict[str, dict[str, torch.Tensor]] = {}  # name -> candidates/gradients/grown/pruned
        self.last_score_examples = 0  # the latest score batch's size

    def is_update_step(self, step: int) -> bool:
        return step % self.update_every == 0 and step <= self.end_step

    def rate(self, step: int) -> float:
        return self.prune_rate / 2 * (1 + math.cos(math.pi * min(step, self.end_step) / self.end_step))

    # -- capture ---------------------------------------------------------------------------------------

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (layer input, ∂L/∂layer output) on one batch; parameter ``.grad`` fields are untouched."""
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if name in outputs:
                    raise RuntimeError(f"GSE: layer of {name} is called twice in one forward pass")
                inputs[name], outputs[name] = args[0].detach(), output
            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in self.modules.items()]
        try:
            with torch.enable_grad():
                loss = self.loss(self.model(images), labels)
                names = [n for n in self.modules if n in outputs and outputs[n].requires_grad]
                deltas = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return {n: (inputs[n], torch.zeros_like(outputs[n]) if d is None else d.detach())
                for n, d in zip(names, deltas)}

    # -- sampling --------------------------------------------------------------------------------------

    def draw(self, count: int, rows: int, cols: int, p_out: torch.Tensor | None = None,
             p_in: torch.Tensor | None = None) -> torch.Tensor:
        """``count`` flat (row * cols + col) positions drawn with replacement: uniform, or GraBo's
        ``P(i, j) = p_out(i) p_in(j)`` (the marginals normalised)."""
        device = self.generator.device
        if self.sampler == "uniform":
            return torch.randint(rows * cols, (count,), generator=self.generator, device=device)
        r = torch.multinomial(_distribution(p_out, device), count, replacement=True, generator=self.generator)
        c = torch.multinomial(_distribution(p_in, device), count, replacement=True, generator=self.generator)
        return r * cols + c

    def sample(self, count: int, rows: int, cols: int, p_out: torch.Tensor | None = None,
               p_in: torch.Tensor | None = None) -> torch.Tensor:
        """The candidates: ``draw`` deduplicated and sorted."""
        return torch.unique(self.draw(count, rows, cols, p_out, p_in))

    # -- update ----------------------------------------------------------------------------------------

    def after_step(self, masker: "SparseMasker", step: int) -> bool:
        if not self.is_update_step(step):
            return False
        saved = [b.detach().clone() for b in self.model.buffers()]
        try:  # neither the attack on the score batch nor its forward pass may move BatchNorm statistics
            images, labels = self.score_batch(step)
            self.last_score_examples = len(labels)  # FLOPs accounting (robust_sparse.flops)
            captured = self.capture(images, labels)
        finally:
            with torch.no_grad():
                for buffer, value in zip(self.model.buffers(), saved):
                    buffer.copy_(value)
        self.update(masker, captured, self.rate(step))
        return True

    @torch.no_grad()
    def update(self, masker: "SparseMasker", captured: dict[str, tuple[torch.Tensor, torch.Tensor]],
               rate: float) -> None:
        self.last_update = {}
        plan = []  # (name, candidates or None for all positions)
        grabo = {}
        for name, param in masker.params.items():
            if name not in captured:
                continue
            mask = masker.masks[name]
            if int(mask.count_nonzero()) / mask.numel() < DENSE_THRESHOLD and self.sampler == "grabo":
                grabo[name] = marginals(self.modules[name], *captured[name])
        distributed.all_reduce_mean([t for pair in grabo.values() for t in pair])  # same sampling on every rank

        scores = []
        for name, param in masker.params.items():
            if name not in captured:
                continue
            mask, module = masker.masks[name], self.modules[name]
            rows, cols = param.shape[0], param[0].numel()
            nnz = int(mask.count_nonzero())
            if nnz / mask.numel() >= DENSE_THRESHOLD:
                candidates = torch.arange(mask.numel(), device=param.device)
                gradient = dense_gradient(module, *captured[name]).flatten()
            else:
                count = max(1, round(self.candidate_multiple * nnz))
                candidates = self.sample(count, rows, cols, *grabo.get(name, (None, None))).to(param.device)
                gradient = candidate_gradients(module, *captured[name], candidates)
            plan.append((name, candidates))
            scores.append(gradient)
        distributed.all_reduce_mean(scores)
        if self.scope == "global":
            self._update_global(masker, plan, scores, rate)
            return

        for (name, candidates), gradient in zip(plan, scores):
            param, mask = masker.params[name], masker.masks[name]
            flat_mask = mask.flatten()
            nnz = int(flat_mask.count_nonzero())
            count = int(rate * nnz)
            dormant = ~flat_mask[candidates]
            count = min(count, int(dormant.count_nonzero()))
            grown = candidates[dormant][torch.topk(gradient[dormant].abs(), count, sorted=False).indices] \
                if count else candidates[:0]
            # prune as many of the weakest previously active connections (the grown ones are protected)
            active = flat_mask.nonzero().squeeze(1)
            weakest = torch.topk(param.detach().flatten()[active].abs(), count, largest=False, sorted=False).indices
            self._commit(masker, name, candidates, gradient, grown, active[weakest])

    def _update_global(self, masker: "SparseMasker", plan: list[tuple[str, torch.Tensor]],
                       scores: list[torch.Tensor], rate: float) -> None:
        """The official global scope: grow ``int(rate * N)`` dormant candidates of largest |g| over all layers,
        then prune as many previously active connections of smallest |W| over all layers."""
        if not plan:
            return
        names = [name for name, _ in plan]
        flat_masks = [masker.masks[name].flatten() for name in names]
        dormant = [~flat[candidates] for flat, (_, candidates) in zip(flat_masks, plan)]
        pool = [candidates[d] for (_, candidates), d in zip(plan, dormant)]  # per layer: dormant candidates
        pool_scores = torch.cat([gradient[d].abs() for gradient, d in zip(scores, dormant)])
        active = [flat.nonzero().squeeze(1) for flat in flat_masks]
        magnitudes = torch.cat([masker.params[name].detach().flatten()[a].abs() for name, a in zip(names, active)])
        count = min(int(rate * magnitudes.numel()), pool_scores.numel())
        grown_at = torch.topk(pool_scores, count, sorted=False).indices
        pruned_at = torch.topk(magnitudes, count, largest=False, sorted=False).indices
        grow_start = pruned_start = 0
        for i, ((name, candidates), gradient) in enumerate(zip(plan, scores)):
            grow_end, pruned_end = grow_start + pool[i].numel(), pruned_start + active[i].numel()
            grown = pool[i][grown_at[(grown_at >= grow_start) & (grown_at < grow_end)] - grow_start]
            pruned = active[i][pruned_at[(pruned_at >= pruned_start) & (pruned_at < pruned_end)] - pruned_start]
            self._commit(masker, name, candidates, gradient, grown, pruned)
            grow_start, pruned_start = grow_end, pruned_end

    def _commit(self, masker: "SparseMasker", name: str, candidates: torch.Tensor, gradient: torch.Tensor,
                grown: torch.Tensor, pruned: torch.Tensor) -> None:
        """Switch ``grown`` on and ``pruned`` off in layer ``name`` (flat indices); grown entries start at zero."""
        # index updates only: no further weight-sized temporaries besides the new mask itself
        new_mask = masker.masks[name].clone()
        new_mask.view(-1)[grown] = True
        new_mask.view(-1)[pruned] = False
        masker.reset(name, grown)  # grown weights and their optimizer state start at zero
        masker.set_mask(name, new_mask)
        self.last_update[name] = {"candidates": candidates, "gradients": gradient, "grown": grown,
                                  "pruned": pruned}


def _distribution(weights: torch.Tensor, device: torch.device) -> torch.Tensor:
    weights = weights.to(device=device, dtype=torch.float64)
    if not torch.isfinite(weights).all() or float(weights.sum()) <= 0:
        return torch.ones_like(weights)
    return weights


# ---- the score batch --------------------------------------------------------------------------------------


def balanced_batch(train: "ImageSet", per_class: int, device: torch.device, seed: int,
                   perturb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each class in a permutation seeded by ``seed``, as float [0, 1] on
    ``device``; adversarial when ``perturb`` (an objective's ``perturb``) returns examples."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    labels = train.labels[order]
    picked = torch.cat([order[labels == c][:per_class] for c in torch.unique(train.labels).tolist()])
    from robust_sparse.datasets.splits import in_memory  # a streamed (ImageNet) split is read for the picked images only

    chosen = in_memory(train.take(picked))
    images = chosen.images.to(device).float().div_(255)
    targets = chosen.labels.to(device)
    if perturb is not None:
        with torch.enable_grad():
            adversarial = perturb(images, targets)
        if adversarial is not None:
            images = adversarial.detach()
    return images, targets


def modules_of(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Parameter name ("features.0.weight") -> its module."""
    found = dict(model.named_modules())
    return {name: found[name.rsplit(".", 1)[0] if "." in name else ""] for name in names}


# ---- allocation and the method ---------------------------------------------------------------------------


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

    return proportional(shapes, density, fans, "GSE's Erdős–Rényi")


def build(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    section = setup.section
    if setup.batch_source is None:
        raise ConfigError("sparsity.method = gse: needs a score batch (build_sparsity(..., data=...) or "
                          "batch_source=...)")
    modules = modules_of(setup.model, list(setup.params))
    unsupported = [name for name, module in modules.items() if not supported(module)]
    if unsupported:
        raise ConfigError(f"sparsity.method = gse: layer {unsupported[0]} is not a Linear or zero-padded "
                          "Conv2d layer")
    engine = GSEEngine(
        model=setup.model, modules=modules, score_batch=setup.batch_source, sampler=section.sampler.value,
        candidate_multiple=section.candidate_multiple, update_every=setup.setting("update_every"),
        prune_rate=setup.setting("prune_rate"), end_step=setup.end_step, generator=setup.engine_generator,
        scope=section.scope.value)
    return setup.random_masks(setup.densities()), engine


def score_batches(setup: Setup, data: TrainingData) -> ScoreBatch:
    """GSE's scoring batch at optimizer step ``step``: class-balanced, drawn afresh (seeded by the step) and
    attacked by the training objective."""
    per_class = setup.section.samples_per_class

    def score_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return balanced_batch(data.train, per_class, data.device, data.seed + step, data.perturb)

    return score_batch


# its settings (section, rules, defaults): robust_sparse/config/builtin_methods.py
register(SparseMethod("gse", build, allocations={"gse_er": lambda setup, density: gse_er(setup.shapes, density)},
                      batch_source=score_batches))
