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
from typing import Iterable, Sequence

import pandas as pd
import torch

from robust_sparse.eval.evaluation import Evaluation

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


def checks_summary(frame: pd.DataFrame, monotone_fired: int = 0) -> list[str]:
    """The report's sentences on the checks, one per check, each stated only over the stored results that
    support it: a check no result ran is "not run" (the probe) or absent (a comparison of two attacks that no
    result ran both of). ``frame``: result rows (per_attack, warnings, attacks, mode, pgd_acc, autoattack_acc,
    large_eps_acc, threat_model, eps, model, model_fingerprint, dataset, n_examples, seed);
    ``monotone_fired``: how many non-monotone-in-eps warnings the report found across rows."""
    sentences = []
    attacked = frame[frame["threat_model"] != "corruptions"]
    both = [r for _, r in attacked.iterrows()
            if _number(r.get("pgd_acc")) is not None and _number(r.get("autoattack_acc")) is not None
            and r.get("mode") != "chained"]
    if both:
        above = sum(_number(r["autoattack_acc"]) > _number(r["pgd_acc"]) for r in both)
        sentences.append(f"AutoAttack is above PGD in {above} of the {len(both)} results that ran both (see above)."
                         if above else f"AutoAttack is not above PGD in any of the {len(both)} results that ran both.")
    with_square = [r for _, r in attacked.iterrows() if _runs_square(r)]
    if with_square:
        fired = sum(any("the black-box" in str(w) for w in r["warnings"]) for r in with_square)
        sentences.append(f"A black-box attack broke points every white-box attack left robust in {fired} of the "
                         f"{len(with_square)} results that ran Square (see above)." if fired else
                         f"Square broke no more than {SQUARE_TOLERANCE:.1%} of the points the white-box attacks "
                         f"left robust in any of the {len(with_square)} results that ran it.")
    probed = [r for _, r in attacked.iterrows() if _number(r.get("large_eps_acc")) is not None]
    if probed:
        high = sum(_number(r["large_eps_acc"]) > LARGE_EPS_TOLERANCE for r in probed)
        sentences.append(f"The large-eps probe left more than {LARGE_EPS_TOLERANCE:.0%} of the points robust in "
                         f"{high} of the {len(probed)} results that ran it (see above)." if high else
                         f"The large-eps probe fell to at most {LARGE_EPS_TOLERANCE:.0%} in all {len(probed)} "
                         "results that ran it.")
    unprobed = len(attacked) - len(probed)
    if unprobed:
        sentences.append(f"The large-eps probe was not run for {unprobed} of the {len(attacked)} results "
                         "(--no-probe): gradient masking at large eps is unchecked there.")
    keys = ["model", "model_fingerprint", "dataset", "threat_model", "n_examples", "seed"]
    groups = attacked.assign(seed=attacked["seed"].astype(str)).groupby(keys, sort=False, dropna=False)["eps"].nunique() \
        if len(attacked) else pd.Series(dtype=int)
    several = int((groups >= 2).sum())
    if several:
        sentences.append(f"Accuracy rises with eps in {monotone_fired} places (see above) across the {several} "
                         "models evaluated at several eps." if monotone_fired else
                         f"Accuracy does not rise with eps for any of the {several} models evaluated at several eps.")
    elif len(attacked):
        sentences.append("Monotonicity in eps was not checked: no model was evaluated at more than one eps.")
    corrupted = len(frame) - len(attacked)
    if corrupted:
        sentences.append(f"The {corrupted} corruptions results are plain accuracies on fixed images: no "
                         "gradient-masking check applies to them.")
    return sentences


def _number(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _runs_square(row) -> bool:
    """AutoAttack standard (Square after its white-box attacks), or Square beside a white-box attack."""
    attacks = [a.strip() for a in str(row.get("attacks") or "").split(",") if a.strip()]
    return "autoattack" in attacks or ("square" in attacks and len(attacks) > 1)
