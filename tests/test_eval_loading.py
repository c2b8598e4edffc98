"""Model sources (robust-sparse checkpoints, RobustBench zoo from a local model dir, plain state_dicts), the
RobustBench protocol's test points, and what we measure about a model (sparsity, fingerprints)."""

from __future__ import annotations

import pytest
import torch

from robust_sparse.files.checkpoint import save_checkpoint
from robust_sparse.config import load_config, to_dict
from robust_sparse.errors import UserError
from robust_sparse.eval import points, sources

from conftest import make_tiny_model


def cifar_shaped(mnist, n):
    """Real MNIST-5k test digits, zero-padded to 32x32 and repeated over 3 channels (CIFAR-shaped, not noise)."""
    _, test = mnist
    images = torch.nn.functional.pad(test.images[:n], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return images.float() / 255, test.labels[:n]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """A model directory in the zoo's layout holding the 'Standard' WRN-28-10 as RobustBench stores it
    (``{'state_dict': {'module.' + key: tensor}}``); the weights are a seeded initialisation, not the real ones."""
    from robust_sparse.environment.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    model = WideResNet(depth=28, widen_factor=10)
    directory = tmp_path_factory.mktemp("zoo")
    (directory / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               directory / "cifar10" / "Linf" / "Standard.pt")
    return directory, model.eval()


def test_robustbench_model_from_a_local_checkpoint_in_the_zoo_format(zoo_dir, mnist):
    directory, reference = zoo_dir
    loaded = sources.from_robustbench("Standard", "cifar10", "linf", directory)
    assert loaded.source == "robustbench" and loaded.name == "Standard" and not loaded.model.training
    images, _ = cifar_shaped(mnist, 2)
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), reference(images), atol=1e-5)
    assert sources.sparsity_stats(loaded.model)["params"] == 36_479_194  # WRN-28-10


def test_robustbench_missing_weights_without_network_is_one_clear_line(zoo_dir, monkeypatch, tmp_path):
    import requests
    import robustbench.utils

    def offline(gdrive_id, path):
        open(path, "wb").write(b"partial")  # what an interrupted download leaves behind
        raise requests.exceptions.ConnectionError(
            "HTTPSConnectionPool(host='drive.google.com', port=443): Max retries exceeded with url: /uc")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    with pytest.raises(UserError) as error:
        sources.from_robustbench("Wong2020Fast", "cifar10", "linf", tmp_path)
    message = str(error.value)
    assert "\n" not in message and "weights not found at" in message and "Wong2020Fast.pt" in message
    assert "cannot reach drive.google.com" in message
    assert not (tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt").exists()  # the partial file is gone


@pytest.mark.parametrize("name, dataset, threat, message", [
    ("Wong2020Fst", "cifar10", "linf", "did you mean Wong2020Fast"),
    ("Standard", "mnist5k", "linf", "zoo is supported for cifar10, cifar100"),
])
def test_robustbench_bad_names(name, dataset, threat, message, tmp_path):
    with pytest.raises(UserError, match=message):
        sources.from_robustbench(name, dataset, threat, tmp_path)


def test_plain_state_dict_for_a_registry_architecture(trained_tiny, tmp_path, mnist):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained_tiny.state_dict().items()}}, path)
    loaded = sources.from_weights("tiny_cnn", path, "mnist5k")
    _, test = mnist
    images = test.images[:4].float() / 255
    with torch.no_grad():
        assert torch.equal(loaded.model(images), trained_tiny(images))
    assert loaded.name == "tiny_cnn:weights" and loaded.source == "weights"
    with pytest.raises(UserError, match="weights do not fit small_cnn"):
        sources.from_weights("small_cnn", path, "mnist5k")
    with pytest.raises(UserError, match="unknown model 'tiny'"):
        sources.from_weights("tiny", path, "mnist5k")
    with pytest.raises(UserError, match="weights file not found"):
        sources.from_weights("tiny_cnn", tmp_path / "missing.pt", "mnist5k")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupted or not loadable safely"):
        sources.from_weights("tiny_cnn", tmp_path / "junk.pt", "mnist5k")


def test_robust_sparse_checkpoint_carries_its_protocol(trained_tiny, tmp_path):
    config = load_config(None, ["model.name=tiny_cnn", "attack.eps=0.2", "eval.restarts=3"])
    path = tmp_path / "run" / "best.pt"
    save_checkpoint({"config": to_dict(config), "model": trained_tiny.state_dict(), "epoch": 4}, path)
    loaded = sources.from_checkpoint(path)
    assert (loaded.name, loaded.architecture, loaded.dataset, loaded.norm) == ("run/best", "tiny_cnn", "mnist5k", "linf")
    assert (loaded.eps, loaded.n_examples, loaded.pgd_steps, loaded.restarts, loaded.epoch) == (0.2, 1000, 20, 3, 4)


def test_first_n_test_points_in_order(mnist, tmp_path):
    _, test = mnist
    images, labels = points.load_points("mnist5k", None)
    assert len(labels) == len(test) == 1000  # min(10000, size of the test set)
    assert torch.equal(labels, test.labels) and images.dtype == torch.float32 and images.max() <= 1
    images, labels = points.load_points("mnist5k", 7)
    assert torch.equal(images, test.images[:7].float() / 255)
    with pytest.raises(UserError, match="--n-examples 5000: the test set has only 1000 points"):
        points.load_points("mnist5k", 5000)
    with pytest.raises(UserError, match="must be >= 1"):
        points.load_points("mnist5k", 0)


def test_data_file(mnist, tmp_path):
    _, test = mnist
    path = tmp_path / "points.pt"
    torch.save({"images": test.images[:5], "labels": test.labels[:5]}, path)  # uint8 is scaled
    images, _ = points.load_points("mnist5k", None, data_file=path)
    assert torch.equal(images, test.images[:5].float() / 255)
    torch.save({"images": test.images[:5].float(), "labels": test.labels[:5]}, path)  # 0-255 floats: wrong range
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        points.load_points("mnist5k", None, data_file=path)
    torch.save({"pixels": test.images[:5]}, path)
    with pytest.raises(UserError, match="must hold a dict with 'images'"):
        points.load_points("mnist5k", None, data_file=path)


def test_sparsity_and_fingerprints():
    model = make_tiny_model()
    stats = sources.sparsity_stats(model)
    assert stats["sparsity"] == 0.0 and stats["params"] >= stats["nonzero_params"] > stats["prunable_params"] > 0
    nonzero, before = stats["nonzero_params"], sources.model_fingerprint(model)
    with torch.no_grad():
        conv = model.features[0].weight
        conv.view(-1)[: conv.numel() // 2] = 0
    stats = sources.sparsity_stats(model)
    assert stats["sparsity"] == pytest.approx((conv.numel() // 2) / stats["prunable_params"])
    assert stats["nonzero_params"] == nonzero - conv.numel() // 2
    assert sources.model_fingerprint(model) != before
    images, labels = torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    assert points.data_fingerprint(images, labels) == points.data_fingerprint(images.clone(), labels.clone())


@pytest.mark.parametrize("text, expected", [("Linf", "linf"), ("l2", "l2"), ("L2", "l2")])
def test_threat_model_names(text, expected):
    assert points.parse_threat(text) == expected


def test_bad_threat_model_and_dataset_names():
    with pytest.raises(UserError, match="choose Linf or L2"):
        points.parse_threat("L1")
    with pytest.raises(UserError, match="unknown dataset 'tinyimagenet'"):
        points.parse_dataset("tinyimagenet")
    assert points.parse_dataset("ImageNet") == "imagenet"
    with pytest.raises(UserError, match="--dataset imagefolder: evaluate a CHECKPOINT"):
        points.parse_dataset("imagefolder")
