"""The evaluation-only attacks: FGSM and PGD on the CW margin loss; the step size and start of eval's PGD family."""

from __future__ import annotations

import pytest
import torch

from robust_sparse.attacks import CW, FGSM, PGD, margin_loss
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.errors import UserError
from robust_sparse.eval import evaluate, parse_attack, parse_attacks
from robust_sparse.eval.specs import AttackContext

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


# ----------------------------------------------------------------------------------------------------------
# eval's pgd and cw: ``:step=S`` and ``:start=zero``


@pytest.mark.parametrize("text, key, label, step_size, random_start", [
    ("pgd-50x10", "pgd-50x10", "PGD-50x10", None, True),  # the spellings of before keep their meaning and key
    ("pgd-50x10:start=random", "pgd-50x10", "PGD-50x10", None, True),  # the default, spelled out
    ("pgd-50x10:step=2/255", "pgd-50x10:step=2/255", "PGD-50x10:step=2/255", 2 / 255, True),
    ("PGD-20X1:Start=Zero:Step=0.01", "pgd-20x1:step=0.01:start=zero", "PGD-20x1:step=0.01:start=zero", 0.01, False),
    ("pgd:start=zero", "pgd-50x1:start=zero", "PGD-50x1:start=zero", None, False),  # deterministic: one run
    ("cw-30:step=1/255:start=zero", "cw-30x1:step=1/255:start=zero", "CW-30x1:step=1/255:start=zero", 1 / 255, False),
    ("pgd-5x1:step=0.5/255", "pgd-5x1:step=0.00196078431372549", "PGD-5x1:step=0.00196078431372549", 0.5 / 255, True),
])
def test_pgd_parameters_parse_into_the_key_and_label(text, key, label, step_size, random_start):
    spec = parse_attack(text)
    assert (spec.key, spec.label, spec.step_size, spec.random_start) == (key, label, step_size, random_start)
    assert parse_attack(spec.key) == spec  # the key is a spelling (a sweep passes keys on to its evaluations)


@pytest.mark.parametrize("text, step_size, random_start", [
    ("pgd-4x1", 2.5 * 0.1 / 4, True), ("pgd-4x1:step=0.01:start=zero", 0.01, False),
    ("cw-4x1", 2.5 * 0.1 / 4, True), ("cw-4x1:step=2/255:start=zero", 2 / 255, False),
])
def test_step_size_and_start_reach_the_attack(text, step_size, random_start):
    spec = parse_attack(text)
    context = AttackContext(make_tiny_model(), norm="linf", eps=0.1, seed=0, device=torch.device("cpu"),
                            num_classes=10)
    attack = spec.build(context, spec.units[0])
    assert type(attack) is (CW if spec.kind == "cw" else PGD)
    assert (attack.steps, attack.step_size, attack.random_start) == (4, step_size, random_start)


def test_zero_start_is_deterministic_and_the_random_one_is_not(trained_tiny, test_batch):
    images, labels = test_batch
    runs = {}
    for text in ("pgd-3x1:start=zero", "pgd-3x1"):
        runs[text] = [evaluate(trained_tiny, images, labels, norm="linf", eps=0.1, attacks=parse_attacks(text),
                               seed=seed, large_eps=None).outcomes[0].robust for seed in (0, 1, 2)]
    zero, random = runs["pgd-3x1:start=zero"], runs["pgd-3x1"]
    assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
    assert not (torch.equal(random[0], random[1]) and torch.equal(random[0], random[2]))
    torch.manual_seed(5)
    expected = PGD(trained_tiny, eps=0.1, step_size=2.5 * 0.1 / 3, steps=3, random_start=False)(images, labels)
    with torch.no_grad():
        clean_correct = trained_tiny(images).argmax(1) == labels
        assert torch.equal(zero[0], clean_correct & (trained_tiny(expected).argmax(1) == labels))


def test_flags_are_keyed_by_the_step_size(trained_tiny, test_batch, tmp_path):
    """A second run with another step size on the same flags file computes its own flags, not the first's."""
    images, labels = test_batch
    state = tmp_path / "flags.pt"
    kwargs = dict(norm="linf", eps=0.1, state_path=state, large_eps=None)
    default = evaluate(trained_tiny, images, labels, attacks=parse_attacks("pgd-5x1"), **kwargs)
    tiny_steps = evaluate(trained_tiny, images, labels, attacks=parse_attacks("pgd-5x1:step=0.0005"), **kwargs)
    assert tiny_steps.outcomes[0].accuracy > default.outcomes[0].accuracy + 0.2  # 5 x 0.0005 barely moves a point
    assert sorted(load_checkpoint(state)["attacks"]) == ["pgd-5x1:step=0.0005@bs500", "pgd-5x1@bs500"]
    both = evaluate(trained_tiny, images, labels, attacks=parse_attacks("pgd-5x1,pgd-5x1:step=0.0005"), **kwargs)
    assert both.accuracies() == {"PGD-5x1": default.outcomes[0].accuracy,
                                 "PGD-5x1:step=0.0005": tiny_steps.outcomes[0].accuracy}


@pytest.mark.parametrize("text, message", [
    ("pgd-5x1:step=abc", "attack 'pgd-5x1:step=abc': step=abc: must be a finite size > 0 in pixel units"),
    ("pgd-5x1:step=0", "step=0: must be a finite size > 0"),
    ("pgd-5x1:step=1/0", "step=1/0: must be a finite size > 0"),
    ("pgd-5x1:step=inf", "step=inf: must be a finite size > 0"),
    ("pgd-5x1:start=one", "start=one: choose random or zero"),
    ("pgd-5x3:start=zero", "start=zero is deterministic, so its 3 restarts would repeat one run; use one restart"),
    ("pgd-5x1:steps=3", "unknown parameter 'steps=3'; pgd takes step=SIZE"),
    ("pgd-5x1:step=1/255:step=2/255", "step= is given twice"),
    ("fgsm:step=0.1", "fgsm takes no parameters (step= and start= are for pgd, cw)"),
    ("autoattack:start=zero", "autoattack takes no parameters"),
])
def test_bad_pgd_parameters_are_one_line_errors(text, message):
    with pytest.raises(UserError) as error:
        parse_attacks(f"fgsm,{text}" if not text.startswith("fgsm") else text)
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1
