"""Gradient-masking checks: they fire on a model with masked gradients and stay quiet on the normal tiny model."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from robust_sparse.eval import AttackSpec, evaluate, parse_attacks
from robust_sparse.eval.runner import AttackOutcome, Evaluation
from robust_sparse.eval.sanity import check_evaluation, check_monotone, default_large_eps, monotone_warnings


class Quantize(nn.Module):
    """Input quantisation with a non-differentiable rounding: every input gradient is exactly zero.

    MNIST pixels already lie on the 1/255 grid, so predictions are unchanged: only the gradient is masked.
    """

    def forward(self, x):
        return torch.round(x * 255) / 255


def _points(mnist, n):
    _, test = mnist
    return test.images[:n].float() / 255, test.labels[:n]


SUITE = parse_attacks("pgd-10x1,apgd-ce,square")


def test_masked_gradients_are_caught(trained_tiny, mnist):
    images, labels = _points(mnist, 12)
    masked = nn.Sequential(Quantize(), trained_tiny).eval()
    result = evaluate(masked, images, labels, norm="linf", eps=0.1, attacks=SUITE, batch_size=16, large_eps=0.5)
    pgd, apgd, square = result.outcomes
    assert pgd.accuracy == apgd.accuracy == result.clean_accuracy  # the white-box attacks see no gradient
    assert square.accuracy < pgd.accuracy  # the black-box attack does not need one
    warnings = check_evaluation(result)
    assert any("Square attack broke" in w for w in warnings)
    assert any("at a large eps" in w for w in warnings)
    assert result.probe["accuracy"] == result.probe["clean_accuracy"]


def test_no_warning_for_the_normal_tiny_model(trained_tiny, mnist):
    images, labels = _points(mnist, 12)
    result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.1, attacks=SUITE, batch_size=16, large_eps=0.5)
    assert 0 < result.worst_accuracy < result.clean_accuracy  # an eps where the attacks matter
    assert result.probe["accuracy"] == 0.0
    assert check_evaluation(result) == []


def _synthetic(accuracies: dict[str, list[bool]], chained=False, eps=0.1) -> Evaluation:
    n = len(next(iter(accuracies.values())))
    outcomes = [AttackOutcome(AttackSpec(kind, 50, 1) if kind == "pgd" else AttackSpec(kind), torch.tensor(flags),
                              torch.full((n,), -1, dtype=torch.int8)) for kind, flags in accuracies.items()]
    return Evaluation(norm="linf", eps=eps, seed=0, batch_size=8, chained=chained, clean=torch.ones(n, dtype=torch.bool),
                      outcomes=outcomes, seconds=0.0)


def test_autoattack_above_pgd_is_flagged_in_standalone_mode_only():
    flags = {"pgd": [True, False, False, False], "autoattack": [True, True, False, False]}
    (warning,) = check_evaluation(_synthetic(flags))
    assert "AutoAttack accuracy 0.5000 is above PGD-50x1 0.2500" in warning and "1 points" in warning
    assert check_evaluation(_synthetic({"pgd": [True, True, False], "autoattack": [True, False, False]})) == []
    assert check_evaluation(_synthetic(flags, chained=True)) == []


def test_square_inside_autoattack_counts_only_if_white_box_attacks_missed_the_point():
    n = 10
    evaluation = _synthetic({"pgd": [True] * n, "autoattack": [True] * n})
    evaluation.outcomes[1].robust[:2] = False
    evaluation.outcomes[1].broken_by[:2] = 3  # broken by Square (unit 3)
    assert any("Square attack broke 2 points" in w for w in check_evaluation(evaluation))
    evaluation.outcomes[0].robust[:2] = False  # PGD (white-box) breaks them too: nothing to report
    assert not any("Square" in w for w in check_evaluation(evaluation))


def test_non_monotone_accuracy_in_eps_is_flagged():
    rising = [_synthetic({"pgd": [True, False, False, False]}, eps=0.05),
              _synthetic({"pgd": [True, True, False, False]}, eps=0.1)]
    warnings = check_monotone(rising)
    assert len(warnings) == 2 and all("rises from 0.2500 at eps=0.05 to 0.5000 at eps=0.1" in w for w in warnings)
    frame = pd.DataFrame({"attack": ["a", "a", "a", "b", "b"], "eps": [0.1, 0.2, 0.3, 0.1, 0.2],
                          "accuracy": [0.5, 0.4, 0.4, 0.3, 0.1]})
    assert monotone_warnings(frame, ["attack"]) == []


def test_a_real_eps_sweep_is_monotone(trained_tiny, mnist):
    images, labels = _points(mnist, 48)
    sweep = [evaluate(trained_tiny, images, labels, norm="linf", eps=eps, attacks=parse_attacks("fgsm,pgd-10x1"),
                      batch_size=48) for eps in (0.0, 0.03, 0.08, 0.2)]
    assert [round(e.worst_accuracy, 3) for e in sweep] == sorted((round(e.worst_accuracy, 3) for e in sweep), reverse=True)
    assert check_monotone(sweep) == []


@pytest.mark.parametrize("norm, shape, expected", [("linf", (3, 32, 32), 0.5), ("l2", (3, 32, 32), 0.5 * math.sqrt(3072)),
                                                   ("l2", (1, 28, 28), 14.0)])
def test_default_large_eps(norm, shape, expected):
    assert default_large_eps(norm, shape) == pytest.approx(expected)


def test_an_attack_registered_as_black_box_counts_like_square():
    """The check reads black-box-ness from the attack registry, not from the name "square"."""
    from robust_sparse.eval.specs import ATTACKS, register_attack

    register_attack("toy-blackbox", lambda model, images, labels, *, norm, eps: images, label="Toy black box",
                    black_box=True, module="tests.toy")
    try:
        n = 10
        evaluation = _synthetic({"pgd": [True] * n, "toy-blackbox": [False, False] + [True] * (n - 2)})
        assert any("black-box Toy black box attack broke 2 points" in w for w in check_evaluation(evaluation))
        evaluation.outcomes[0].robust[:2] = False  # the white-box PGD breaks them too: nothing to report
        assert check_evaluation(evaluation) == []
    finally:
        ATTACKS.remove("toy-blackbox")
