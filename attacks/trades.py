"""The TRADES inner maximisation (Zhang et al., 2019, https://arxiv.org/abs/1901.08573)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.attacks.base import Attack, ascent_step, project


class TradesKL(Attack):
    """Maximise KL(p(x) || p(x')) over the eps-ball, starting at x + 0.001 * N(0, 1).

    The clean distribution p(x) is computed once and held fixed, as in the reference implementation and
    ``torchattacks.TPGD``. Labels are not used. We keep our own class (rather than ``torchattacks.TPGD``)
    for the L2 threat model, which TPGD lacks, and to share the projection code with :class:`PGD`.

    Args:
        model: maps [0,1] images to logits.
        norm: ``"linf"`` or ``"l2"``.
        eps, step_size, steps: as in :class:`~robust_sparse.attacks.PGD`.
    """

    def __init__(
        self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 10
    ) -> None:
        super().__init__(model)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if eps < 0 or step_size <= 0 or steps < 1:
            raise ValueError("TradesKL needs eps >= 0, step_size > 0 and steps >= 1")
        self.norm, self.eps, self.step_size, self.steps = norm, eps, step_size, steps

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            clean_probs = F.softmax(self.logits(images), dim=1)
        # The TRADES reference evaluates its first gradient at x + 0.001 * N(0,1) outside the box; like
        # torchattacks.TPGD we clamp the start into [0,1], so the model never sees an out-of-range input.
        delta = project(0.001 * torch.randn_like(images), images, self.norm, self.eps)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            log_probs = F.log_softmax(self.logits(images + delta), dim=1)
            loss = F.kl_div(log_probs, clean_probs, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = project(delta.detach() + ascent_step(grad, self.norm, self.step_size), images, self.norm, self.eps)
        return images + delta
