"""Training objectives, split into "make the inputs" and "score the model on them".

Keeping the two apart lets a caller reuse one batch of adversarial examples for several models (AGENT
scores its snapshot on the *same* adversarial batch as the current model, with no second attack).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.attacks import PGD, Attack, TradesKL
from robust_sparse.config import ObjectiveName, TrainConfig


class Objective(ABC):
    attack: Attack | None = None

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Adversarial inputs for this batch, or None for natural training."""
        return None if self.attack is None else self.attack(images, labels)

    @abstractmethod
    def loss(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, adversarial: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the batch, and the logits that training accuracy is measured on."""


class Natural(Objective):
    def loss(self, model, images, labels, adversarial):
        logits = model(images)
        return F.cross_entropy(logits, labels), logits


class PGDAdversarial(Objective):
    """Madry et al.: cross-entropy on the adversarial batch only."""

    def __init__(self, attack: Attack) -> None:
        self.attack = attack

    def loss(self, model, images, labels, adversarial):
        logits = model(adversarial)
        return F.cross_entropy(logits, labels), logits


class Trades(Objective):
    """Zhang et al.: CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x')), batch mean.

    Two train-mode forward passes (clean, then adversarial) as in the reference code, so BatchNorm sees
    both; gradients flow through both branches of the KL.
    """

    def __init__(self, attack: Attack, beta: float) -> None:
        self.attack = attack
        self.beta = beta

    def loss(self, model, images, labels, adversarial):
        clean_logits = model(images)
        adversarial_logits = model(adversarial)
        robust_term = F.kl_div(
            F.log_softmax(adversarial_logits, dim=1), F.log_softmax(clean_logits, dim=1),
            reduction="batchmean", log_target=True,
        )
        return F.cross_entropy(clean_logits, labels) + self.beta * robust_term, clean_logits


def build_objective(config: TrainConfig, model: nn.Module,
                    autocast: Callable[[], AbstractContextManager] | None = None) -> Objective:
    """The objective of ``config``; ``autocast`` (mixed precision) wraps the training attack's forwards."""
    attack = config.attack
    if config.objective is ObjectiveName.NATURAL:
        return Natural()
    if config.objective is ObjectiveName.PGD_AT:
        objective: Objective = PGDAdversarial(PGD(model, norm=attack.norm.value, eps=attack.eps,
                                                  step_size=attack.step_size, steps=attack.steps,
                                                  random_start=attack.random_start))
    else:
        objective = Trades(TradesKL(model, norm=attack.norm.value, eps=attack.eps, step_size=attack.step_size,
                                    steps=attack.steps), beta=config.trades_beta)
    if autocast is not None:
        objective.attack.autocast = autocast
    return objective
