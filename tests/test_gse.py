"""GSE (Heddes et al. 2024): candidate gradients from hooks, grow-then-prune invariants, sampling, allocation,
config errors and a short AGENT + PGD-AT run. Real MNIST-5k digits throughout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from robust_sparse.cli import main
from robust_sparse.config import load_config
from robust_sparse.errors import ConfigError
from robust_sparse.sparse import build_sparsity
from robust_sparse.sparse import density as allocation
from robust_sparse.sparse.gse import GSEEngine, balanced_batch, candidate_gradients, dense_gradient, gse_er, marginals
from robust_sparse.train import fit

from conftest import make_tiny_model


def _digits(mnist, n=32, channels=1):
    train, _ = mnist
    images = train.images[:n].float() / 255
    return images.repeat(1, channels, 1, 1), train.labels[:n]


def _hooked(module, inputs, readout):
    """(input, dL/doutput, dense dL/dW) of one layer with the loss readout(output)."""
    output = module(inputs)
    loss = readout(output)
    delta, weight_grad = torch.autograd.grad(loss, [output, module.weight])
    return inputs, delta, weight_grad.reshape(module.weight.shape[0], -1)


@pytest.mark.parametrize("layer", ["linear", "conv", "conv_strided", "conv_grouped"])
def test_candidate_gradients_equal_the_dense_gradient_at_the_candidates(layer, mnist):
    torch.manual_seed(0)
    if layer == "linear":
        images, _ = _digits(mnist)
        module, inputs = nn.Linear(784, 50), images.flatten(1)
    else:
        images, _ = _digits(mnist, channels=2 if layer == "conv_grouped" else 1)
        module = {"conv": nn.Conv2d(1, 6, 3, padding=1),
                  "conv_strided": nn.Conv2d(1, 6, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1)),
                  "conv_grouped": nn.Conv2d(2, 6, 3, groups=2)}[layer]
        inputs = images
    # float64: the comparison tests the formula, not float32 summation order over 32 x 784 terms
    module, inputs = module.double(), inputs.double()
    readout = torch.randn(module(inputs).shape[1:], dtype=torch.float64)
    inputs, delta, reference = _hooked(module, inputs, lambda out: (out.tanh() * readout).sum())
    flat = torch.randperm(reference.numel(), generator=torch.Generator().manual_seed(1))[:300]
    got = candidate_gradients(module, inputs, delta, flat)
    torch.testing.assert_close(got, reference.flatten()[flat], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_gradient(module, inputs, delta), reference, atol=1e-5, rtol=1e-5)
    p_out, p_in = marginals(module, inputs, delta)
    assert p_out.shape == (reference.shape[0],) and p_in.shape == (reference.shape[1],)


def _gse_run(mnist, density=0.25, sampler="grabo", steps=8, update_every=2, extra=()):
    """tiny_cnn under GSE, with a score batch that also records the reference dense gradient of the model
    at the moment GSE scores (after the optimizer step, before the topology change)."""
    train, _ = mnist
    config = load_config(None, ["sparsity.method=gse", f"sparsity.density={density}",
                                f"sparsity.update_every={update_every}", f"sparsity.gse_sampler={sampler}", *extra])
    model = make_tiny_model().double()  # float64: candidate vs reference gradients compared to 1e-5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = {}

    def score_batch(step):
        images, labels = balanced_batch(train, 4, torch.device("cpu"), seed=len(seen))
        images = images.double()
        # fresh leaves: the masker's gradient hooks on the real parameters would mask the reference
        params = {n: p.detach().clone().requires_grad_() for n, p in masker.params.items()}
        outputs = torch.func.functional_call(model, params, (images,))
        grads = torch.autograd.grad(F.cross_entropy(outputs, labels), list(params.values()))
        seen["reference"] = {n: g.reshape(g.shape[0], -1).flatten() for n, g in zip(masker.params, grads)}
        seen["weights"] = {n: p.detach().flatten().clone() for n, p in masker.params.items()}
        seen["masks"] = {n: m.flatten().clone() for n, m in masker.masks.items()}
        return images, labels

    masker = build_sparsity(config.sparsity, model, "tiny_cnn", optimizer, total_steps=100, seed=0,
                            batch_source=score_batch)
    return model, optimizer, masker, seen, train


def test_gse_grows_the_top_candidates_protects_them_and_keeps_every_count(mnist):
    model, optimizer, masker, seen, train = _gse_run(mnist)
    counts = masker.active_counts()
    densities = masker.layer_densities()
    assert any(d >= 0.5 for d in densities.values()) and any(d < 0.5 for d in densities.values())
    images, labels = train.images[:256].double() / 255, train.labels[:256]
    updates = 0
    for step in range(8):
        index = slice(32 * step, 32 * (step + 1))
        optimizer.zero_grad()
        F.cross_entropy(model(images[index]), labels[index]).backward()
        grads_before = {n: p.grad.clone() for n, p in masker.params.items()}
        optimizer.step()
        assert masker.active_counts() == counts  # per layer, hence globally, exact
        for n, p in masker.params.items():
            assert torch.equal(p.grad, grads_before[n]), "GSE touched a parameter's .grad"
        if masker.step % 2:
            continue
        updates += 1
        for name, update in masker.engine.last_update.items():
            candidates, gradient, grown, pruned = (update[k] for k in ("candidates", "gradients", "grown", "pruned"))
            old_mask, new_mask = seen["masks"][name], masker.masks[name].flatten()
            param = masker.params[name].detach().flatten()
            # the candidate gradients are the dense gradient at the candidates
            torch.testing.assert_close(gradient, seen["reference"][name][candidates], atol=1e-5, rtol=1e-5)
            # grown = the top-|g| dormant candidates
            dormant = candidates[~old_mask[candidates]]
            assert not old_mask[grown].any() and set(grown.tolist()) <= set(dormant.tolist())
            assert len(grown) == min(int(masker.engine.rate(masker.step) * counts[name]), len(dormant))
            if len(grown) < len(dormant):
                rest = torch.tensor(sorted(set(dormant.tolist()) - set(grown.tolist())))
                assert seen["reference"][name][grown].abs().min() >= seen["reference"][name][rest].abs().max()
            # grown start at zero with zero momentum and survive the following prune
            assert new_mask[grown].all() and torch.all(param[grown] == 0)
            momentum = optimizer.state[masker.params[name]]["momentum_buffer"].flatten()
            assert torch.all(momentum[grown] == 0)
            # pruned = as many of the weakest previously active
            assert len(pruned) == len(grown) and old_mask[pruned].all() and not new_mask[pruned].any()
            kept_old = seen["weights"][name][old_mask & new_mask].abs()
            if len(pruned):
                assert seen["weights"][name][pruned].abs().max() <= kept_old.min()
            assert int(new_mask.sum()) == counts[name]
        assert sum(len(u["grown"]) for u in masker.engine.last_update.values()) > 0
    assert updates == 4


def test_gse_global_scope_keeps_the_global_budget_with_global_rankings(mnist):
    """gse_scope=global (the official default): one |g| ranking grows int(alpha_t * N) dormant candidates over all
    layers, one |W| ranking prunes as many previously active connections; the global count stays exactly N."""
    model, optimizer, masker, seen, train = _gse_run(mnist, extra=["sparsity.gse_scope=global"])
    assert masker.engine.scope == "global"
    budget = sum(masker.active_counts().values())
    initial = masker.active_counts()
    images, labels = train.images[:256].double() / 255, train.labels[:256]
    moved = False
    for step in range(8):
        index = slice(32 * step, 32 * (step + 1))
        optimizer.zero_grad()
        F.cross_entropy(model(images[index]), labels[index]).backward()
        optimizer.step()
        counts = masker.active_counts()
        assert sum(counts.values()) == budget  # exact, after every step and update
        moved |= counts != initial
        if masker.step % 2:
            continue
        updates = masker.engine.last_update
        grown = {n: u["grown"] for n, u in updates.items()}
        pruned = {n: u["pruned"] for n, u in updates.items()}
        total_grown = sum(len(g) for g in grown.values())
        dormant = {n: u["candidates"][~seen["masks"][n][u["candidates"]]] for n, u in updates.items()}
        assert total_grown == min(int(masker.engine.rate(masker.step) * budget), sum(len(d) for d in dormant.values()))
        assert total_grown == sum(len(q) for q in pruned.values()) > 0
        # grown: the largest |g| among every layer's dormant candidates (a hand ranking over the union)
        grown_g = torch.cat([seen["reference"][n][grown[n]].abs() for n in grown])
        rest_g = torch.cat([seen["reference"][n][torch.tensor(sorted(set(dormant[n].tolist()) - set(grown[n].tolist())),
                                                             dtype=torch.long)].abs() for n in grown])
        if len(rest_g):
            assert grown_g.min() >= rest_g.max() - 1e-9
        # pruned: the smallest |W| among every layer's previously active connections
        pruned_w = torch.cat([seen["weights"][n][pruned[n]].abs() for n in pruned])
        kept_w = torch.cat([seen["weights"][n][seen["masks"][n] & masker.masks[n].flatten()].abs() for n in pruned])
        assert pruned_w.max() <= kept_w.min()
        for n in grown:  # grown entries start at zero and survive the prune
            assert masker.masks[n].flatten()[grown[n]].all()
            assert torch.all(masker.params[n].detach().flatten()[grown[n]] == 0)
    assert moved  # unlike the layerwise scope, layer counts move under the global budget


def test_gse_below_threshold_samples_about_gamma_nnz_candidates(mnist):
    _, _, masker, _, _ = _gse_run(mnist, density=0.1, update_every=1)
    model = masker.engine.model
    images, labels = balanced_batch(mnist[0], 4, torch.device("cpu"), seed=0)
    images = images.double()
    masker.engine.update(masker, masker.engine.capture(images, labels), rate=0.2)
    for name, update in masker.engine.last_update.items():
        nnz = masker.active_counts()[name]
        assert masker.layer_densities()[name] < 0.5
        assert 0 < len(update["candidates"]) <= nnz  # gamma = 1, with replacement, deduplicated
    assert model is not None


def test_grabo_draws_follow_the_marginals_and_concentrate_on_high_marginal_rows_and_columns(mnist):
    _, _, masker, _, _ = _gse_run(mnist)
    engine: GSEEngine = masker.engine
    images, labels = balanced_batch(mnist[0], 10, torch.device("cpu"), seed=0)
    captured = engine.capture(images.double(), labels)
    name = "features.4.weight"  # the 16 x 72 conv of tiny_cnn, density < 0.5
    p_out, p_in = marginals(engine.modules[name], *captured[name])
    rows, cols = p_out.numel(), p_in.numel()
    top_rows, top_cols = torch.topk(p_out, rows // 4).indices, torch.topk(p_in, cols // 4).indices
    row_mass, col_mass = float(p_out[top_rows].sum() / p_out.sum()), float(p_in[top_cols].sum() / p_in.sum())
    assert row_mass > 0.35  # real marginals are uneven enough to tell the samplers apart
    n = 20000
    share = {}
    for sampler in ("uniform", "grabo"):
        engine.sampler = sampler
        engine.generator.manual_seed(123)
        flat = engine.draw(n, rows, cols, p_out, p_in)
        share[sampler] = (float(torch.isin(flat // cols, top_rows).float().mean()),
                          float(torch.isin(flat % cols, top_cols).float().mean()))
        if sampler == "grabo":  # empirical row frequencies = p_out (binomial sd < 0.004 at n = 20000)
            freq = torch.bincount(flat // cols, minlength=rows).double() / n
            assert (freq - p_out / p_out.sum()).abs().max() < 0.015
    assert share["uniform"][0] == pytest.approx(0.25, abs=0.015) and share["uniform"][1] == pytest.approx(0.25, abs=0.015)
    assert share["grabo"][0] == pytest.approx(row_mass, abs=0.015) and share["grabo"][1] == pytest.approx(col_mass, abs=0.015)
    assert share["grabo"][0] > share["uniform"][0] + 0.08
    engine.generator.manual_seed(123)
    first = engine.sample(500, rows, cols, p_out, p_in)
    engine.generator.manual_seed(123)
    assert torch.equal(engine.sample(500, rows, cols, p_out, p_in), first)  # seeded: every rank agrees
    assert torch.equal(first, torch.unique(first)) and len(first) <= 500


def test_gse_er_meets_the_budget_and_follows_fan_in_plus_fan_out():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (64, 16, 3, 3), "conv3": (128, 64, 3, 3), "fc": (10, 2048)}
    total = sum(math.prod(s) for s in shapes.values())
    for density in (0.01, 0.05, 0.1, 0.3):
        got = gse_er(shapes, density)
        assert sum(got[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(density * total, rel=1e-9)
        assert all(0 < d <= 1 for d in got.values())
        ratio = {n: got[n] * math.prod(s[1:]) * s[0] / (math.prod(s[1:]) + s[0])
                 for n, s in shapes.items() if got[n] < 1}
        assert max(ratio.values()) == pytest.approx(min(ratio.values()), rel=1e-9)  # one scale
    assert gse_er(shapes, 0.3)["conv1"] == 1.0  # clipped, the rest re-solved
    assert gse_er(shapes, 0.1) != allocation.erk(shapes, 0.1)  # not ERK: kernel dims excluded


def test_gse_needs_a_score_batch():
    config = load_config(None, ["sparsity.method=gse"])
    model = make_tiny_model()
    with pytest.raises(ConfigError, match="score batch"):
        build_sparsity(config.sparsity, model, "tiny_cnn", torch.optim.SGD(model.parameters(), lr=0.1), 10, 0)


@pytest.mark.parametrize("override,field", [
    ("sparsity.gse_sampler=magic", "sparsity.gse.sampler"),  # the first versions' flat names still parse
    ("sparsity.gse.candidates=0", "sparsity.gse.candidate_multiple"),  # the old name, translated
    ("sparsity.gse_samples_per_class=0", "sparsity.gse.samples_per_class"),
    ("sparsity.gse.scope=local", "sparsity.gse.scope"),
    ("sparsity.prune_rate=1.5", "sparsity.prune_rate"),
])
def test_bad_gse_settings_give_one_line_errors(override, field, capsys, tmp_path):
    assert main(["train", "--set", "sparsity.method=gse", "--set", override, "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and field in error[0]


_SMALL = ["data.train_limit=192", "data.val_size=64", "val.max_examples=64"]  # 3 steps/epoch, keeps CI fast


def test_gse_fit_with_agent_under_pgd_at(tiny_config):
    result = fit(tiny_config("sparsity.method=gse", "sparsity.density=0.2", "sparsity.update_every=2",
                             "agent.enabled=true", "agent.full_grad_batches=2", "agent.probe_chunks=0",
                             "optim.epochs=2", "eval.n_examples=0", *_SMALL))
    masker = result.masker
    assert masker.global_density() == pytest.approx(0.2, abs=1e-3)
    assert masker.exploration_rate() > masker.global_density()  # the topology moved
    assert list(result.metrics["density"]) == [masker.global_density()] * 2
