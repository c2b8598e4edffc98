"""A run's optimizer and learning-rate schedule (:func:`build_optimization`), and SGDW (MVR: robust_sparse.mvr).

SGDW as BSR-Net and AGENT run it (TensorFlow Addons ``SGDW`` with Keras momentum).

Two differences from ``torch.optim.SGD(weight_decay=...)``, both of which matter for BSR-Net, where decay is
what drives connections across zero:

* decay is decoupled and *not* multiplied by the learning rate: ``p <- p - wd_t * p`` before the update,
  where ``wd_t`` follows the learning-rate schedule (``wd * lr_t / lr_0``), as the official code schedules
  both with the same piecewise factors;
* Keras momentum keeps the learning rate inside the velocity: ``v <- m * v - lr * g; p <- p + v``. With a
  constant rate this equals torch's ``b <- m * b + g; p <- p - lr * b``; they differ right after a drop.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from robust_sparse.config import OptimizerName, Schedule, TrainConfig, sparse_methods
from robust_sparse.mvr import MVR

log = logging.getLogger(__name__)


def sgdw(params: list[torch.Tensor], grads: list[torch.Tensor], velocities: list[torch.Tensor], *,
         lr: float, momentum: float, decay: float) -> None:
    """One SGDW step over tensor lists, in place (single-tensor reference implementation)."""
    for param, grad, velocity in zip(params, grads, velocities):
        if decay:
            param.mul_(1.0 - decay)
        velocity.mul_(momentum).sub_(grad, alpha=lr)
        param.add_(velocity)


class SGDW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum: {momentum}")
        if weight_decay < 0 or weight_decay >= 1:
            raise ValueError(f"Invalid weight decay (a per-step fraction): {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            velocities = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                velocities.append(state["momentum_buffer"])
            # The decay follows the learning-rate schedule; LambdaLR records the base rate as initial_lr.
            decay = group["weight_decay"] * group["lr"] / group.get("initial_lr", group["lr"])
            sgdw(params, [p.grad for p in params], velocities, lr=group["lr"], momentum=group["momentum"],
                 decay=decay)
        return loss


def lr_factor(config: TrainConfig, progress: float) -> float:
    """Multiplier of the base learning rate after ``progress`` (a fraction in [0,1]) of all iterations."""
    optim = config.optim
    if optim.schedule is Schedule.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if optim.schedule is Schedule.PIECEWISE:
        passed = [factor for milestone, factor in zip(optim.milestones, optim.factors) if progress >= milestone]
        return passed[-1] if passed else 1.0
    return 1.0


def build_optimization(config: TrainConfig, model: nn.Module, steps_per_epoch: int):
    """``optim``'s optimizer over ``model``'s parameters and its schedule, a LambdaLR stepped every iteration."""
    optim = config.optim
    if optim.optimizer is OptimizerName.MVR:
        optimizer: torch.optim.Optimizer = MVR(model, lr=optim.lr, momentum=optim.momentum,
                                               weight_decay=optim.weight_decay)
    elif optim.optimizer is OptimizerName.SGDW:
        optimizer = SGDW(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                                weight_decay=optim.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                    weight_decay=optim.weight_decay, nesterov=optim.nesterov)
        methods, method = sparse_methods(), config.sparsity.method
        paired = methods.get(method).optimizer if method in methods else None
        if paired == OptimizerName.SGDW.value and optim.weight_decay > 0:
            log.warning("sparsity.method = %s runs with coupled weight decay (optim.optimizer = sgd); the method "
                        "pairs with decoupled decay not scaled by the learning rate: set optim.optimizer = sgdw",
                        method)
    total = config.optim.epochs * steps_per_epoch
    # Stepped once per iteration, so milestones fall where the papers put them (BSR-Net counts iterations).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step / total))
    return optimizer, scheduler
