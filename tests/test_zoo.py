"""RobustBench both ways: ``robust-sparse export --robustbench`` into the zoo layout, ``register`` +
``robustbench.utils.load_model`` giving identical logits, and ``robustbench.eval.benchmark`` itself on the real
CIFAR-10 prefix agreeing with ``robust-sparse eval`` (skipped without the prefix)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from robust_sparse.checkpoint import save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import DatasetName, load_config, to_dict
from robust_sparse.data import DATASETS
from robust_sparse.eval import zoo
from robust_sparse.eval.store import append_result, load_results
from robust_sparse.models import build_model

# the project's shared data beside the checkout (or inside it, as on a device machine)
CIFAR_PREFIX = next((root / "shared" / "data" / "cifar10-prefix" for root in Path(__file__).resolve().parents[1:3]
                     if (root / "shared" / "data" / "cifar10-prefix").is_dir()),
                    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-prefix")
needs_cifar_prefix = pytest.mark.skipif(
    not (CIFAR_PREFIX / "cifar-10-batches-py" / "test_batch").is_file(),
    reason=f"the real CIFAR-10 prefix is not at {CIFAR_PREFIX}")


def _cifar_tiny(seed: int = 0, zero_fraction: float = 0.5) -> torch.nn.Module:
    info = DATASETS[DatasetName.CIFAR10]
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", 10, 3, info.mean, info.std)
    with torch.no_grad():  # a sparse model: half of every conv/linear weight is exactly zero
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight[torch.rand_like(module.weight) < zero_fraction] = 0
    return model.eval()


@pytest.fixture(scope="module")
def run(mnist, tmp_path_factory):
    """A CIFAR-10 checkpoint of tiny_cnn and a CIFAR-10 test batch of real MNIST digits padded to 3x32x32."""
    _, test = mnist
    base = tmp_path_factory.mktemp("zoo_run")
    (base / "data" / "cifar-10-batches-py").mkdir(parents=True)
    images = torch.nn.functional.pad(test.images[:40], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    with open(base / "data" / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": images.reshape(40, -1).numpy(), b"labels": test.labels[:40].tolist()}, handle)
    config = load_config(None, ["model.name=tiny_cnn", "data.dataset=cifar10", f"data.root={base / 'data'}",
                                "attack.eps=0.03137254901960784", "sparsity.method=rigl", "sparsity.density=0.5"])
    model = _cifar_tiny()
    checkpoint = base / "run" / "best.pt"
    checkpoint.parent.mkdir()
    save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "epoch": 3}, checkpoint)
    return checkpoint, model


def test_export_register_load_model_identical_logits(run, tmp_path, capsys):
    checkpoint, model = run
    assert main(["eval", str(checkpoint), "--attacks", "fgsm", "--no-probe", "--n-examples", "40", "--device", "cpu",
                 "--no-progress"]) == 0
    stored = load_results(checkpoint.parent / "eval").iloc[-1].to_dict()
    # an AutoAttack row of the same weights, on more points (AutoAttack itself is run by the benchmark test)
    append_result(checkpoint.parent / "eval", {**stored, "n_examples": 1000, "attacks": "autoattack",
                                               "autoattack_acc": 0.125, "clean_acc": 0.5})
    append_result(checkpoint.parent / "eval", {**stored, "n_examples": 5000, "autoattack_acc": 0.9,
                                               "model_fingerprint": "other weights"})
    out = tmp_path / "models"
    code = main(["export", str(checkpoint), "--out", str(out), "--robustbench", "Mine2026Sparse"])
    assert code == 0, capsys.readouterr().err
    weights, info_path = out / "cifar10" / "Linf" / "Mine2026Sparse.pt", out / "cifar10" / "Linf" / "Mine2026Sparse.json"
    state = torch.load(weights, weights_only=True)
    assert not any(k.startswith("module.") for k in state) and set(state) == set(model.state_dict())

    info = json.loads(info_path.read_text())
    for field in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                  "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"):
        assert field in info  # RobustBench's leaderboard entry fields
    assert (info["dataset"], info["eps"], info["architecture"]) == ("cifar10", "8/255", "tiny_cnn")
    assert (info["clean_acc"], info["autoattack_acc"]) == ("50.00", "12.50")  # the AutoAttack row of these weights
    extra = info["robust_sparse"]
    assert extra["training_method"] == "rigl" and extra["objective"] == "pgd_at"
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert extra["sparsity"] == pytest.approx(zeros / total)
    assert extra["commands"][0].startswith("robust-sparse train") and "--robustbench Mine2026Sparse" in extra["commands"][-1]
    assert "--attacks autoattack" in extra["commands"][1] and "--n-examples 1000" in extra["commands"][1]

    from robustbench.utils import load_model

    with pytest.raises(KeyError):  # what a user hit before: robustbench knows only its own names
        load_model("Mine2026Sparse", model_dir=str(out), dataset="cifar10", threat_model="Linf")
    zoo.register("Mine2026Sparse", out, "cifar10", "Linf")
    loaded = load_model("Mine2026Sparse", model_dir=str(out), dataset="cifar10", threat_model="Linf")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_register_errors(tmp_path):
    with pytest.raises(Exception, match=r"Nope.pt not found .*--robustbench Nope"):
        zoo.register("Nope", tmp_path, "cifar10", "Linf")
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / "Standard.pt").write_bytes(b"")
    (folder / "Standard.json").write_text(json.dumps({"robust_sparse": {"dataset": "cifar10", "architecture": "tiny_cnn",
                                                                        "num_classes": 10}}))
    with pytest.raises(Exception, match="RobustBench's own zoo"):
        zoo.register("Standard", tmp_path, "cifar10", "Linf")
    with pytest.raises(Exception, match="dataset 'mnist'"):
        zoo.register("Standard", tmp_path, "mnist", "Linf")


def test_export_refuses_bad_names_and_datasets(run, mnist, tmp_path, capsys):
    checkpoint, _ = run
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "o"), "--robustbench", "a/b"]) == 2
    assert "a zoo name is letters" in capsys.readouterr().err
    config = load_config(None, ["model.name=tiny_cnn"])  # MNIST-5k: not a RobustBench data set
    mnist_checkpoint = tmp_path / "m" / "best.pt"
    mnist_checkpoint.parent.mkdir()
    info = DATASETS[DatasetName.MNIST5K]
    save_checkpoint({"config": to_dict(config), "epoch": 1,
                     "model": build_model("tiny_cnn", 10, 1, info.mean, info.std).state_dict()}, mnist_checkpoint)
    assert main(["export", str(mnist_checkpoint), "--out", str(tmp_path / "o"), "--robustbench", "X"]) == 2
    assert "trained on mnist5k" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert zoo.eps_text(8 / 255) == "8/255" and zoo.eps_text(0.5) == "0.5"


@pytest.fixture(scope="module")
def prefix_model():
    """tiny_cnn trained for one epoch on the prefix's 4660 training images: above chance, far from robust."""
    from robust_sparse.config import DataConfig
    from robust_sparse.data import load_raw

    train, test = load_raw(DataConfig(dataset=DatasetName.CIFAR10, root=str(CIFAR_PREFIX)))
    model = _cifar_tiny(zero_fraction=0.0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = train.images.float() / 255
    for start in range(0, len(images), 64):
        loss = torch.nn.functional.cross_entropy(model(images[start:start + 64]), train.labels[start:start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), test


def _eval_points(model, tmp_path, attacks, n, eps="8/255"):
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    output = tmp_path / "row.json"
    code = main(["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "cifar10", "--data-root",
                 str(CIFAR_PREFIX), "--n-examples", str(n), "--attacks", attacks, "--eps", eps, "--no-probe", "--batch-size",
                 str(n), "--seed", "0", "--results-dir", str(tmp_path / "r"), "--output", str(output),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    return json.loads(output.read_text())


class _StopBeforeAutoAttack(Exception):
    pass


@needs_cifar_prefix
def test_benchmark_clean_accuracy_on_the_prefix(prefix_model, tmp_path, capsys):
    """benchmark() itself on 100 local prefix points prints robust-sparse eval's clean accuracy (stopped before
    its AutoAttack, which the next test runs on fewer points)."""
    import robustbench.eval as rb_eval

    model, test = prefix_model
    n = 100
    images, labels = test.images[:n].float() / 255, test.labels[:n]
    row = _eval_points(model, tmp_path, "fgsm", n)
    capsys.readouterr()
    calls = []

    def no_autoattack(*args, **options):
        calls.append(options)
        raise _StopBeforeAutoAttack

    with zoo.local_points(images, labels, "cifar10"):
        seeded = rb_eval.AutoAttack
        rb_eval.AutoAttack = no_autoattack
        try:
            with pytest.raises(_StopBeforeAutoAttack):
                rb_eval.benchmark(model, n_examples=n, dataset="cifar10", threat_model="Linf", eps=8 / 255,
                                  batch_size=n)
        finally:
            rb_eval.AutoAttack = seeded
    printed = capsys.readouterr().out
    assert f"Clean accuracy: {round(row['clean_acc'] * n) / n:.2%}" in printed  # benchmark()'s own line
    assert calls[0]["eps"] == pytest.approx(8 / 255) and calls[0]["version"] == "standard"
    assert 0.15 < row["clean_acc"] < 1  # trained: above chance


@needs_cifar_prefix
@pytest.mark.parametrize("eps_text, survivors", [
    ("8/255", False),  # seconds: APGD-CE breaks every point
    pytest.param("1/255", True, marks=pytest.mark.slow),  # ~6 min on 2 CPU cores: Square runs on the survivors
])
def test_benchmark_autoattack_equals_robust_sparse_eval(prefix_model, tmp_path, eps_text, survivors):
    """robustbench.eval.benchmark itself (AutoAttack standard) on 24 prefix points = robust-sparse eval."""
    model, test = prefix_model
    n = 24
    images, labels = test.images[:n].float() / 255, test.labels[:n]
    row = _eval_points(model, tmp_path, "autoattack", n, eps=eps_text)
    eps = int(eps_text.split("/")[0]) / 255
    clean, robust = zoo.benchmark_on_points(model, images, labels, dataset="cifar10", threat_model="Linf",
                                            eps=eps, batch_size=n, seed=0)
    assert round(clean * n) == round(row["clean_acc"] * n) > 0
    assert round(robust * n) == round(row["autoattack_acc"] * n)
    assert (0 < robust < clean) if survivors else robust < clean
    # the loader is restored: outside the block benchmark() would read torchvision's test set again
    import robustbench.data as rb_data
    from robustbench.model_zoo.enums import BenchmarkDataset

    assert rb_data._clean_dataset_loaders[BenchmarkDataset.cifar_10] is rb_data.load_cifar10
