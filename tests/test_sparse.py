"""Sparse engines: invariants over real training steps, hand-computed BSR-Net steps, export, bad settings."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_sparse.files.checkpoint import load_checkpoint, save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config
from robust_sparse.errors import ConfigError
from robust_sparse.mvr import MVR
from robust_sparse.optim import SGDW, sgdw
from robust_sparse.sparse import METHODS, StaticEngine, build_sparsity, density as allocation
from robust_sparse.sparse.bsrnet import BSRNetEngine, bsrnet_initial
from robust_sparse.sparse.prune_regrow import PruneGrowEngine
from robust_sparse.sparse.export import load_compact
from robust_sparse.sparse.masker import SparseMasker
from robust_sparse.train import fit

from conftest import make_tiny_model

# Every registered method runs through the invariants below by being registered (METHODS); "snfs-momentum" is
# SET with SNFS's growth. A method that needs an input to build at all gets it here (magnitude_prune: a dense
# checkpoint); every other one runs with the shared settings alone.
VARIANTS = {"snfs-momentum": ("set", ["sparsity.growth=momentum"])}
SHARED = ["sparsity.update_every=3"]  # every method that rewires does so within the 10-40 steps of a test


def _engines() -> list[str]:
    return [*METHODS.names(), *VARIANTS]


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    save_checkpoint({"model": make_tiny_model(seed=3).state_dict()}, path)
    return path


def _needs(method: str, dense: str | None) -> list[str]:
    return [f"sparsity.magnitude_prune.dense_checkpoint={dense}"] if method == "magnitude_prune" and dense else []


def _setup(name, mnist, density=0.2, optimizer="sgd", dense=None, seed=0):
    method, extra = VARIANTS.get(name, (name, []))
    budget = [f"sparsity.density={density}"] if METHODS.get(method).ignores_density is None else []  # AST: its own
    config = load_config(None, [f"sparsity.method={method}", *budget, *SHARED, *extra, *_needs(method, dense)])
    model = make_tiny_model()
    opt = (SGDW(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if optimizer == "sgdw"
           else MVR(model, lr=0.05, momentum=0.9, weight_decay=5e-4) if optimizer == "mvr"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
    train, _ = mnist
    images, labels = train.images[:640].float() / 255, train.labels[:640]
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", opt, total_steps=40, seed=seed,
                            batch_source=lambda step: (images[:40], labels[:40]))  # GSE's scoring batch
    if isinstance(opt, MVR):
        opt.attach(masker)
    return model, opt, masker, images, labels


def _step(model, opt, images, labels, step):
    batch = slice(step % 10 * 64, (step % 10 + 1) * 64)
    loss = F.cross_entropy(model(images[batch]), labels[batch])
    opt.zero_grad()
    loss.backward()
    if isinstance(opt, MVR):  # its extra gradient: the previous weights on the same batch
        opt.previous_backward(lambda previous: F.cross_entropy(previous(images[batch]), labels[batch]))


def _assert_sparse_state(model, opt, masker, check_grad=True):
    for name, param in masker.params.items():
        dormant = ~masker.masks[name]
        assert torch.all(param[dormant] == 0), f"{name}: pruned weight not zero"
        if check_grad and param.grad is not None:
            assert torch.all(param.grad[dormant] == 0), f"{name}: pruned gradient not zero"
        for key, buffer in opt.state.get(param, {}).items():  # momentum, MVR's direction and previous weights
            if isinstance(buffer, torch.Tensor) and buffer.shape == param.shape:
                assert torch.all(buffer[dormant] == 0), f"{name}: pruned optimizer state {key} not zero"


def _assert_masks_keyed_by_parameter_name(model, masker):
    named = dict(model.named_parameters())
    for view in masker.views():
        assert set(view.masks) == set(masker.params) and set(masker.params) <= set(named)
        for name, mask in view.masks.items():
            assert mask.dtype == torch.bool and mask.shape == named[name].shape, name  # binary, the layer's shape
            assert masker.params[name] is named[name]


@pytest.mark.parametrize("name", _engines())
@pytest.mark.parametrize("optimizer", ["sgd", "sgdw", "mvr"])
def test_every_method_keeps_pruned_weights_gradients_and_momentum_zero(name, optimizer, mnist, dense_checkpoint):
    model, opt, masker, images, labels = _setup(name, mnist, optimizer=optimizer, dense=dense_checkpoint)
    total = sum(mask.numel() for mask in masker.masks.values())
    # the budget: a method may start above it (BSR-Net's hand-set first/last layers, gradual pruning from dense)
    # and prune down, but no step adds connections beyond the larger of the start and the budget
    ceiling = max(sum(masker.active_counts().values()), math.ceil(0.2 * total))
    _assert_masks_keyed_by_parameter_name(model, masker)
    _assert_sparse_state(model, opt, masker)
    for step in range(10):
        _step(model, opt, images, labels, step)
        _assert_sparse_state(model, opt, masker)  # gradients masked by the hooks
        opt.step()
        # weights and momentum re-masked by the step hook (.grad still holds the previous topology's gradient)
        _assert_sparse_state(model, opt, masker, check_grad=False)
        _assert_masks_keyed_by_parameter_name(model, masker)
        assert sum(masker.active_counts().values()) <= ceiling
        assert all(view.density() <= ceiling / total for view in masker.views())


@pytest.mark.parametrize("name", _engines())
def test_every_method_resumes_exactly_from_a_saved_state(name, mnist, dense_checkpoint, tmp_path):
    """The masker's state (masks, explored set, the engine's generators and state) through a checkpoint file
    (``weights_only``): a fresh masker loaded from it continues exactly as the one that kept training."""
    model, opt, masker, images, labels = _setup(name, mnist, dense=dense_checkpoint)
    for step in range(4):
        _step(model, opt, images, labels, step)
        opt.step()
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsity": masker.state_dict()},
                    tmp_path / "state.pt")
    saved = load_checkpoint(tmp_path / "state.pt")
    model_b, opt_b, masker_b, _, _ = _setup(name, mnist, dense=dense_checkpoint, seed=1)  # other draws
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optimizer"])  # first: AST's state holds the full optimizer buffers
    masker_b.load_state_dict(saved["sparsity"])
    for step in range(4, 10):
        for m, o in ((model, opt), (model_b, opt_b)):
            _step(m, o, images, labels, step)
            o.step()
    assert masker_b.step == masker.step == 10
    for key, value in model.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    for view, view_b in zip(masker.views(), masker_b.views(), strict=True):
        assert all(torch.equal(view.masks[n], view_b.masks[n]) for n in view.masks)
    assert all(torch.equal(masker.ever_active[n], masker_b.ever_active[n]) for n in masker.masks)


@pytest.mark.parametrize("name", sorted(VARIANTS) + ["static", "set", "rigl", "itop", "bsrnet", "gse"])
def test_fixed_count_methods_hold_their_exact_count(name, mnist):
    """The methods whose count is fixed keep it exactly after every step; PruneGrow rewires on its update steps
    only; BSR-Net tops up to its budget once it has pruned down to it."""
    model, opt, masker, images, labels = _setup(name, mnist)
    counts = sum(masker.active_counts().values())
    target = masker.engine.budget if isinstance(masker.engine, BSRNetEngine) else counts
    for step in range(10):
        before = {n: m.clone() for n, m in masker.masks.items()}
        _step(model, opt, images, labels, step)
        opt.step()
        changed = any(not torch.equal(before[n], masker.masks[n]) for n in before)
        if isinstance(masker.engine, PruneGrowEngine) and not masker.engine.is_update_step(masker.step):
            assert not changed  # topology frozen between updates
        if isinstance(masker.engine, StaticEngine):
            assert not changed
        count = sum(masker.active_counts().values())
        if counts <= target:
            assert count == target  # exact global count after every step
        else:  # BSR-Net may start over budget (first/last layers at 0.6): no regrowth until pruned down to K
            assert count <= counts
        counts = count


def _parametrized_names(test) -> set[str]:
    return {value for mark in test.pytestmark if mark.name == "parametrize" and mark.args[0] == "name"
            for value in mark.args[1]}


def test_the_invariant_tests_run_every_registered_method():
    """The invariant and resume tests above are parametrized with every registered method (a hand-written list
    there would silently skip a new method), and every method file of the package registers what it defines."""
    for test in (test_every_method_keeps_pruned_weights_gradients_and_momentum_zero,
                 test_every_method_resumes_exactly_from_a_saved_state):
        assert set(METHODS.names()) <= _parametrized_names(test), test.__name__
    import pkgutil

    import robust_sparse.sparse as package

    registering = {record.build.__module__.rpartition(".")[2] for _, record in METHODS.entries()}
    method_files = {info.name for info in pkgutil.iter_modules(package.__path__)} - package._INFRASTRUCTURE
    assert method_files == registering  # a method file that registers nothing, or a method defined elsewhere
    assert {"static", "set", "rigl", "itop", "bsrnet", "gse", "ast", "magnitude_prune"} <= set(METHODS.names())


def test_rigl_grows_by_dense_gradient_and_grown_weights_start_at_zero(mnist):
    model, opt, masker, images, labels = _setup("rigl", mnist)
    engine, calls = masker.engine, []
    prune, grow = engine.prune, engine.grow

    def recording_prune(weight, mask, count):
        calls.append({"weight": weight.detach().clone(), "mask": mask.clone(), "count": count})
        calls[-1]["kept"] = prune(weight, mask, count)
        return calls[-1]["kept"]

    def recording_grow(mask, count, score, generator):
        calls[-1]["score"] = score.clone()
        return grow(mask, count, score, generator)

    engine.prune, engine.grow = recording_prune, recording_grow
    for step in range(3):
        loss = F.cross_entropy(model(images[:64]), labels[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert masker.step == 3 and len(calls) == len(masker.params)  # one update, at step 3 (update_every=3)
    for call, (name, param) in zip(calls, masker.params.items()):
        old, kept, new = call["mask"], call["kept"], masker.masks[name]
        dropped, grown = old & ~kept, new & ~kept
        assert int(dropped.sum()) == int(grown.sum()) == call["count"] and int(new.sum()) == int(old.sum())
        if call["count"] == 0:
            continue
        # the dropped ones are the smallest-magnitude active weights (after the optimizer step)
        assert call["weight"][dropped].abs().max() <= call["weight"][kept].abs().min()
        # the grown ones have the largest |dense gradient| among dormant positions, start at zero, no momentum
        assert call["score"][grown].abs().min() >= call["score"][~kept & ~grown].abs().max()
        assert torch.all(param.detach()[grown] == 0)
        assert torch.all(opt.state[param]["momentum_buffer"][grown] == 0)


def test_set_exploration_rate_grows(mnist):
    model, opt, masker, images, labels = _setup("set", mnist)
    start = masker.exploration_rate()
    for step in range(6):
        loss = F.cross_entropy(model(images[:64]), labels[:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert masker.exploration_rate() > start > 0
    assert masker.exploration_rate() >= masker.global_density()


# ---- BSR-Net against a hand computation ----------------------------------------------------------------


def test_bsrnet_steps_match_hand_computation():
    """Two SGDW steps plus rewiring on one 2x3 layer, noise off, loss = sum(W * G) so dL/dW = G."""
    layer = nn.Linear(3, 2, bias=False)
    W0 = torch.tensor([[0.5, -0.2, 0.0], [0.03, 0.0, -0.4]])
    sign = torch.tensor([[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]])
    mask0 = torch.tensor([[True, True, False], [True, False, True]])
    G = torch.tensor([[0.1, 0.3, 0.2], [1.0, 0.5, -0.2]])
    lr, momentum, wd, budget = 0.1, 0.9, 0.01, 4
    with torch.no_grad():
        layer.weight.copy_(W0)
    opt = SGDW(layer.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    engine = BSRNetEngine(signs={"weight": sign}, budget=budget, noise_scale=0.0, temperature=None, l1=0.0,
                          regrow_value=1e-12, generator=torch.Generator().manual_seed(0),
                          count_generator=torch.Generator().manual_seed(1))
    masker = SparseMasker({"weight": layer.weight}, opt, {"weight": mask0}, engine)

    # step 1 by hand: v = -lr*G*mask; W = (1-wd)*W0 + v
    v1 = -lr * G * mask0
    W1 = (1 - wd) * W0 + v1
    # theta = sign*W1: [0.485, 0.168, -], [-0.0703, -, 0.396] -> position (1,0) crosses zero and is pruned
    alive1 = mask0 & (sign * W1 > 0)
    assert alive1.sum() == 3
    (layer.weight * G).sum().backward()
    opt.step()
    mask1 = masker.masks["weight"]
    assert int(mask1.sum()) == budget  # deficit of 1 regrown at once
    regrown = mask1 & ~alive1
    assert int(regrown.sum()) == 1
    torch.testing.assert_close(layer.weight.detach()[alive1], W1[alive1])
    assert layer.weight.detach()[regrown].item() == pytest.approx((sign[regrown] * 1e-12).item(), abs=0)
    assert torch.all(layer.weight.detach()[~mask1] == 0)

    # step 2 by hand, from the actual state: Keras momentum keeps lr inside the velocity
    W1_actual = layer.weight.detach().clone()
    v1_masked = v1 * mask1
    v2 = momentum * v1_masked - lr * G * mask1
    W2 = (1 - wd) * W1_actual + v2
    layer.weight.grad = None
    (layer.weight * G).sum().backward()
    opt.step()
    alive2 = mask1 & (sign * W2 > 0)
    kept = masker.masks["weight"] & alive2
    torch.testing.assert_close(layer.weight.detach()[kept], W2[kept])
    assert int(masker.masks["weight"].sum()) == budget


def test_bsrnet_regrowth_never_exceeds_a_layers_room():
    """The official code crashes when a layer must regrow more than it has dormant; here the excess moves."""
    small, big = nn.Linear(2, 2, bias=False), nn.Linear(50, 10, bias=False)
    params = {"small": small.weight, "big": big.weight}
    opt = torch.optim.SGD([small.weight, big.weight], lr=0.0)
    signs = {"small": torch.ones(2, 2), "big": torch.ones(10, 50)}
    with torch.no_grad():
        small.weight.fill_(1.0)
        big.weight.fill_(1.0)
    masks = {"small": torch.zeros(2, 2, dtype=torch.bool), "big": torch.zeros(10, 50, dtype=torch.bool)}
    engine = BSRNetEngine(signs=signs, budget=503, noise_scale=0.0, temperature=None, l1=0.0, regrow_value=1e-12,
                          generator=torch.Generator().manual_seed(0), count_generator=torch.Generator().manual_seed(0))
    masker = SparseMasker(params, opt, masks, engine)
    engine.regrow(masker)
    assert masker.active_counts() == {"small": 4, "big": 499}


def test_bsrnet_noise_follows_temperature_and_scale():
    engine = BSRNetEngine(signs={}, budget=1, noise_scale=1e-6, temperature=None, l1=0.0, regrow_value=1e-12,
                          generator=torch.Generator(), count_generator=torch.Generator())
    assert engine.noise_std(0.1) == pytest.approx(1e-7)
    engine.temperature = 5e-14
    assert engine.noise_std(0.1) == pytest.approx(math.sqrt(2 * 0.1 * 5e-14))


def test_bsrnet_initial_densities_follow_the_paper():
    shapes = {f"features.{i}.weight": (64, 64, 3, 3) for i in range(13)}
    shapes.update({"classifier.0.weight": (256, 2048), "classifier.2.weight": (256, 256),
                   "classifier.4.weight": (10, 256)})
    densities = bsrnet_initial("vgg16", shapes, 0.1)  # within the budget: as the paper sets them
    values = list(densities.values())
    assert values[:4] == [0.6, 0.6, 0.2, 0.2] and values[-1] == 0.6
    assert all(v == pytest.approx(0.05) for v in values[4:-1])
    resnet = {"conv1.weight": (64, 3, 3, 3), "layer1.0.conv1.weight": (64, 64, 3, 3),
              "layer1.0.conv2.weight": (64, 64, 3, 3), "layer2.0.conv1.weight": (256, 128, 3, 3),
              "fc.weight": (10, 512)}
    assert list(bsrnet_initial("resnet18", resnet, 0.1).values()) == [0.6, 0.2, 0.2, 0.05, 0.6]
    wrn = {"conv1.weight": (16, 3, 3, 3), "block1.0.conv1.weight": (64, 16, 3, 3),
           "block2.0.conv1.weight": (128, 64, 3, 3), "fc.weight": (10, 256)}
    assert list(bsrnet_initial("wrn28_4", wrn, 0.1).values()) == [0.6, 0.1, 0.05, 0.6]


def test_bsrnet_holds_its_budget_where_the_hand_set_layers_hold_most_weights(mnist):
    """tiny_cnn's first and last layer, at 0.6, would start it at density 0.43 when 0.1 is asked for."""
    model, opt, masker, images, labels = _setup("bsrnet", mnist, density=0.1, optimizer="sgdw")
    total = sum(m.numel() for m in masker.masks.values())
    assert masker.engine.budget == int(0.1 * total)
    assert masker.engine.budget - 3 <= sum(masker.active_counts().values()) <= masker.engine.budget  # int() per layer
    densities = {name: int(mask.sum()) / mask.numel() for name, mask in masker.masks.items()}
    first, middle, last = densities.values()  # the paper's proportions, scaled down together
    assert first == pytest.approx(last, abs=0.02) and middle == pytest.approx(last * 0.05 / 0.6, abs=0.005)
    for step in range(5):
        batch = slice(step * 64, (step + 1) * 64)
        opt.zero_grad()
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        opt.step()
        assert masker.global_density() == pytest.approx(0.1, abs=1e-3)


# ---- allocation -----------------------------------------------------------------------------------------


def test_erk_meets_the_budget_and_caps_at_dense():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc": (10, 512)}
    total = sum(math.prod(s) for s in shapes.values())
    densities = allocation.erk(shapes, 0.3)
    assert sum(densities[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.3 * total)
    # ERK density is proportional to (sum of dims) / (product of dims): highest for the FC layer here
    assert densities["fc"] > densities["conv1"] > densities["conv2"]
    densities = allocation.erk(shapes, 0.6)
    assert densities["fc"] == 1.0  # would exceed 1, so it is made dense and the rest re-solved
    assert sum(densities[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.6 * total)
    assert all(0 < d <= 1 for d in densities.values())
    uniform = allocation.uniform(shapes, 0.3)
    assert len(set(uniform.values())) == 1


def test_sgdw_matches_hand_computation():
    param, grad, velocity = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.0])
    sgdw([param], [grad], [velocity], lr=0.1, momentum=0.9, decay=0.01)
    torch.testing.assert_close(velocity, torch.tensor([0.9 * 0.1 - 0.05, -0.05]))
    torch.testing.assert_close(param, torch.tensor([0.99 + 0.04, -1.98 - 0.05]))


# ---- runs, resume, export ------------------------------------------------------------------------------


RESUMED = {
    "bsrnet": ["sparsity.update_every=4", "optim.epochs=3"],
    "rigl": ["sparsity.update_every=4", "optim.epochs=3"],
    # GSE rewires every step on a smaller split (3 steps per epoch), so its sampling generators are exercised
    "gse": ["sparsity.update_every=1", "optim.epochs=2", "data.train_limit=192", "data.val_size=64",
            "val.max_examples=64"],
}


@pytest.mark.parametrize("method", sorted(RESUMED))
def test_resumed_sparse_run_matches_uninterrupted(method, tiny_config, tmp_path):
    from test_train import _train_one_epoch_then_stop

    common = [f"sparsity.method={method}", "sparsity.density=0.2", "eval.n_examples=0", *RESUMED[method]]
    uninterrupted = fit(tiny_config(*common, f"out_dir={tmp_path / 'a'}"))
    killed = tiny_config(*common, f"out_dir={tmp_path / 'b'}")
    _train_one_epoch_then_stop(killed)
    resumed = fit(killed, resume=True)
    a = load_checkpoint(uninterrupted.run_dir / "last.pt")
    b = load_checkpoint(resumed.run_dir / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["sparsity"]["masks"]:
        assert torch.equal(a["sparsity"]["masks"][key], b["sparsity"]["masks"][key])
        assert torch.equal(a["sparsity"]["ever_active"][key], b["sparsity"]["ever_active"][key])
    assert a["sparsity"]["step"] == b["sparsity"]["step"]
    if "generator" in a["sparsity"]["engine"]:
        assert torch.equal(a["sparsity"]["engine"]["generator"], b["sparsity"]["engine"]["generator"])
    assert list(resumed.metrics["density"]) == list(uninterrupted.metrics["density"])


def test_sparse_run_reports_density_and_exports_exactly(tiny_config, tmp_path):
    # ERK initial densities: BSR-Net's hand-set ones (first and last layer at 0.6) are scaled down on tiny_cnn.
    result = fit(tiny_config("sparsity.method=bsrnet", "sparsity.density=0.1", "sparsity.distribution=erk",
                             "optim.optimizer=sgdw"))
    assert result.metrics["density"].tolist() == pytest.approx([0.1] * 2, abs=1e-3)
    assert (result.metrics["exploration_rate"] >= result.metrics["density"]).all()
    layer_rows = (result.run_dir / "layer_density.csv").read_text().strip().splitlines()
    assert len(layer_rows) == 1 + 2 * 3  # header + 2 epochs x 3 layers of tiny_cnn

    checkpoint = load_checkpoint(result.run_dir / "best.pt")
    masks = checkpoint["sparsity"]["masks"]
    expected_density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert main(["export", str(result.run_dir / "best.pt"), "--out", str(tmp_path / "export")]) == 0
    summary = json.loads((tmp_path / "export" / "export.json").read_text())
    assert summary["density"] == expected_density

    model = make_tiny_model(seed=123)  # the ordinary model class, fresh weights
    model.load_state_dict(torch.load(tmp_path / "export" / "model_dense.pt", weights_only=True))
    training_model = make_tiny_model()
    training_model.load_state_dict(checkpoint["model"])
    images = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(model.eval()(images), training_model.eval()(images), rtol=0, atol=0)
    compact = load_compact(tmp_path / "export" / "model_sparse.pt")
    assert all(torch.equal(compact[k], checkpoint["model"][k]) for k in checkpoint["model"])
    for name, mask in masks.items():
        assert int(compact[name].count_nonzero()) <= int(mask.sum())

    # the export carries its protocol, so evaluating the exported weights needs neither --dataset nor --eps
    config = checkpoint["config"]
    assert summary["protocol"] == {
        "architecture": "tiny_cnn", "dataset": "mnist5k", "num_classes": 10, "in_channels": 1, "image_size": 28,
        "norm": config["attack"]["norm"], "eps": config["attack"]["eps"], "objective": config["objective"]}
    output = tmp_path / "exported_eval.json"
    assert main(["eval", "--arch", "tiny_cnn", "--weights", str(tmp_path / "export" / "model_dense.pt"),
                 "--n-examples", "32", "--attacks", "pgd-2x1", "--no-probe", "--results-dir", str(tmp_path / "ev"),
                 "--output", str(output)]) == 0
    row = json.loads(output.read_text())
    assert row["dataset"] == "mnist5k" and row["eps"] == pytest.approx(config["attack"]["eps"])


def test_magnitude_prune_keeps_largest_weights_and_fine_tunes(tiny_config, tmp_path):
    dense = fit(tiny_config("optim.epochs=1", "eval.n_examples=0", f"out_dir={tmp_path / 'dense'}"))
    dense_weights = load_checkpoint(dense.run_dir / "last.pt")["model"]
    pruned = fit(tiny_config("optim.epochs=1", "eval.n_examples=0", "sparsity.method=magnitude_prune",
                             "sparsity.density=0.3", f"sparsity.dense_checkpoint={dense.run_dir / 'last.pt'}",
                             f"out_dir={tmp_path / 'pruned'}"))
    state = load_checkpoint(pruned.run_dir / "last.pt")
    masks = state["sparsity"]["masks"]
    scores = torch.cat([dense_weights[n].abs().flatten() for n in masks])
    threshold = torch.topk(scores, round(0.3 * scores.numel())).values.min()
    for name, mask in masks.items():
        assert torch.all(dense_weights[name][mask].abs() >= threshold)
        assert torch.all(state["model"][name][~mask] == 0)
    assert pruned.metrics["density"].iloc[-1] == pytest.approx(0.3, abs=1e-3)


# ---- bad settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,field", [
    ("sparsity.density=0", "sparsity.density"),
    ("sparsity.density=1.5", "sparsity.density"),
    ("sparsity.method=lottery", "sparsity.method"),
    ("sparsity.update_every=0", "sparsity.update_every"),
    ("sparsity.prune_rate=1.0", "sparsity.prune_rate"),
    ("sparsity.growth=magic", "sparsity.growth"),
    ("sparsity.end_fraction=0", "sparsity.end_fraction"),
    ("sparsity.dense_checkpoint=/nonexistent.pt", "sparsity.magnitude_prune.dense_checkpoint"),  # old name, new field
])
def test_bad_sparsity_settings_give_one_line_errors(override, field, capsys, tmp_path):
    method = [] if "method=" in override else ["--set", "sparsity.method=" +
                                              ("magnitude_prune" if "dense_checkpoint" in override else "rigl")]
    assert main(["train", *method, "--set", override, "--out", str(tmp_path / "r")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and field in error[0]


def test_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().startswith("robust-sparse: error: checkpoint not found")


def test_model_without_sparsifiable_layers_is_an_error():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4))
    config = load_config(None, ["sparsity.method=set"])
    with pytest.raises(ConfigError, match="no sparsifiable"):
        build_sparsity(config.sparsity, model, "bn_only", torch.optim.SGD(model.parameters(), lr=0.1), 10, 0)
