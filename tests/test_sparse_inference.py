"""Sparse inference: every architecture's logits match the dense model's, each kernel against F.conv2d/F.linear,
the per-layer choice follows the measurement, eval-only, and the export writes and reloads the model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_sparse
from robust_sparse.cli import main
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.models import MODELS, build_model
from robust_sparse.deploy.inference import (
    SparseConv2d, SparseInferenceModel, SparseLinear, load_sparse_inference, sparse_inference,
)
from robust_sparse.train import fit

from conftest import make_tiny_model

CIFAR = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
BIG = {"wrn28_10", "wrn34_10", "wrn34_20"}  # tens to hundreds of millions of weights


def sparse_always(_name, _dense, _sparse):
    """A measurement in which every sparse kernel wins, so every sparse kernel is exercised."""
    return 1.0, 0.5


def masked_model(arch: str, density: float, seed: int = 0) -> nn.Module:
    """``arch`` with random masks at ``density``, weights rescaled to keep the logits O(1), and non-trivial BN."""
    torch.manual_seed(seed)
    model = build_model(arch, 10, 3, *CIFAR)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_((torch.rand_like(module.weight) < density) / math.sqrt(density))
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _cases():
    for arch in sorted(MODELS):
        for sparsity in (0.0, 0.9, 0.99):
            slow = arch in BIG  # a minute each to build and mask; wrn28_4 runs the same WRN code by default
            yield pytest.param(arch, sparsity, marks=[pytest.mark.slow] if slow else [], id=f"{arch}-{sparsity}")


@pytest.mark.parametrize("arch,sparsity", list(_cases()))
def test_logits_match_the_dense_model_for_every_architecture(arch, sparsity):
    model = masked_model(arch, 1.0 - sparsity)
    size = 32 if arch in BIG or arch == "vgg16" else 16  # adaptive pools take any size; small keeps it fast
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    fast = sparse_inference(model, images, measure=sparse_always)
    candidates = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(fast.sparse_layers) == len(candidates)  # every layer took its sparse kernel
    with torch.no_grad():
        expected = model(images)
    assert expected.abs().max() > 0.01  # the comparison is not between zero logits
    torch.testing.assert_close(fast(images), expected, rtol=0, atol=1e-4)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())  # the input untouched


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 1), padding=(1, 0), bias=True),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, dilation=2, padding=2, bias=True),
    dict(kernel_size=5, padding=0),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_each_convolution_kernel_equals_conv2d(geometry, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, bias=geometry.pop("bias", False), **geometry)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    x = torch.randn(batch, 4, 9, 7)
    sparse = SparseConv2d.from_dense(conv)
    assert sparse.values.numel() == int(conv.weight.count_nonzero())  # only the nonzeros are stored
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), conv(x), rtol=0, atol=1e-5)


def test_linear_kernel_on_batched_and_extra_leading_dimensions():
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.2)
    sparse = SparseLinear.from_dense(linear)
    for x in (torch.randn(12), torch.randn(4, 12), torch.randn(2, 3, 12)):
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), F.linear(x, linear.weight, linear.bias), rtol=0, atol=1e-6)


def test_a_layer_stays_dense_where_dense_measured_faster():
    model = masked_model("tiny_cnn", 0.1)
    images = torch.rand(2, 3, 16, 16)
    calls = []

    def measure(name, dense, sparse):
        calls.append(name)
        return (0.5, 1.0) if name == "features.0" else (1.0, 0.5)  # the first conv: dense wins

    fast = sparse_inference(model, images, measure=measure)
    assert calls == ["features.0", "features.4", "classifier.1", ""]  # each candidate, then the whole model
    assert isinstance(fast.model.features[0], nn.Conv2d) and not isinstance(fast.model.features[0], SparseConv2d)
    assert isinstance(fast.model.features[4], SparseConv2d) and isinstance(fast.model.classifier[1], SparseLinear)
    report = fast.report().set_index("name")
    assert report["sparse"].to_dict() == {"features.0": False, "features.4": True, "classifier.1": True}
    assert report.loc["features.4", "density"] == pytest.approx(
        int(model.features[4].weight.count_nonzero()) / model.features[4].weight.numel())
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), rtol=0, atol=1e-4)


def test_a_fully_dense_layer_measured_slower_sparse_stays_dense():
    model = masked_model("tiny_cnn", 0.05)
    with torch.no_grad():
        model.classifier[1].weight.normal_()  # 100% dense: no zero to skip

    def measure(name, dense, sparse):  # the cost a sparse kernel pays per stored weight, dense pays per position
        if not name:
            return 1.0, 0.5
        layer = fast_layers[name]
        return float(layer.weight.numel()), 2.0 * float(layer.weight.count_nonzero())

    fast_layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    # the package-level name: the module it shares with the function is bound by now, and calls the function
    fast = robust_sparse.sparse_inference(model, torch.rand(1, 3, 16, 16), measure=measure)
    assert fast.sparse_layers == ["features.0", "features.4"]
    assert type(fast.model.classifier[1]) is nn.Linear


def test_the_whole_model_falls_back_to_dense_when_sparse_is_not_faster():
    model = masked_model("tiny_cnn", 0.1)
    fast = sparse_inference(model, torch.rand(1, 3, 16, 16),
                            measure=lambda name, d, s: (1.0, 2.0) if name == "" else (1.0, 0.5))
    assert fast.sparse_layers == [] and not fast.report()["sparse"].any()
    assert fast.sparse_latency_s == fast.dense_latency_s == 1.0


def test_eval_mode_only_and_no_gradients():
    model = masked_model("tiny_cnn", 0.1)
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="eval mode"):
        sparse_inference(model.train(), images, measure=sparse_always)
    fast = sparse_inference(model.eval(), images, measure=sparse_always)
    with pytest.raises(RuntimeError, match="eval mode only"):
        fast.train()(images)
    fast.eval()
    with pytest.raises(RuntimeError, match="no gradients"):
        fast(images.clone().requires_grad_())
    sparse_layer = fast.model.features[0]
    with pytest.raises(RuntimeError, match="inference only"):
        sparse_layer.train()(images)
    sparse_layer.eval()
    assert not fast(images).requires_grad  # runs under no_grad even where grad mode is on


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    from robust_sparse.deploy.inference import save_sparse_inference

    model = masked_model("resnet18", 0.05)
    images = torch.rand(2, 3, 16, 16)
    fast = sparse_inference(model, images, measure=lambda name, d, s: (1.0, 0.5) if "conv2" in name or not name
                            else (0.5, 1.0))
    save_sparse_inference(fast, tmp_path / "m.pt", "resnet18", 10, 3, *CIFAR)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["sparse_layers"] == fast.sparse_layers and all("conv2" in name for name in raw["sparse_layers"])
    loaded = load_sparse_inference(tmp_path / "m.pt")
    assert isinstance(loaded, SparseInferenceModel) and loaded.sparse_layers == fast.sparse_layers
    torch.testing.assert_close(loaded(images), fast(images), rtol=0, atol=0)


def test_batch_norm_and_relu_after_a_sparse_conv_are_folded_in_and_saved(tmp_path):
    """VGG-16's features: each conv-BN-ReLU becomes one sparse layer with a fused ReLU; logits unchanged, and the
    saved file rebuilds the folded model."""
    from robust_sparse.deploy.inference import save_sparse_inference

    model = masked_model("vgg16", 0.05)
    images = torch.rand(2, 3, 32, 32)
    fast = sparse_inference(model, images, measure=sparse_always)
    conv_names = [n for n, m in model.features.named_children() if isinstance(m, nn.Conv2d)]
    assert len(fast.fused) == len(conv_names) == 13
    for conv, norm, relu in fast.fused:
        assert isinstance(fast.model.get_submodule(norm), nn.Identity) and fast.model.get_submodule(conv).relu
        assert isinstance(fast.model.get_submodule(relu), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), rtol=0, atol=1e-4)
    assert isinstance(model.features[1], nn.BatchNorm2d)  # the input model untouched
    save_sparse_inference(fast, tmp_path / "vgg.pt", "vgg16", 10, 3, *CIFAR)
    loaded = load_sparse_inference(tmp_path / "vgg.pt")
    assert loaded.fused == fast.fused
    torch.testing.assert_close(loaded(images), fast(images), rtol=0, atol=0)


def test_a_file_of_the_first_format_still_loads(tmp_path):
    """Format 1 stored each sparse layer as a CSR matrix of its im2col kernel: (kernel row, kernel column, channel)
    columns for stride-1 convs, (channel, kernel row, kernel column) for the others, a Linear as itself."""
    model = masked_model("resnet18", 0.05)
    names = ["layer1.0.conv1", "layer2.0.conv1", "linear" if hasattr(model, "linear") else "fc"]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for name in names:
        weight = state.pop(f"{name}.weight")
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            shifted = layer.stride == (1, 1)
            weight = weight.permute(0, 2, 3, 1) if shifted else weight
        csr = weight.reshape(weight.shape[0], -1).to_sparse_csr()
        state.update({f"{name}.crow_indices": csr.crow_indices(), f"{name}.col_indices": csr.col_indices(),
                      f"{name}.values": csr.values()})
    torch.save({"kind": "robust-sparse-sparse-inference/1", "architecture": "resnet18", "num_classes": 10,
                "in_channels": 3, "mean": list(CIFAR[0]), "std": list(CIFAR[1]), "sparse_layers": names,
                "dense_latency_s": 1.0, "sparse_latency_s": 0.5, "state": state}, tmp_path / "v1.pt")
    loaded = load_sparse_inference(tmp_path / "v1.pt")
    assert loaded.sparse_layers == names
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=1e-4)


def test_a_shared_relu_is_not_fused():
    torch.manual_seed(0)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), relu, nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), relu, nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
    images = torch.rand(2, 3, 4, 4)
    fast = sparse_inference(model, images, measure=sparse_always)
    assert [entry[2] for entry in fast.fused] == [None, None]  # the BatchNorms fold, the shared ReLU stays
    with torch.no_grad():
        torch.testing.assert_close(fast(images), model(images), rtol=0, atol=1e-5)


def test_export_writes_the_sparse_inference_model_and_its_latencies(tiny_config, tmp_path, capsys):
    result = fit(tiny_config("sparsity.method=rigl", "sparsity.density=0.1", "sparsity.update_every=3"))
    out = tmp_path / "export"
    assert main(["export", str(result.run_dir / "best.pt"), "--out", str(out)]) == 0
    assert "model_sparse_inference.pt" in capsys.readouterr().out
    summary = json.loads((out / "export.json").read_text())["sparse_inference"]
    assert summary["file"] == "model_sparse_inference.pt" and summary["batch_size"] == 1
    assert summary["dense_latency_ms"] > 0 and summary["sparse_latency_ms"] > 0
    assert summary["sparse_latency_ms"] <= summary["dense_latency_ms"]  # never slower: it falls back to dense
    assert sorted(summary["sparse_layers"] + summary["dense_layers"]) == ["classifier.1", "features.0",
                                                                          "features.4"]
    assert torch.load(out / "model_sparse_inference.pt", weights_only=True)["architecture"] == "tiny_cnn"

    loaded = robust_sparse.load_sparse_inference(out / "model_sparse_inference.pt")
    assert loaded.sparse_layers == summary["sparse_layers"]
    dense = make_tiny_model(seed=5)
    dense.load_state_dict(load_checkpoint(result.run_dir / "best.pt")["model"])
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), dense.eval()(images), rtol=0, atol=1e-4)


def test_loading_something_else_is_a_checkpoint_error(tmp_path):
    from robust_sparse.errors import CheckpointError

    torch.save({"kind": "something"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a sparse-inference export"):
        load_sparse_inference(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_sparse_inference(tmp_path / "missing.pt")


def test_a_model_with_no_faster_sparse_layer_claims_no_speed_up():
    """Every layer measured slower sparse: the model is the dense one, timed once, so its two latencies are
    equal (a second timing of the same model would report noise as a speed-up), and export says so."""
    from robust_sparse.cli import latency_claim

    calls = []

    def slower_sparse(name, dense, sparse):
        calls.append(name)
        return (1.0, 2.0) if name else (0.0008, 0.0006)  # the whole model's pair would claim 1.33x

    fast = sparse_inference(make_tiny_model().eval(), torch.rand(1, 1, 28, 28), measure=slower_sparse)
    assert fast.sparse_layers == [] and fast.dense_latency_s == fast.sparse_latency_s == 0.0008
    assert calls.count("") == 1
    record = {"threads": 1, "sparse_layers": [], "dense_latency_ms": 0.8, "sparse_latency_ms": 0.8, "speedup": 1.0}
    assert latency_claim(record) == ("every layer kept dense (no sparse kernel measured faster here), 0.80 ms per "
                                     "image on 1 thread")
    record.update(sparse_layers=["features.0"], sparse_latency_ms=0.78, speedup=0.8 / 0.78)
    assert latency_claim(record).endswith("on 1 thread: no measurable difference")
    record.update(sparse_layers=["features.0", "features.4"], sparse_latency_ms=0.4, speedup=2.0)
    assert latency_claim(record).endswith("0.40 ms vs 0.80 ms dense per image on 1 thread (2.00x)")
