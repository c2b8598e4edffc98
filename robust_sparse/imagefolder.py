"""Datasets streamed from image files: ImageNet-2012 and any tree in torchvision's ImageFolder layout.

``data.root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>``. Nothing of the training split is held
in memory but its file names: a DataLoader with ``data.workers`` processes decodes and augments each batch
(RandomResizedCrop + horizontal flip) into uint8 tensors, which are pinned, moved to the device and scaled to
[0, 1] there, as the in-memory loader does for CIFAR. Under torchrun a DistributedSampler gives each rank its
shard. Each epoch's order and crops come from ``(seed, epoch)``: a resumed run sees the batches an
uninterrupted one would have seen.

The test split follows RobustBench: for ``imagenet`` its own list of 5000 validation images
(``robustbench/helper_files/imagenet_test_image_ids.txt``), its class indices
(``imagenet_class_to_id_map.json``) and its 'Res256Crop224' preprocessing; its first ``n`` images in the list's
order. The validation split for model selection is a seeded subset of the *training* images, so the test list
is never seen before the final evaluation. What is evaluated (``val.max_examples`` validation images each epoch,
the first ``eval.n_examples`` test images) is small: it is read into uint8 tensors (:func:`in_memory`), exactly
the values RobustBench's float preprocessing gives times 255, and every evaluation path runs on them as on CIFAR.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch

from robust_sparse.config import DataConfig, DatasetName
from robust_sparse.errors import ConfigError, UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # inside the model's Normalize layer, never in the data pipeline
IMAGENET_STD = (0.229, 0.224, 0.225)
ROBUSTBENCH_PREPROCESSING = "Res256Crop224"  # RobustBench's ImageNet test preprocessing
_TEST_ORDER_SEED = 20240501  # imagefolder without a list: val/ in one fixed order, whatever the run's seed


@dataclass
class FolderSet:
    """Images named by file, with their labels; read (and, for training, augmented) when a batch is drawn."""

    paths: list[str]
    targets: list[int]
    image_size: int

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.targets, dtype=torch.int64)

    @property
    def example_shape(self) -> tuple[int, ...]:
        """One example's (C, H, W) as the model sees it: an RGB crop of ``image_size``."""
        return (3, self.image_size, self.image_size)

    def take(self, index: torch.Tensor | slice) -> "FolderSet":
        if isinstance(index, slice):
            return FolderSet(self.paths[index], self.targets[index], self.image_size)
        chosen = index.tolist()
        return FolderSet([self.paths[i] for i in chosen], [self.targets[i] for i in chosen], self.image_size)


# ----------------------------------------------------------------------------------------------------------
# transforms: PIL image -> uint8 [C, H, W]


def training_transform(size: int, augment: bool) -> Callable:
    """RandomResizedCrop(size) + horizontal flip (the standard ImageNet recipe), or the test preprocessing."""
    import torchvision.transforms as T

    if not augment:
        return test_transform(size)
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])


def test_transform(size: int) -> Callable:
    """RobustBench's 'Res256Crop224' (its own transform object) at 224 px; the same proportions otherwise.

    RobustBench's transform ends in ToTensor (uint8 / 255 as float32); we store the uint8 values it came from,
    so that an image costs a quarter of the memory and every path divides by 255 on the device alike."""
    import torchvision.transforms as T

    if size == 224:
        with warnings.catch_warnings():  # robustbench.loaders imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            from robustbench.data import PREPROCESSINGS
        preprocessing = PREPROCESSINGS[ROBUSTBENCH_PREPROCESSING]
    else:
        preprocessing = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
    return T.Compose([preprocessing, _to_uint8])


def corruptions_transform() -> Callable:
    """RobustBench's ImageNet-C preprocessing: its 'Res224' (``robustbench.eval`` uses only resizing to 224x224
    for the corruptions tracks; ImageNet-C's images are 224 px already), stored as uint8 like the test split."""
    import torchvision.transforms as T

    with warnings.catch_warnings():  # robustbench.loaders imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        from robustbench.data import PREPROCESSINGS
    return T.Compose([PREPROCESSINGS["Res224"], _to_uint8])


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.mul(255).round_().to(torch.uint8)  # ToTensor's x / 255, back to x exactly


class _Files(torch.utils.data.Dataset):
    def __init__(self, data: FolderSet, transform: Callable) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # torchvision's reader (PIL, converted to RGB): robustbench.loaders' default_loader is a copy of it
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(self.data.paths[index])), self.data.targets[index]


# ----------------------------------------------------------------------------------------------------------
# loading


class FolderLoader:
    """Iterates over a :class:`FolderSet` in batches of float [0,1] images on ``device``: the streamed
    counterpart of :class:`robust_sparse.data.BatchLoader`, with the same arguments and behaviour."""

    def __init__(self, data: FolderSet, batch_size: int, device: torch.device, *, shuffle: bool = False,
                 seed: int = 0, info=None, augment_batches: bool = False, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, workers: int = 0) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.data, self.batch_size, self.device = data, batch_size, device
        self.seed, self.drop_last, self.workers = seed, drop_last, workers
        self.dataset = _Files(data, training_transform(data.image_size, augment_batches and info is not None))
        # every rank draws the same permutation of seed + epoch and keeps its own equal-sized slice
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=True)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers are started afresh each epoch from a generator of (seed, epoch): their crops do not depend on
        # the epochs before, so a resumed run augments as an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True).float().div_(255),
                   labels.to(self.device, non_blocking=True))


def in_memory(data: FolderSet, workers: int = 0, batch_size: int = 64, transform: Callable | None = None):
    """``data`` read in order through the test preprocessing (or ``transform``, PIL -> uint8 [C, H, W]), as an
    in-memory uint8 ImageSet."""
    from robust_sparse.data import ImageSet

    if len(data) == 0:
        return ImageSet(torch.zeros(0, 3, data.image_size, data.image_size, dtype=torch.uint8),
                        torch.zeros(0, dtype=torch.int64))
    transform = transform or test_transform(data.image_size)
    loader = torch.utils.data.DataLoader(_Files(data, transform), batch_size=batch_size,
                                         num_workers=min(workers, max(1, len(data) // batch_size)))
    images, labels = zip(*loader)
    return ImageSet(torch.cat(images), torch.cat(labels))


# ----------------------------------------------------------------------------------------------------------
# the tree


def _robustbench_file(name: str) -> Path:
    with warnings.catch_warnings():  # importing robustbench imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        return Path(str(resources.files("robustbench") / "helper_files" / name))


def imagenet_classes() -> dict[str, int]:
    """wnid -> class index, RobustBench's map (the standard ImageNet-2012 order)."""
    return json.loads(_robustbench_file("imagenet_class_to_id_map.json").read_text())


def robustbench_test_list() -> Path:
    """RobustBench's list of its 5000 ImageNet test images, ``<wnid>/<file>`` per line."""
    return _robustbench_file("imagenet_test_image_ids.txt")


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _classes(config: DataConfig, train_dir: Path) -> dict[str, int]:
    """Class folder -> label: RobustBench's map for imagenet, the sorted folders (ImageFolder's) otherwise."""
    folders = _class_folders(train_dir)
    if not folders:
        raise UserError(f"data.root: {train_dir} has no class folders (expected train/<class>/<image>)")
    if config.dataset is DatasetName.IMAGENET:
        classes = imagenet_classes()
        unknown = [name for name in folders if name not in classes]
        if unknown:
            raise UserError(f"data.root: {train_dir} has folders that are no ImageNet-2012 class (wnid), e.g. "
                            f"{', '.join(unknown[:3])}; use data.dataset = imagefolder for another dataset")
        return classes
    if len(folders) != config.num_classes:
        raise ConfigError(f"data.num_classes = {config.num_classes}: {train_dir} has {len(folders)} class folders")
    return {name: index for index, name in enumerate(folders)}


def _scan(folder: Path, classes: dict[str, int], image_size: int) -> FolderSet:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    present = _class_folders(folder)
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise UserError(f"data.root: {folder} has class folders the training split lacks: {', '.join(unknown[:3])}")
    samples = make_dataset(str(folder), {name: classes[name] for name in present}, IMG_EXTENSIONS)
    return FolderSet([path for path, _ in samples], [label for _, label in samples], image_size)


def _read_list(path: Path, val_dir: Path, classes: dict[str, int], image_size: int) -> FolderSet:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise UserError(f"data.test_list: cannot read {path} ({error.strerror})") from None
    paths, targets = [], []
    for number, line in enumerate(lines, start=1):
        name = line.split("/")[0]
        if "/" not in line or name not in classes:
            raise UserError(f"data.test_list: {path} line {number}: {line!r} is not <class>/<file> of a known class")
        paths.append(str(val_dir / line))
        targets.append(classes[name])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"data.root: {len(missing)} of the {len(paths)} test images listed in {path} are missing "
                        f"under {val_dir}, e.g. {missing[0]}")
    return FolderSet(paths, targets, image_size)


def read_tree(config: DataConfig, need_train: bool = True) -> tuple[FolderSet | None, FolderSet]:
    """The training split (file names; None without ``need_train``) and the test split, in order."""
    root = Path(config.root)
    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir) if need_train or config.dataset is DatasetName.IMAGEFOLDER else (val_dir,):
        if not folder.is_dir():
            raise UserError(f"data.root: {folder} does not exist (expected {root}/train/<class>/<image> and "
                            f"{root}/val/<class>/<image>, the layout torchvision's ImageFolder reads)")
    if config.dataset is DatasetName.IMAGENET:
        classes = imagenet_classes()
        if need_train:
            _classes(config, train_dir)  # checks that the folders are wnids
    else:
        classes = _classes(config, train_dir)
    train = _scan(train_dir, classes, config.image_size) if need_train else None
    if config.test_list is not None:
        test = _read_list(Path(config.test_list), val_dir, classes, config.image_size)
    elif config.dataset is DatasetName.IMAGENET:
        test = _read_list(robustbench_test_list(), val_dir, classes, config.image_size)
    else:  # all of val/, shuffled once so that "the first n" holds every class
        test = _scan(val_dir, classes, config.image_size)
        test = test.take(torch.randperm(len(test), generator=torch.Generator().manual_seed(_TEST_ORDER_SEED)))
    if not len(test):
        raise UserError(f"data.root: {val_dir} holds no test image")
    return train, test


def folder_info(config: DataConfig, base):
    """``base`` (imagenet's DatasetInfo) with this config's class count and image size."""
    classes = 1000 if config.dataset is DatasetName.IMAGENET else config.num_classes
    return replace(base, num_classes=classes, image_size=config.image_size)
