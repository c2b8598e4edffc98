"""Attack invariants: inside the eps-ball and [0,1], model mode restored, parameter grads untouched."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchattacks

import robust_sparse.attacks as attacks
from robust_sparse.attacks import CW, FGSM, PGD, Attack, TradesKL
from robust_sparse.accuracy import evaluate_pgd

from conftest import assert_in_ball_and_box, make_tiny_model

ATTACKS = {
    "pgd-linf": lambda m: PGD(m, norm="linf", eps=0.1, step_size=0.03, steps=5),
    "pgd-l2": lambda m: PGD(m, norm="l2", eps=1.5, step_size=0.5, steps=5),
    "pgd-linf-restarts": lambda m: PGD(m, norm="linf", eps=0.1, step_size=0.03, steps=3, restarts=3),
    "pgd-l2-restarts": lambda m: PGD(m, norm="l2", eps=1.5, step_size=0.5, steps=3, restarts=3),
    "trades-linf": lambda m: TradesKL(m, norm="linf", eps=0.1, step_size=0.03, steps=5),
    "trades-l2": lambda m: TradesKL(m, norm="l2", eps=1.5, step_size=0.5, steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_output_in_ball_and_box(name, trained_tiny, test_batch):
    images, labels = test_batch
    attack = ATTACKS[name](trained_tiny)
    adversarial = attack(images, labels)
    delta = assert_in_ball_and_box(adversarial, images, attack)
    assert not adversarial.requires_grad
    assert (delta.abs().sum(1) > 0).float().mean() > 0.9  # it actually moved the points


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_and_parameter_grads_untouched(name, training, test_batch):
    images, labels = test_batch
    model = make_tiny_model()
    model.train(training)
    seen_modes = []
    model.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    ATTACKS[name](model)(images[:8], labels[:8])
    assert model.training is training
    assert seen_modes and not any(seen_modes)  # BatchNorm/dropout in eval mode during the attack
    assert all(p.grad is None for p in model.parameters())


def test_mode_restored_when_attack_raises(test_batch):
    class Failing(Attack):
        def forward(self, images, labels):
            raise RuntimeError("boom")

    model = make_tiny_model().train()
    with pytest.raises(RuntimeError, match="boom"):
        Failing(model)(*test_batch)
    assert model.training


def test_pgd_reduces_accuracy_of_trained_model(trained_tiny, mnist):
    _, test = mnist
    images, labels = test.images[:300].float() / 255, test.labels[:300]
    result = evaluate_pgd(trained_tiny, images, labels, eps=0.2, steps=10)
    assert result.clean_accuracy > 0.85
    assert result.robust_accuracy < result.clean_accuracy - 0.3
    # per-point: robust implies clean-correct
    assert not (result.robust_correct & ~result.clean_correct).any()


def test_more_restarts_never_help_the_model(trained_tiny, mnist):
    _, test = mnist
    images, labels = test.images[:200].float() / 255, test.labels[:200]
    torch.manual_seed(0)
    one = evaluate_pgd(trained_tiny, images, labels, eps=0.08, steps=5, restarts=1)
    torch.manual_seed(0)
    five = evaluate_pgd(trained_tiny, images, labels, eps=0.08, steps=5, restarts=5)
    # the first restart of the 5-restart run replays the 1-restart run (same seed), so five can only be lower
    assert not (five.robust_correct & ~one.robust_correct).any()
    assert five.robust_accuracy <= one.robust_accuracy


def test_eps_zero_gives_clean_accuracy(trained_tiny, test_batch):
    result = evaluate_pgd(trained_tiny, *test_batch, eps=0.0, steps=5)
    assert torch.equal(result.robust_correct, result.clean_correct)


def test_large_eps_breaks_everything(trained_tiny, test_batch):
    result = evaluate_pgd(trained_tiny, *test_batch, eps=1.0, steps=20, step_size=0.1)
    assert result.robust_accuracy == 0.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_torchattacks_without_random_start(norm, trained_tiny, test_batch):
    """torchattacks does this job correctly; ours must agree step for step from the clean point.

    Both run in float64: L2 steps divide by the gradient norm and torchattacks takes the gradient of the *mean*
    loss (we use the sum), so in float32 the last bits differ and, depending on the torch build's kernels, a
    coordinate drifted by 1.6e-3 over 7 steps (torch 2.14.1). In float64 that rounding is ~1e-12, so a tight
    tolerance tests the algorithm, not the build.
    """
    model = copy.deepcopy(trained_tiny).double()
    images, labels = test_batch
    images = images.double()
    if norm == "linf":
        ours = PGD(model, norm="linf", eps=0.1, step_size=0.02, steps=7, random_start=False)
        reference = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=7, random_start=False)
    else:
        ours = PGD(model, norm="l2", eps=1.0, step_size=0.2, steps=7, random_start=False)
        # torchattacks adds 1e-10 to the norm of the *mean*-loss gradient: on a confidently classified point that
        # gradient is ~1e-10 itself, and the offset shortens the step. Set it far below any real norm.
        reference = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=7, random_start=False,
                                       eps_for_division=1e-30)
    mine, theirs = ours(images, labels), reference(images, labels)
    assert mine.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=0)


def test_trades_attack_matches_torchattacks_tpgd(trained_tiny, test_batch):
    """In float64, as the PGD comparison: the result must not hinge on one build's float32 rounding."""
    model = copy.deepcopy(trained_tiny).double()
    images = test_batch[0].double()
    torch.manual_seed(3)
    ours = TradesKL(model, eps=0.1, step_size=0.02, steps=5)(images)
    torch.manual_seed(3)
    reference = torchattacks.TPGD(model, eps=0.1, alpha=0.02, steps=5)(images)
    assert ours.dtype == reference.dtype == torch.float64
    torch.testing.assert_close(ours, reference, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(norm="l1"), dict(eps=-0.1), dict(steps=0), dict(step_size=0.0),
                                    dict(restarts=0)])
def test_pgd_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PGD(make_tiny_model(), **kwargs)


# One constructor per attack class of robust_sparse.attacks; the test below fails when a new class is not listed.
EVERY_ATTACK = {
    PGD: lambda m: PGD(m, eps=0.1, step_size=0.03, steps=2),
    CW: lambda m: CW(m, eps=0.1, step_size=0.03, steps=2),
    FGSM: lambda m: FGSM(m, eps=0.1),
    TradesKL: lambda m: TradesKL(m, eps=0.1, step_size=0.03, steps=2),
}


def test_every_attack_class_is_listed_for_the_autocast_check():
    exported = {getattr(attacks, name) for name in attacks.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, Attack) and c is not Attack}
    assert classes == set(EVERY_ATTACK)


@pytest.mark.parametrize("attack_class", list(EVERY_ATTACK), ids=lambda c: c.__name__)
def test_every_forward_of_every_attack_runs_under_the_requested_autocast(attack_class, test_batch):
    """With ``autocast`` set (bf16 on the CPU here), each forward the attack makes runs in bf16 and the output
    stays fp32; without it, each forward is fp32. A forward that bypasses :meth:`Attack.logits` (FGSM once
    called ``self.model``) shows up as an fp32 forward under a bf16 request."""
    images, labels = test_batch[0][:8], test_batch[1][:8]
    model = make_tiny_model()
    forward_dtypes = []
    model.register_forward_hook(lambda module, args, output: forward_dtypes.append(output.dtype))
    attack = EVERY_ATTACK[attack_class](model)
    plain = attack(images, labels)
    assert forward_dtypes and set(forward_dtypes) == {torch.float32}
    forward_dtypes.clear()
    attack.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    adversarial = attack(images, labels)
    assert forward_dtypes and set(forward_dtypes) == {torch.bfloat16}
    assert adversarial.dtype == plain.dtype == torch.float32
    assert_in_ball_and_box(adversarial, images, attack)
