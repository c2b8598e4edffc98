"""The fast gradient sign method (Goodfellow et al., 2015, https://arxiv.org/abs/1412.6572)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.attacks.base import Attack, ascent_step, project


class FGSM(Attack):
    """One full-size step on the cross-entropy from the clean point: ``x + eps * sign(grad)`` for L-inf,
    ``x + eps * grad / ||grad||`` for L2 (the "fast gradient method"), clamped into [0, 1].

    Deterministic (no random start). A weak attack: useful as a lower bound on the attacks' strength and as a
    cheap gradient-masking probe (FGSM much stronger than PGD points at a masked or noisy gradient).
    """

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255) -> None:
        super().__init__(model)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if eps < 0:
            raise ValueError("FGSM needs eps >= 0")
        self.norm, self.eps = norm, eps

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("FGSM needs labels")
        if self.eps == 0:
            return images.clone()
        delta = torch.zeros_like(images, requires_grad=True)
        loss = F.cross_entropy(self.logits(images + delta), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        return images + project(ascent_step(grad, self.norm, self.eps), images, self.norm, self.eps)
