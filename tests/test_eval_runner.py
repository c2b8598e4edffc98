"""The evaluation runner: attack specs, per-point flags, early exit, resume, input checks, AutoAttack ordering."""

from __future__ import annotations

import pytest
import torch

from robust_sparse.attacks import FGSM, PGD
from robust_sparse.errors import UserError
from robust_sparse.eval import AttackSpec, evaluate, parse_attack, parse_attacks
from robust_sparse.eval import runner as runner_module

from conftest import make_tiny_model


def _points(mnist, n):
    _, test = mnist
    return test.images[:n].float() / 255, test.labels[:n]


# ----------------------------------------------------------------------------------------------------------
# specs


@pytest.mark.parametrize("text, key, label, units", [
    ("pgd", "pgd-50x10", "PGD-50x10", 10),
    ("pgd-20", "pgd-20x1", "PGD-20x1", 1),
    ("PGD-50x10", "pgd-50x10", "PGD-50x10", 10),
    ("cw", "cw-50x1", "CW-50x1", 1),
    ("cw-30x2", "cw-30x2", "CW-30x2", 2),
    ("fgsm", "fgsm", "FGSM", 1),
    ("autoattack", "autoattack", "AutoAttack", 4),
    ("square", "square", "Square", 1),
    ("torchattacks-aa", "torchattacks-aa", "torchattacks-AA", 1),
])
def test_attack_names(text, key, label, units):
    spec = parse_attack(text)
    assert (spec.key, spec.label, len(spec.units)) == (key, label, units)


def test_attack_lists_keep_order_and_use_defaults():
    specs = parse_attacks("fgsm, pgd ,autoattack", default_steps=7, default_restarts=3)
    assert [s.key for s in specs] == ["fgsm", "pgd-7x3", "autoattack"]
    assert AttackSpec("autoattack").unit_is_white_box("fab-t") and not AttackSpec("autoattack").unit_is_white_box("square")


@pytest.mark.parametrize("text, message", [("pgb-10", "unknown attack 'pgb-10'"), ("pgd-0", ">= 1"),
                                           ("fgsm,fgsm", "listed twice"), ("apgd", "unknown attack")])
def test_bad_attack_names(text, message):
    with pytest.raises(UserError, match=message):
        parse_attacks(text)


# ----------------------------------------------------------------------------------------------------------
# flags and protocol


def test_eps_zero_gives_clean_accuracy_for_every_attack(trained_tiny, mnist):
    images, labels = _points(mnist, 64)
    result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.0,
                      attacks=parse_attacks("fgsm,pgd-5x2,cw-5,autoattack"), batch_size=32)
    assert 0.8 < result.clean_accuracy < 1.0
    for outcome in result.outcomes:
        assert torch.equal(outcome.robust, result.clean)
    assert result.worst_accuracy == result.clean_accuracy


def test_robust_accuracy_is_zero_at_a_large_eps(trained_tiny, mnist):
    images, labels = _points(mnist, 16)
    result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.4,
                      attacks=parse_attacks("pgd-10x1,cw-10,autoattack"), batch_size=32)
    assert result.clean_accuracy > 0.8
    assert all(o.accuracy == 0.0 for o in result.outcomes)
    l2 = evaluate(trained_tiny, images, labels, norm="l2", eps=8.0, attacks=parse_attacks("pgd-10x1"), batch_size=32)
    assert l2.worst_accuracy == 0.0


def test_flags_are_per_point_and_worst_case_is_their_and(trained_tiny, mnist):
    images, labels = _points(mnist, 64)
    result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.08, attacks=parse_attacks("fgsm,pgd-10x2"),
                      batch_size=20, seed=3)
    fgsm, pgd = result.outcomes
    assert fgsm.robust.dtype == torch.bool and fgsm.robust.shape == (64,)
    assert not (fgsm.robust & ~result.clean).any() and not (pgd.robust & ~result.clean).any()
    assert torch.equal(result.worst, result.clean & fgsm.robust & pgd.robust)
    assert pgd.accuracy <= fgsm.accuracy  # 20 steps with restarts beat one step here
    # restart 2 only broke points restart 1 left robust: each broken point has exactly one unit
    assert set(pgd.broken_by[~pgd.robust & result.clean].tolist()) <= {0, 1}
    assert (pgd.broken_by[pgd.robust] == -1).all()


def test_same_seed_same_flags_other_seed_other_random_starts(trained_tiny, mnist):
    images, labels = _points(mnist, 48)
    run = lambda seed: evaluate(trained_tiny, images, labels, norm="linf", eps=0.07,
                                attacks=parse_attacks("pgd-3x1"), batch_size=16, seed=seed).outcomes[0]
    first, again = run(0), run(0)
    assert torch.equal(first.robust, again.robust)
    assert torch.is_tensor(run(1).robust)
    state = torch.random.get_rng_state()
    run(0)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_chained_attacks_only_see_survivors(trained_tiny, mnist, monkeypatch):
    images, labels = _points(mnist, 48)
    seen = []
    for attack in (PGD, FGSM):  # the suite's attacks; the probe's CW (a PGD subclass) is not counted
        monkeypatch.setattr(attack, "__call__", lambda self, x, y, call=attack.__call__:
                            (type(self) in (PGD, FGSM) and seen.append(len(x))) or call(self, x, y))
    result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.08, attacks=parse_attacks("pgd-10x1,fgsm"),
                      batch_size=64, chained=True)
    pgd, fgsm = result.outcomes
    assert seen == [int(result.clean.sum()), int(pgd.robust.sum())]
    assert not (fgsm.robust & ~pgd.robust).any()  # cumulative
    assert torch.equal(result.worst, fgsm.robust)


def test_interrupted_evaluation_resumes_to_the_same_flags(trained_tiny, mnist, tmp_path, monkeypatch):
    images, labels = _points(mnist, 40)
    kwargs = dict(norm="linf", eps=0.08, attacks=parse_attacks("pgd-3x2,fgsm"), batch_size=10, seed=5)
    calls = {"n": 0, "die_at": None}

    def counting(call):
        def run(self, x, y):
            calls["n"] += type(self) in (PGD, FGSM)
            if calls["n"] == calls["die_at"]:
                raise KeyboardInterrupt
            return call(self, x, y)
        return run

    for attack in (PGD, FGSM):  # the suite's attacks; the probe's CW (a PGD subclass) is not counted
        monkeypatch.setattr(attack, "__call__", counting(attack.__call__))
    monkeypatch.setattr(runner_module, "SAVE_EVERY_SECONDS", 0.0)
    reference = evaluate(trained_tiny, images, labels, **kwargs)
    uninterrupted_calls = calls["n"]

    state = tmp_path / "flags.pt"
    calls.update(n=0, die_at=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained_tiny, images, labels, state_path=state, **kwargs)
    assert state.is_file()
    calls.update(n=0, die_at=None)
    resumed = evaluate(trained_tiny, images, labels, state_path=state, **kwargs)
    assert calls["n"] == uninterrupted_calls - 3  # only the batches not finished before the kill
    for a, b in zip(reference.outcomes, resumed.outcomes):
        assert torch.equal(a.robust, b.robust) and torch.equal(a.broken_by, b.broken_by)
    calls["n"] = 0
    evaluate(trained_tiny, images, labels, state_path=state, **kwargs)  # complete: nothing left to attack
    assert calls["n"] == 0


def test_changed_settings_start_afresh(trained_tiny, mnist, tmp_path):
    images, labels = _points(mnist, 16)
    state = tmp_path / "flags.pt"
    evaluate(trained_tiny, images, labels, norm="linf", eps=0.05, attacks=parse_attacks("fgsm"), state_path=state)
    other = evaluate(trained_tiny, images, labels, norm="linf", eps=0.3, attacks=parse_attacks("fgsm"), state_path=state)
    assert other.eps == 0.3 and other.outcomes[0].accuracy < 0.5


# ----------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("transform, message", [
    (lambda x: x * 2.0, r"must lie in \[0, 1\]"),
    (lambda x: (x - 0.5) / 0.25, r"must lie in \[0, 1\]"),
    (lambda x: (x * 255).to(torch.uint8), "must be float"),
    (lambda x: x[0], r"\[N, C, H, W\]"),
])
def test_images_must_be_unnormalised_floats_in_the_unit_box(trained_tiny, mnist, transform, message):
    images, labels = _points(mnist, 8)
    with pytest.raises(UserError, match=message):
        evaluate(trained_tiny, transform(images), labels, norm="linf", eps=0.1, attacks=[])


def test_other_bad_arguments(trained_tiny, mnist):
    images, labels = _points(mnist, 8)
    with pytest.raises(UserError, match="labels must lie"):
        evaluate(trained_tiny, images, labels + 10, norm="linf", eps=0.1, attacks=[], num_classes=10)
    with pytest.raises(UserError, match="threat model"):
        evaluate(trained_tiny, images, labels, norm="l1", eps=0.1, attacks=[])
    with pytest.raises(UserError, match="eps"):
        evaluate(trained_tiny, images, labels, norm="linf", eps=-0.1, attacks=[])
    with pytest.raises(UserError, match="returns 10 logits"):
        evaluate(trained_tiny, images, labels, norm="linf", eps=0.1, attacks=[], num_classes=100)
    with pytest.raises(UserError, match="cannot process"):
        evaluate(trained_tiny, images.repeat(1, 3, 1, 1), labels, norm="linf", eps=0.1, attacks=[])


def test_model_mode_is_restored(mnist):
    images, labels = _points(mnist, 8)
    model = make_tiny_model().train()
    evaluate(model, images, labels, norm="linf", eps=0.1, attacks=parse_attacks("fgsm"))
    assert model.training


# ----------------------------------------------------------------------------------------------------------
# results as a table


def _hand_built() -> runner_module.Evaluation:
    """5 points: 4 clean; PGD breaks point 2; AutoAttack's APGD-CE breaks point 2 and APGD-T point 1."""
    from robust_sparse.eval import AttackOutcome

    pgd = AttackOutcome(AttackSpec("pgd", 20, 1), torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool),
                        torch.tensor([-1, -1, 0, -1, -1], dtype=torch.int8))
    autoattack = AttackOutcome(AttackSpec("autoattack"), torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool),
                               torch.tensor([-1, 1, 0, -1, -1], dtype=torch.int8))
    return runner_module.Evaluation(norm="linf", eps=8 / 255, seed=2, batch_size=5, chained=False,
                                    clean=torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool),
                                    outcomes=[pgd, autoattack], seconds=1.0)


def test_an_evaluation_is_one_tidy_frame():
    from robust_sparse.eval.store import TIDY_COLUMNS
    from robust_sparse.studies.stats import wilson_interval

    frame = _hand_built().to_frame("runs/ast/best/subnet1", dataset="cifar10")
    assert list(frame.columns) == TIDY_COLUMNS
    assert list(frame["attack"]) == ["clean", "PGD-20x1", "AutoAttack", "AutoAttack/apgd-ce", "AutoAttack/apgd-t",
                                     "AutoAttack/fab-t", "AutoAttack/square", "worst case"]
    assert list(frame["kind"]) == ["clean", "attack", "attack"] + ["unit"] * 4 + ["worst"]
    assert list(frame["correct"]) == [4, 3, 2, 3, 2, 2, 2, 2]  # APGD-CE alone leaves points 0, 1 and 3
    assert frame["accuracy"].tolist() == pytest.approx([0.8, 0.6, 0.4, 0.6, 0.4, 0.4, 0.4, 0.4])
    assert (frame["model"] == "runs/ast/best").all() and (frame["subnet"] == 1).all()
    assert (frame["threat_model"] == "Linf").all() and (frame["dataset"] == "cifar10").all()
    assert (frame["eps"] == 8 / 255).all() and (frame["seed"] == 2).all() and (frame["n"] == 5).all()
    assert (frame["mode"] == "standalone").all()
    assert tuple(frame.loc[0, ["ci_low", "ci_high"]]) == pytest.approx(wilson_interval(0.8, 5))


def test_the_results_store_gives_the_same_frame():
    """A store row of the evaluation (as robust-sparse eval writes it) reads back as the same tidy rows; the rows
    of two sub-nets and two seeds concatenate into one frame."""
    import pandas as pd

    from robust_sparse.eval.store import tidy

    evaluation = _hand_built()
    row = {"model": "runs/ast/best/subnet1", "dataset": "cifar10", "threat_model": "Linf", "eps": evaluation.eps,
           "seed": evaluation.seed, "mode": "standalone", "n_examples": evaluation.n,
           "clean_acc": evaluation.clean_accuracy, "per_attack": evaluation.accuracies(),
           "worst_acc": evaluation.worst_accuracy}
    pd.testing.assert_frame_equal(tidy(pd.DataFrame([row])), evaluation.to_frame("runs/ast/best/subnet1", "cifar10"))
    both = pd.concat([evaluation.to_frame("m", "cifar10", subnet=k) for k in (0, 1)], ignore_index=True)
    assert both.groupby(["subnet", "attack"]).size().eq(1).all() and len(both) == 16


def test_a_single_batch_attack_has_an_estimated_eta_and_the_plan_says_what_runs(trained_tiny, mnist, caplog,
                                                                                monkeypatch):
    """One batch (64 points, batch 500) reports nothing until it ends: its heartbeat gives an ETA estimated from
    the attack's pass budget and the model's measured cost per pass, and the plan line comes first."""
    import logging

    import robust_sparse.progress as progress_module

    images, labels = _points(mnist, 64)
    monkeypatch.setattr(progress_module, "LOG_EVERY_SECONDS", 0.02)
    with caplog.at_level(logging.INFO):
        evaluate(trained_tiny, images, labels, norm="linf", eps=0.3, attacks=parse_attacks("pgd-300x1"),
                 progress=True, large_eps=None)
    lines = [record.getMessage() for record in caplog.records]
    plan = [line for line in lines if line.startswith("plan: ")]
    assert len(plan) == 1 and "PGD-300x1 (1 unit, up to 301 passes per point)" in plan[0]
    assert "large-eps probe" not in plan[0]  # large_eps=None: no probe, and the plan does not claim one
    beats = [line for line in lines if "running on" in line]
    assert beats and all("ETA ~" in line or "over the estimated" in line for line in beats), beats[:3]
    assert "an estimate from the attack's budget" in beats[0]
    assert lines.index(plan[0]) < lines.index(beats[0])


def test_the_estimate_is_the_budget_times_the_measured_pass(monkeypatch):
    from robust_sparse.progress import Heartbeat

    beat = Heartbeat("APGD-T batch 1/1", 100, estimated_seconds_per_point=901 * 0.002)
    assert beat.line(now=beat.started + 60.0).endswith(
        "ETA ~120 s (an estimate from the attack's budget and the model's measured cost per pass; refined once a "
        "batch has finished)")  # 100 points x 901 passes x 2 ms = 180.2 s, 60 s gone
    assert "over the estimated 180 s" in beat.line(now=beat.started + 200.0)
    assert parse_attack("autoattack").passes_per_point("apgd-t") == 901.0
    assert parse_attack("pgd-50x10").passes_per_point("restart 3") == 51.0


def test_a_resumed_evaluation_says_this_runs_time_and_the_total_apart():
    from robust_sparse.eval.job import wall_time

    assert wall_time({"wall_seconds": 1244.9, "session_seconds": 576.2}) == "576.2 s this run, 1244.9 s over all attempts"
    assert wall_time({"wall_seconds": 12.3, "session_seconds": 12.3}) == "12.3 s"
    assert wall_time({"wall_seconds": 12.3}) == "12.3 s"  # a row stored before this field existed
