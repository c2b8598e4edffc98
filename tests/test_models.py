"""Tests for the model zoo: shapes, normalisation, determinism and parameter counts."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn

from robust_sparse.errors import UserError
from robust_sparse.models import MODELS, Normalize, build_model, wide_resnet

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def _build(name: str, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes, 3, CIFAR_MEAN, CIFAR_STD).eval()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Module scope: pytest groups the tests by model, builds each (including the ~185M-parameter
# wrn34_20) once, and frees it before the next one is built.
@pytest.fixture(scope="module", params=MODELS.names())
def named_model(request: pytest.FixtureRequest) -> Iterator[tuple[str, nn.Module]]:
    yield request.param, _build(request.param)


@pytest.fixture(scope="module")
def cifar_batch() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_registry_has_the_required_models() -> None:
    expected = {
        "small_cnn", "tiny_cnn", "vgg16", "resnet18", "resnet34", "preact_resnet18",
        "wrn28_4", "wrn28_10", "wrn34_10", "wrn34_20",
    }
    assert expected <= set(MODELS.names())


def test_logits_shape_and_determinism(
    named_model: tuple[str, nn.Module], cifar_batch: torch.Tensor
) -> None:
    _, model = named_model
    with torch.inference_mode():
        first = model(cifar_batch)
        second = model(cifar_batch)
    assert first.shape == (2, 10)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


def test_normalize_buffers_in_state_dict(named_model: tuple[str, nn.Module]) -> None:
    _, model = named_model
    assert isinstance(model.normalize, Normalize)
    state = model.state_dict()
    assert torch.allclose(state["normalize.mean"], torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
    assert torch.allclose(state["normalize.std"], torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
    # Buffers, not parameters: the statistics must never be trained or pruned.
    assert all(not name.startswith("normalize.") for name, _ in model.named_parameters())


def test_normalize_runs_first(named_model: tuple[str, nn.Module]) -> None:
    _, model = named_model
    order: list[nn.Module] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(lambda mod, _: order.append(mod)) for m in leaves]
    try:
        with torch.inference_mode():
            model(torch.rand(1, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert order[0] is model.normalize


def test_no_dropout(named_model: tuple[str, nn.Module]) -> None:
    _, model = named_model
    dropout_types = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    assert not any(isinstance(m, dropout_types) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        # The HYDRA/BSR-Net VGG-16: 14.71M conv + 0.59M in the 2048-256-256-10 head.
        ("vgg16", 15.25e6, 15.35e6),
        ("resnet18", 11.16e6, 11.18e6),
        ("preact_resnet18", 11.16e6, 11.18e6),
        ("wrn28_4", 5.80e6, 5.90e6),
    ],
)
def test_parameter_counts(name: str, low: float, high: float) -> None:
    assert low <= _num_params(_build(name)) <= high


@pytest.mark.parametrize("name", ["small_cnn", "tiny_cnn"])
def test_small_models_on_mnist_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 1, MNIST_MEAN, MNIST_STD).eval()
    with torch.inference_mode():
        logits = model(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 10)


def test_normalize_computes_standardisation() -> None:
    norm = Normalize((0.5, 0.25), (0.5, 2.0))
    assert norm.mean.shape == (1, 2, 1, 1) and norm.std.shape == (1, 2, 1, 1)
    x = torch.rand(3, 2, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    assert torch.allclose(norm(x), expected)


def test_wide_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="depth"):
        wide_resnet(27, 4, 10, 3, CIFAR_MEAN, CIFAR_STD)


def test_unknown_model_raises_user_error() -> None:
    with pytest.raises(UserError, match="no_such_model"):
        build_model("no_such_model", 10, 3, CIFAR_MEAN, CIFAR_STD)


def test_mean_std_channel_mismatch_raises_user_error() -> None:
    with pytest.raises(UserError, match="in_channels"):
        build_model("tiny_cnn", 10, 1, CIFAR_MEAN, CIFAR_STD)


def _block_keys(prefix: str, shortcut: bool) -> list[str]:
    batch_norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = [f"{prefix}.bn1.{k}" for k in batch_norm] + [f"{prefix}.conv1.weight"]
    keys += [f"{prefix}.bn2.{k}" for k in batch_norm] + [f"{prefix}.conv2.weight"]
    return keys + ([f"{prefix}.shortcut.weight"] if shortcut else [])


def test_wide_resnet_keeps_the_reference_state_dict_keys() -> None:
    """WRN shares PreAct ResNet's block; the keys stay those of stored checkpoints and RobustBench-style weights:
    groups block1..3 of pre-activation blocks, a 1x1 shortcut where the shape changes."""
    model = wide_resnet(16, 2, 10, 3, CIFAR_MEAN, CIFAR_STD)  # two blocks per group; every group's first projects
    expected = ["normalize.mean", "normalize.std", "conv1.weight"]
    for group in (1, 2, 3):
        expected += _block_keys(f"block{group}.0", shortcut=True) + _block_keys(f"block{group}.1", shortcut=False)
    expected += [f"bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    expected += ["fc.weight", "fc.bias"]
    assert list(model.state_dict()) == expected
    assert model.block1[0].shortcut.weight.shape == (32, 16, 1, 1) and model.block1[1].shortcut is None
    preact = _build("preact_resnet18")
    assert type(model.block2[0]) is type(preact.layer2[0])  # one block class for both architectures


# ---- ResNet-50 and outside architectures -------------------------------------------------------------------


def test_resnet50_is_torchvisions_architecture_behind_normalize() -> None:
    import torchvision

    model = build_model("resnet50", 1000, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    reference = torchvision.models.resnet50()
    assert _num_params(model) == _num_params(reference) == 25_557_032  # torchvision's published count
    ours = {k.removeprefix("network."): v.shape for k, v in model.state_dict().items() if k.startswith("network.")}
    assert ours == {k: v.shape for k, v in reference.state_dict().items()}
    # inputs in [0, 1]: the model is torchvision's network applied to the normalised image
    reference.load_state_dict(model.network.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.eval()(model.normalize(images))
        assert torch.allclose(model.eval()(images), expected)
        assert torch.allclose(model.normalize(images), (images - model.normalize.mean) / model.normalize.std)


def _library_specs() -> list:
    return ["torchvision:resnet18", pytest.param("timm:resnet18", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("timm") is None, reason="timm is not installed (pip install timm)"))]


@pytest.mark.parametrize("spec", _library_specs())
def test_library_models_train_with_a_sparse_engine_and_agent_and_keep_their_masks(spec, tmp_path) -> None:
    """One short PGD-AT run of torchvision's/timm's ResNet-18 with RigL and AGENT: weights outside the masks
    stay zero through the optimizer steps, AGENT's correction and a topology update."""
    from image_tree import make_tree

    from robust_sparse.config import load_config
    from robust_sparse.train import fit

    test_list = make_tree(tmp_path / "tree", classes=4, train_per_class=12, val_per_class=2, size=(32, 32), listed=4)
    config = load_config(None, [
        "data.dataset=imagefolder", f"data.root={tmp_path / 'tree'}", "data.num_classes=4",
        f"data.test_list={test_list}", "data.image_size=32", "data.val_size=8", "data.train_limit=16", "data.batch_size=8", "data.workers=0",
        f"model.name={spec}", "sparsity.method=rigl", "sparsity.density=0.2", "sparsity.update_every=2",
        "agent.enabled=true", "agent.full_grad_batches=2", "agent.probe_chunks=0", "attack.steps=1", "optim.epochs=1", "val.pgd_steps=1",
        "eval.n_examples=0", "device=cpu", f"out_dir={tmp_path / 'run'}"])
    result = fit(config)
    assert result.agent is not None and result.metrics["density"].iloc[0] == pytest.approx(0.2, abs=0.01)
    parameters = dict(result.model.named_parameters())
    (view,) = result.masker.views()
    assert view.masks and all(name.startswith("network.") for name in view.masks)
    for name, mask in view.masks.items():
        assert torch.count_nonzero(parameters[name].detach()[~mask]) == 0, name
        assert torch.count_nonzero(parameters[name].detach()[mask]) > 0, name


def test_library_specs_take_kwargs_and_unknown_names_fail_in_one_line() -> None:
    from robust_sparse.config import load_config
    from robust_sparse.models import check_model_name

    model = build_model("torchvision:resnet18", 10, 3, CIFAR_MEAN, CIFAR_STD, {"zero_init_residual": True})
    assert all(torch.count_nonzero(block.bn2.weight) == 0 for block in model.network.layer1)
    assert load_config(None, ["model.name=torchvision:resnet18", "model.kwargs.width_per_group=64"]).model.kwargs == \
        {"width_per_group": 64}
    with pytest.raises(UserError, match="torchvision has no model 'resnet19'; did you mean resnet18"):
        check_model_name("torchvision:resnet19")
    with pytest.raises(UserError, match="model torchvision:resnet18 with model.kwargs .*no_such"):
        build_model("torchvision:resnet18", 10, 3, CIFAR_MEAN, CIFAR_STD, {"no_such": 1})
    with pytest.raises(UserError, match="model.kwargs .*'tiny_cnn' does not take them"):
        build_model("tiny_cnn", 10, 3, CIFAR_MEAN, CIFAR_STD, {"width": 3})
    with pytest.raises(UserError, match="model.kwargs: expected a mapping"):
        load_config(None, ["model.kwargs=3"])


def test_a_registered_model_trains_by_name_and_reaches_a_sweeps_processes(tmp_path, monkeypatch) -> None:
    import os
    import sys

    import yaml

    import robust_sparse
    from robust_sparse.config import load_config
    from robust_sparse.models import REGISTERED_MODELS
    from robust_sparse.studies.sweep import load_sweep
    from robust_sparse.train import fit

    monkeypatch.delenv("ROBUST_SPARSE_PLUGINS", raising=False)
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "toy_models.py").write_text(
        "import robust_sparse\nfrom torch import nn\nfrom robust_sparse.models import Normalize\n\n"
        "def linear(num_classes, in_channels, mean, std, hidden=7):\n"
        "    return nn.Sequential(Normalize(mean, std), nn.Flatten(), nn.Linear(in_channels * 28 * 28, hidden),\n"
        "                         nn.ReLU(), nn.Linear(hidden, num_classes))\n\n"
        "robust_sparse.register_model('toy_linear', linear)\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    import toy_models  # noqa: F401

    try:
        assert REGISTERED_MODELS["toy_linear"] == "toy_models"
        config = load_config(None, ["model.name=toy_linear", "model.kwargs.hidden=5", "data.train_limit=64",
                                    "data.val_size=32", "data.batch_size=32", "optim.epochs=1", "attack.steps=1",
                                    "val.pgd_steps=1", "val.max_examples=32", "eval.n_examples=0", "device=cpu",
                                    f"out_dir={tmp_path / 'run'}"])
        result = fit(config)
        assert result.model[2].out_features == 5  # model.kwargs reached the factory
        sweep_file = tmp_path / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({"overrides": ["model.name=toy_linear", "device=cpu"],
                                              "grid": {"seed": [0]}}))
        assert load_sweep(sweep_file, str(tmp_path / "out")).plugins == ("toy_models",)
        with pytest.raises(ValueError, match="already registered"):
            robust_sparse.register_model("toy_linear", toy_models.linear)
        with pytest.raises(ValueError, match="without ':'"):
            robust_sparse.register_model("timm:x", toy_models.linear)
    finally:
        MODELS.remove("toy_linear")
        REGISTERED_MODELS.pop("toy_linear", None)
        sys.modules.pop("toy_models", None)


def test_eval_model_specs_build_library_models_and_call_factories_with_kwargs() -> None:
    from robust_sparse.eval.sources import from_factory, parse_kwargs

    assert parse_kwargs("model_name=resnet18,num_classes=10,pretrained=false", "--model-kwargs") == \
        {"model_name": "resnet18", "num_classes": 10, "pretrained": False}
    assert parse_kwargs("{num_classes: 10, drop_rate: 0.0}", "--model-kwargs") == {"num_classes": 10, "drop_rate": 0.0}
    with pytest.raises(UserError, match="--model-kwargs: 'num_classes' is not NAME=VALUE"):
        parse_kwargs("num_classes", "--model-kwargs")
    # a library model: built as training builds it, the dataset's normalisation in front
    loaded = from_factory("torchvision:resnet18", "cifar10", kwargs={"zero_init_residual": True})
    assert type(loaded.model).__name__ == "Normalized" and loaded.architecture == "torchvision:resnet18"
    assert torch.allclose(loaded.model.normalize.mean.flatten(), torch.tensor(CIFAR_MEAN))
    if __import__("importlib").util.find_spec("timm") is not None:
        # a library's factory function, called with the keyword arguments as they are
        loaded = from_factory("timm:create_model", "cifar10",
                              kwargs={"model_name": "resnet18", "num_classes": 10})
        assert type(loaded.model).__name__ == "ResNet"


def test_eval_model_kwargs_flag_is_checked_in_one_line(capsys) -> None:
    from robust_sparse.cli import main

    assert main(["eval", "--arch", "tiny_cnn", "--weights", "w.pt", "--model-kwargs", "a=1", "--dataset", "cifar10"]) != 0
    assert capsys.readouterr().err.strip() == "robust-sparse: error: --model-kwargs goes with --model"
    assert main(["eval", "--model", "torchvision:resnet18", "--model-kwargs", "=3", "--dataset", "cifar10"]) != 0
    error = capsys.readouterr().err.strip()
    assert error.startswith("robust-sparse: error: --model-kwargs: '=3' is not NAME=VALUE") and "\n" not in error
