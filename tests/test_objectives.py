"""Objectives against hand computations on a tiny linear model."""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_sparse.config import load_config
from robust_sparse.objectives import Natural, PGDAdversarial, Trades, build_objective
from robust_sparse.attacks import PGD, TradesKL


def linear_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
    return model


def softmax(logits):
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_trades_loss_matches_hand_computation():
    model = linear_model()
    clean = torch.tensor([[0.2, 0.4], [0.9, 0.1]])
    adversarial = torch.tensor([[0.3, 0.35], [0.8, 0.2]])
    labels = torch.tensor([1, 0])
    beta = 6.0

    def logits(x):  # W x + b by hand
        return [x[0] + 0.0, x[1] + 0.5, x[0] - x[1] - 0.5]

    expected_ce, expected_kl = 0.0, 0.0
    for x, x_adv, y in zip(clean.tolist(), adversarial.tolist(), labels.tolist()):
        p, q = softmax(logits(x)), softmax(logits(x_adv))
        expected_ce += -math.log(p[y])
        expected_kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected = (expected_ce + beta * expected_kl) / 2

    objective = Trades(TradesKL(model, eps=0.1, step_size=0.01, steps=1), beta=beta)
    loss, returned_logits = objective.loss(model, clean, labels, adversarial)
    assert abs(loss.item() - expected) < 1e-6
    torch.testing.assert_close(returned_logits, model(clean))


def test_trades_with_beta_zero_is_natural_cross_entropy():
    model = linear_model()
    clean, adversarial = torch.rand(4, 2), torch.rand(4, 2)
    labels = torch.tensor([0, 1, 2, 1])
    trades, _ = Trades(TradesKL(model), beta=0.0).loss(model, clean, labels, adversarial)
    natural, _ = Natural().loss(model, clean, labels, None)
    torch.testing.assert_close(trades, natural)


def test_trades_gradient_flows_through_both_branches():
    model = linear_model()
    clean, adversarial = torch.tensor([[0.2, 0.4]]), torch.tensor([[0.3, 0.35]])
    clean.requires_grad_(True)
    adversarial.requires_grad_(True)
    loss, _ = Trades(TradesKL(model), beta=6.0).loss(model, clean, torch.tensor([1]), adversarial)
    clean_grad, adversarial_grad = torch.autograd.grad(loss, [clean, adversarial])
    assert clean_grad.abs().sum() > 0 and adversarial_grad.abs().sum() > 0


def test_pgd_at_loss_is_cross_entropy_on_adversarial_batch_only():
    model = linear_model()
    clean, adversarial = torch.rand(5, 2), torch.rand(5, 2)
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss, logits = PGDAdversarial(PGD(model)).loss(model, clean, labels, adversarial)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(adversarial), labels))
    torch.testing.assert_close(logits, model(adversarial))


def test_build_objective_follows_config():
    model = linear_model()
    config = load_config(None, ["objective=trades", "trades_beta=3", "attack.eps=0.2", "attack.steps=4"])
    objective = build_objective(config, model)
    assert isinstance(objective, Trades) and objective.beta == 3.0
    assert objective.attack.eps == 0.2 and objective.attack.steps == 4
    assert isinstance(build_objective(load_config(None, ["objective=natural"]), model), Natural)
    assert build_objective(load_config(None, ["objective=natural"]), model).perturb(torch.rand(2, 2), None) is None
    pgd = build_objective(load_config(None, ["attack.norm=l2", "attack.eps=1.5"]), model)
    assert isinstance(pgd, PGDAdversarial) and pgd.attack.norm == "l2"
