"""AGENT: hand-computed steps, estimators, gamma = 0 identity, state round trip, every engine and objective."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.agent import AGENT, agent_correction, estimate_c, momentum_update, update_c
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import AgentConfig, AgentEstimator, AgentVariant, load_config
from robust_sparse.objectives import build_objective
from robust_sparse.optim import SGDW
from robust_sparse.sparse import build_sparsity
from robust_sparse.train import fit

from conftest import make_tiny_model


@pytest.mark.parametrize("foreach", [False, True])
def test_correction_is_g_minus_gamma_c_times_old_minus_full(foreach):
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    agent_correction(grads, [torch.tensor([0.5, 1.0]), torch.tensor([[2.0]])],
                     [torch.tensor([0.25, 0.0]), torch.tensor([[1.0]])], gamma_c=0.2, foreach=foreach)
    torch.testing.assert_close(grads[0], torch.tensor([1.0 - 0.2 * 0.25, 2.0 - 0.2 * 1.0]))
    torch.testing.assert_close(grads[1], torch.tensor([[3.0 - 0.2 * 1.0]]))


def test_fused_correction_matches_the_reference_loop():
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 64)]
    grads, old, full = ([torch.randn(s, generator=generator) for s in shapes] for _ in range(3))
    reference = [g.clone() for g in grads]
    agent_correction(reference, old, full, gamma_c=0.37, foreach=False)
    agent_correction(grads, old, full, gamma_c=0.37)  # the default: fused
    for fused, looped in zip(grads, reference):
        torch.testing.assert_close(fused, looped, rtol=1e-6, atol=1e-6)


def test_estimate_c_matches_numpy_cov_ddof1():
    rng = np.random.default_rng(0)
    snapshot = rng.normal(size=50)
    current = 0.7 * snapshot + rng.normal(scale=0.3, size=50)
    expected = np.cov(current, snapshot, ddof=1)[0][1] / np.var(snapshot, ddof=1)
    assert estimate_c(current.tolist(), snapshot.tolist()) == pytest.approx(expected, rel=1e-12)
    assert momentum_update(0.5, 2.0, 0.3, refresh_index=0) == 0.0  # c_0 = 0
    assert momentum_update(0.5, 2.0, 0.3, refresh_index=3) == pytest.approx(0.7 * 0.5 + 0.3 * 2.0)


def test_update_c_follows_each_estimator_by_hand():
    """update_c over floats: c_0 = 0, official's c_hat = 1, fixed's constant, paper's Eq. (4), the clip."""
    rule = dict(alpha=0.3, fixed_c=0.4, clip=False)
    assert update_c(AgentEstimator.OFFICIAL, 0.9, 0, **rule) == (1.0, 0.0)  # c_0 = 0 whatever came before
    assert update_c(AgentEstimator.OFFICIAL, 0.3, 2, **rule) == (1.0, pytest.approx(0.7 * 0.3 + 0.3 * 1.0))
    c_hat, c = update_c(AgentEstimator.FIXED, 0.9, 0, **rule)
    assert np.isnan(c_hat) and c == 0.4  # from the first refresh, no estimate
    c_hat, c = update_c(AgentEstimator.PAPER, 0.9, 0, **rule)  # the first refresh: no previous snapshot
    assert np.isnan(c_hat) and c == 0.0
    # losses [1, 2, 3] against [1, 2, 4]: Cov = 3/2, Var = 7/3 (ddof=1), c_hat = 9/14
    c_hat, c = update_c(AgentEstimator.PAPER, 0.5, 1, **rule, current_losses=[1.0, 2.0, 3.0],
                        snapshot_losses=[1.0, 2.0, 4.0])
    assert c_hat == pytest.approx(9 / 14) and c == pytest.approx(0.7 * 0.5 + 0.3 * 9 / 14)
    # the snapshot's losses falling as the current model's rise: c_hat = -1; alpha = 1 makes c_t = c_hat
    clipped = dict(rule, alpha=1.0, clip=True)
    assert update_c(AgentEstimator.PAPER, 0.5, 1, **dict(rule, alpha=1.0), current_losses=[1.0, 2.0, 3.0],
                    snapshot_losses=[3.0, 2.0, 1.0]) == (pytest.approx(-1.0), pytest.approx(-1.0))
    assert update_c(AgentEstimator.PAPER, 0.5, 1, **clipped, current_losses=[1.0, 2.0, 3.0],
                    snapshot_losses=[3.0, 2.0, 1.0]) == (pytest.approx(-1.0), 0.0)
    assert update_c(AgentEstimator.PAPER, 0.5, 1, **clipped, current_losses=[1.0, 3.0, 5.0],
                    snapshot_losses=[1.0, 2.0, 3.0]) == (pytest.approx(2.0), 1.0)


# ---- a linear model with a quadratic loss: every gradient by hand --------------------------------------


X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
Y = torch.tensor([1.0, -1.0, 0.5, 2.0])
BATCHES = [(X[:2], Y[:2]), (X[2:], Y[2:]), (X[[0, 3]], Y[[0, 3]])]


def quadratic(model, x, y):
    return 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()


def hand_grad(w, x, y):
    return ((x @ w - y)[:, None] * x).mean(0)


def hand_loss(w, x, y):
    return float(0.5 * ((x @ w - y) ** 2).mean())


def test_two_agent_steps_match_hand_computation():
    gamma, alpha, lr = 0.5, 0.3, 0.1
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.2, -0.4]]))
    base = torch.optim.SGD(model.parameters(), lr=lr)
    agent = AGENT(base, model, AgentConfig(enabled=True, gamma=gamma, alpha=alpha, probe_chunks=0))

    w0 = torch.tensor([0.2, -0.4])
    agent.refresh(BATCHES, quadratic)  # refresh 0: snapshot = w0, c_0 = 0, no gradient pass needed
    assert agent.c == 0.0 and agent.full_grads is None
    for x, y in BATCHES[:2]:  # an epoch without correction: plain SGD
        base.zero_grad()
        quadratic(model, x, y).backward()
        agent.snapshot_backward(lambda snap: quadratic(snap, x, y))
        agent.step()
    w1 = w0 - lr * hand_grad(w0, *BATCHES[0])
    w1 = w1 - lr * hand_grad(w1, *BATCHES[1])
    torch.testing.assert_close(model.weight.detach()[0], w1)

    # refresh 1 by hand: c_hat from per-batch losses of w1 (current) against w0 (previous snapshot)
    current = [hand_loss(w1, x, y) for x, y in BATCHES]
    previous = [hand_loss(w0, x, y) for x, y in BATCHES]
    c_hat = np.cov(current, previous, ddof=1)[0][1] / np.var(previous, ddof=1)
    c1 = alpha * c_hat  # (1 - alpha) * c_0 + alpha * c_hat with c_0 = 0
    full = torch.stack([hand_grad(w1, x, y) for x, y in BATCHES]).mean(0)  # g_tilde at the new snapshot w1
    stats = agent.refresh(BATCHES, quadratic)
    assert stats["agent_c_hat"] == pytest.approx(c_hat, rel=1e-5)
    assert agent.c == pytest.approx(c1, rel=1e-5)
    torch.testing.assert_close(agent.full_grads[0][0], full)

    # two corrected steps: g_hat = g_new - gamma * c1 * (g_old(w1) - g_tilde)
    w = w1.clone()
    for x, y in BATCHES[:2]:
        base.zero_grad()
        quadratic(model, x, y).backward()
        agent.snapshot_backward(lambda snap: quadratic(snap, x, y))
        agent.step()
        g_hat = hand_grad(w, x, y) - gamma * c1 * (hand_grad(w1, x, y) - full)
        w = w - lr * g_hat
    torch.testing.assert_close(model.weight.detach()[0], w, rtol=1e-6, atol=1e-7)


def _hand_epochs(weights, w0, lr=0.1):
    """Two epochs of two SVRG-style steps by hand: ``weights(e, w_start, w_previous)`` is epoch e's gamma * c_t;
    the snapshot (and g_tilde over all BATCHES) is the weights at the start of the epoch."""
    w, previous = w0.clone(), None
    for epoch in range(2):
        snapshot = w.clone()
        full = torch.stack([hand_grad(snapshot, x, y) for x, y in BATCHES]).mean(0)
        weight = weights(epoch, snapshot, previous)
        for x, y in BATCHES[:2]:
            w = w - lr * (hand_grad(w, x, y) - weight * (hand_grad(snapshot, x, y) - full))
        previous = snapshot
    return w


def _paper_c_hat(current, previous):
    losses = [hand_loss(current, x, y) for x, y in BATCHES], [hand_loss(previous, x, y) for x, y in BATCHES]
    return np.cov(*losses, ddof=1)[0][1] / np.var(losses[1], ddof=1)


@pytest.mark.parametrize("variant, weights", [
    # "Fixed c_t" read literally: the weight is fixed_c = 0.4 from the first step, gamma = 0.5 plays no part
    (AgentVariant.FIXED_C, lambda e, w, prev: 0.4),
    # the same with gamma multiplying it: 0.5 * 0.4
    (AgentVariant.FIXED_C_GAMMA, lambda e, w, prev: 0.2),
    # "No gamma": the paper estimator's c_t (c_0 = 0, then 0.3 * c_hat), gamma = 1
    (AgentVariant.NO_GAMMA, lambda e, w, prev: 0.0 if e == 0 else 0.3 * _paper_c_hat(w, prev)),
    # SVRG: weight 1 from the first step
    (AgentVariant.SVRG, lambda e, w, prev: 1.0),
    # AGENT itself for contrast: gamma * c_t
    (AgentVariant.AGENT, lambda e, w, prev: 0.0 if e == 0 else 0.5 * 0.3 * _paper_c_hat(w, prev)),
])
def test_ablation_variants_first_steps_match_hand_computation(variant, weights):
    w0 = torch.tensor([0.2, -0.4])
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0[None])
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = AGENT(base, model, AgentConfig(enabled=True, gamma=0.5, alpha=0.3, fixed_c=0.4, variant=variant,
                                           probe_chunks=0))
    for _ in range(2):
        agent.refresh(BATCHES, quadratic)
        for x, y in BATCHES[:2]:
            base.zero_grad()
            quadratic(model, x, y).backward()
            agent.snapshot_backward(lambda snap: quadratic(snap, x, y))
            agent.step()
    torch.testing.assert_close(model.weight.detach()[0], _hand_epochs(weights, w0), rtol=1e-6, atol=1e-7)


def test_no_gamma_with_a_fixed_estimator_is_refused(capsys, tmp_path):
    from robust_sparse.cli import main

    assert main(["train", "--set", "agent.enabled=true", "--set", "agent.variant=no_gamma", "--set",
                 "agent.estimator=fixed", "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "agent.variant = no_gamma" in error[0]


def test_official_estimator_is_the_ramp_gamma_times_one_minus_0_7_to_the_e():
    model = nn.Linear(2, 1, bias=False)
    agent = AGENT(torch.optim.SGD(model.parameters(), lr=0.1), model,
                  AgentConfig(enabled=True, gamma=0.1, alpha=0.3, estimator=AgentEstimator.OFFICIAL, probe_chunks=0))
    for epoch in range(8):
        agent.refresh(BATCHES, quadratic)
        assert agent.gamma_c == pytest.approx(0.1 * (1 - 0.7 ** epoch), abs=1e-15)
        assert (agent.full_grads is None) == (epoch == 0)  # no wasted gradient pass while c = 0


def test_fixed_estimator_and_clip():
    model = nn.Linear(2, 1, bias=False)
    fixed = AGENT(torch.optim.SGD(model.parameters(), lr=0.1), model,
                  AgentConfig(enabled=True, gamma=0.5, estimator=AgentEstimator.FIXED, fixed_c=0.4, probe_chunks=0))
    fixed.refresh(BATCHES, quadratic)
    assert fixed.gamma_c == pytest.approx(0.2) and fixed.full_grads is not None  # corrected from the first epoch

    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.2, -0.4]]))  # a fixed start: the assertion below depends on it
    clipped = AGENT(torch.optim.SGD(model.parameters(), lr=0.1), model,
                    AgentConfig(enabled=True, gamma=0.5, alpha=1.0, clip=True, probe_chunks=0))
    clipped.refresh(BATCHES, quadratic)
    with torch.no_grad():
        model.weight.mul_(10.0)  # the per-batch losses now vary far more than the snapshot's: c_hat = 28.4
    clipped.refresh(BATCHES, quadratic)
    assert not 0 <= clipped.c_hat <= 1
    assert clipped.c == (1.0 if clipped.c_hat > 1 else 0.0)  # alpha = 1: c would be c_hat without the clip


@pytest.mark.parametrize("c_hat, words", [(-0.13, "reverses the correction"), (28.4, "c_t > 1"), (0.4, None)])
def test_c_t_outside_0_1_is_warned_unless_clipped(c_hat, words, monkeypatch, caplog):
    import robust_sparse.agent as agent_module

    monkeypatch.setattr(agent_module, "estimate_c", lambda current, previous: c_hat)
    for clip in (False, True):
        model = nn.Linear(2, 1, bias=False)
        agent = AGENT(torch.optim.SGD(model.parameters(), lr=0.1), model,
                      AgentConfig(enabled=True, gamma=0.5, alpha=1.0, clip=clip, probe_chunks=0))
        caplog.clear()
        with caplog.at_level("WARNING", logger="robust_sparse.agent"):
            agent.refresh(BATCHES, quadratic)  # c_0 = 0: nothing to say
            agent.refresh(BATCHES, quadratic)
        warned = [r.getMessage() for r in caplog.records]
        if words is None or clip:
            assert warned == []
            assert 0 <= agent.c <= 1
        else:
            assert agent.c == pytest.approx(c_hat)  # unclipped, as the official code: reproducible, and said
            assert f"c_t = {c_hat:.4g}" in warned[0] and words in warned[0] and "agent.clip=true" in warned[1]


def test_state_dict_round_trip_mid_epoch_resumes_identically():
    def make():
        torch.manual_seed(0)
        model = nn.Linear(2, 1, bias=False)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, AGENT(base, model, AgentConfig(enabled=True, gamma=0.3, probe_chunks=0))

    def train_steps(model, agent, batches):
        for x, y in batches:
            agent.zero_grad()
            quadratic(model, x, y).backward()
            agent.snapshot_backward(lambda snap: quadratic(snap, x, y))
            agent.step()

    model, agent = make()
    agent.refresh(BATCHES, quadratic)
    train_steps(model, agent, BATCHES)
    agent.refresh(BATCHES, quadratic)
    train_steps(model, agent, BATCHES[:1])  # mid-epoch
    state = copy.deepcopy(agent.state_dict())
    weights = copy.deepcopy(model.state_dict())
    train_steps(model, agent, BATCHES[1:])
    reference = model.weight.detach().clone()

    model2, agent2 = make()
    model2.load_state_dict(weights)
    agent2.load_state_dict(state)
    train_steps(model2, agent2, BATCHES[1:])
    assert torch.equal(model2.weight.detach(), reference)
    assert agent2.c == agent.c and agent2.param_groups is agent2.base.param_groups


def test_gamma_zero_reproduces_the_base_run_bit_for_bit(tiny_config, tmp_path):
    common = ["sparsity.method=rigl", "sparsity.density=0.3", "sparsity.update_every=4", "eval.n_examples=0"]
    base = fit(tiny_config(*common, f"out_dir={tmp_path / 'base'}"))
    agent = fit(tiny_config(*common, "agent.enabled=true", "agent.gamma=0", f"out_dir={tmp_path / 'agent'}"))
    a = load_checkpoint(base.run_dir / "last.pt")["model"]
    b = load_checkpoint(agent.run_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_agent_run_logs_its_state(tiny_config):
    result = fit(tiny_config("agent.enabled=true", "agent.gamma=0.2", "agent.full_grad_batches=3",
                             "optim.epochs=3", "eval.n_examples=0"))
    metrics = result.metrics
    assert metrics["agent_c"].iloc[0] == 0.0  # c_0 = 0
    assert np.isfinite(metrics["agent_c_hat"].iloc[1:]).all()
    assert metrics["agent_weight"].tolist() == pytest.approx((0.2 * metrics["agent_c"]).tolist())
    assert np.isfinite(metrics["agent_cosine"].iloc[2]) and -1 <= metrics["agent_cosine"].iloc[2] <= 1
    assert np.isfinite(metrics["agent_variance_ratio"].iloc[2])


# ---- every engine x every objective ------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["natural", "pgd_at", "trades"])
@pytest.mark.parametrize("engine", ["none", "static", "set", "rigl", "itop", "bsrnet", "gse", "ast"])
def test_agent_composes_with_every_engine_and_objective(engine, objective, mnist):
    density = [] if engine == "ast" else ["sparsity.density=0.3"]  # AST's sub-nets have densities of their own
    config = load_config(None, [f"sparsity.method={engine}", *density, "sparsity.update_every=2",
                                f"objective={objective}", "attack.steps=1", "agent.enabled=true",
                                "agent.gamma=0.5", "agent.estimator=fixed", "agent.fixed_c=1.0",
                                "optim.optimizer=" + ("sgdw" if engine == "bsrnet" else "sgd")])
    train, _ = mnist
    images, labels = train.images[:96].float() / 255, train.labels[:96]
    model = make_tiny_model()
    base = (SGDW(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) if engine == "bsrnet"
            else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", base, total_steps=12, seed=0,
                            batch_source=lambda step: (images[:20], labels[:20]))
    agent = AGENT(base, model, config.agent, masker=masker)
    objective_ = build_objective(config, model)
    loss_fn = lambda m, x, y, inputs: objective_.loss(m, x, y, inputs)[0]  # noqa: E731
    chunks = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    for epoch in range(2):
        agent.refresh([(x, y, x) for x, y in chunks], loss_fn)
        assert agent.gamma_c == 0.5
        for x, y in chunks:
            adversarial = objective_.perturb(x, y)
            loss, _ = objective_.loss(model, x, y, adversarial)
            agent.zero_grad()
            loss.backward()
            agent.snapshot_backward(lambda snap: objective_.loss(snap, x, y, adversarial)[0])
            assert agent.snapshot_grads is not None
            agent.step()
            assert all(torch.isfinite(p).all() for p in model.parameters())
            if masker is not None:  # the sparse invariants survive the corrected update
                for name, param in masker.params.items():
                    assert torch.all(param[~masker.masks[name]] == 0)
                    momentum = base.state[param].get("momentum_buffer")
                    assert momentum is None or torch.all(momentum[~masker.masks[name]] == 0)
    if masker is not None and engine in ("set", "rigl", "itop", "bsrnet", "gse", "ast"):
        assert masker.step == 6
    if engine == "ast":  # one g_tilde per sub-net, each from its share of the refresh batches
        assert len(agent.subnet_full_grads) == 3 and agent.full_grads is agent.subnet_full_grads[masker.active_view]


@pytest.mark.parametrize("override,field", [
    ("agent.gamma=1.5", "agent.gamma"), ("agent.gamma=-0.1", "agent.gamma"), ("agent.alpha=0", "agent.alpha"),
    ("agent.estimator=magic", "agent.estimator"), ("agent.snapshot_every=0", "agent.snapshot_every"),
    ("agent.full_grad_inputs=noisy", "agent.full_grad_inputs"), ("agent.snapshot_mask=all", "agent.snapshot_mask"),
    ("agent.full_grad_batches=1", "at least 2 batches"), ("data.train_limit=200", "at least 2 full batches"),
])
def test_bad_agent_settings(override, field, capsys, tmp_path):
    from robust_sparse.cli import main

    assert main(["train", "--set", "agent.enabled=true", "--set", override, "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and field in error[0]


def test_a_gamma_that_cannot_act_is_said_before_training(tmp_path, caplog):
    """paper/official start at c_0 = 0: gamma acts only after the second refresh, so a run of snapshot_every
    epochs or fewer trains as gamma = 0 would; said once, before any data is read. A fixed c_t, gamma = 0 and a
    run long enough are silent."""
    import logging

    from robust_sparse.agent import inactive_reason
    from robust_sparse.run_record import check_run

    def agent(*sets):
        return load_config(None, ["agent.enabled=true", *sets]).agent

    assert inactive_reason(agent("agent.gamma=0.5"), epochs=1) == (
        "agent.gamma = 0.5 never acts in this run: with agent.estimator = paper, c_t is 0 until the second snapshot "
        "refresh, at epoch 2, and optim.epochs = 1; train longer, or use agent.estimator=fixed to correct from the "
        "first epoch")
    assert "at epoch 4" in inactive_reason(agent("agent.gamma=0.5", "agent.snapshot_every=3"), epochs=3)
    assert inactive_reason(agent("agent.gamma=0.5", "agent.snapshot_every=3"), epochs=4) is None
    assert inactive_reason(agent("agent.gamma=0.5", "agent.estimator=official"), epochs=1) is not None
    assert inactive_reason(agent("agent.gamma=0.5", "agent.estimator=fixed", "agent.fixed_c=1"), epochs=1) is None
    assert inactive_reason(agent("agent.gamma=0"), epochs=1) is None
    assert inactive_reason(load_config(None, ["agent.gamma=0.5"]).agent, epochs=1) is None  # AGENT off
    config = load_config(None, ["agent.enabled=true", "agent.gamma=0.5", "optim.epochs=1", f"out_dir={tmp_path / 'r'}"])
    with caplog.at_level(logging.WARNING):
        check_run(config)
    assert [r.getMessage() for r in caplog.records if "never acts" in r.getMessage()] == [
        inactive_reason(config.agent, 1)]
