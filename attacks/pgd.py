"""Projected gradient descent (Madry et al., 2018, https://arxiv.org/abs/1706.06083)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.attacks.base import Attack, ascent_step, project, random_start


class PGD(Attack):
    """Untargeted PGD on the cross-entropy, L-inf or L2, with random starts and restarts.

    With ``restarts > 1`` a point keeps the first perturbation that fools the model (and otherwise the last
    one), so a point counts as robust only if no restart fools it: the BSR-Net/AGENT PGD-50x10 protocol.

    We do not wrap ``torchattacks.PGD``/``PGDL2``: they have no restarts, and their base checks the input
    range with ``.min()``/``.max()`` on every call, a device-to-host sync inside the training loop. A test
    checks that this class and torchattacks agree step for step when both start at the clean point.

    Args:
        model: maps [0,1] images to logits.
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the threat model, in pixel units.
        step_size: ascent step (L-inf: per coordinate; L2: Euclidean length).
        steps: number of ascent steps.
        random_start: start from a uniform point in the ball instead of the clean image.
        restarts: independent runs; a point is fooled if any run fools it.

    Shape:
        images: [N, C, H, W] in [0, 1]; labels: [N] int64. Returns [N, C, H, W] in [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "linf",
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
    ) -> None:
        super().__init__(model)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        if eps < 0 or step_size <= 0 or steps < 1 or restarts < 1:
            raise ValueError("PGD needs eps >= 0, step_size > 0, steps >= 1 and restarts >= 1")
        self.norm, self.eps, self.step_size, self.steps = norm, eps, step_size, steps
        self.random_start, self.restarts = random_start, restarts

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise ValueError("PGD needs labels")
        best = images.clone()
        still_robust = torch.ones(len(images), dtype=torch.bool, device=images.device)
        for _ in range(self.restarts):
            adversarial = self._run(images, labels)
            if self.restarts == 1:
                return adversarial
            with torch.no_grad():
                fooled = self.logits(adversarial).argmax(1) != labels
            # Points no earlier run fooled take this run's output: frozen from now on if it fools the model,
            # replaced by the next run's otherwise. The result is always a genuine attack output.
            best[still_robust] = adversarial[still_robust]
            still_robust &= ~fooled
        return best

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed objective each step ascends (cross-entropy here; subclasses change only this)."""
        return F.cross_entropy(logits, labels, reduction="sum")

    def _run(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(images)
        if self.random_start:
            delta = project(random_start(images, self.norm, self.eps), images, self.norm, self.eps)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = self.loss(self.logits(images + delta), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = project(delta.detach() + ascent_step(grad, self.norm, self.step_size), images, self.norm, self.eps)
        return images + delta
