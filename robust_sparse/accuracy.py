"""Clean and PGD accuracy with per-point flags, shared by training-time validation and ``robust-sparse eval``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from robust_sparse.attacks import PGD
from robust_sparse.progress import progress as progress_bar


@dataclass
class RobustnessResult:
    clean_correct: torch.Tensor  # bool [N], per point
    robust_correct: torch.Tensor  # bool [N]: correct under every attack that was run

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct.float().mean().item() if len(self.clean_correct) else float("nan")

    @property
    def robust_accuracy(self) -> float:
        return self.robust_correct.float().mean().item() if len(self.robust_correct) else float("nan")


def pgd_step_size(eps: float, steps: int) -> float:
    """The BSR-Net/AGENT evaluation step, 2.5 * eps / steps: enough to cross the ball from a random start."""
    return 2.5 * eps / steps


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def evaluate_pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 50,
    restarts: int = 1,
    step_size: float | None = None,
    batch_size: int = 500,
    progress: bool = False,
    description: str = "PGD",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> RobustnessResult:
    """Clean and PGD robustness of ``model`` (put in eval mode) on [0,1] ``images`` already on its device.

    Only points the model classifies correctly are attacked: a misclassified point is not robust whatever
    the attack does, so attacking it is wasted work. ``autocast`` wraps every forward of the model (mixed
    precision); the attack's perturbation stays in the images' dtype.
    """
    model.eval()
    with autocast():
        clean_correct = predict(model, images, batch_size) == labels
    robust_correct = clean_correct.clone()
    if eps == 0:  # the ball is a point: robust accuracy is clean accuracy, by definition
        return RobustnessResult(clean_correct.cpu(), robust_correct.cpu())
    attack = PGD(model, norm=norm, eps=eps, steps=steps, restarts=restarts,
                 step_size=step_size if step_size is not None else pgd_step_size(eps, steps))
    attack.autocast = autocast
    candidates = torch.nonzero(clean_correct).flatten()
    with progress_bar(total=len(candidates), desc=description, unit="correct pt", enabled=progress) as bar:
        for start in range(0, len(candidates), batch_size):
            index = candidates[start : start + batch_size]
            adversarial = attack(images[index], labels[index])
            with torch.no_grad():
                robust_correct[index] = attack.logits(adversarial).argmax(1) == labels[index]
            bar.update(len(index))
    return RobustnessResult(clean_correct.cpu(), robust_correct.cpu())
