"""MVR (STORM): float64 steps by hand, AGENT + MVR by hand, a training run, its FLOPs and its resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robust_sparse.agent import AGENT
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import AgentConfig, AgentEstimator
from robust_sparse.mvr import MVR, mvr_direction
from robust_sparse.train import fit

from test_train import _train_one_epoch_then_stop

X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
Y = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
BATCHES = [(X[:2], Y[:2]), (X[2:], Y[2:]), (X[[0, 3]], Y[[0, 3]]), (X[[1, 2]], Y[[1, 2]])]


def quadratic(model, x, y):
    return 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()


def hand_grad(w, x, y):
    return ((x @ w - y)[:, None] * x).mean(0)


def _linear(w0):
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0[None])
    return model


def test_mvr_direction_is_storm():
    d, g, g_prev = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.25, 1.0])
    mvr_direction([g], [g_prev], [d], keep=0.9)
    torch.testing.assert_close(d, torch.tensor([0.5 + 0.9 * (1.0 - 0.25), 0.5 + 0.9 * (-2.0 - 1.0)]))
    mvr_direction([g], None, [d], keep=0.9)  # no previous gradient: d = g
    torch.testing.assert_close(d, g)


@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_four_mvr_steps_match_hand_computation_in_float64(decay):
    lr, keep = 0.1, 0.7  # a = 0.3
    w0 = torch.tensor([0.2, -0.4], dtype=torch.float64)
    model = _linear(w0)
    optimizer = MVR(model, lr=lr, momentum=keep, weight_decay=decay)
    w, w_previous, d = w0.clone(), None, None
    for x, y in BATCHES:
        optimizer.zero_grad()
        quadratic(model, x, y).backward()
        optimizer.previous_backward(lambda previous: quadratic(previous, x, y))
        assert optimizer.took_previous_gradient == (w_previous is not None)
        optimizer.step()
        g = hand_grad(w, x, y) + decay * w
        if w_previous is None:
            d = g
        else:  # the previous weights' gradient on *this* batch
            d = g + keep * (d - (hand_grad(w_previous, x, y) + decay * w_previous))
        w_previous, w = w, w - lr * d
        torch.testing.assert_close(model.weight.detach()[0], w, rtol=1e-13, atol=1e-15)


def test_agent_over_mvr_feeds_mvr_the_corrected_gradient():
    """AGENT wraps MVR: d_t = g_hat_t + (1 - a)(d_{t-1} - g(theta_{t-1}; xi_t)), g_hat = g - w (g_old - g_tilde),
    with a fixed weight w = gamma * fixed_c from the first step."""
    lr, keep, weight = 0.1, 0.6, 0.5 * 0.4
    w0 = torch.tensor([0.3, 0.1], dtype=torch.float64)
    model = _linear(w0)
    base = MVR(model, lr=lr, momentum=keep)
    agent = AGENT(base, model, AgentConfig(enabled=True, gamma=0.5, estimator=AgentEstimator.FIXED, fixed_c=0.4, probe_chunks=0))
    agent.refresh(BATCHES, quadratic)
    snapshot = w0.clone()
    full = torch.stack([hand_grad(snapshot, x, y) for x, y in BATCHES]).mean(0)
    w, w_previous, d = w0.clone(), None, None
    for x, y in BATCHES[:3]:
        agent.zero_grad()
        quadratic(model, x, y).backward()
        agent.snapshot_backward(lambda snap: quadratic(snap, x, y))
        base.previous_backward(lambda previous: quadratic(previous, x, y))
        agent.step()
        g_hat = hand_grad(w, x, y) - weight * (hand_grad(snapshot, x, y) - full)
        d = g_hat if w_previous is None else g_hat + keep * (d - hand_grad(w_previous, x, y))
        w_previous, w = w, w - lr * d
        torch.testing.assert_close(model.weight.detach()[0], w, rtol=1e-13, atol=1e-15)


def test_mvr_state_round_trip_resumes_identically():
    def make():
        model = _linear(torch.tensor([0.2, -0.4], dtype=torch.float64))
        return model, MVR(model, lr=0.1, momentum=0.8, weight_decay=0.01)

    def steps(model, optimizer, batches):
        for x, y in batches:
            optimizer.zero_grad()
            quadratic(model, x, y).backward()
            optimizer.previous_backward(lambda previous: quadratic(previous, x, y))
            optimizer.step()

    model, optimizer = make()
    steps(model, optimizer, BATCHES[:2])
    state, weights = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
    steps(model, optimizer, BATCHES[2:])
    model_b, optimizer_b = make()
    model_b.load_state_dict(weights)
    optimizer_b.load_state_dict(state)
    steps(model_b, optimizer_b, BATCHES[2:])
    assert torch.equal(model.weight, model_b.weight)


def test_an_mvr_run_trains_sparse_counts_its_extra_gradient_and_resumes(tiny_config, tmp_path):
    common = ["sparsity.method=set", "sparsity.density=0.3", "sparsity.update_every=4", "eval.n_examples=0",
              "objective=natural"]
    sgd = fit(tiny_config(*common, f"out_dir={tmp_path / 'sgd'}"))
    mvr = fit(tiny_config(*common, "optim.optimizer=mvr", f"out_dir={tmp_path / 'mvr'}"))
    assert mvr.metrics["train_loss"].notna().all()
    state = load_checkpoint(mvr.run_dir / "last.pt")
    masks = state["sparsity"]["masks"]
    for name, mask in masks.items():
        assert torch.all(state["model"][name][~mask] == 0)
    # natural training: a step is one forward + backward; MVR adds one more on every step but the first
    steps = len(mvr.metrics) * 6  # 384 training images / 64
    ratio = mvr.metrics["train_flops"].iloc[-1] / sgd.metrics["train_flops"].iloc[-1]
    assert ratio == pytest.approx((2 * steps - 1) / steps, rel=0.02)
    # killed after epoch 1 of 2, resumed: the same weights (MVR's direction and previous weights are saved)
    killed = tiny_config(*common, "optim.optimizer=mvr", f"out_dir={tmp_path / 'killed'}")
    _train_one_epoch_then_stop(killed)
    resumed = fit(killed, resume=True)
    a, b = load_checkpoint(mvr.run_dir / "last.pt")["model"], load_checkpoint(resumed.run_dir / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mvr_with_fp16_is_refused(capsys, tmp_path):
    from robust_sparse.cli import main

    assert main(["train", "--set", "optim.optimizer=mvr", "--set", "train.precision=fp16", "--set", "device=cuda",
                 "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "optim.optimizer = mvr" in error[0]
