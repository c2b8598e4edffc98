"""A config's dataset as train/validation/test splits, through its record (:mod:`robust_sparse.datasets`).

In-memory datasets come back as :class:`~robust_sparse.datasets.images.ImageSet`; ImageNet and other ImageFolder
trees do not fit in memory and are streamed from their files (:mod:`robust_sparse.datasets.folders`).
:func:`batch_loader` and :func:`in_memory` serve both kinds alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from robust_sparse.datasets import DATASETS, Dataset
from robust_sparse.datasets.registry import EVAL_DOWNLOAD_HINT, TRAIN_DOWNLOAD_HINT  # noqa: F401 (eval's import)
from robust_sparse.datasets.folders import FolderLoader, FolderSet
from robust_sparse.datasets.folders import in_memory as read_folder
from robust_sparse.datasets.images import BatchLoader, ImageSet
from robust_sparse.errors import ConfigError, UserError

if TYPE_CHECKING:
    from robust_sparse.datasets.registry import DataSettings


@dataclass
class Splits:
    """In memory (``ImageSet``), or file names streamed from disk (``FolderSet``) for ImageNet-sized data."""

    train: ImageSet | FolderSet
    val: ImageSet | FolderSet  # held out from the training split, for model selection
    test: ImageSet | FolderSet
    info: Dataset


def dataset_info(config: "DataSettings") -> Dataset:
    """The record of ``config``'s dataset, a streamed one's with the config's class count and crop size."""
    return DATASETS.get(config.dataset).resolved(config)


def load_raw(config: "DataSettings", need_train: bool = True,
             download_hint: str = TRAIN_DOWNLOAD_HINT) -> tuple[ImageSet | FolderSet | None, ImageSet | FolderSet]:
    """The training split (None without ``need_train``) and the test split, by the dataset's loader.
    ``download_hint`` ends the missing-dataset error: eval passes :data:`EVAL_DOWNLOAD_HINT`."""
    return DATASETS.get(config.dataset).load(config, need_train, download_hint)


def check_data_root(config: "DataSettings") -> None:
    """Training's data directory exists, or may be downloaded into: checked before any work (``fit`` and
    ``sweep`` run it first), not when the config is read, so that a checkpoint's config still loads where its
    data directory does not exist (evaluation reads the test split from its own ``--data-root``)."""
    record = DATASETS.get(config.dataset)
    if record.check_root is not None:  # the dataset's own rule (an embedded one has none to check)
        record.check_root(config)
        return
    if config.download and not record.downloadable:
        raise ConfigError(f"data.download: {record.name} cannot be downloaded; put a local copy under data.root")
    if not config.download and not Path(config.root).is_dir():
        raise ConfigError(f"data.root: directory {config.root!r} does not exist; put a local copy of "
                          f"{record.name} there{' or set data.download=true' if record.downloadable else ''}")


def load_splits(config: "DataSettings", seed: int) -> Splits:
    """Train/validation/test splits. The validation split is a seeded random subset of the training set, drawn
    with ``config.split_seed`` when set, else with the run's ``seed``."""
    train, test = load_raw(config)
    assert train is not None
    if config.val_size >= len(train):
        raise UserError(f"data.val_size = {config.val_size}: must be smaller than the training set ({len(train)})")
    split_seed = seed if config.split_seed is None else config.split_seed
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
    val = train.take(order[: config.val_size])
    train = train.take(order[config.val_size:])
    if config.train_limit:
        train = train.take(slice(0, config.train_limit))
    return Splits(train=train, val=val, test=test, info=dataset_info(config))


def in_memory(data: ImageSet | FolderSet, workers: int = 0) -> ImageSet:
    """``data`` as an in-memory ImageSet: itself, or a streamed subset read through the test preprocessing."""
    if isinstance(data, ImageSet):
        return data
    return read_folder(data, workers)


def batch_loader(data: ImageSet | FolderSet, batch_size: int, device: torch.device, *, workers: int = 0,
                 **options):
    """A :class:`BatchLoader` over an in-memory set, a DataLoader-backed ``FolderLoader`` with ``workers``
    processes over a streamed one; ``options`` are BatchLoader's."""
    if isinstance(data, ImageSet):
        return BatchLoader(data, batch_size, device, **options)
    return FolderLoader(data, batch_size, device, workers=workers, **options)
