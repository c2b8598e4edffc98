"""CIFAR-10, read from ``data.root/cifar-10-batches-py`` (torchvision's layout; ``data.download`` fetches it).

Protocol: RobustBench's, L-inf 8/255 and L2 0.5 on the first 10,000 test points (the whole test split).
Corruptions: CIFAR-10-C. The reader here serves CIFAR-100 too (``cifar100.py``): both ship in one format.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from robust_sparse.datasets.registry import (TRAIN_DOWNLOAD_HINT, CorruptionLayout, CorruptionSet, Dataset,
                                             Protocol, register_dataset)
from robust_sparse.errors import UserError

if TYPE_CHECKING:
    from robust_sparse.datasets.images import ImageSet
    from robust_sparse.datasets.registry import DataSettings


def _read_cifar_files(folder: Path, files: list[str], label_key: bytes, dataset: str) -> "ImageSet":
    import numpy as np
    import torch

    from robust_sparse.datasets.images import ImageSet
    from robust_sparse.files.plain_pickle import NotPlainPickle, load_plain

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


#: name -> (folder under data.root, training files, test files, label key, torchvision's class)
CIFAR_FOLDERS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"),
}


def load_cifar(name: str, root: Path, download: bool, need_train: bool = True,
               download_hint: str = TRAIN_DOWNLOAD_HINT) -> "tuple[ImageSet | None, ImageSet]":
    """CIFAR-10/100 from ``root`` in torchvision's layout, downloading through torchvision when allowed.

    torchvision's class checks the md5 of *every* batch even for the test split, so a test-only copy (all an
    evaluation needs) would be rejected. We let torchvision download and verify, and read the batch files
    ourselves, requiring only the files the requested splits use.
    """
    name = getattr(name, "value", name)
    folder_name, train_files, test_files, label_key, torchvision_class = CIFAR_FOLDERS[name]
    folder = root / folder_name
    needed = (train_files if need_train else []) + test_files
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and download:
        import torchvision.datasets as tvd

        try:
            getattr(tvd, torchvision_class)(str(root), train=True, download=True)
        except Exception as error:  # network errors come in many types; the message is what matters
            raise UserError(f"could not download {name} into {root}: {str(error).splitlines()[0]}") from None
        missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{name} not found: expected {', '.join(missing)} in {folder} "
            f"(the layout torchvision downloads; {download_hint})"
        )
    train = _read_cifar_files(folder, train_files, label_key, name) if need_train else None
    test = _read_cifar_files(folder, test_files, label_key, name)
    return train, test


def load(settings: "DataSettings", need_train: bool, download_hint: str):
    """The loader of both CIFAR records: ``settings.dataset`` picks the folder."""
    return load_cifar(settings.dataset, Path(settings.root), settings.download, need_train, download_hint)


CIFAR10 = register_dataset(Dataset(
    name="cifar10", description="CIFAR-10 (torchvision's cifar-10-batches-py)", num_classes=10, in_channels=3,
    image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616), crop_padding=4, hflip=True,
    load=load, protocols={"linf": Protocol(eps=8 / 255, n_examples=10000), "l2": Protocol(eps=0.5, n_examples=10000)},
    train_images=50000, downloadable=True, robustbench="cifar10",
    corruptions=CorruptionSet("CIFAR-10-C", CorruptionLayout.NPY, "https://zenodo.org/record/2535967 (CIFAR-10-C.tar)")))
