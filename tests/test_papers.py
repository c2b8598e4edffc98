"""configs/papers/: every config loads (offline, CIFAR root redirected) and holds what its docs/papers.md row says;
bsrnet gets decoupled decay by default, and every shipped config that uses bsrnet runs with it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from robust_sparse.config import OptimizerName, load_config, to_dict
from robust_sparse.studies.sweep import expand, load_sweep

from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
PAPERS = REPO / "configs" / "papers"

# file -> the fields its docs/papers.md row states (dotted path -> value; enums compared by .value)
ROWS = {
    "bsrnet_vgg16_cifar10_pgdat.yaml": {
        "model.name": "vgg16", "objective": "pgd_at", "sparsity.method": "bsrnet", "sparsity.density": 0.1,
        "sparsity.distribution": "bsrnet", "optim.optimizer": "sgdw", "optim.lr": 0.1, "optim.weight_decay": 1e-3,
        "optim.schedule": "piecewise", "optim.milestones": [0.5, 0.75], "optim.factors": [0.1, 0.01],
        "optim.epochs": 200, "data.batch_size": 128, "data.augment": True},
    "bsrnet_vgg16_cifar10_trades.yaml": {
        "model.name": "vgg16", "objective": "trades", "trades_beta": 6.0, "sparsity.method": "bsrnet",
        "optim.optimizer": "sgdw", "optim.lr": 0.1, "optim.weight_decay": 5e-4, "optim.milestones": [0.5, 0.75],
        "optim.factors": [0.1, 0.01], "optim.epochs": 200, "data.batch_size": 128},
    "bsrnet_wrn28_4_cifar10_pgdat.yaml": {
        "model.name": "wrn28_4", "objective": "pgd_at", "sparsity.method": "bsrnet", "optim.optimizer": "sgdw",
        "optim.lr": 0.1, "optim.weight_decay": 1e-3, "optim.milestones": [0.5, 0.75], "optim.epochs": 200,
        "data.batch_size": 128},
    "bsrnet_wrn28_4_cifar10_trades.yaml": {
        "model.name": "wrn28_4", "objective": "trades", "sparsity.method": "bsrnet", "optim.optimizer": "sgdw",
        "optim.lr": 0.1, "optim.weight_decay": 5e-4, "optim.milestones": [0.5, 0.75], "optim.epochs": 200,
        "data.batch_size": 128},
    "absrnet_vgg16_cifar10_pgdat.yaml": {
        "model.name": "vgg16", "objective": "pgd_at", "sparsity.method": "bsrnet", "optim.optimizer": "sgdw",
        "optim.lr": 0.04, "optim.weight_decay": 1e-3, "optim.schedule": "piecewise",
        "optim.milestones": [0.25, 0.5], "optim.factors": [0.1, 0.005], "optim.epochs": 200,
        "data.batch_size": 128, "agent.enabled": True, "agent.estimator": "official", "agent.gamma": 0.1,
        "agent.alpha": 0.3, "agent.clip": False, "agent.full_grad_inputs": "clean", "agent.full_grad_bn": "train"},
    "rigl_wrn28_4_cifar10_pgdat.yaml": {
        "model.name": "wrn28_4", "sparsity.method": "rigl", "sparsity.update_every": 100, "sparsity.prune_rate": 0.3,
        "sparsity.prune_schedule": "cosine", "sparsity.end_fraction": 0.75, "sparsity.distribution": "erk",
        "sparsity.growth": "gradient", "optim.optimizer": "sgd", "optim.weight_decay": 5e-4, "optim.epochs": 200,
        "optim.milestones": [0.5, 0.75], "data.batch_size": 128},
    "itop_vgg16_cifar10_pgdat.yaml": {
        "model.name": "vgg16", "sparsity.method": "itop", "sparsity.update_every": 1500, "sparsity.prune_rate": 0.5,
        "sparsity.prune_schedule": "cosine", "sparsity.growth": "random", "sparsity.distribution": "erk",
        "sparsity.end_fraction": 1.0, "optim.optimizer": "sgd", "optim.nesterov": True, "optim.lr": 0.1,
        "optim.weight_decay": 5e-4, "optim.milestones": [0.5, 0.75], "optim.factors": [0.1, 0.01],
        "optim.epochs": 250, "data.batch_size": 128},
    "hydra_dense_vgg16_cifar10_trades.yaml": {
        "model.name": "vgg16", "objective": "trades", "trades_beta": 6.0, "sparsity.method": "none",
        "attack.eps": 0.031, "attack.step_size": 0.0078, "attack.steps": 10, "optim.optimizer": "sgd",
        "optim.lr": 0.1, "optim.weight_decay": 1e-4, "optim.schedule": "cosine", "optim.epochs": 100,
        "data.batch_size": 128},
    "hydra_lwm_vgg16_cifar10_trades.yaml": {
        "model.name": "vgg16", "objective": "trades", "sparsity.method": "magnitude_prune",
        "sparsity.prune_scope": "layerwise", "attack.eps": 0.031, "optim.optimizer": "sgd", "optim.lr": 0.01,
        "optim.weight_decay": 1e-4, "optim.schedule": "cosine", "optim.epochs": 100, "data.batch_size": 128},
    "ast_resnet18_cifar10_pgdat.yaml": {
        "model.name": "resnet18", "sparsity.method": "ast", "sparsity.ast.densities": [0.1, 0.05, 0.02],
        "sparsity.ast.init_density": 1.0, "sparsity.update_every": 333, "sparsity.ast.offset": 33,
        "sparsity.prune_rate": 0.5, "sparsity.end_fraction": 0.6875, "sparsity.prune_scope": "global",
        "sparsity.ast.prune_from": "shared", "sparsity.ast.gc": True, "sparsity.ast.gc_beta": 0.0,
        "sparsity.ast.subnet_bn": False, "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.weight_decay": 5e-4,
        "optim.schedule": "cosine", "optim.epochs": 160, "data.batch_size": 128},
    "gse_vgg16_cifar10_pgdat.yaml": {
        "model.name": "vgg16", "sparsity.method": "gse", "sparsity.gse.sampler": "grabo",
        "sparsity.gse.candidate_multiple": 1.0, "sparsity.gse.samples_per_class": 10, "sparsity.gse.scope": "global",
        "sparsity.prune_rate": 0.2, "sparsity.update_every": 1000, "sparsity.end_fraction": 0.6,
        "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.weight_decay": 1e-4, "optim.schedule": "piecewise",
        "optim.milestones": [0.4, 0.6], "optim.factors": [0.1, 0.01], "optim.epochs": 200, "data.batch_size": 128},
}

_ITOP_IMAGENET = {
    "data.dataset": "imagenet", "model.name": "resnet50", "objective": "natural", "sparsity.method": "itop",
    "sparsity.growth": "gradient", "sparsity.update_every": 4000, "sparsity.distribution": "erk",
    "sparsity.prune_rate": 0.5, "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.weight_decay": 1e-4,
    "optim.epochs": 100, "optim.milestones": [0.3, 0.6, 0.9], "optim.factors": [0.1, 0.01, 0.001],
    "data.batch_size": 64, "data.image_size": 224, "attack.eps": 0.0, "eval.eps": 4 / 255,
    "data.val_size": 1000, "val.max_examples": 1000}  # natural: selected by clean accuracy on every held-out image
_AGENT_PYTORCH = {"agent.enabled": True, "agent.estimator": "paper", "agent.gamma": 0.1, "agent.alpha": 0.3,
                  "agent.clip": False, "agent.full_grad_inputs": "clean"}
ROWS.update({
    "itop_reduce_lr_vgg16_cifar10.yaml": {  # Table 10's Reduce LR: lr x (1 - gamma), natural SET-ITOP at 99%
        "objective": "natural", "sparsity.method": "itop", "sparsity.growth": "random", "sparsity.density": 0.01,
        "optim.lr": 0.09, "optim.nesterov": True, "optim.epochs": 250, "agent.enabled": False, "agent.gamma": 0.1,
        "attack.eps": 0.0},
    "rigl_itop_resnet50_imagenet_s80.yaml": {**_ITOP_IMAGENET, "sparsity.density": 0.2, "agent.enabled": False},
    "rigl_itop_resnet50_imagenet_s90.yaml": {**_ITOP_IMAGENET, "sparsity.density": 0.1, "agent.enabled": False},
    "arigl_itop_resnet50_imagenet_s80.yaml": {**_ITOP_IMAGENET, **_AGENT_PYTORCH, "sparsity.density": 0.2},
    "arigl_itop_resnet50_imagenet_s90.yaml": {**_ITOP_IMAGENET, **_AGENT_PYTORCH, "sparsity.density": 0.1},
    "pgdat_resnet50_imagenet_linf4.yaml": {
        "data.dataset": "imagenet", "model.name": "resnet50", "objective": "pgd_at", "sparsity.method": "none",
        "attack.norm": "linf", "attack.eps": 4 / 255, "attack.steps": 3, "attack.step_size": 2 / 3 * 4 / 255,
        "optim.optimizer": "sgd", "optim.lr": 0.1, "optim.weight_decay": 1e-4, "optim.epochs": 90,
        "optim.milestones": [1 / 3, 2 / 3], "optim.factors": [0.1, 0.01], "eval.autoattack_examples": 5000,
        "data.val_size": 1000, "val.max_examples": 1000},
})
# the evaluation of every row: PGD-50 x 10 restarts on CIFAR-10's whole test set; PGD-50 on RobustBench's 5000
# ImageNet images (AutoAttack where the row says so)
EVALUATION = {"cifar10": (10000, 50, 10), "imagenet": (5000, 50, 1)}



def _load(path: Path, tmp_path: Path, *overrides: str):
    """Load offline: CIFAR roots point at an empty directory, the dense checkpoint at an empty file."""
    checkpoint = tmp_path / "dense.pt"
    checkpoint.touch()
    return load_config(path, [f"data.root={tmp_path}", f"sparsity.dense_checkpoint={checkpoint}", *overrides])


def _get(config, dotted: str):
    value = to_dict(config)  # plain values; a sparse method's section is sparsity.<method>.* there too
    for part in dotted.split("."):
        value = value[part]
    return value


def test_every_paper_config_has_a_row_and_a_docs_entry():
    shipped = sorted(p.name for p in PAPERS.glob("*.yaml"))
    assert len(shipped) >= 6 and shipped == sorted(ROWS)
    docs = (REPO / "docs" / "papers.md").read_text()
    assert all(f"`{name}`" in docs for name in shipped)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_paper_config_loads_and_holds_its_row(name, tmp_path):
    config = _load(PAPERS / name, tmp_path)
    assert config.data.dataset == ROWS[name].get("data.dataset", "cifar10")
    for field, expected in ROWS[name].items():
        actual = _get(config, field)
        if isinstance(expected, float):
            assert actual == pytest.approx(expected), field
        elif isinstance(expected, list) and expected and isinstance(expected[0], float):
            assert actual == pytest.approx(expected), field
        else:
            assert actual == expected, field
    evaluation = (config.eval.n_examples, config.eval.pgd_steps, config.eval.restarts)
    assert evaluation == EVALUATION[config.data.dataset]
    assert config.out_dir == f"runs/papers/{name.removesuffix('.yaml')}"


def test_the_99_percent_setting_is_one_override(tmp_path):
    config = _load(PAPERS / "bsrnet_vgg16_cifar10_pgdat.yaml", tmp_path, "sparsity.density=0.01")
    assert config.sparsity.density == 0.01 and config.optim.optimizer is OptimizerName.SGDW


# ---- decoupled decay for bsrnet ----------------------------------------------------------------------------


def test_bsrnet_defaults_to_decoupled_decay_unless_the_optimizer_is_given(tmp_path):
    assert load_config(None, ["sparsity.method=bsrnet"]).optim.optimizer is OptimizerName.SGDW
    # a YAML file that names no optimizer (the shipped dense CIFAR configs) gets it too
    config = load_config(REPO / "configs" / "cifar10_trades_vgg16.yaml",
                         [f"data.root={tmp_path}", "sparsity.method=bsrnet"])
    assert config.optim.optimizer is OptimizerName.SGDW
    # given explicitly, in an override or a file: kept
    assert load_config(None, ["sparsity.method=bsrnet", "optim.optimizer=sgd"]).optim.optimizer is OptimizerName.SGD
    path = tmp_path / "c.yaml"
    path.write_text("sparsity:\n  method: bsrnet\noptim:\n  optimizer: sgd\n")
    assert load_config(path).optim.optimizer is OptimizerName.SGD
    # other methods keep torch's SGD
    for method in ("none", "rigl", "ast", "gse"):
        assert load_config(None, [f"sparsity.method={method}"]).optim.optimizer is OptimizerName.SGD


def test_bsrnet_with_coupled_sgd_decay_warns_in_one_line(caplog):
    from robust_sparse.optim import SGDW
    from robust_sparse.optim import build_optimization

    model = make_tiny_model()
    with caplog.at_level(logging.WARNING, logger="robust_sparse.optim"):
        optimizer, _ = build_optimization(load_config(None, ["sparsity.method=bsrnet", "optim.optimizer=sgd"]),
                                          model, 10)
    assert isinstance(optimizer, torch.optim.SGD)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "sgdw" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="robust_sparse.optim"):
        optimizer, _ = build_optimization(load_config(None, ["sparsity.method=bsrnet"]), model, 10)
        build_optimization(load_config(None, ["sparsity.method=rigl"]), model, 10)
    assert isinstance(optimizer, SGDW) and not caplog.records


def _shipped_run_configs(tmp_path, monkeypatch):
    """Every config a shipped file trains: configs/*.yaml (the quickstart among them), configs/papers/*.yaml, and
    every run of every study sweep (configs/studies, grids expanded)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)  # the studies read ./data or ../shared/data/cifar10-prefix: empty stand-ins
    (repo / "data").mkdir()
    (tmp_path / "shared" / "data" / "cifar10-prefix").mkdir(parents=True)
    for path in [*sorted((REPO / "configs").glob("*.yaml")), *sorted(PAPERS.glob("*.yaml"))]:
        yield path.name, _load(path, tmp_path)
    for path in sorted((REPO / "configs" / "studies").glob("*.yaml")):
        if path.name.startswith("common_"):
            continue
        sweep = load_sweep(path, out_dir=str(tmp_path / "out"))
        for overrides in expand(sweep):
            yield f"{path.name} {overrides}", load_config(sweep.base, sweep.overrides + overrides)


def test_every_shipped_config_using_bsrnet_uses_decoupled_decay(tmp_path, monkeypatch):
    seen = 0
    for name, config in _shipped_run_configs(tmp_path, monkeypatch):
        if config.sparsity.method == "bsrnet":
            seen += 1
            assert config.optim.optimizer is OptimizerName.SGDW, name
    assert seen >= 10  # the quickstart, six paper configs and the study grids
