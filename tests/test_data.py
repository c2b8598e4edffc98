"""Data: the embedded set, splits, deterministic batching and augmentation, local CIFAR copies."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from robust_sparse.config import DataConfig, load_config
from robust_sparse.datasets import DATASETS
from robust_sparse.datasets.images import BatchLoader, augment
from robust_sparse.datasets.cifar10 import load_cifar
from robust_sparse.datasets.splits import load_splits
from robust_sparse.errors import UserError


def test_mnist5k_is_real_balanced_and_disjoint(mnist):
    train, test = mnist
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.bincount(test.labels[:100], minlength=10).min() >= 3  # shuffled: the first n are mixed
    train_rows = {bytes(row) for row in train.images.flatten(1).numpy()}
    assert not any(bytes(row) in train_rows for row in test.images.flatten(1).numpy())
    assert train.images.float().mean() / 255 == pytest.approx(0.13, abs=0.02)  # MNIST's mean intensity


def test_validation_split_is_held_out_and_seeded():
    config = DataConfig(val_size=300, train_limit=1000)
    a, b, c = load_splits(config, seed=0), load_splits(config, seed=0), load_splits(config, seed=1)
    assert len(a.val) == 300 and len(a.train) == 1000
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    val_rows = {bytes(row) for row in a.val.images.flatten(1).numpy()}
    assert not any(bytes(row) in val_rows for row in a.train.images.flatten(1).numpy())


def test_val_size_larger_than_train_is_an_error():
    with pytest.raises(UserError, match="data.val_size"):
        load_splits(DataConfig(val_size=4000), seed=0)


def test_loader_order_depends_only_on_seed_and_epoch(mnist):
    train, _ = mnist
    subset = train.take(slice(0, 300))
    info = DATASETS.get("mnist5k")

    def epoch_batches(seed, epoch):
        loader = BatchLoader(subset, 64, torch.device("cpu"), shuffle=True, seed=seed, info=info, augment_batches=True)
        loader.set_epoch(epoch)
        return list(loader)

    first, again, other_epoch = epoch_batches(0, 1), epoch_batches(0, 1), epoch_batches(0, 2)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again))
    assert not torch.equal(first[0][0], other_epoch[0][0])
    images, labels = first[0]
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    assert sum(len(y) for _, y in first) == 300  # the last, partial batch is kept without drop_last


def test_augment_crops_by_shifting_and_flips():
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    out = augment(images, padding=0, hflip=True, generator=generator)
    for original, result in zip(images, out):
        assert torch.equal(result, original) or torch.equal(result, original.flip(-1))
    shifted = augment(images, padding=2, hflip=False, generator=torch.Generator().manual_seed(1))
    assert shifted.shape == images.shape
    for original, result in zip(images, shifted):  # every crop is a window of the zero-padded image
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        windows = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(result, w) for w in windows)


def test_svhn_and_mnist_are_never_flipped():
    assert not DATASETS.get("svhn").hflip and not DATASETS.get("mnist5k").hflip
    assert DATASETS.get("cifar10").hflip and DATASETS.get("cifar10").crop_padding == 4


def _write_cifar_copy(root, images, labels, test_only=False):
    """Real digits (padded to 32x32, 3 channels) written in torchvision's cifar-10-batches-py layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rgb = torch.nn.functional.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1).numpy().reshape(len(images), -1)
    names = ["test_batch"] if test_only else ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    for name in names:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rgb, b"labels": labels.tolist()}, handle)


def test_local_cifar_copy_is_read_in_standard_layout(tmp_path, mnist):
    _, test = mnist
    _write_cifar_copy(tmp_path, test.images[:20], test.labels[:20])
    train, test_set = load_cifar("cifar10", tmp_path, download=False)
    assert train.images.shape == (100, 3, 32, 32) and test_set.images.shape == (20, 3, 32, 32)
    assert torch.equal(test_set.labels, test.labels[:20])
    config = load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}", "data.val_size=10"])
    splits = load_splits(config.data, seed=0)
    assert splits.info.num_classes == 10 and len(splits.train) == 90


def test_test_only_cifar_copy_serves_evaluation_but_not_training(tmp_path, mnist):
    _, test = mnist
    _write_cifar_copy(tmp_path, test.images[:10], test.labels[:10], test_only=True)
    train, test_set = load_cifar("cifar10", tmp_path, download=False, need_train=False)
    assert train is None and len(test_set) == 10
    with pytest.raises(UserError, match="data_batch_1"):
        load_cifar("cifar10", tmp_path, download=False)


def test_missing_cifar_gives_clear_error(tmp_path):
    with pytest.raises(UserError, match="data.download=true"):
        load_cifar("cifar100", tmp_path, download=False)


def test_corrupted_cifar_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted"):
        load_cifar("cifar10", tmp_path, download=False, need_train=False)


def test_split_seed_holds_the_validation_split_fixed_across_run_seeds():
    """data.split_seed draws the split; unset, the run's seed does, as before the field (stored runs resume)."""
    fixed = DataConfig(val_size=200, train_limit=400, split_seed=7)
    a, b = load_splits(fixed, seed=0), load_splits(fixed, seed=1)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.train.images, b.train.images)
    legacy = DataConfig(val_size=200, train_limit=400)
    assert torch.equal(load_splits(legacy, seed=7).val.images, a.val.images)  # split_seed 7 = seed 7's split
    assert not torch.equal(load_splits(legacy, seed=0).val.images, a.val.images)
