"""Gradient-masking sanity checks (Athalye et al., 2018; Carlini et al., 2019; Croce & Hein, 2020).

A robust accuracy is only as honest as the attacks behind it. These checks look for the usual signs that the
gradient-based attacks failed rather than the model being robust:

* **AutoAttack above PGD**: AutoAttack (stronger by design) leaves more points robust than PGD did;
* **black-box where white-box failed**: the black-box Square attack (or one registered as black-box) breaks
  points every gradient-based attack left robust (AutoAttack's own ``check_square_sr``, with its 0.2% tolerance);
* **large eps**: a margin PGD from the clean point at a large eps (L-inf 0.5, where a mid-grey image is in
  every ball) leaves points robust; robust accuracy should fall to ~0;
* **non-monotone in eps**: robust accuracy rises with eps.

Each check returns human-readable warnings; they are stored with the result and printed in the report.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

import pandas as pd
import torch

if TYPE_CHECKING:  # the runner calls these checks at the end of every evaluation
    from robust_sparse.eval.runner import Evaluation

SQUARE_TOLERANCE = 0.002  # fraction of points, as AutoAttack's check_square_sr
LARGE_EPS_TOLERANCE = 0.01  # accuracy left at the large eps


def default_large_eps(norm: str, image_shape: Sequence[int]) -> float:
    """L-inf 0.5 (a mid-grey image is inside every ball); L2 the radius of the ball containing that L-inf ball."""
    if norm == "linf":
        return 0.5
    return 0.5 * math.sqrt(math.prod(image_shape))


def check_evaluation(evaluation: Evaluation) -> list[str]:
    """The checks that need one evaluation (one eps)."""
    warnings: list[str] = []
    eps_text = f"{evaluation.norm} eps={evaluation.eps:.4g}"
    autoattack, pgd = evaluation.outcome("autoattack"), evaluation.outcome("pgd")
    if autoattack is not None and pgd is not None and not evaluation.chained and autoattack.accuracy > pgd.accuracy:
        extra = int((autoattack.robust & ~pgd.robust).sum())
        warnings.append(
            f"{eps_text}: AutoAttack accuracy {autoattack.accuracy:.4f} is above {pgd.label} {pgd.accuracy:.4f} "
            f"({extra} points survive AutoAttack but not PGD); AutoAttack should be the stronger attack: "
            "check for a randomised or non-deterministic model, or gradient masking")
    black_box_only, labels = _black_box_only(evaluation)
    if black_box_only is not None:
        count = int(black_box_only.sum())
        if count > SQUARE_TOLERANCE * evaluation.n:
            attacks = " and ".join(dict.fromkeys(labels))
            warnings.append(
                f"{eps_text}: the black-box {attacks} attack broke {count} points ({count / evaluation.n:.2%}) that "
                "every white-box attack left robust: gradients are likely masked or obfuscated; trust the "
                "black-box number and consider adaptive attacks")
    probe = evaluation.probe
    if probe is not None and probe["accuracy"] > LARGE_EPS_TOLERANCE:
        warnings.append(
            f"at a large eps ({evaluation.norm} {probe['eps']:.4g}) a {probe['steps']}-step margin PGD from the "
            f"clean point still leaves {probe['accuracy']:.2%} of {probe['points']} points robust (clean "
            f"{probe['clean_accuracy']:.2%}); robust accuracy should fall to ~0: the gradient does not lead the "
            "attack (masked, obfuscated or saturated)")
    for label, count in evaluation.invalid.items():
        warnings.append(f"{eps_text}: {label} returned {count} adversarial examples outside the threat model; "
                        "they were not counted (a bug in the attack or an eps mismatch)")
    for message in evaluation.autoattack_messages:
        warnings.append(f"AutoAttack's own check: {message}")
    return warnings


def _black_box_only(evaluation: Evaluation) -> tuple[torch.Tensor | None, list[str]]:
    """Points broken by a black-box attack (Square inside AutoAttack or alone, or one registered as black-box)
    and robust under every white-box attack run; with the black-box attacks' labels."""
    white_box_robust = evaluation.clean.clone()
    black_box_broken = torch.zeros_like(evaluation.clean)
    white_box_seen, labels = False, []
    for outcome in evaluation.outcomes:
        spec = outcome.spec
        black = [unit for unit in spec.units if not spec.unit_is_white_box(unit)]
        if black and len(black) < len(spec.units):
            # AutoAttack: its black-box Square ran only on the points its white-box units left robust
            for unit in black:
                black_box_broken |= outcome.broken_by_unit(unit)
            white_box_seen = True
            labels.append("Square" if black == ["square"] else f"{outcome.label} ({', '.join(black)})")
        elif black:
            black_box_broken |= evaluation.clean & ~outcome.robust
            labels.append(outcome.label)
        else:
            white_box_robust &= outcome.robust
            white_box_seen = True
    if not (labels and white_box_seen):
        return None, labels
    return black_box_broken & white_box_robust, labels


def check_monotone(evaluations: Iterable[Evaluation]) -> list[str]:
    """Across eps (one model, one data set): no attack's accuracy may rise with eps."""
    rows = []
    for evaluation in evaluations:
        rows.extend({"eps": evaluation.eps, "attack": label, "accuracy": value}
                    for label, value in evaluation.accuracies().items() if "/" not in label)
        rows.append({"eps": evaluation.eps, "attack": "worst case", "accuracy": evaluation.worst_accuracy})
    return monotone_warnings(pd.DataFrame(rows), group=["attack"], prefix="")


def monotone_warnings(frame: pd.DataFrame, group: list[str], prefix: str = "") -> list[str]:
    """Warnings for every group of ``frame`` (columns eps, accuracy + ``group``) whose accuracy rises with eps."""
    warnings = []
    if frame.empty:
        return warnings
    for key, rows in frame.groupby(group, sort=False):
        rows = rows.dropna(subset=["accuracy"]).sort_values("eps")
        rows = rows.groupby("eps", as_index=False)["accuracy"].min()  # repeated eps: keep the worst
        if len(rows) < 2:
            continue
        previous = None
        for eps, accuracy in zip(rows["eps"], rows["accuracy"]):
            if previous is not None and accuracy > previous[1] + 1e-12:
                name = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
                warnings.append(
                    f"{prefix}{name}: accuracy rises from {previous[1]:.4f} at eps={previous[0]:.4g} to "
                    f"{accuracy:.4f} at eps={eps:.4g}; robust accuracy cannot increase with eps (weak, "
                    "randomised or masked attack)")
            previous = (eps, accuracy)
    return warnings
