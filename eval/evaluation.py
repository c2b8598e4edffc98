"""What one evaluation produced: each attack's per-point flags (:class:`AttackOutcome`) and the whole at one eps
(:class:`Evaluation`), with its tidy frame. The runner (runner.py) makes them and the gradient-masking checks
(sanity.py) read them; both import this module, so neither imports the other for the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from robust_sparse.eval.specs import AttackSpec
from robust_sparse.eval.store import WORST, threat_label, tidy_frame, tidy_rows


@dataclass
class AttackOutcome:
    """Per-point flags of one attack. ``broken_by[i]`` is the index of the unit that broke point i, or -1."""

    spec: AttackSpec
    robust: torch.Tensor  # bool [N]
    broken_by: torch.Tensor  # int8 [N]

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def accuracy(self) -> float:
        return fraction(self.robust)

    def unit_accuracies(self) -> dict[str, float]:
        """Robust accuracy after each unit, cumulative (AutoAttack's "robust accuracy after APGD-CE: ...")."""
        return {unit: fraction(self.robust | (self.broken_by > index)) for index, unit in enumerate(self.spec.units)}

    def broken_by_unit(self, unit: str) -> torch.Tensor:
        return self.broken_by == self.spec.units.index(unit)


@dataclass
class Evaluation:
    """Everything one evaluation at one eps produced; flags are on the CPU."""

    norm: str
    eps: float
    seed: int
    batch_size: int
    chained: bool
    clean: torch.Tensor  # bool [N]
    outcomes: list[AttackOutcome]
    seconds: float  # wall time, summed over resumed runs
    probe: dict[str, Any] | None = None  # the large-eps probe: eps, points, accuracy
    invalid: dict[str, int] = field(default_factory=dict)  # attack label -> examples rejected (outside the ball)
    autoattack_messages: list[str] = field(default_factory=list)
    autoattack_backend: str = ""
    warnings: list[str] = field(default_factory=list)  # filled by robust_sparse.eval.sanity
    session_seconds: float | None = None  # wall time of this call alone (``seconds`` adds the resumed attempts')

    @property
    def n(self) -> int:
        return len(self.clean)

    @property
    def clean_accuracy(self) -> float:
        return fraction(self.clean)

    @property
    def worst(self) -> torch.Tensor:
        robust = self.clean.clone()
        for outcome in self.outcomes:
            robust &= outcome.robust
        return robust

    @property
    def worst_accuracy(self) -> float:
        return fraction(self.worst)

    def outcome(self, kind: str) -> AttackOutcome | None:
        """The first outcome of that attack kind (``"pgd"``, ``"autoattack"``, ...)."""
        return next((o for o in self.outcomes if o.spec.kind == kind), None)

    def to_frame(self, model: str = "", dataset: str | None = None, subnet: int | None = None) -> pd.DataFrame:
        """The tidy frame of this evaluation (robust_sparse.eval.store: one row per attack, with clean accuracy,
        each multi-unit attack's parts and the worst case as rows of their own; counts exact, 95% Wilson
        intervals). ``model``, ``dataset`` and ``subnet`` name what was evaluated (an ``Evaluation`` holds only
        its results); a ``model`` ending in ``/subnet{k}`` gives ``subnet`` k, as the results store's names do."""
        entries = [("clean", "clean", self.clean_accuracy, int(self.clean.sum()), None)]
        for outcome in self.outcomes:
            entries.append((outcome.label, "attack", outcome.accuracy, int(outcome.robust.sum()), None))
            if not outcome.spec.attack_kind.iterative and len(outcome.spec.units) > 1:  # as accuracies() lists them
                for index, unit in enumerate(outcome.spec.units):
                    robust = outcome.robust | (outcome.broken_by > index)
                    entries.append((f"{outcome.label}/{unit}", "unit", fraction(robust), int(robust.sum()), None))
        entries.append((WORST, "worst", self.worst_accuracy, int(self.worst.sum()), None))
        identity = {"model": model, "subnet": subnet, "dataset": dataset, "threat_model": threat_label(self.norm),
                    "eps": self.eps, "seed": self.seed, "mode": "chained" if self.chained else "standalone"}
        return tidy_frame(tidy_rows(identity, self.n, entries))

    def accuracies(self) -> dict[str, float]:
        """Label -> robust accuracy, plus ``AutoAttack/apgd-ce``-style cumulative entries for multi-unit attacks."""
        result: dict[str, float] = {}
        for outcome in self.outcomes:
            result[outcome.label] = outcome.accuracy
            if not outcome.spec.attack_kind.iterative and len(outcome.spec.units) > 1:  # AutoAttack's sub-attacks
                for unit, accuracy in outcome.unit_accuracies().items():
                    result[f"{outcome.label}/{unit}"] = accuracy
        return result


def fraction(flags: torch.Tensor) -> float:
    """The fraction of true flags (NaN for none)."""
    return flags.float().mean().item() if len(flags) else float("nan")
