"""AGENT: adaptive gradient correction for sparse training (Lei et al., "Balance is Essence", CPAL 2024).

Every step uses the corrected gradient

    g_hat = g_new - gamma * c_t * (g_old - g_tilde)

where ``g_new`` is the current model's gradient on the batch, ``g_old`` the snapshot's gradient on the *same*
batch (the same adversarial examples, no second attack), and ``g_tilde`` the snapshot's large-batch gradient
over (a subsample of) the training set. At every snapshot refresh ``c_t = (1 - alpha) c_{t-1} + alpha c_hat``
with ``c_0 = 0``, where ``c_hat = Cov(l(B|theta_t), l(B|theta~)) / Var(l(B|theta~))`` over per-batch losses
(numpy's ddof=1). Estimators of ``c_hat``:

``paper`` (default)
    compares the current model with the *previous* snapshot, so c_t really adapts (as A-ITOP/A-RigL do).
``official``
    the official A-BSR-Net code copies the model right before measuring, so its estimate is identically 1 and
    ``gamma * c_t`` is the ramp ``gamma * (1 - (1 - alpha)^e)``, i.e. ``gamma * (1 - 0.7^e)``.
``fixed``
    ``c_t`` held at ``fixed_c`` from the first step (the paper's "fixed c_t" ablation, gamma multiplying it).

The paper's ablations (its Table 6) and SVRG are named variants (``agent.variant``, :func:`resolve_variant`):
``fixed_c`` (weight ``fixed_c``, gamma ignored: "Fixed c_t = 0.1" read literally), ``fixed_c_gamma`` (weight
``gamma * fixed_c``: the same name read with gamma kept; the paper does not say which it ran), ``no_gamma`` (the
adaptive ``c_t``, gamma = 1) and ``svrg`` (weight 1 from the first step).

:class:`AGENT` is an optimizer *wrapper*: it shares ``param_groups`` with the base optimizer, corrects the
gradients in ``.grad`` and delegates the update, so it composes with any base optimizer, sparse engine (their
hooks sit on the base optimizer) and objective. The maths is in pure functions: :func:`agent_correction` (the
step) and :func:`update_c` (c_t at a refresh, from the pass's per-batch losses). The training loop's side of AGENT
lives here too: the batches of the large-batch pass (:func:`full_grad_pass`), the loss it differentiates
(:func:`objective_loss`), the per-epoch columns (:func:`agent_metrics`) and the check of the settings against
the run (:func:`check_agent`).

Deliberate deviation: sparse engines hold dormant weights at exactly zero (their invariant), so the part of
the correction that falls on dormant positions has no effect. In the official TF code a dormant BSR-Net theta
is a negative number that the correction term could push back above zero, reviving a connection outside the
rewiring budget; we do not reproduce that.

A sparse masker (``masker=``) may train several networks over one weight tensor, its views (AST's sub-nets).
Then the snapshot holds the full shared weights and every view gets its own ``g_tilde``: the large-batch pass
gives batch ``b`` to view ``b mod K`` (so it costs one pass, not K), and ``g_old`` of a step is the snapshot
seen as the step's view. With one view (every other engine) this is plain AGENT.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from robust_sparse import distributed
from robust_sparse.config import AgentConfig, AgentEstimator, AgentVariant, TrainConfig
from robust_sparse.datasets.images import ImageSet
from robust_sparse.datasets.splits import batch_loader, in_memory
from robust_sparse.errors import UserError
from robust_sparse.objectives import Objective
from robust_sparse.precision import Amp

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker

log = logging.getLogger(__name__)


def agent_correction(grads: list[torch.Tensor], snapshot_grads: list[torch.Tensor],
                     full_grads: list[torch.Tensor], *, gamma_c: float, foreach: bool | None = None) -> None:
    """In place: ``g <- g - gamma_c * (g_old - g_tilde)`` for every tensor, ``gamma_c`` = gamma * c_t.

    ``foreach`` (default: whenever every tensor is on one device) runs it as two fused multi-tensor kernels
    without temporaries, like ``torch.optim.SGD``'s foreach path; the loop is the reference.
    """
    if not grads:
        return
    if foreach is None:
        foreach = len({g.device for g in grads}) == 1 and not torch.jit.is_scripting()
    if foreach:
        _multi_tensor_agent_correction(grads, snapshot_grads, full_grads, gamma_c)
    else:
        _single_tensor_agent_correction(grads, snapshot_grads, full_grads, gamma_c)


# (torch's ``alpha=`` below is its scalar multiplier of the added tensor, not AGENT's momentum ``alpha``)
def _single_tensor_agent_correction(grads, snapshot_grads, full_grads, gamma_c: float) -> None:
    for grad, old, full in zip(grads, snapshot_grads, full_grads):
        grad.sub_(old - full, alpha=gamma_c)


def _multi_tensor_agent_correction(grads, snapshot_grads, full_grads, gamma_c: float) -> None:
    torch._foreach_add_(grads, full_grads, alpha=gamma_c)
    torch._foreach_add_(grads, snapshot_grads, alpha=-gamma_c)


def estimate_c(current_losses: list[float], snapshot_losses: list[float]) -> float:
    """Eq. (4): Cov(l(B|theta_t), l(B|theta~)) / Var(l(B|theta~)), both with ddof=1 like ``numpy.cov``."""
    n = len(current_losses)
    if n < 2 or len(snapshot_losses) != n:
        raise ValueError("estimate_c needs at least two paired per-batch losses")
    mean_current, mean_snapshot = sum(current_losses) / n, sum(snapshot_losses) / n
    covariance = sum((a - mean_current) * (b - mean_snapshot) for a, b in zip(current_losses, snapshot_losses)) / (n - 1)
    variance = sum((b - mean_snapshot) ** 2 for b in snapshot_losses) / (n - 1)
    return covariance / variance if variance > 0 else 0.0


def momentum_update(c_previous: float, c_hat: float, alpha: float, refresh_index: int) -> float:
    """``c_0 = 0``; afterwards ``(1 - alpha) c + alpha c_hat``."""
    return 0.0 if refresh_index == 0 else (1 - alpha) * c_previous + alpha * c_hat


def update_c(estimator: AgentEstimator, c_previous: float, refresh_index: int, *, alpha: float, fixed_c: float,
             clip: bool, current_losses: list[float] | None = None,
             snapshot_losses: list[float] | None = None) -> tuple[float, float]:
    """``(c_hat, c_t)`` at refresh ``refresh_index``: ``official`` c_hat = 1 with the momentum, ``fixed`` c_t =
    ``fixed_c`` (no estimate: c_hat is NaN), ``paper`` the momentum over :func:`estimate_c` of the per-batch losses
    of the current model and of the previous snapshot (without them, at the first refresh: c_0 = 0, c_hat NaN).
    ``clip`` clips c_t to [0, 1] (the paper's text; the official code does not)."""
    if estimator is AgentEstimator.FIXED:
        c_hat, c = float("nan"), fixed_c
    elif estimator is AgentEstimator.OFFICIAL:
        c_hat = 1.0
        c = momentum_update(c_previous, c_hat, alpha, refresh_index)
    elif current_losses is None or snapshot_losses is None:
        c_hat, c = float("nan"), 0.0
    else:
        c_hat = estimate_c(current_losses, snapshot_losses)
        c = momentum_update(c_previous, c_hat, alpha, refresh_index)
    if clip:
        c = min(1.0, max(0.0, c))
    return c_hat, c


@dataclass(frozen=True)
class Weighting:
    """What a variant fixes: the estimator of c_t, gamma and the constant c_t of the fixed estimators."""

    estimator: AgentEstimator
    gamma: float
    fixed_c: float


def resolve_variant(config: AgentConfig) -> Weighting:
    """``agent.variant`` as the estimator, gamma and constant c it stands for (``agent`` keeps the config's)."""
    variant = config.variant
    if variant is AgentVariant.FIXED_C:
        return Weighting(AgentEstimator.FIXED, 1.0, config.fixed_c)
    if variant is AgentVariant.FIXED_C_GAMMA:
        return Weighting(AgentEstimator.FIXED, config.gamma, config.fixed_c)
    if variant is AgentVariant.NO_GAMMA:
        return Weighting(config.estimator, 1.0, config.fixed_c)
    if variant is AgentVariant.SVRG:
        return Weighting(AgentEstimator.FIXED, 1.0, 1.0)
    return Weighting(config.estimator, config.gamma, config.fixed_c)


def inactive_reason(config: AgentConfig, epochs: int) -> str | None:
    """Why AGENT's correction cannot act in a run of ``epochs`` epochs, or None when it can.

    The paper's and the official estimators start at c_0 = 0 (the first refresh, at the first epoch, has no
    earlier snapshot to compare with), so gamma first acts after the second refresh, ``snapshot_every`` epochs
    later: a shorter run trains exactly as gamma = 0 would, and a gamma sweep of it compares identical runs.
    """
    if not config.enabled:
        return None
    weighting = resolve_variant(config)
    if weighting.gamma == 0 or weighting.estimator is AgentEstimator.FIXED:
        return None  # the gamma = 0 baseline by design; a fixed c_t acts from the first epoch
    if epochs <= config.snapshot_every:
        return (f"agent.gamma = {weighting.gamma:g} never acts in this run: with agent.estimator = "
                f"{weighting.estimator.value}, c_t is 0 until the second snapshot refresh, at epoch "
                f"{config.snapshot_every + 1}, and optim.epochs = {epochs}; train longer, or use agent.estimator=fixed "
                "to correct from the first epoch")
    return None


@dataclass(frozen=True)
class _PassResult:
    """What :meth:`AGENT._large_batch_pass` computed."""

    batches: int  # that this rank ran
    sums: list[list[torch.Tensor]]  # per view: the gradients summed over its batches (mean over ranks)
    counts: list[float]  # per view: its batches (mean over ranks)
    current_losses: list[float] | None  # per batch, every rank's: the new snapshot's, when estimating c_hat
    previous_losses: list[float] | None  # and the previous snapshot's


@dataclass(frozen=True)
class RefreshPass:
    """What a refresh's large-batch pass ran on this rank: its batches, whether it took their gradient
    (g_tilde) and whether it also scored them with the previous snapshot (the paper estimator)."""

    batches: int
    gradient: bool
    previous_forward: bool


class AGENT(torch.optim.Optimizer):
    """Wrap ``base`` (SGD, SGDW, ...) with AGENT's gradient correction for the parameters of ``model``.

    Per step the training loop calls :meth:`snapshot_backward` after ``loss.backward()`` (it computes ``g_old``
    on the same inputs), then :meth:`step`. Before each epoch it calls :meth:`refresh` when :meth:`due`.

    Under a GradScaler (fp16) ``.grad`` and ``g_old`` both carry the loss scale ``s``: the loop calls
    :meth:`correct` with ``s`` before the scaler's step, which applies ``g - gamma_c (g_old - s g_tilde)``, exactly
    ``s`` times the unscaled correction, so the scaler's unscale and overflow check cover it.
    """

    def __init__(self, base: torch.optim.Optimizer, model: nn.Module, config: AgentConfig,
                 masks: dict[str, torch.Tensor] | None = None, masker: "SparseMasker | None" = None) -> None:
        # super().__init__ over the base optimizer's own group dicts: both optimizers share the same group
        # objects, so a scheduler stepping either one changes the learning rate both see.
        super().__init__(base.param_groups, {})
        self.base = base
        self.model = model
        self.config = config
        self.weighting = resolve_variant(config)  # agent.variant: the estimator, gamma and constant c it uses
        self.masker = masker  # the sparse masker: its views, the networks it trains (one active per step)
        # the live masks of the network being trained, keyed by parameter name
        self.masks = masks if masks is not None else masker.masks if masker is not None else {}
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.snapshot: nn.Module | None = None
        self.subnet_snapshot_masks: list[dict[str, torch.Tensor]] = [{}]  # one entry per view
        self.subnet_full_grads: list[list[torch.Tensor]] | None = None
        self.snapshot_grads: list[torch.Tensor] | None = None
        self.c = 0.0
        self.c_hat = float("nan")
        self.refreshes = 0
        self.last_pass: RefreshPass | None = None  # the latest refresh's g_tilde pass
        self._cosine_sum = torch.zeros(())
        self._cosine_count = 0

    # ---- the masker's views: several sub-nets (AST), or the model itself ----------------------------------

    def _count(self) -> int:
        return len(self.masker.views()) if self.masker is not None else 1

    def _active_view(self) -> int:
        return self.masker.active_view if self.masker is not None else 0

    def _view(self, module: nn.Module | None, k: int):
        """Inside, ``module`` (the snapshot: full weights) is view ``k``."""
        return self.masker.views()[k].on(module) if self.masker is not None and module is not None else nullcontext()

    def _masks_of(self, k: int) -> dict[str, torch.Tensor]:
        return self.masker.views()[k].masks if self.masker is not None else self.masks

    @property
    def full_grads(self) -> list[torch.Tensor] | None:
        """g_tilde of the active view."""
        return self.subnet_full_grads[self._active_view()] if self.subnet_full_grads is not None else None

    @property
    def snapshot_masks(self) -> dict[str, torch.Tensor]:
        return self.subnet_snapshot_masks[self._active_view()]

    # ---- gamma * c_t ------------------------------------------------------------------------------------

    @property
    def gamma_c(self) -> float:
        """gamma * c_t, the scale of the correction in the current epoch (the metrics' ``agent_weight``)."""
        return self.weighting.gamma * self.c

    def due(self, epoch: int) -> bool:
        return self.weighting.gamma > 0 and epoch % self.config.snapshot_every == 0

    # ---- per epoch ---------------------------------------------------------------------------------------

    def refresh(self, batches: Iterable[tuple[Any, ...]], loss_fn, scale: float = 1.0) -> dict[str, float]:
        """New snapshot; update c_t; compute g_tilde at the new snapshot if the coming epochs use it.

        ``batches`` yields argument tuples of the large-batch pass (clean or adversarial inputs, per config);
        ``loss_fn(model, *batch)`` is the objective's batch-mean loss. The pass runs only when needed: never
        at the first refresh of ``paper``/``official`` (c_0 = 0), always afterwards for ``paper`` (the
        estimate needs it) and whenever c_t != 0 for the others. ``scale`` (fp16: the GradScaler's scale) multiplies
        each batch's loss before its gradient, which is then divided by it; a batch whose scaled gradient
        overflows is taken again at half the scale.
        """
        config = self.config
        with self.masker.full_weights() if self.masker is not None else nullcontext():
            new_snapshot = copy.deepcopy(self.model)
        new_snapshot.train(config.full_grad_bn == "train")
        previous = self.snapshot
        # paper: c_hat compares the new snapshot (the current model) with the previous one on the pass's batches
        estimator = self.weighting.estimator
        estimating = estimator is AgentEstimator.PAPER and previous is not None
        update = partial(update_c, estimator, self.c, self.refreshes, alpha=config.alpha,
                         fixed_c=self.weighting.fixed_c, clip=config.clip)
        if not estimating:  # official's ramp, fixed, paper's c_0 = 0: known before the pass
            self.c_hat, self.c = update()
        n_views = self._count()
        passed = None
        if estimating or (estimator is not AgentEstimator.PAPER and self.c != 0):
            passed = self._large_batch_pass(new_snapshot, previous if estimating else None, batches, loss_fn, scale)
        # what this rank's pass ran (FLOPs accounting): batches, whether with gradients, the previous snapshot's
        self.last_pass = (RefreshPass(passed.batches, True, estimating) if passed is not None
                          else RefreshPass(0, False, False))
        if estimating:
            assert passed is not None
            self.c_hat, self.c = update(current_losses=passed.current_losses, snapshot_losses=passed.previous_losses)
        if not config.clip and not 0.0 <= self.c <= 1.0:  # only paper gets here (official ramps, fixed is checked)
            log.warning("AGENT c_t = %.4g (c_hat %.4g) at refresh %d is outside [0, 1], the paper's range: %s",
                        self.c, self.c_hat, self.refreshes,
                        "a negative c_t reverses the correction (adds gamma*|c_t|*(g_old - g_tilde))" if self.c < 0
                        else "the correction outweighs the variance it should remove (c_t > 1)")
            log.warning("unclipped c_t is the official code's behaviour; agent.clip=true clips it to [0, 1] as the "
                        "paper's text does")
        self.subnet_snapshot_masks = [{name: mask.clone() for name, mask in self._masks_of(k).items()}
                                      for k in range(n_views)]
        if passed is not None and min(passed.counts):  # the mean of batch-mean gradients, per sub-net
            self.subnet_full_grads = [self._mask_like_snapshot([total / count for total in sums], k)
                                      for k, (sums, count) in enumerate(zip(passed.sums, passed.counts))]
        for p in new_snapshot.parameters():
            p.requires_grad_(True)
        new_snapshot.train()
        self.snapshot = new_snapshot
        self.refreshes += 1
        return {"agent_c_hat": self.c_hat, "agent_c": self.c, "agent_weight": self.gamma_c}

    def _large_batch_pass(self, snapshot: nn.Module, previous: nn.Module | None, batches: Iterable[tuple[Any, ...]],
                          loss_fn, scale: float) -> _PassResult:
        """The gradient of ``snapshot`` summed per view over ``batches`` (batch ``b`` of the whole pass goes to
        view ``b mod K``) and, with ``previous``, the per-batch losses of both models; the sums and batch counts
        are the mean over ranks, the losses every rank's."""
        snapshot_params = [p for p in snapshot.parameters() if p.requires_grad]
        n_views = self._count()
        sums = [[torch.zeros_like(p) for p in snapshot_params] for _ in range(n_views)]
        current_losses, previous_losses, counts = [], [], [0] * n_views
        # Under torchrun ``batches`` is this rank's share of the pass: its i-th batch is batch i * W + rank of the
        # whole pass, which picks the sub-net.
        rank, world_size = distributed.rank_and_world_size()
        if previous is not None:
            previous.train(self.config.full_grad_bn == "train")
        for index, batch in enumerate(batches):
            k = (index * world_size + rank) % n_views
            with self._view(snapshot, k):
                loss = loss_fn(snapshot, *batch)
                for accumulator, grad in zip(sums[k], _scaled_grad(loss, snapshot_params, scale)):
                    accumulator.add_(grad)
            if previous is not None:
                with torch.no_grad(), self._view(previous, k):
                    previous_losses.append(loss_fn(previous, *batch).detach())
                current_losses.append(loss.detach())
            counts[k] += 1
        batches_run = sum(counts)
        # Every rank ran its own shard of the pass: sums and batch counts over all ranks.
        for grads in sums:
            distributed.all_reduce_mean(grads)
        totals = torch.tensor(counts, dtype=torch.float32, device=snapshot_params[0].device)
        distributed.all_reduce_mean([totals])
        if previous is None:
            return _PassResult(batches_run, sums, totals.tolist(), None, None)
        current = distributed.all_gather_cat(torch.stack(current_losses)).tolist()
        return _PassResult(batches_run, sums, totals.tolist(), current,
                           distributed.all_gather_cat(torch.stack(previous_losses)).tolist())

    def _mask_like_snapshot(self, grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """Mask sub-net ``k``'s snapshot gradients as the config says: by the snapshot's mask (official), the
        current one, or not."""
        choice = self.config.snapshot_mask
        if choice == "none":
            return grads
        masks = self.subnet_snapshot_masks[k] if choice == "snapshot" else self._masks_of(k)
        # in place: the gradients are fresh tensors from autograd.grad or the g_tilde accumulators
        return [grad.mul_(masks[name]) if name in masks else grad for name, grad in zip(self.names, grads)]

    # ---- per step ----------------------------------------------------------------------------------------

    def active(self) -> bool:
        return self.snapshot is not None and self.full_grads is not None and self.gamma_c != 0

    def snapshot_backward(self, loss_fn) -> None:
        """g_old: the snapshot's gradient of ``loss_fn(snapshot)`` (the same batch as the current step)."""
        if not self.active():
            self.snapshot_grads = None
            return
        assert self.snapshot is not None
        snapshot_params = [p for p in self.snapshot.parameters() if p.requires_grad]
        k = self._active_view()
        with self._view(self.snapshot, k):
            grads = list(torch.autograd.grad(loss_fn(self.snapshot), snapshot_params))
        distributed.all_reduce_mean(grads)  # like g_new, which DistributedDataParallel averages
        self.snapshot_grads = self._mask_like_snapshot(grads, k)

    @torch.no_grad()
    def correct(self, scale: torch.Tensor | None = None) -> None:
        """Apply the correction to ``.grad`` now (:meth:`step` does it otherwise). ``scale``: the loss scale that
        ``.grad`` and ``g_old`` carry (a GradScaler's), applied to ``g_tilde`` too; None = unscaled."""
        if self.snapshot_grads is not None and self.active():
            assert self.full_grads is not None
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            self._record_cosine(grads, self.snapshot_grads)
            full = self.full_grads if scale is None else torch._foreach_mul(self.full_grads, scale)
            agent_correction(grads, self.snapshot_grads, full, gamma_c=self.gamma_c)
            for p, grad in zip(self.params, grads):
                p.grad = grad
        self.snapshot_grads = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AGENT does not take a closure: call snapshot_backward() between backward and step")
        self.correct()
        return self.base.step()

    def _record_cosine(self, new: list[torch.Tensor], old: list[torch.Tensor]) -> None:
        # Accumulated on the device: reading it back every step would cost a host sync per step. Flat dot
        # products allocate no per-element temporaries.
        dot = sum(torch.dot(a.flatten(), b.flatten()) for a, b in zip(new, old))
        norms = torch.sqrt(sum(torch.dot(a.flatten(), a.flatten()) for a in new)
                           * sum(torch.dot(b.flatten(), b.flatten()) for b in old))
        cosine = (dot / norms.clamp_min(1e-30)).detach()
        if self._cosine_count == 0:  # a fresh zero on the gradients' device: moving the CPU one is a blocking copy
            self._cosine_sum = torch.zeros((), device=cosine.device)
        self._cosine_sum = self._cosine_sum + cosine
        self._cosine_count += 1

    def epoch_metrics(self) -> dict[str, float]:
        """Per-epoch logging: c_hat, c_t, gamma*c_t and the mean cosine between g_new and g_old."""
        cosine = self._cosine_sum.item() / self._cosine_count if self._cosine_count else float("nan")
        self._cosine_sum, self._cosine_count = torch.zeros(()), 0
        return {"agent_c_hat": self.c_hat, "agent_c": self.c, "agent_weight": self.gamma_c, "agent_cosine": cosine}

    def variance_ratio(self, chunks: list[tuple[Any, Any]], loss_fn) -> float:
        """Var(g_hat) / Var(g_new) across the sub-batches of a probe batch (summed over coordinates).

        ``chunks`` are argument tuples for ``loss_fn(model, *chunk)``; the model's BN is in train mode, as in
        training, but on a copy so that the probe does not move the running statistics.
        """
        if not self.active() or len(chunks) < 2:
            return float("nan")
        assert self.snapshot is not None and self.full_grads is not None
        probe = copy.deepcopy(self.model).train()
        probe_params = [p for p in probe.parameters() if p.requires_grad]
        snapshot_params = [p for p in self.snapshot.parameters() if p.requires_grad]
        news, hats = [], []
        for chunk in chunks:
            new = [g * self.masks[n] if n in self.masks else g
                   for n, g in zip(self.names, torch.autograd.grad(loss_fn(probe, *chunk), probe_params))]
            with self._view(self.snapshot, self._active_view()):
                old = list(torch.autograd.grad(loss_fn(self.snapshot, *chunk), snapshot_params))
            old = self._mask_like_snapshot(old, self._active_view())
            hat = [g.clone() for g in new]
            agent_correction(hat, old, self.full_grads, gamma_c=self.gamma_c)
            news.append(torch.cat([g.flatten() for g in new]))
            hats.append(torch.cat([g.flatten() for g in hat]))
        variance_new = torch.stack(news).var(dim=0).sum()
        variance_hat = torch.stack(hats).var(dim=0).sum()
        return (variance_hat / variance_new).item() if variance_new > 0 else float("nan")

    # ---- persistence -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.state_dict(),
            "agent": {
                "c": self.c, "c_hat": self.c_hat, "refreshes": self.refreshes,
                "snapshot": self.snapshot.state_dict() if self.snapshot is not None else None,
                "snapshot_masks": [{n: m.clone() for n, m in masks.items()} for masks in self.subnet_snapshot_masks],
                "full_grads": [[g.clone() for g in grads] for grads in self.subnet_full_grads]
                if self.subnet_full_grads is not None else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.param_groups = self.base.param_groups  # loading replaced the base's group dicts: share again
        agent = state["agent"]
        self.c, self.c_hat, self.refreshes = float(agent["c"]), float(agent["c_hat"]), int(agent["refreshes"])
        self.snapshot = None
        if agent["snapshot"] is not None:
            self.snapshot = copy.deepcopy(self.model)
            self.snapshot.load_state_dict(agent["snapshot"])
            self.snapshot.train()
        masks, full = agent["snapshot_masks"], agent["full_grads"]
        if isinstance(masks, dict):  # written before sub-nets existed: one set of masks and gradients
            masks, full = [masks], [full] if full is not None else None
        self.subnet_snapshot_masks = [dict(m) for m in masks]
        self.subnet_full_grads = [list(g) for g in full] if full is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)


# ---- the training loop's side: the pass's batches and loss, the per-epoch columns, the settings' check ------


def objective_loss(objective: Objective, amp: Amp | None = None):
    """``loss(model, images, labels, model_inputs)``: the objective's batch-mean loss, for AGENT's passes (the
    forward under ``amp``'s autocast; unscaled)."""

    def loss(model, images, labels, inputs):
        with amp.autocast() if amp is not None else nullcontext():
            return objective.loss(model, images, labels, inputs)[0]

    return loss


def full_grad_pass_length(config: TrainConfig, images: int, world_size: int) -> int:
    """Batches of AGENT's g_tilde pass each rank runs: its share of ``agent.full_grad_batches`` (rounded up, the
    same on every rank), at most its shard of the training split in full batches."""
    shard = (images // world_size) // config.data.batch_size
    return min(math.ceil(config.agent.full_grad_batches / world_size) or shard, shard)


def full_grad_pass(config: TrainConfig, train: ImageSet, objective: Objective, device: torch.device, epoch: int,
                   world: distributed.Context = distributed.Context()) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches of AGENT's large-batch pass: unaugmented training batches, clean (official) or adversarial
    inputs, as ``(images, labels, model_inputs)``.

    Under torchrun each rank takes its own shard of the split, as the training loader does, and runs
    1/world_size of the pass; AGENT all-reduces what the ranks computed.
    """
    loader = batch_loader(train, config.data.batch_size, device, shuffle=True, seed=config.seed + 1, drop_last=True,
                          rank=world.rank, world_size=world.world_size, workers=config.data.workers)
    loader.set_epoch(epoch)
    limit = full_grad_pass_length(config, len(train), world.world_size)
    for index, (images, labels) in enumerate(loader):
        if index == limit:
            return
        inputs = images if config.agent.full_grad_inputs == "clean" else objective.perturb(images, labels)
        yield images, labels, images if inputs is None else inputs


def agent_metrics(agent: AGENT | None, config: TrainConfig, train: ImageSet, objective: Objective,
                  device: torch.device, amp: Amp | None = None) -> dict[str, float]:
    """The epoch's AGENT columns: :meth:`AGENT.epoch_metrics` and, with ``agent.probe_chunks``,
    Var(g_hat)/Var(g_new) on a fixed probe batch (the first training images, attacked afresh)."""
    if agent is None:
        return {}
    metrics = agent.epoch_metrics()
    ratio = float("nan")
    if config.agent.probe_chunks and agent.active():
        probe = in_memory(train.take(slice(0, config.data.batch_size)), config.data.workers)
        images = probe.images.to(device).float().div_(255)
        labels = probe.labels.to(device)
        adversarial = objective.perturb(images, labels)
        inputs = images if adversarial is None else adversarial
        chunks = [(x, y, a) for x, y, a in zip(images.chunk(config.agent.probe_chunks),
                                                 labels.chunk(config.agent.probe_chunks),
                                                 inputs.chunk(config.agent.probe_chunks))]
        ratio = agent.variance_ratio(chunks, objective_loss(objective, amp))
    return {**metrics, "agent_variance_ratio": ratio}


def check_agent(config: TrainConfig, train_images: int, world_size: int, views: int) -> None:
    """AGENT's settings against what the run has: its g_tilde pass drops the last partial batch and, under
    torchrun, each rank runs its share of it; several sub-nets (``views``) each need batches of their own."""
    agent = config.agent
    if views > 1 and 0 < agent.full_grad_batches < views:
        raise UserError(f"agent.full_grad_batches = {agent.full_grad_batches}: each of the {views} sub-nets "
                        f"gets its own g_tilde batches; use >= {views} (or 0 = all)")
    rank_batches = full_grad_pass_length(config, train_images, world_size)
    if resolve_variant(agent).gamma > 0 and (rank_batches < 1 or rank_batches * world_size < 2):
        raise UserError(f"agent: the g_tilde pass needs at least 2 full batches of {config.data.batch_size} "
                        f"training images (one per rank), the split has {train_images}; lower data.batch_size")


def _scaled_grad(loss: torch.Tensor, params: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """d loss / d params, computed as d (scale * loss) / d params / scale; halves the scale until it is finite."""
    if scale == 1.0:
        return list(torch.autograd.grad(loss, params))
    while True:
        grads = torch.autograd.grad(loss * scale, params, retain_graph=scale > 1.0)
        if scale <= 1.0 or all(bool(torch.isfinite(g).all()) for g in grads):
            return [g / scale for g in grads]
        scale /= 2


__all__ = ["AGENT", "Weighting", "agent_correction", "resolve_variant", "agent_metrics", "check_agent", "estimate_c", "full_grad_pass",
           "full_grad_pass_length", "momentum_update", "objective_loss", "update_c"]
