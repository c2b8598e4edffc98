"""PGD on the Carlini-Wagner margin loss (Carlini & Wagner, 2017, https://arxiv.org/abs/1608.04644).

This is the "CW-inf" attack of the adversarial-training literature (TRADES, MART, Rice et al.): not the
original optimisation-based C&W attack, but projected gradient ascent on the logit margin
``max_{j != y} z_j - z_y`` instead of the cross-entropy. The margin is scale-invariant in the sense that
matters here: a model whose softmax saturates (vanishing cross-entropy gradients) still has a useful
margin gradient, so CW and PGD disagreeing points at gradient masking.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_sparse.attacks.base import Attack, ascent_step, project, random_start


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float = float("inf")) -> torch.Tensor:
    """Per-example ``min(max_{j != y} z_j - z_y, kappa)``: positive exactly when the point is misclassified."""
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, labels[:, None], float("-inf"))
    return (others.amax(1) - true_logit).clamp(max=kappa)


class CW(Attack):
    """Untargeted PGD on the CW margin loss, L-inf or L2, from a random start.

    ``kappa`` caps the margin, as in the usual CW-inf evaluation code (50): a point already misclassified by
    ``kappa`` stops moving. One run per call; the evaluation runner does restarts (on the points still
    robust) so that every restart is seeded and resumable.

    Args:
        model: maps [0,1] images to logits.
        norm: ``"linf"`` or ``"l2"``.
        eps, step_size, steps, random_start: as in :class:`~robust_sparse.attacks.PGD`.
        kappa: margin cap (confidence).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 30,
        random_start: bool = True,
        kappa: float = 50.0,
    ) -> None:
        super().__init__(model)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if eps < 0 or step_size <= 0 or steps < 1 or kappa <= 0:
            raise ValueError("CW needs eps >= 0, step_size > 0, steps >= 1 and kappa > 0")
        self.norm, self.eps, self.step_size, self.steps = norm, eps, step_size, steps
        self.random_start, self.kappa = random_start, kappa

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("CW needs labels")
        delta = torch.zeros_like(images)
        if self.random_start:
            delta = project(random_start(images, self.norm, self.eps), images, self.norm, self.eps)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = margin_loss(self.model(images + delta), labels, self.kappa).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = project(delta.detach() + ascent_step(grad, self.norm, self.step_size), images, self.norm, self.eps)
        return images + delta
