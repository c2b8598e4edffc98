"""train.precision / channels_last / compile on the CPU: bf16 autocast trains like fp32, sparse and AGENT
invariants hold, the attack's perturbation stays fp32, the fp16 GradScaler path is exact, resume refuses a
precision mismatch, and bad values are one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from robust_sparse import cli
from robust_sparse.agent import AGENT, full_grad_pass, objective_loss
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import load_config, save_config
from robust_sparse.datasets.images import BatchLoader
from robust_sparse.datasets.splits import load_splits
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.objectives import build_objective
from robust_sparse.optim import build_optimization
from robust_sparse.precision import Amp, maybe_compile
from robust_sparse.sparse import build_sparsity
from robust_sparse.train import fit, train_one_epoch
from conftest import assert_in_ball_and_box, make_tiny_model

CPU = torch.device("cpu")


def test_bf16_trains_like_fp32(tiny_config, tmp_path):
    """PGD-AT with RigL at density 0.5 on 2048 MNIST-5k images, 3 epochs: the same seed and data order in fp32
    and in bf16 autocast end within 0.05 of each other in clean and PGD accuracy, on 256 validation and 500
    test points. 0.05 is two binomial standard errors of a 256-point accuracy near 0.8 (sqrt(.8 * .2 / 256)
    = 0.025); measured on this machine the gaps were <= 0.01. Both runs must also have learned (clean > 0.8,
    chance is 0.1), so a broken bf16 path cannot pass by failing like fp32."""
    common = ("data.train_limit=2048", "data.val_size=256", "val.max_examples=256", "eval.n_examples=500",
              "optim.epochs=3", "optim.lr=0.1", "sparsity.method=rigl", "sparsity.density=0.5")
    runs = {p: fit(tiny_config(*common, f"train.precision={p}", f"out_dir={tmp_path / p}")) for p in ("fp32", "bf16")}
    for precision, run in runs.items():
        assert run.metrics["val_clean_accuracy"].iloc[-1] > 0.8, precision
        assert run.evaluation["clean_accuracy"] > 0.8, precision
        assert run.evaluation["precision"] == "fp32"  # eval.precision: the final evaluation stays fp32
    a, b = runs["fp32"], runs["bf16"]
    for column in ("val_clean_accuracy", "val_pgd_accuracy"):
        assert abs(a.metrics[column].iloc[-1] - b.metrics[column].iloc[-1]) <= 0.05, column
    for key in ("clean_accuracy", "pgd_accuracy"):
        assert abs(a.evaluation[key] - b.evaluation[key]) <= 0.05, key
    # the runs really differ in arithmetic: bf16 is not silently fp32
    assert a.metrics["train_loss"].tolist() != b.metrics["train_loss"].tolist()


def test_sparse_and_agent_invariants_under_bf16_and_channels_last(tiny_config):
    """RigL + AGENT in bf16 with channels-last weights: pruned weights and their momentum are exactly zero,
    the density is exactly the target, AGENT's correction ran (a non-zero weight) and the training loss is
    finite."""
    config = tiny_config("train.precision=bf16", "train.channels_last=true", "sparsity.method=rigl",
                         "sparsity.density=0.3", "sparsity.update_every=2", "agent.enabled=true",
                         "agent.estimator=fixed", "agent.fixed_c=0.5", "agent.full_grad_batches=2",
                         "eval.n_examples=0")
    result = fit(config)
    masker, agent = result.masker, result.agent
    assert agent.gamma_c == pytest.approx(0.05) and agent.full_grads is not None
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"].tolist())).all()
    changed = False
    for name, param in masker.params.items():
        mask = masker.masks[name]
        assert param.is_contiguous(memory_format=torch.channels_last) or param.dim() != 4
        assert param.dtype == torch.float32
        assert torch.count_nonzero(param[~mask]) == 0, name
        momentum = masker.optimizer.state[param]["momentum_buffer"]
        assert torch.count_nonzero(momentum[~mask]) == 0, name
        changed |= not torch.equal(mask, masker.ever_active[name])
    assert changed  # RigL did move connections under bf16
    total = sum(m.numel() for m in masker.masks.values())
    assert masker.global_density() == pytest.approx(0.3, abs=len(masker.masks) / total)


def _train_steps(config, amp: Amp, observed: list) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One epoch of RigL + AGENT (active from the first step) with ``amp``; returns weights and masks, and
    appends every dense gradient the masker shows RigL to ``observed``."""
    torch.manual_seed(0)
    model = make_tiny_model()
    splits = load_splits(config.data, config.seed)
    loader = BatchLoader(splits.train, config.data.batch_size, CPU, shuffle=True, seed=0, info=splits.info,
                         augment_batches=False, drop_last=True)
    optimizer, scheduler = build_optimization(config, model, len(loader))
    masker = build_sparsity(config.sparsity, model, config.model.name, optimizer, 2 * len(loader), config.seed)
    original = masker.engine.observe_dense_grad
    masker.engine.observe_dense_grad = lambda name, grad: (observed.append(grad.clone()), original(name, grad))
    if amp.scaler is not None:
        masker.grad_scale = amp.scale
    objective = build_objective(config, model, autocast=amp.autocast)
    agent = AGENT(optimizer, model, config.agent, masks=masker.masks)
    agent.refresh(full_grad_pass(config, splits.train, objective, CPU, 0), objective_loss(objective, amp),
                  scale=amp.scaler.get_scale() if amp.scaler is not None else 1.0)
    assert agent.active()
    train_one_epoch(model, objective, agent, scheduler, loader, agent=agent, amp=amp)
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: m.clone() for k, m in masker.masks.items()})


def test_grad_scaler_path_is_exact(tiny_config):
    """The fp16 plumbing, run in fp32 with a GradScaler at a fixed power-of-two scale (2^10; scaling by a power
    of two is exact in floating point): the loss scale reaches g_new, AGENT's g_old and g_tilde, and the dense
    gradients RigL sees are unscaled, so weights, masks and observed gradients equal the unscaled run bit for
    bit. A missing scale on any of them would change the weights (or the observed gradients by 2^10)."""
    config = tiny_config("sparsity.method=rigl", "sparsity.density=0.3", "sparsity.update_every=2",
                         "agent.enabled=true", "agent.estimator=fixed", "agent.fixed_c=0.5",
                         "agent.full_grad_batches=2")
    plain_seen, scaled_seen = [], []
    plain = _train_steps(config, Amp("fp32", CPU), plain_seen)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10 ** 6)
    scaled = _train_steps(config, Amp("fp32", CPU, scaler=scaler), scaled_seen)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow, no skipped step
    assert plain_seen and len(plain_seen) == len(scaled_seen)
    for a, b in zip(plain_seen, scaled_seen):
        assert torch.equal(a, b)
    for part in (0, 1):
        for key in plain[part]:
            assert torch.equal(plain[part][key], scaled[part][key]), key


def test_agent_overflow_in_g_old_skips_the_step():
    """Under a GradScaler an overflow in AGENT's g_old alone poisons the corrected .grad before the scaler's
    check, so the step is skipped (weights unchanged) and the scale is reduced."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = load_config(None, ["agent.enabled=true", "agent.estimator=fixed", "agent.fixed_c=1"]).agent
    agent = AGENT(optimizer, model, config)
    agent.snapshot, agent.c = model, 1.0
    agent.subnet_full_grads = [[torch.zeros_like(p) for p in model.parameters()]]
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    agent.snapshot_grads = [torch.full_like(p, float("inf")) for p in model.parameters()]
    agent.correct(scaler.scale(torch.ones(())))
    scaler.step(agent)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0


def test_bf16_attack_keeps_an_fp32_perturbation_in_the_ball_and_box(tiny_config, test_batch):
    """The training attack under bf16: the model's forwards ran in bf16 (checked with a hook), while the
    adversarial images are fp32, in [0, 1] exactly, and within eps up to fp32 rounding of x + delta - x (1e-6,
    the shared helper's slack; a bf16 delta would miss it: bf16's 0.1 is 0.10009765625)."""
    images, labels = test_batch
    config = tiny_config("attack.steps=5")
    model = make_tiny_model().eval()
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    objective = build_objective(config, model, autocast=Amp("bf16", CPU).autocast)
    torch.manual_seed(0)
    adversarial = objective.perturb(images, labels)
    assert seen and set(seen) == {torch.bfloat16}
    assert adversarial.dtype == torch.float32
    assert_in_ball_and_box(adversarial, images, objective.attack)
    assert (adversarial - images).abs().max() > 0.05  # the attack moved the points


def test_resume_refuses_a_precision_mismatch_and_an_old_checkpoint_resumes(tiny_config, tmp_path, capsys):
    config = tiny_config("optim.epochs=2", "eval.n_examples=0")
    fit(config)
    path = Path(config.out_dir) / "last.pt"
    save_config(config, tmp_path / "run.yaml")
    code = cli.main(["train", str(tmp_path / "run.yaml"), "--resume", "--set", "train.precision=bf16"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("robust-sparse: error")]
    assert code != 0 and len(errors) == 1
    assert "config differs from this one in train.precision (saved 'fp32', now 'bf16')" in errors[0]
    # a checkpoint from before the field existed: rewind it to epoch 1 and drop train/eval.precision
    state = load_checkpoint(path)
    del state["config"]["train"], state["config"]["eval"]["precision"]
    state["epoch"], state["history"] = 1, state["history"][:1]
    torch.save(state, path)
    with pytest.raises(UserError, match="train.precision"):
        fit(tiny_config("optim.epochs=2", "eval.n_examples=0", "train.precision=bf16"), resume=True)
    assert fit(config, resume=True).metrics["epoch"].tolist() == [1, 2]
    assert load_checkpoint(path)["config"]["train"]["precision"] == "fp32"


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp8", "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("eval.precision=half", "eval.precision: 'half' is not one of fp32, bf16, fp16"),
    ("train.channels_last=maybe", "train.channels_last: expected true or false, got 'maybe'"),
    ("train.compile=1", "train.compile: expected true or false, got 1"),
    ("train.precision=fp16", "train.precision = fp16: needs a CUDA device"),
    ("eval.precision=fp16", "eval.precision = fp16: needs a CUDA device"),
])
def test_bad_values_are_one_line_errors(tiny_config, override, message):
    with pytest.raises(ConfigError) as error:
        tiny_config(override)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_without_cuda_is_refused_before_any_work(tiny_config, monkeypatch):
    import robust_sparse.run_setup as run_setup

    monkeypatch.setattr(run_setup, "load_splits", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(UserError, match="train.precision = fp16: needs a CUDA device.*use bf16 on cpu"):
        fit(tiny_config("device=auto", "train.precision=fp16"))


def test_compile_failure_falls_back_to_eager_with_one_log_line(monkeypatch, caplog, test_batch):
    images, _ = test_batch
    model = make_tiny_model().eval()

    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded\nlong traceback text")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    wrapped = maybe_compile(model, True)
    with caplog.at_level(logging.WARNING, logger="robust_sparse.precision"), torch.no_grad():
        first, second = wrapped(images), wrapped(images)
        expected = model(images)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    records = [r.getMessage() for r in caplog.records if r.name == "robust_sparse.precision"]
    assert records == ["train.compile: torch.compile failed (RuntimeError: backend exploded); continuing in eager mode"]
    assert maybe_compile(model, False) is model


@pytest.mark.slow
def test_compiled_training_keeps_the_sparse_invariants(tiny_config, caplog):
    """train.compile on the CPU (inductor; ~35 s here, hence slow): it compiles without falling back, and RigL's
    pruned weights and their momentum stay exactly zero through the compiled forward."""
    with caplog.at_level(logging.WARNING, logger="robust_sparse.precision"):
        result = fit(tiny_config("train.compile=true", "train.precision=bf16", "optim.epochs=1", "eval.n_examples=0",
                                 "sparsity.method=rigl", "sparsity.update_every=2"))
    assert not [r for r in caplog.records if r.name == "robust_sparse.precision"]
    masker = result.masker
    for name, param in masker.params.items():
        mask = masker.masks[name]
        assert torch.count_nonzero(param[~mask]) == 0, name
        assert torch.count_nonzero(masker.optimizer.state[param]["momentum_buffer"][~mask]) == 0, name
    assert not all(torch.equal(m, masker.ever_active[n]) for n, m in masker.masks.items())  # RigL moved some
