"""The evaluation-only attacks: FGSM and PGD on the CW margin loss."""

from __future__ import annotations

import pytest
import torch

from robust_sparse.attacks import CW, FGSM, PGD, margin_loss

from conftest import assert_in_ball_and_box, make_tiny_model

ATTACKS = {
    "fgsm-linf": lambda m: FGSM(m, norm="linf", eps=0.1),
    "fgsm-l2": lambda m: FGSM(m, norm="l2", eps=1.5),
    "cw-linf": lambda m: CW(m, norm="linf", eps=0.1, step_size=0.03, steps=5),
    "cw-l2": lambda m: CW(m, norm="l2", eps=1.5, step_size=0.5, steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_output_in_ball_and_box_and_mode_restored(name, trained_tiny, test_batch):
    images, labels = test_batch
    grads = [None if p.grad is None else p.grad.clone() for p in trained_tiny.parameters()]
    trained_tiny.train()
    try:
        attack = ATTACKS[name](trained_tiny)
        adversarial = attack(images, labels)
        assert trained_tiny.training
    finally:
        trained_tiny.eval()
    delta = assert_in_ball_and_box(adversarial, images, attack)
    for before, p in zip(grads, trained_tiny.parameters()):  # parameter gradients untouched
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)
    with torch.no_grad():
        clean_correct = trained_tiny(images).argmax(1) == labels
        fooled = trained_tiny(adversarial).argmax(1) != labels
    assert (fooled & clean_correct).sum() > 0  # the attack works on a non-robust model


def test_fgsm_is_one_signed_step(trained_tiny, test_batch):
    images, labels = test_batch
    images = images.clamp(0.2, 0.8)  # away from the box, so no clamping interferes
    adversarial = FGSM(trained_tiny, norm="linf", eps=0.05)(images, labels)
    step = (adversarial - images).abs()
    assert torch.allclose(step[step > 0], torch.full_like(step[step > 0], 0.05), atol=1e-6)
    assert torch.equal(FGSM(trained_tiny, eps=0.0)(images, labels), images)


def test_margin_loss_is_positive_exactly_on_misclassified_points():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.5, 2.0, 1.0], [1.0, 1.0, 4.0]])
    labels = torch.tensor([0, 0, 2])
    loss = margin_loss(logits, labels)
    assert torch.allclose(loss, torch.tensor([-2.0, 1.5, -3.0]))
    assert torch.allclose(margin_loss(logits, labels, kappa=1.0), torch.tensor([-2.0, 1.0, -3.0]))


def test_cw_breaks_about_as_many_points_as_pgd(trained_tiny, test_batch):
    images, labels = test_batch
    torch.manual_seed(0)
    with torch.no_grad():
        pgd = (trained_tiny(PGD(trained_tiny, eps=0.1, step_size=0.01, steps=20)(images, labels)).argmax(1) == labels)
        cw = (trained_tiny(CW(trained_tiny, eps=0.1, step_size=0.01, steps=20)(images, labels)).argmax(1) == labels)
    assert abs(pgd.float().mean() - cw.float().mean()) < 0.15


@pytest.mark.parametrize("factory", [lambda m: FGSM(m, norm="l1"), lambda m: CW(m, steps=0), lambda m: FGSM(m, eps=-1)])
def test_bad_arguments_raise(factory):
    with pytest.raises(ValueError):
        factory(make_tiny_model())
