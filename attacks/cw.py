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

from robust_sparse.attacks.pgd import PGD


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, kappa: float = float("inf")) -> torch.Tensor:
    """Per-example ``min(max_{j != y} z_j - z_y, kappa)``: positive exactly when the point is misclassified."""
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, labels[:, None], float("-inf"))
    return (others.amax(1) - true_logit).clamp(max=kappa)


class CW(PGD):
    """Untargeted PGD on the CW margin loss, L-inf or L2, from a random start: :class:`PGD` with another loss.

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
        super().__init__(model, norm=norm, eps=eps, step_size=step_size, steps=steps, random_start=random_start)
        if kappa <= 0:
            raise ValueError(f"CW needs kappa > 0, got {kappa}")
        self.kappa = kappa

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_loss(logits, labels, self.kappa).sum()
