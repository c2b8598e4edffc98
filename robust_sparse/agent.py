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
    ``c_t`` held at ``fixed_c`` from the first step (the paper's "fixed c_t" ablation).

:class:`AGENT` is an optimizer *wrapper*: it shares ``param_groups`` with the base optimizer, corrects the
gradients in ``.grad`` and delegates the update, so it composes with any base optimizer, sparse engine (their
hooks sit on the base optimizer) and objective. The maths is the pure function :func:`agent_correction`.

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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from robust_sparse import distributed
from robust_sparse.config import AgentConfig, AgentEstimator

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker

log = logging.getLogger(__name__)


def agent_correction(grads: list[torch.Tensor], snapshot_grads: list[torch.Tensor],
                     full_grads: list[torch.Tensor], *, weight: float, foreach: bool | None = None) -> None:
    """In place: ``g <- g - weight * (g_old - g_tilde)`` for every tensor.

    ``foreach`` (default: whenever every tensor is on one device) runs it as two fused multi-tensor kernels
    without temporaries, like ``torch.optim.SGD``'s foreach path; the loop is the reference.
    """
    if not grads:
        return
    if foreach is None:
        foreach = len({g.device for g in grads}) == 1 and not torch.jit.is_scripting()
    if foreach:
        _multi_tensor_agent_correction(grads, snapshot_grads, full_grads, weight)
    else:
        _single_tensor_agent_correction(grads, snapshot_grads, full_grads, weight)


def _single_tensor_agent_correction(grads, snapshot_grads, full_grads, weight: float) -> None:
    for grad, old, full in zip(grads, snapshot_grads, full_grads):
        grad.sub_(old - full, alpha=weight)


def _multi_tensor_agent_correction(grads, snapshot_grads, full_grads, weight: float) -> None:
    torch._foreach_add_(grads, full_grads, alpha=weight)
    torch._foreach_add_(grads, snapshot_grads, alpha=-weight)


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
    :meth:`correct` with ``s`` before the scaler's step, which applies ``g - w (g_old - s g_tilde)``, exactly
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

    def _active(self) -> int:
        return self.masker.active_view if self.masker is not None else 0

    def _view(self, module: nn.Module | None, k: int):
        """Inside, ``module`` (the snapshot: full weights) is view ``k``."""
        return self.masker.views()[k].on(module) if self.masker is not None and module is not None else nullcontext()

    def _masks_of(self, k: int) -> dict[str, torch.Tensor]:
        return self.masker.views()[k].masks if self.masker is not None else self.masks

    @property
    def full_grads(self) -> list[torch.Tensor] | None:
        """g_tilde of the active view."""
        return self.subnet_full_grads[self._active()] if self.subnet_full_grads is not None else None

    @property
    def snapshot_masks(self) -> dict[str, torch.Tensor]:
        return self.subnet_snapshot_masks[self._active()]

    # ---- the weight --------------------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        """gamma * c_t, the weight of the correction in the current epoch."""
        return self.config.gamma * self.c

    def due(self, epoch: int) -> bool:
        return self.config.gamma > 0 and epoch % self.config.snapshot_every == 0

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
        estimator = config.estimator
        needs_estimate = estimator is AgentEstimator.PAPER and previous is not None
        if estimator is AgentEstimator.FIXED:
            self.c = config.fixed_c
        elif estimator is AgentEstimator.OFFICIAL:
            self.c_hat = 1.0
            self.c = momentum_update(self.c, 1.0, config.alpha, self.refreshes)
        need_gradient = needs_estimate or (estimator is not AgentEstimator.PAPER and self.c != 0)

        snapshot_params = [p for p in new_snapshot.parameters() if p.requires_grad]
        n_views = self._count()
        full = [[torch.zeros_like(p) for p in snapshot_params] for _ in range(n_views)] if need_gradient else None
        current_losses, previous_losses, counts = [], [], [0] * n_views
        # Under torchrun ``batches`` is this rank's share of the pass: its i-th batch is batch i * W + rank of the
        # whole pass, which picks the sub-net.
        rank, world_size = distributed.rank_and_world_size()
        if need_gradient or needs_estimate:
            if previous is not None:
                previous.train(config.full_grad_bn == "train")
            for index, batch in enumerate(batches):
                k = (index * world_size + rank) % n_views
                with self._view(new_snapshot, k):
                    loss = loss_fn(new_snapshot, *batch)
                    if full is not None:
                        for accumulator, grad in zip(full[k], _scaled_grad(loss, snapshot_params, scale)):
                            accumulator.add_(grad)
                if needs_estimate:
                    with torch.no_grad(), self._view(previous, k):
                        previous_losses.append(loss_fn(previous, *batch).detach())
                    current_losses.append(loss.detach())
                counts[k] += 1
        # what this rank's pass ran (FLOPs accounting): batches, whether with gradients, the previous snapshot's
        self.last_pass = RefreshPass(sum(counts), full is not None, needs_estimate)
        if full is not None:
            # Every rank ran its own shard of the pass: sums and batch counts over all ranks.
            for grads in full:
                distributed.all_reduce_mean(grads)
            totals = torch.tensor(counts, dtype=torch.float32, device=snapshot_params[0].device)
            distributed.all_reduce_mean([totals])
            counts = totals.tolist()
        if needs_estimate:
            current = distributed.all_gather_cat(torch.stack(current_losses))
            previous_all = distributed.all_gather_cat(torch.stack(previous_losses))
            self.c_hat = estimate_c(current.tolist(), previous_all.tolist())
            self.c = momentum_update(self.c, self.c_hat, config.alpha, self.refreshes)
        elif estimator is AgentEstimator.PAPER:
            self.c_hat, self.c = float("nan"), 0.0  # the first refresh: no previous snapshot, c_0 = 0
        if config.clip:
            self.c = min(1.0, max(0.0, self.c))
        elif not 0.0 <= self.c <= 1.0:  # only the paper estimator can get here (official ramps, fixed is checked)
            log.warning("AGENT c_t = %.4g (c_hat %.4g) at refresh %d is outside [0, 1], the paper's range: %s",
                        self.c, self.c_hat, self.refreshes,
                        "a negative c_t reverses the correction (adds gamma*|c_t|*(g_old - g_tilde))" if self.c < 0
                        else "the correction outweighs the variance it should remove (c_t > 1)")
            log.warning("unclipped c_t is the official code's behaviour; agent.clip=true clips it to [0, 1] as the "
                        "paper's text does")
        self.subnet_snapshot_masks = [{name: mask.clone() for name, mask in self._masks_of(k).items()}
                                      for k in range(n_views)]
        if full is not None and min(counts):
            # the mean of batch-mean gradients, per sub-net
            self.subnet_full_grads = [self._mask_like_snapshot([value / counts[k] for value in full[k]], k)
                                      for k in range(n_views)]
        for p in new_snapshot.parameters():
            p.requires_grad_(True)
        new_snapshot.train()
        self.snapshot = new_snapshot
        self.refreshes += 1
        return {"agent_c_hat": self.c_hat, "agent_c": self.c, "agent_weight": self.weight}

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
        return self.snapshot is not None and self.full_grads is not None and self.weight != 0

    def snapshot_backward(self, loss_fn) -> None:
        """g_old: the snapshot's gradient of ``loss_fn(snapshot)`` (the same batch as the current step)."""
        if not self.active():
            self.snapshot_grads = None
            return
        assert self.snapshot is not None
        snapshot_params = [p for p in self.snapshot.parameters() if p.requires_grad]
        k = self._active()
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
            agent_correction(grads, self.snapshot_grads, full, weight=self.weight)
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
        return {"agent_c_hat": self.c_hat, "agent_c": self.c, "agent_weight": self.weight, "agent_cosine": cosine}

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
            with self._view(self.snapshot, self._active()):
                old = list(torch.autograd.grad(loss_fn(self.snapshot, *chunk), snapshot_params))
            old = self._mask_like_snapshot(old, self._active())
            hat = [g.clone() for g in new]
            agent_correction(hat, old, self.full_grads, weight=self.weight)
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



def _scaled_grad(loss: torch.Tensor, params: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """d loss / d params, computed as d (scale * loss) / d params / scale; halves the scale until it is finite."""
    if scale == 1.0:
        return list(torch.autograd.grad(loss, params))
    while True:
        grads = torch.autograd.grad(loss * scale, params, retain_graph=scale > 1.0)
        if scale <= 1.0 or all(bool(torch.isfinite(g).all()) for g in grads):
            return [g / scale for g in grads]
        scale /= 2


__all__ = ["AGENT", "agent_correction", "estimate_c", "momentum_update"]
