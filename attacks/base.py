"""The attack base: runs ``forward`` with the model in eval mode and always restores the caller's mode."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import nn


class Attack(ABC):
    """An adversary over inputs in [0, 1].

    BatchNorm uses running statistics while the attack runs (eval mode), as in Madry et al., TRADES, BSR-Net
    and AGENT; the model's previous mode is restored afterwards, even if the attack raises. Gradients are
    taken with ``torch.autograd.grad`` with respect to the input only, so parameter ``.grad`` fields are
    never touched.

    ``autocast`` (default: none) is entered around every forward of the model made through :meth:`logits`
    (mixed-precision training sets it): only the forward runs in reduced precision, the logits come back as
    the inputs' dtype, and the perturbation, its step and its projection stay in the inputs' dtype.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.autocast: Callable[[], AbstractContextManager] = nullcontext

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's forward, under :attr:`autocast`; the logits in the inputs' dtype (fp32 under autocast)."""
        with self.autocast():
            logits = self.model(inputs)
        return logits if logits.dtype == inputs.dtype else logits.to(inputs.dtype)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                adversarial = self.forward(images.detach(), None if labels is None else labels.detach())
        finally:
            self.model.train(was_training)
        return adversarial.detach()

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Return adversarial images in [0, 1], inside the threat model's ball around ``images``."""


def flat_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast over [N, C, H, W]."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project a perturbation onto the eps-ball of ``norm`` and then onto the [0, 1] box.

    Clamping into the box after the ball projection keeps the point in the ball for both norms: the box
    clamp only moves coordinates towards ``images``, which never increases |delta|.
    """
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * factor
    return (images + delta).clamp(0.0, 1.0) - images


def ascent_step(grad: torch.Tensor, norm: str, step_size: float) -> torch.Tensor:
    """Steepest ascent under ``norm``: the sign for L-inf, the normalised gradient for L2."""
    if norm == "linf":
        return step_size * grad.sign()
    return step_size * grad / flat_norm(grad).clamp_min(1e-12)


def random_start(images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A uniform point in the L-inf ball, or a uniform point in the L2 ball (random direction, radius eps*U^(1/d))."""
    if norm == "linf":
        return torch.empty_like(images).uniform_(-eps, eps)
    direction = torch.randn_like(images)
    direction = direction / flat_norm(direction).clamp_min(1e-12)
    dims = images[0].numel()
    radius = eps * torch.rand(images.shape[0], device=images.device).pow(1.0 / dims)
    return direction * radius.view(-1, *([1] * (images.dim() - 1)))
