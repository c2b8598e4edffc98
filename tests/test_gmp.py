"""Gradual magnitude pruning (robust_sparse/sparse/gmp.py): the cubic schedule and the pruning by hand, a run
through the training loop, and its settings. The shared invariants (tests/test_sparse.py) run it because it is
registered."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from robust_sparse.cli import main
from robust_sparse.config import PruneScope, load_config
from robust_sparse.errors import ConfigError
from robust_sparse.sparse import METHODS, build_sparsity
from robust_sparse.sparse.gmp import GMPEngine, GMPSchedule, keep_largest
from robust_sparse.train import fit


def test_cubic_schedule_by_hand():
    # 100 steps, t0 = 10, end_fraction's last step 75 -> t_end = 10 + 6 * 10 = 70 (n = 6, Δt = 10)
    schedule = GMPSchedule.over(100, start_fraction=0.1, end_step=75, every=10, initial=1.0, final=0.1)
    assert (schedule.start, schedule.stop) == (10, 70)
    assert [t for t in range(101) if schedule.is_update_step(t)] == [20, 30, 40, 50, 60, 70]
    assert schedule.density(5) == schedule.density(10) == 1.0  # dense until t0
    assert schedule.density(20) == pytest.approx(0.1 + 0.9 * (5 / 6) ** 3)
    assert schedule.density(40) == pytest.approx(0.1 + 0.9 * 0.125)  # half way: (1 - 1/2)^3
    assert schedule.density(70) == schedule.density(100) == pytest.approx(0.1)
    partial = GMPSchedule.over(40, start_fraction=0.0, end_step=30, every=4, initial=0.5, final=0.2)
    assert partial.stop == 28 and partial.density(14) == pytest.approx(0.2 + 0.3 * 0.125)


def test_schedule_that_never_prunes_is_an_error():
    with pytest.raises(ConfigError, match="never prune"):
        GMPSchedule.over(100, start_fraction=0.7, end_step=75, every=10, initial=1.0, final=0.1)


def test_keep_largest_by_hand():
    weights = {"a": torch.tensor([[0.1, -0.5], [0.3, -0.05]]), "b": torch.tensor([0.2, -0.4, 0.0, 0.6])}
    masks = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([True, True, True, False])}
    # global, half of the 8 positions: |W| 0.5, 0.4, 0.3, 0.2 among the active ones (b's 0.6 is pruned already)
    kept = keep_largest(weights, masks, 0.5, PruneScope.GLOBAL)
    assert kept["a"].tolist() == [[False, True], [True, False]]
    assert kept["b"].tolist() == [True, True, False, False]
    # each layer to half of its own positions
    kept = keep_largest(weights, masks, 0.5, PruneScope.LAYERWISE)
    assert kept["a"].tolist() == [[False, True], [True, False]]
    assert kept["b"].tolist() == [True, True, False, False]
    kept = keep_largest(weights, masks, 0.25, PruneScope.LAYERWISE)
    assert kept["a"].tolist() == [[False, True], [False, False]] and kept["b"].tolist() == [False, True, False, False]
    # never more than the active ones: a pruned position does not come back
    assert keep_largest(weights, masks, 1.0, PruneScope.GLOBAL)["b"].tolist() == [True, True, True, False]


def test_training_steps_follow_the_schedule_from_dense(mnist):
    config = load_config(None, ["sparsity.method=gmp", "sparsity.density=0.2", "sparsity.update_every=3"])
    model = make_tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", optimizer, total_steps=40, seed=0)
    engine = masker.engine
    assert isinstance(engine, GMPEngine) and masker.global_density() == 1.0  # a dense start
    assert (engine.schedule.start, engine.schedule.stop, engine.schedule.every) == (0, 30, 3)  # 0.75 * 40 = 30
    total = sum(mask.numel() for mask in masker.masks.values())
    train, _ = mnist
    images, labels = train.images[:640].float() / 255, train.labels[:640]
    for step in range(1, 36):
        before = {name: mask.clone() for name, mask in masker.masks.items()}
        batch = slice(step % 10 * 64, (step % 10 + 1) * 64)
        optimizer.zero_grad()
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
        assert all(not (masker.masks[n] & ~before[n]).any() for n in before)  # masks only shrink
        if step % 3 == 0 and step <= 30:  # exactly the schedule's count, under one global threshold
            assert sum(masker.active_counts().values()) == round((0.2 + (1.0 - 0.2) * (1 - step / 30) ** 3) * total)
        else:
            assert all(torch.equal(masker.masks[n], before[n]) for n in before)
        assert masker.at_target_density() == (step >= 30)
    assert sum(masker.active_counts().values()) == round(0.2 * total)


def test_a_run_ends_at_the_configured_density(tiny_config):
    result = fit(tiny_config("sparsity.method=gmp", "sparsity.density=0.2", "sparsity.update_every=2",
                             "sparsity.gmp.start_fraction=0.25", "eval.n_examples=0"))
    assert result.metrics["density"].iloc[-1] == pytest.approx(0.2, abs=1e-3)
    assert result.metrics["density"].iloc[0] > 0.2  # still pruning after the first epoch


def test_registered_and_listed_as_an_allowed_method():
    assert METHODS.get("gmp").build.__module__ == "robust_sparse.sparse.gmp"  # one file, registered by importing it
    with pytest.raises(ConfigError, match=r"sparsity\.method: 'pruning' is not one of .*\bgmp\b"):
        load_config(None, ["sparsity.method=pruning"])


@pytest.mark.parametrize("override,field", [
    ("sparsity.gmp.start_fraction=0.8", "sparsity.gmp.start_fraction"),  # after end_fraction = 0.75
    ("sparsity.gmp.initial_density=0.05", "sparsity.gmp.initial_density"),  # below sparsity.density = 0.1
    ("sparsity.gmp.start_fraction=soon", "sparsity.gmp.start_fraction"),  # the typed parser's error
    ("sparsity.gmp.every=3", "sparsity.gmp.every"),  # not a field of the section
])
def test_bad_settings_give_one_line_errors(override, field, capsys, tmp_path):
    assert main(["train", "--set", "sparsity.method=gmp", "--set", override, "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and field in error[0] and "Traceback" not in error[0]
    assert not (tmp_path / "r").exists()
