"""SVHN, read through torchvision from ``data.root`` (``train_32x32.mat``, ``test_32x32.mat``); label 10 is digit 0.

Protocol: RobustBench has no SVHN track; the CIFAR radii, L-inf 8/255 and L2 0.5, as HYDRA and BSR-Net evaluate
it, on the first 10,000 test points (RobustBench's CIFAR count; the split has 26,032).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from robust_sparse.datasets.registry import TRAIN_DOWNLOAD_HINT, Dataset, Protocol, register_dataset
from robust_sparse.errors import UserError

if TYPE_CHECKING:
    from robust_sparse.datasets.images import ImageSet
    from robust_sparse.datasets.registry import DataSettings


def load_svhn(root: Path, download: bool, need_train: bool = True,
              download_hint: str = TRAIN_DOWNLOAD_HINT) -> "tuple[ImageSet | None, ImageSet]":
    """SVHN through torchvision (``train_32x32.mat``/``test_32x32.mat`` in ``root``)."""
    import numpy as np
    import torch
    import torchvision.datasets as tvd

    from robust_sparse.datasets.images import ImageSet

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


def _load(settings: "DataSettings", need_train: bool, download_hint: str):
    return load_svhn(Path(settings.root), settings.download, need_train, download_hint)


SVHN = register_dataset(Dataset(
    name="svhn", description="SVHN (torchvision's train_32x32.mat, test_32x32.mat)", num_classes=10, in_channels=3,
    image_size=32, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), crop_padding=4, hflip=False,
    load=_load, protocols={"linf": Protocol(eps=8 / 255, n_examples=10000), "l2": Protocol(eps=0.5, n_examples=10000)},
    train_images=73257, downloadable=True))
