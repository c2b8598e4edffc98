"""The dataset record and its registry: what a dataset is to every part of the toolkit, said once.

A :class:`Dataset` holds a dataset's name, its classes and input shape, the normalisation the models apply
(inside their own ``Normalize`` layer, never in the data pipeline), its augmentation, its loader, its evaluation
protocol per threat model (:class:`Protocol`: the radius and the number of test points), its common-corruptions
set (:class:`CorruptionSet`) and its name in RobustBench. Training, ``robust-sparse eval``, the corruptions track
and the leaderboard read these records instead of tables of their own, so a new dataset is one file in this
package that registers its record (see ``fashion_mnist.py``).

This module imports neither torch nor the config: the config checks ``data.dataset`` and takes its default radius
here, so the arrow goes from the config to the datasets only (tests/test_layering.py). A loader therefore gets the
config's data section as :class:`DataSettings`, the fields it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Mapping, Protocol as TypingProtocol

from robust_sparse.registry import Registry


class DataSettings(TypingProtocol):
    """The fields of the config's data section (``robust_sparse.config.DataConfig``) a loader reads."""

    dataset: str
    root: str
    download: bool
    num_classes: int
    image_size: int
    test_list: str | None
    workers: int


#: How to get a missing dataset, in the words of the caller: a config field for train, flags for eval.
TRAIN_DOWNLOAD_HINT = "set data.download=true to fetch it"
EVAL_DOWNLOAD_HINT = "pass --download to fetch it, or --data-root DIR for a local copy"

#: ``load(settings, need_train, download_hint) -> (train or None, test)``, each split an ``ImageSet`` (in memory,
#: datasets/images.py) or a ``FolderSet`` (streamed, datasets/folders.py), which this module does not import (they
#: import it); ``download_hint`` ends the error for a missing copy in the caller's words (a config field for
#: train, flags for eval).
Loader = Callable[[DataSettings, bool, str], "tuple[Any, Any]"]


@dataclass(frozen=True)
class Protocol:
    """How a dataset is evaluated under one threat model: the radius (pixel units, inputs in [0, 1]), which is
    also a training config's ``attack.eps`` when it sets none, and the number of test points (the first ``n``
    of the test split, in order)."""

    eps: float
    n_examples: int


class CorruptionLayout(str, Enum):
    """How a common-corruptions set is stored (robustbench's loaders read the same layouts)."""

    NPY = "npy"  # <folder>/<corruption>.npy, uint8 [5 * n, H, W, 3], severity s in rows (s - 1) * n on
    IMAGE_TREE = "image_tree"  # <folder>/<corruption>/<severity>/<class>/<image>, RobustBench's test list


@dataclass(frozen=True)
class CorruptionSet:
    """A dataset's common corruptions (Hendrycks & Dietterich 2019), read from ``--data-root/<folder>``."""

    folder: str  # robustbench.data.CORRUPTIONS_DIR_NAMES
    layout: CorruptionLayout
    source: str  # where to get it, for the error that says it is missing


@dataclass(frozen=True)
class Dataset:
    """One dataset, as training and evaluation see it. A streamed one (``streamed``: read from image files by a
    DataLoader, too large for memory) takes its class count and crop size from the config (:meth:`resolved`)."""

    name: str  # data.dataset
    description: str  # one line, for listings and errors
    num_classes: int  # 0: the config's data.num_classes (an ImageFolder tree of any classes)
    in_channels: int
    image_size: int  # a streamed dataset's default crop; data.image_size sets it
    mean: tuple[float, ...]  # the model's Normalize layer, never the data pipeline: inputs stay in [0, 1]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding of the training augmentation (0 = no crop)
    hflip: bool  # digits and house numbers are not mirror-symmetric: no flip for them
    load: Loader
    # threat model ("linf", "l2") -> its protocol; a config without attack.eps takes its norm's eps from here
    protocols: Mapping[str, Protocol]
    train_images: int | None = None  # the whole training split (the leaderboard compares recipes against it)
    streamed: bool = False
    downloadable: bool = False  # data.download may fetch it (through torchvision)
    corruptions: CorruptionSet | None = None
    robustbench: str | None = None  # RobustBench's BenchmarkDataset value: its model zoo and leaderboard
    # checks of data.root before any work (the loader checks it again when it reads); None: the loader's alone
    check_root: Callable[[DataSettings], None] | None = field(default=None, compare=False)

    def protocol(self, norm: Any) -> Protocol:
        """The protocol for ``norm`` (a ``Norm`` or its value)."""
        return self.protocols[getattr(norm, "value", norm)]

    def resolved(self, settings: DataSettings) -> "Dataset":
        """This record with a streamed dataset's class count and crop size from ``settings``."""
        if not self.streamed:
            return self
        return replace(self, num_classes=self.num_classes or settings.num_classes, image_size=settings.image_size)


#: Every dataset by name. Importing :mod:`robust_sparse.datasets` registers the package's own.
DATASETS: Registry[Dataset] = Registry("dataset")

#: The threat models every record gives a protocol for.
THREAT_MODELS = ("linf", "l2")


def register_dataset(record: Dataset) -> Dataset:
    """Add ``record`` to :data:`DATASETS` (``data.dataset = record.name`` then trains on it); it must be complete:
    a protocol for every threat model, a mean and std per channel."""
    missing = [threat for threat in THREAT_MODELS if threat not in record.protocols]
    if missing:
        raise ValueError(f"dataset {record.name!r} has no protocol for {', '.join(missing)}")
    if not len(record.mean) == len(record.std) == record.in_channels:
        raise ValueError(f"dataset {record.name!r}: mean and std need one value per channel ({record.in_channels})")
    record = _frozen(record)
    DATASETS.register(record.name)(record)
    return record


def _frozen(record: Dataset) -> Dataset:
    return replace(record, protocols=MappingProxyType(dict(record.protocols)))
