"""The CSR kernels: each product against torch's convolution and its autograd, both grid layouts, any thread
count; in training, the same run with the kernels on and off, for every registered sparse method, exact resume,
the dense path where the engine needs the dense gradient, and the refusals of train.sparse_kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import load_config
from robust_sparse.errors import ConfigError
from robust_sparse.kernels import SparseKernels, SparsePattern, sparse_conv
from robust_sparse.kernels import csr_conv
from robust_sparse.kernels.training import AUTO_BUDGET, KernelBatchNorm2d, KernelConv2d, KernelReLU, worth_it
from robust_sparse.sparse import METHODS, StaticEngine, build_sparsity
from robust_sparse.train import fit

from conftest import make_tiny_model, one_line_error

GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, padding=0),
    dict(kernel_size=(3, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=7, stride=2, padding=3),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=3, stride=2, dilation=2, padding=1),
    dict(kernel_size=5, padding=4),  # padding beyond the kernel's reach
]


@pytest.fixture(params=["images side by side", "batch innermost"])
def layout(request, monkeypatch):
    """Both grid layouts: every map counts as wide (images side by side) or as narrow (the batch innermost)."""
    monkeypatch.setattr(csr_conv, "_WIDE", 0 if request.param == "images side by side" else 10_000)
    return request.param


def _masked_conv(geometry: dict, density: float = 0.3, seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(5, 6, bias=True, **geometry)
    mask = torch.rand_like(conv.weight) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_input_and_weight_gradients_equal_conv2d(geometry, batch, layout):
    conv, mask = _masked_conv(geometry)
    pattern = SparsePattern(mask, conv.stride, conv.padding, conv.dilation)
    x = torch.randn(batch, 5, 11, 9, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    _assert_same_layer(sparse_conv(x, weight, bias, pattern),
                       F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation), (x, weight, bias), mask)


def _assert_same_layer(out, expected, inputs, mask):
    """Equal outputs and input and bias gradients; the weight gradient at the non-zeros only, exactly zero
    elsewhere (the masked gradient)."""
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(out, inputs, upstream)
    reference = torch.autograd.grad(expected, inputs, upstream)
    torch.testing.assert_close(grads[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], reference[1] * mask, rtol=1e-5, atol=1e-5)
    assert torch.all(grads[1][~mask] == 0)
    torch.testing.assert_close(grads[2], reference[2], rtol=1e-5, atol=1e-5)


def test_a_hand_computed_convolution():
    """One non-zero, W[0, 0, 1, 2] = 2, on a 3x3 image with padding 1: out[h, w] = 2 * x[h, w + 1] (0 past the edge)."""
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 2] = 2.0
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out = sparse_conv(x, weight, None, SparsePattern(mask, (1, 1), (1, 1)))
    assert out.squeeze().tolist() == [[2.0, 4.0, 0.0], [8.0, 10.0, 0.0], [14.0, 16.0, 0.0]]


def test_inputs_of_any_memory_layout_and_a_fused_relu(layout):
    conv, mask = _masked_conv(dict(kernel_size=3, padding=1))
    pattern = SparsePattern(mask, (1, 1), (1, 1))
    base = torch.randn(4, 5, 8, 8)
    expected = F.conv2d(base, conv.weight, conv.bias, padding=1)
    for x in (base, base.to(memory_format=torch.channels_last), base.transpose(0, 1).contiguous().transpose(0, 1)):
        torch.testing.assert_close(sparse_conv(x, conv.weight, conv.bias, pattern), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_conv(base, conv.weight, conv.bias, pattern, relu=True), expected.relu(),
                               rtol=1e-5, atol=1e-5)


def test_linear_layer_and_its_gradients():
    torch.manual_seed(0)
    mask = torch.rand(7, 12) < 0.3
    weight = (torch.randn(7, 12) * mask).requires_grad_()
    bias = torch.randn(7, requires_grad=True)
    x = torch.randn(5, 12, requires_grad=True)
    _assert_same_layer(sparse_conv(x, weight, bias, SparsePattern(mask)), F.linear(x, weight, bias),
                       (x, weight, bias), mask)


def test_the_output_takes_in_place_layers():
    """An in-place ReLU after the layer (VGG's nn.ReLU(inplace=True)) needs an output that is not a view."""
    conv, mask = _masked_conv(dict(kernel_size=3, padding=1))
    weight = conv.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 5, 6, 6)
    out = torch.relu_(sparse_conv(x, weight, None, SparsePattern(mask, (1, 1), (1, 1))))
    out.sum().backward()
    expected = F.conv2d(x, weight.detach(), None, padding=1).relu()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_the_thread_count():
    conv, mask = _masked_conv(dict(kernel_size=3, padding=1), density=0.5)
    pattern = SparsePattern(mask, (1, 1), (1, 1))
    x = torch.randn(8, 5, 40, 40)  # several tiles, so that threads split the work
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(sparse_conv(x, conv.weight, conv.bias, pattern))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])  # each tile is one thread's, summed in one order


def test_the_auto_rule_weighs_density_against_the_padded_grid():
    assert AUTO_BUDGET == 0.2
    mask = torch.zeros(8, 8, 3, 3, dtype=torch.bool)
    mask.view(-1)[:58] = True  # density 0.1
    pattern = SparsePattern(mask, (1, 1), (1, 1))
    assert worth_it(pattern, torch.zeros(2, 8, 32, 32))  # 0.1 x (34 * 34) / (32 * 32) = 0.11 < 0.2
    assert not worth_it(pattern, torch.zeros(2, 8, 2, 2))  # 0.1 x 16 / 4 = 0.4: the padding costs more
    linear = torch.zeros(10, 10, dtype=torch.bool)
    linear.view(-1)[:19] = True
    assert worth_it(SparsePattern(linear), torch.zeros(2, 10))  # 0.19: no grid, no waste
    assert not worth_it(SparsePattern(torch.ones(8, 8, dtype=torch.bool)), torch.zeros(2, 8))


def test_the_quickstart_keeps_the_dense_kernels(tmp_path):
    """The quickstart (BSR-Net, 90%, small CNN on 28x28 digits) is where the kernels measured slower end to end
    (BENCHMARKS.md): its config turns them off, so its figures are those of the dense kernels, to the bit."""
    from robust_sparse.cli import QUICKSTART
    from robust_sparse.run_setup import build_run

    config = load_config(QUICKSTART, [f"out_dir={tmp_path / 'q'}"])
    assert config.train.sparse_kernels.value == "off" and config.sparsity.method == "bsrnet"
    assert build_run(config).kernels is None


# ---- in training ---------------------------------------------------------------------------------------------


def _static_model(density: float = 0.1):
    model = make_tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = load_config(None, ["sparsity.method=static", f"sparsity.density={density}"])
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", optimizer, total_steps=10, seed=0)
    return model, optimizer, masker


def test_where_the_layers_run_sparse_and_where_dense():
    model, _, masker = _static_model()
    kernels = SparseKernels(model, masker, auto=False)
    assert kernels.layers == 3 and isinstance(model.features[0], KernelConv2d)
    conv = model.features[0]
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert kernels.pattern_for(conv, x)[0] is not None  # no weight gradient: sparse
    assert kernels.pattern_for(conv, x)[0] is None  # weight gradients outside a training pass: dense
    with kernels.inputs_only():
        assert kernels.pattern_for(conv, x) == (kernels.pattern_for(conv, x)[0], False)  # weights as constants
        assert kernels.pattern_for(conv, x)[0] is not None
    with kernels.training_pass():
        assert kernels.pattern_for(conv, x)[1] is True
    masker.engine = _DenseGradient()
    with kernels.training_pass():  # the engine wants the dense gradient of this step: dense kernels
        assert kernels.pattern_for(conv, x)[0] is None
    snapshot = copy.deepcopy(model)  # AGENT's snapshot: unknown to the owner, so dense
    with torch.no_grad():
        assert kernels.pattern_for(snapshot.features[0], x)[0] is None
        torch.testing.assert_close(snapshot(x), model(x), rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    kernels.remove()
    assert type(model.features[0]) is nn.Conv2d and model.state_dict().keys() == state.keys()


def test_the_attack_folds_batch_norm_and_relu_into_the_conv():
    """In eval mode (the attack) conv -> BatchNorm -> ReLU runs as one sparse call; logits and input gradients
    equal the dense model's; in train mode (batch statistics) the BatchNorm runs itself."""
    model, _, masker = _static_model(density=0.3)
    with torch.no_grad():
        for norm in (model.features[1], model.features[5]):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    reference = copy.deepcopy(model).eval()  # a copy: always dense
    kernels = SparseKernels(model, masker, auto=False)
    assert isinstance(model.features[1], KernelBatchNorm2d) and isinstance(model.features[2], KernelReLU)
    outputs = []
    model.features[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    for run in (model, reference):
        image = x.clone().requires_grad_()
        with kernels.inputs_only():
            logits = run(image)
        outputs.append((logits.detach(), torch.autograd.grad(logits.square().sum(), image)[0]))
    folded, (sparse_logits, sparse_grad), (dense_logits, dense_grad) = outputs
    assert folded._normalised_by is model.features[1] and folded._rectified_by is model.features[2]
    assert folded.min() >= 0  # the ReLU is in the kernel's output
    torch.testing.assert_close(sparse_logits, dense_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-5)
    model.train()
    with kernels.inputs_only():
        model(x)
    assert not hasattr(outputs[-1], "_normalised_by")  # batch statistics: nothing folded
    kernels.remove()
    assert type(model.features[1]) is nn.BatchNorm2d and type(model.features[2]) is nn.ReLU


class _DenseGradient(StaticEngine):
    def wants_dense_grad(self, step: int) -> bool:
        return True


def test_a_new_topology_rebuilds_the_structure():
    model, _, masker = _static_model()
    kernels = SparseKernels(model, masker, auto=False)
    conv, name = model.features[0], "features.0.weight"
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        first = kernels.pattern_for(conv, x)[0]
        masker.masks[name][0].logical_not_()  # changed in place: its version moves
        conv.weight.mul_(masker.masks[name])
        second = kernels.pattern_for(conv, x)[0]
        assert second is not first and second.nnz == int(masker.masks[name].sum())
        masker.set_mask(name, torch.ones_like(masker.masks[name]))  # replaced
        assert kernels.pattern_for(conv, x)[0].nnz == masker.masks[name].numel()


# AST's two sub-nets need a few steps each before their first rewiring
EXTRA = {"ast": ["sparsity.ast_densities=[0.2, 0.05]", "sparsity.update_every=1", "data.train_limit=384"]}


def _run(tiny_config, tmp_path, method: str, kernels: str, *extra: str):
    budget = [] if METHODS.get(method).ignores_density is not None else ["sparsity.density=0.1"]
    config = tiny_config(f"sparsity.method={method}", *budget, "sparsity.update_every=2", "optim.epochs=1",
                         "data.train_limit=192", "data.val_size=64", "val.max_examples=64", "eval.n_examples=0",
                         f"train.sparse_kernels={kernels}", f"out_dir={tmp_path / kernels}",
                         *EXTRA.get(method, []), *extra)
    fit(config)
    return load_checkpoint(tmp_path / kernels / "last.pt")


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "magnitude_prune"])
def test_training_with_the_kernels_equals_training_without(method, tiny_config, tmp_path):
    """A few PGD-AT steps of every registered method: the same weights within float rounding, the same masks."""
    on = _run(tiny_config, tmp_path, method, "on")
    off = _run(tiny_config, tmp_path, method, "off")
    for key, value in off["model"].items():
        torch.testing.assert_close(on["model"][key].float(), value.float(), rtol=1e-3, atol=2e-4, msg=key)
    for key, mask in off["sparsity"]["masks"].items():
        assert torch.equal(on["sparsity"]["masks"][key], mask), key


def test_a_resumed_run_with_the_kernels_matches_the_uninterrupted_one(tiny_config, tmp_path):
    from test_train import _train_one_epoch_then_stop

    common = ["sparsity.method=rigl", "sparsity.density=0.1", "sparsity.update_every=3", "eval.n_examples=0",
              "train.sparse_kernels=on"]
    uninterrupted = fit(tiny_config(*common, f"out_dir={tmp_path / 'a'}"))
    killed = tiny_config(*common, f"out_dir={tmp_path / 'b'}")
    _train_one_epoch_then_stop(killed)
    # the kernels may be switched on resume, as channels_last may: the same arithmetic within float rounding
    from robust_sparse.run_record import resume_state

    assert resume_state(tiny_config(*common, "train.sparse_kernels=off", f"out_dir={tmp_path / 'b'}"),
                        torch.device("cpu")) is not None
    resumed = fit(killed, resume=True)
    a, b = load_checkpoint(uninterrupted.run_dir / "last.pt"), load_checkpoint(resumed.run_dir / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("setting,message", [
    (["train.sparse_kernels=fast"], "train.sparse_kernels: 'fast' is not one of auto, on, off"),
    (["train.sparse_kernels=on", "train.precision=bf16"], "train.sparse_kernels = on: the CSR kernels compute in fp32"),
    (["train.sparse_kernels=on", "train.compile=true"], "train.sparse_kernels = on: torch.compile cannot trace"),
    (["train.sparse_kernels=on", "device=cuda"], "train.sparse_kernels = on: the CSR kernels run on the CPU"),
])
def test_settings_the_kernels_cannot_serve_are_refused_in_one_line(setting, message, capsys, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, setting)
    flags = [part for value in [*setting, f"out_dir={tmp_path / 'r'}"] for part in ("--set", value)]
    line = one_line_error(["train", *flags], capsys)
    assert "train.sparse_kernels" in line and not (tmp_path / "r").exists()


def test_yaml_on_and_off_are_the_modes_not_booleans():
    assert load_config(None, ["train.sparse_kernels=on"]).train.sparse_kernels.value == "on"
    assert load_config(None, ["train.sparse_kernels=off"]).train.sparse_kernels.value == "off"
