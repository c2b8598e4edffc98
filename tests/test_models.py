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
