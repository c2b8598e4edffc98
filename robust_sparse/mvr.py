"""MVR: momentum-based variance reduction, STORM (Cutkosky & Orabona, NeurIPS 2019), for AGENT's Table 5.

One step on batch ``xi_t``:

    d_t = g(theta_t; xi_t) + (1 - a) (d_{t-1} - g(theta_{t-1}; xi_t)),      theta_{t+1} = theta_t - lr_t d_t

with ``d_0 = g(theta_0; xi_0)``. ``optim.momentum`` is ``1 - a`` (0.9: a = 0.1); ``optim.weight_decay`` is an L2
term of the objective, so it enters both gradients at their own weights (``g + wd * theta``). The gradient at the
previous weights on the *current* batch is what makes it variance reduction rather than momentum: it costs one
more forward and backward per step, which the training loop asks for through :meth:`MVR.previous_backward`
(after ``loss.backward()``, before ``step``) and robust_sparse.flops counts.

Sparse runs: the masker's hooks sit on this optimizer like on any other; :meth:`MVR.attach` gives it the masker,
whose masks the previous gradient gets (the current one is masked by the masker's gradient hooks) and whose
step hook zeroes pruned weights and every state tensor shaped like them (``direction``, ``previous_param``).

AGENT + MVR: AGENT wraps this optimizer as any other base, so the gradient MVR receives is AGENT's corrected
``g_hat_t = g_t - gamma c_t (g_old - g_tilde)``, and ``d_t = g_hat_t + (1 - a)(d_{t-1} - g(theta_{t-1}; xi_t))``
(docs/papers.md says why this reading).

The maths is :func:`mvr_direction` over tensor lists.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from robust_sparse import distributed

if TYPE_CHECKING:
    from robust_sparse.sparse.masker import SparseMasker


def mvr_direction(grads: list[torch.Tensor], previous_grads: list[torch.Tensor] | None,
                  directions: list[torch.Tensor], *, keep: float) -> None:
    """In place: ``d <- g + keep * (d - g_prev)`` (``keep`` = 1 - a); ``d <- g`` without a previous gradient."""
    if previous_grads is None:
        for direction, grad in zip(directions, grads):
            direction.copy_(grad)
        return
    for direction, grad, previous in zip(directions, grads, previous_grads):
        direction.sub_(previous).mul_(keep).add_(grad)


class MVR(torch.optim.Optimizer):
    """STORM over the trainable parameters of ``model`` (it keeps a copy of the model for the previous weights)."""

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum (1 - a): {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight decay: {weight_decay}")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.model = model
        self.names = [name for name, _ in named]
        self.masker: "SparseMasker | None" = None
        self._previous_model: nn.Module | None = None
        self.previous_grads: list[torch.Tensor] | None = None  # g(theta_{t-1}; xi_t), set per step
        self.took_previous_gradient = False  # whether the latest step paid the extra forward and backward

    def attach(self, masker: "SparseMasker") -> None:
        """Mask the previous gradient as the masker masks the current one (and take its view, AST's sub-nets)."""
        self.masker = masker

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _load_previous(self) -> nn.Module | None:
        """The model copy at theta_{t-1} (its buffers the current model's), or None before the first step."""
        params = self._params()
        if any("previous_param" not in self.state.get(p, {}) for p in params):
            return None
        if self._previous_model is None:
            self._previous_model = copy.deepcopy(self.model)
        previous = self._previous_model
        torch._foreach_copy_([p for p in previous.parameters() if p.requires_grad],
                             [self.state[p]["previous_param"] for p in params])
        for mine, theirs in zip(previous.buffers(), self.model.buffers()):
            mine.copy_(theirs)
        previous.train(self.model.training)
        return previous

    def previous_backward(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """g(theta_{t-1}; xi_t): the gradient of ``loss_fn(model at the previous weights)``, the current batch."""
        previous = self._load_previous()
        self.took_previous_gradient = previous is not None
        if previous is None:
            self.previous_grads = None
            return
        view = (self.masker.views()[self.masker.active_view].on(previous) if self.masker is not None
                else nullcontext())
        params = [p for p in previous.parameters() if p.requires_grad]
        with view:
            grads = list(torch.autograd.grad(loss_fn(previous), params, allow_unused=True))
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        distributed.all_reduce_mean(grads)  # like the current gradient, which DistributedDataParallel averages
        masks = self.masker.masks if self.masker is not None else {}
        self.previous_grads = [g.mul_(masks[name]) if name in masks else g for name, g in zip(self.names, grads)]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MVR does not take a closure: call previous_backward() between backward and step")
        previous_grads = iter(self.previous_grads) if self.previous_grads is not None else None
        for group in self.param_groups:
            lr, keep, decay = group["lr"], group["momentum"], group["weight_decay"]
            params, grads, directions, olds = [], [], [], []
            for p in group["params"]:
                previous_grad = next(previous_grads) if previous_grads is not None else None
                if p.grad is None:
                    continue
                state = self.state[p]
                first = "direction" not in state
                if first:
                    state["direction"] = torch.zeros_like(p)
                grad = p.grad + decay * p if decay else p.grad
                params.append(p)
                grads.append(grad)
                directions.append(state["direction"])
                if previous_grad is not None and not first:
                    old = state["previous_param"]
                    olds.append(previous_grad + decay * old if decay else previous_grad)
                else:
                    olds.append(None)
                state["previous_param"] = p.detach().clone()  # theta_t: the next step's previous weights
            for p, grad, direction, old in zip(params, grads, directions, olds):
                mvr_direction([grad], [old] if old is not None else None, [direction], keep=keep)
                p.sub_(direction, alpha=lr)
        self.previous_grads = None
        return None


__all__ = ["MVR", "mvr_direction"]
