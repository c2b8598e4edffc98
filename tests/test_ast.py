"""AST: alternating sub-nets over one shared weight tensor, cubic pruning, our gradient correction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config
from robust_sparse.errors import ConfigError
from robust_sparse.optim import SGDW
from robust_sparse.sparse import build_sparsity
from robust_sparse.sparse.ast import ASTEngine, ASTSchedule, cubic_density, gradient_correction, subnet_weights
from robust_sparse.train import fit

from conftest import make_tiny_model

DENSITIES = [0.3, 0.15, 0.05]


def _setup(mnist, overrides=(), optimizer="sgd", total_steps=60):
    config = load_config(None, ["sparsity.method=ast", f"sparsity.ast_densities={DENSITIES}",
                                "sparsity.update_every=4", "sparsity.end_fraction=0.6", *overrides])
    model = make_tiny_model()
    opt = (SGDW(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if optimizer == "sgdw"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", opt, total_steps=total_steps, seed=0)
    assert isinstance(masker.engine, ASTEngine)
    train, _ = mnist
    return model, opt, masker, train.images[:1920].float() / 255, train.labels[:1920]


def _step(model, opt, masker, images, labels, step):
    batch = slice((step * 32) % len(labels), (step * 32) % len(labels) + 32)
    loss = F.cross_entropy(model(images[batch]), labels[batch])
    opt.zero_grad()
    loss.backward()
    opt.step()


def _full(masker, name):
    with masker.full_weights():
        return masker.params[name].detach().clone()


def test_layerwise_scope_prunes_each_layer_to_its_erk_share(mnist):
    from robust_sparse.sparse import density as allocation

    model, opt, masker, images, labels = _setup(mnist, ["sparsity.prune_scope=layerwise"])
    for step in range(60):
        _step(model, opt, masker, images, labels, step)
    shapes = {name: p.shape for name, p in masker.params.items()}
    for k, target in enumerate(DENSITIES):
        shares = allocation.erk(shapes, target)
        expected = {name: max(1, round(shares[name] * p.numel())) for name, p in masker.params.items()}
        assert masker.engine.subnet_counts(k) == expected
        assert all(count > 0 for count in masker.engine.subnet_counts(k).values())  # no layer pruned away


def test_each_subnet_reaches_its_exact_density_after_pruning(mnist):
    model, opt, masker, images, labels = _setup(mnist)
    total = sum(m.numel() for m in masker.engine.subnet_masks[0].values())
    assert all(masker.engine.subnet_density(k) == 1.0 for k in range(3))  # the official recipe starts dense
    densities = []
    for step in range(60):
        _step(model, opt, masker, images, labels, step)
        densities.append([masker.engine.subnet_density(k) for k in range(3)])
    for k, target in enumerate(DENSITIES):
        assert sum(masker.engine.subnet_counts(k).values()) == round(target * total)
        trace = [row[k] for row in densities]
        assert all(a >= b for a, b in zip(trace, trace[1:]))  # gradual pruning only removes
        assert trace[0] == 1.0 and trace[-1] < trace[len(trace) // 3]
    # The sub-nets rewired at different global steps (staggered) and stop at end_fraction of their steps.
    schedule = masker.engine.schedule
    events = [{(i - 1) * 3 + k + 1 for i in range(1, 21) if schedule.is_event(k, i)} for k in range(3)]
    assert not (events[0] & events[1]) and not (events[1] & events[2])
    assert all(max(e) <= 0.6 * 60 + 3 for e in events)


@pytest.mark.parametrize("optimizer", ["sgd", "sgdw"])
def test_training_subnet_k_never_changes_weights_or_momentum_outside_its_mask(mnist, optimizer):
    model, opt, masker, images, labels = _setup(mnist, optimizer=optimizer)
    for step in range(40):
        k = masker.engine.active
        assert k == step % 3
        mask = {name: m.clone() for name, m in masker.engine.subnet_masks[k].items()}
        with masker.full_weights():
            before = {name: p.detach().clone() for name, p in masker.params.items()}
            buffers_before = {name: {key: v.clone() for key, v in masker.optimizer_buffers(p).items()}
                              for name, p in masker.params.items()}
        rewires = masker.engine.schedule.is_event(*masker.engine.subnet_step(step + 1))
        # while sub-net k trains, the model *is* sub-net k: zero wherever its mask is off
        for name, param in masker.params.items():
            assert torch.all(param[~mask[name]] == 0)
        _step(model, opt, masker, images, labels, step)
        if rewires:
            continue  # a topology event may zero positions that no sub-net uses any more
        with masker.full_weights():
            for name, param in masker.params.items():
                outside = ~mask[name]
                assert torch.equal(param[outside], before[name][outside]), f"step {step}: {name} moved outside M_{k}"
                assert not torch.equal(param[mask[name]], before[name][mask[name]])  # and it did train
                for key, value in masker.optimizer_buffers(param).items():
                    if key in buffers_before[name]:
                        assert torch.equal(value[outside], buffers_before[name][key][outside])
                    else:
                        assert torch.all(value[outside] == 0)


def test_gradient_correction_equals_hand_computed_projection():
    grad = torch.tensor([1.0, 1.0, 0.0])
    reference = torch.tensor([-2.0, 0.0, 1.0])
    # <g, G> = -2 < 0: g - (-2 / 5) G = [1 - 0.8, 1, 0.4], and then <g', G> = -0.4 + 0 + 0.4 = 0
    corrected = gradient_correction(grad, reference)
    torch.testing.assert_close(corrected, torch.tensor([0.2, 1.0, 0.4]))
    assert abs(float(corrected @ reference)) < 1e-6
    # no conflict (<g, -G> = 2 >= 0): untouched
    torch.testing.assert_close(gradient_correction(grad, -reference), grad)


def test_masker_projects_the_steps_gradient_off_the_previous_running_gradient(mnist):
    """Two steps of a 2-sub-net masker against PCGrad's projection by hand: the applied gradient of sub-net 1
    conflicts with sub-net 0's running gradient before, and is orthogonal to it (within M_1) after."""
    config = load_config(None, ["sparsity.method=ast", "sparsity.ast_densities=[0.5, 0.2]", "sparsity.update_every=50",
                                "sparsity.ast_gc_beta=0.5", "sparsity.ast_init_density=0.5"])
    model = make_tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", opt, total_steps=400, seed=0)
    name, param = next(iter(masker.params.items()))
    mask0 = masker.masks[name].clone()
    half = torch.rand(param.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    mask1 = mask0 & half  # sub-net 1 trains only part of sub-net 0's positions
    masker.engine.subnet_masks[1][name] = mask1
    g0 = torch.randn(param.shape, generator=torch.Generator().manual_seed(1))
    g1 = -g0 + 0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2))  # a conflicting pair
    seen = []
    for g in (g0, g1):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        param.grad = g.clone()
        with masker.full_weights():
            before = param.detach().clone()
        opt.step()
        with masker.full_weights():
            seen.append((before - param.detach()) / 0.1)  # the gradient the step applied
    running0 = 0.5 * (g0 * mask0)
    torch.testing.assert_close(seen[0], g0 * mask0)  # no previous running gradient yet
    raw = g1 * mask1
    reference = running0 * mask1
    dot = float((raw * reference).sum())
    assert dot < 0  # the pair conflicts before the correction
    expected = raw - dot / float(reference.square().sum()) * reference
    torch.testing.assert_close(seen[1], expected, rtol=1e-5, atol=1e-6)
    assert not torch.any(seen[1][~mask1])  # nothing outside M_1 moved
    # after: orthogonal to sub-net 0's running gradient, relative to the sizes involved
    assert abs(float((seen[1] * running0).sum())) < 1e-5 * float(raw.norm() * running0.norm())
    torch.testing.assert_close(masker.engine._running[1][name], 0.5 * raw)  # the running gradient keeps the raw g


def test_shared_prune_takes_the_top_magnitudes_of_the_whole_shared_tensor(mnist):
    """ast_prune_from=shared (official): sub-net 1's cubic-pruning event keeps the largest |W| over every
    position of the shared tensor, even ones outside its own mask; subnet (default) keeps within its mask."""
    kept = {}
    for prune_from in ("shared", "subnet"):
        config = load_config(None, ["sparsity.method=ast", "sparsity.ast_densities=[0.5, 0.1]",
                                    "sparsity.update_every=5", "sparsity.prune_rate=0.001",
                                    f"sparsity.ast_prune_from={prune_from}"])
        model = make_tiny_model()
        masker = build_sparsity(config.sparsity, model, "tiny_cnn", torch.optim.SGD(model.parameters(), lr=0.1),
                                total_steps=100, seed=0)
        with masker.full_weights():
            full = {n: p.detach().clone() for n, p in masker.params.items()}
        # sub-net 1 holds the smaller-|W| half of every layer: the official threshold looks beyond it
        for name, weight in full.items():
            masker.engine.subnet_masks[1][name] = weight.abs() <= weight.abs().flatten().median()
        before = {n: m.clone() for n, m in masker.engine.subnet_masks[1].items()}
        last = masker.engine.schedule.last_event[1]
        with masker.full_weights():
            masker.engine._rewire(1, last)  # the last event: density exactly 0.1; regrowth of int(0.001 * nnz) = 0
        total = sum(w.numel() for w in full.values())
        target = round(0.1 * total)
        masks = masker.engine.subnet_masks[1]
        assert sum(int(m.sum()) for m in masks.values()) == target
        magnitudes = torch.cat([full[n].abs().flatten() for n in full])
        chosen = torch.cat([masks[n].flatten() for n in full])
        if prune_from == "shared":
            assert magnitudes[chosen].min() >= magnitudes[~chosen].max()  # one global |W| threshold
            assert any(torch.any(masks[n] & ~before[n]) for n in masks)  # it took positions outside M_1
        else:
            assert all(not torch.any(masks[n] & ~before[n]) for n in masks)  # pruning only removed
            inside = torch.cat([before[n].flatten() for n in full])
            assert magnitudes[chosen].min() >= magnitudes[inside & ~chosen].max()
        kept[prune_from] = chosen
    assert not torch.equal(kept["shared"], kept["subnet"])


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_nested_masks_stay_nested(mnist, scope):
    model, opt, masker, images, labels = _setup(mnist, ["sparsity.ast_nested=true", f"sparsity.prune_scope={scope}"])
    total = sum(m.numel() for m in masker.engine.subnet_masks[0].values())
    for step in range(60):
        _step(model, opt, masker, images, labels, step)
        for k in range(1, 3):
            for name in masker.params:
                assert not torch.any(masker.engine.subnet_masks[k][name] & ~masker.engine.subnet_masks[k - 1][name])
    for k, target in enumerate(DENSITIES):
        if scope == "global":
            assert sum(masker.engine.subnet_counts(k).values()) == round(target * total)
        else:
            assert sum(masker.engine.subnet_counts(k).values()) == pytest.approx(target * total, abs=len(masker.params))


def test_schedule_shape_and_too_short_run():
    assert cubic_density(0, 10, 1.0, 0.1) == 1.0 and cubic_density(10, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert cubic_density(5, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.125)
    schedule = ASTSchedule([0.1, 0.05], 1.0, total_steps=200, update_every=10, offset=5, end_fraction=0.5,
                           prune_rate=0.5)
    assert [i for i in range(1, 101) if schedule.is_event(0, i)] == [10, 20, 30, 40, 50]
    assert [i for i in range(1, 101) if schedule.is_event(1, i)] == [15, 25, 35, 45]
    assert schedule.density(1, 45) == pytest.approx(0.05)
    assert schedule.regrow_fraction(0, 0) == pytest.approx(0.5) and schedule.regrow_fraction(0, 100) == pytest.approx(0.005)
    with pytest.raises(ConfigError, match="never prune"):
        ASTSchedule([0.1, 0.05], 1.0, total_steps=20, update_every=10, offset=5, end_fraction=0.5, prune_rate=0.5)


@pytest.mark.parametrize("override, message", [
    ("sparsity.ast_densities=[0.05, 0.1]", "densest first"),
    ("sparsity.ast_densities=[]", "at least one"),
    ("sparsity.ast_densities=[1.5]", r"\(0, 1\]"),
    ("sparsity.ast_init_density=0.05", "sparsity.ast.init_density"),  # the first versions' flat names still parse
    ("sparsity.ast.gc_beta=1", "sparsity.ast.gc_beta"),
    ("sparsity.ast_offset=-1", "sparsity.ast.offset"),
    ("sparsity.ast.prune_from=everywhere", "sparsity.ast.prune_from"),
])
def test_bad_ast_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["sparsity.method=ast", override])


AST_RUN = ["sparsity.method=ast", "sparsity.ast_densities=[0.2, 0.05]", "sparsity.update_every=3",
           "optim.epochs=3", "agent.enabled=true", "agent.estimator=fixed", "agent.fixed_c=0.5",
           "agent.full_grad_batches=2"]


def test_fit_evaluates_every_subnet_resumes_exactly_and_exports_each(tiny_config, tmp_path, capsys):
    from test_train import _train_one_epoch_then_stop

    result = fit(tiny_config(*AST_RUN, f"out_dir={tmp_path / 'a'}"))
    subnets = result.evaluation["subnets"]
    assert [row["subnet"] for row in subnets] == [0, 1]
    assert [row["density"] for row in subnets] == pytest.approx([0.2, 0.05], abs=1e-3)
    assert (result.run_dir / "subnets.csv").is_file()
    assert {"val_pgd_accuracy_subnet0", "val_pgd_accuracy_subnet1", "density_subnet1"} <= set(result.metrics.columns)

    # killed after epoch 1 and resumed: bit for bit the uninterrupted run (full weights, hidden momentum, GC state)
    killed = tiny_config(*AST_RUN, f"out_dir={tmp_path / 'b'}")
    _train_one_epoch_then_stop(killed)
    resumed = fit(killed, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for k in range(2):
        for name, tensor in subnet_weights(a, k).items():
            assert torch.equal(tensor, subnet_weights(b, k)[name]), f"sub-net {k}: {name} differs after resume"
    untimed = lambda rows: [{key: value for key, value in row.items() if key != "seconds"} for row in rows]
    assert untimed(resumed.evaluation["subnets"]) == untimed(subnets)

    best = tmp_path / "a" / "best.pt"
    assert main(["export", str(best), "--subnet", "1", "--out", str(tmp_path / "export1")]) == 0
    exported = torch.load(tmp_path / "export1" / "model_dense.pt", weights_only=True)
    weights = [t for n, t in exported.items() if n.endswith("weight") and t.dim() > 1]
    assert sum(int(t.count_nonzero()) for t in weights) / sum(t.numel() for t in weights) <= 0.05 + 1e-3
    assert main(["eval", str(best), "--subnet", "1", "--attacks", "fgsm", "--n-examples", "64",
                 "--device", "cpu", "--no-probe", "--no-progress", "--results-dir", str(tmp_path / "ev")]) == 0
    assert main(["eval", str(best), "--subnet", "5", "--attacks", "fgsm"]) == 2
    assert "sub-nets 0..1" in capsys.readouterr().err
    capsys.readouterr()
    # no --subnet: every sub-net, one row each, in one results store
    assert main(["eval", str(best), "--attacks", "fgsm", "--n-examples", "64", "--device", "cpu", "--no-probe",
                 "--no-progress", "--results-dir", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert "a/best/subnet0 on mnist5k" in out and "a/best/subnet1 on mnist5k" in out
    assert main(["eval", str(best), "--attacks", "fgsm", "--n-examples", "64", "--device", "cpu", "--no-probe",
                 "--no-progress", "--results-dir", str(tmp_path / "named"), "--name", "mine"]) == 0
    import pandas as pd

    assert sorted(pd.read_csv(tmp_path / "named" / "results.csv")["model"]) == ["mine/subnet0", "mine/subnet1"]
    store = pd.read_csv(tmp_path / "all" / "results.csv")
    assert sorted(store["model"]) == ["a/best/subnet0", "a/best/subnet1"]
    assert sorted(store["sparsity"].round(2)) == [0.8, 0.95]


def test_agent_snapshot_holds_full_weights_and_sees_the_active_subnet(mnist):
    import copy

    from robust_sparse.agent import AGENT

    model, opt, masker, images, labels = _setup(mnist, ["sparsity.ast_init_density=0.5"])
    config = load_config(None, ["agent.enabled=true", "agent.estimator=fixed", "agent.fixed_c=1.0",
                                "agent.snapshot_mask=current"]).agent
    agent = AGENT(opt, model, config, masker=masker)
    for step in range(4):  # move the sub-nets apart (the next step is sub-net 1)
        _step(model, opt, masker, images, labels, step)
    loss_fn = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    agent.refresh([(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)], loss_fn)
    with masker.full_weights():
        full = {name: p.detach().clone() for name, p in masker.params.items()}
    snapshot = dict(agent.snapshot.named_parameters())
    for name in masker.params:
        assert torch.equal(snapshot[name].detach(), full[name])  # every sub-net's weights, not just the active one
    x, y = images[:32], labels[:32]
    agent.snapshot_backward(lambda snap: loss_fn(snap, x, y))
    k = masker.engine.active
    expected_model = copy.deepcopy(agent.snapshot)
    with torch.no_grad():
        for name, param in expected_model.named_parameters():
            if name in masker.params:
                param.mul_(masker.engine.subnet_masks[k][name])
    expected = torch.autograd.grad(loss_fn(expected_model, x, y), list(expected_model.parameters()))
    for name, got, want in zip(agent.names, agent.snapshot_grads, expected):
        want = want * masker.engine.subnet_masks[k][name] if name in masker.params else want
        torch.testing.assert_close(got, want)
    for name in masker.params:  # the view restored the snapshot
        assert torch.equal(snapshot[name].detach(), full[name])


def test_per_subnet_batchnorm_statistics_are_kept_apart_and_saved(mnist):
    model, opt, masker, images, labels = _setup(mnist, ["sparsity.ast_subnet_bn=true"])
    bn_names = list(masker.engine.bn_buffers)
    assert bn_names and all("running" in n or "num_batches" in n for n in bn_names)
    for step in range(30):
        _step(model, opt, masker, images, labels, step)
    state = masker.state_dict()
    stats = state["batchnorm"]
    # every sub-net saw 10 of the 30 batches, its own statistics counted exactly those
    counter = next(n for n in bn_names if n.endswith("num_batches_tracked"))
    assert [int(s[counter]) for s in stats] == [10, 10, 10]
    means = [s[next(n for n in bn_names if n.endswith("running_mean"))] for s in stats]
    assert not torch.equal(means[0], means[2])  # a 5% sub-net's activations are not a 30% one's
    with masker.views()[2].activate():  # the model carries sub-net 2's statistics while it is sub-net 2
        assert torch.equal(dict(model.named_buffers())[counter], stats[2][counter])
    checkpoint = {"model": model.state_dict(), "sparsity": state}
    assert torch.equal(subnet_weights(checkpoint, 2)[counter], stats[2][counter])
    # round trip into a fresh masker
    model2, opt2, masker2, _, _ = _setup(mnist, ["sparsity.ast_subnet_bn=true"])
    model2.load_state_dict(model.state_dict())
    masker2.load_state_dict(state)
    for k in range(3):
        with masker.views()[k].activate(), masker2.views()[k].activate():
            for (n1, b1), (n2, b2) in zip(model.named_buffers(), model2.named_buffers()):
                assert torch.equal(b1, b2), (k, n1)
