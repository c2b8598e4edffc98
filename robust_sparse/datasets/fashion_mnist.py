"""Fashion-MNIST (Xiao et al. 2017), read from ``data.root/FashionMNIST/raw/`` in torchvision's layout: the four idx
files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each maybe gzipped (``.gz``). ``data.download`` fetches them through torchvision.

Protocol, a stated choice: L-inf eps 0.1. RobustBench has no Fashion-MNIST track; 0.1 is the radius commonly
used for it in the robustness literature (e.g. Wong & Kolter's provable defenses), where MNIST's 0.3 suits
near-binary digits and not grey-level garments; it is also MNIST-5k's radius here, so the quickstart's recipe
carries over. L2: 2.0, as for MNIST-5k (images of the same size and range). Test points: the whole 10,000-image test split. Horizontal flips are on: a mirrored
garment is the same garment.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

from robust_sparse.datasets.registry import Dataset, Protocol, register_dataset
from robust_sparse.errors import ConfigError, UserError

if TYPE_CHECKING:
    from robust_sparse.datasets.images import ImageSet
    from robust_sparse.datasets.registry import DataSettings

FOLDER = Path("FashionMNIST") / "raw"  # torchvision's, under data.root
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: 1}  # the idx element types read: unsigned bytes only (images and labels are both)


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / FOLDER / name, root / FOLDER / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(root: Path, splits: tuple[str, ...]) -> list[str]:
    return [name for split in splits for name in FILES[split] if _find(root, name) is None]


def _expected(root: Path, missing: list[str]) -> str:
    return f"expected {', '.join(missing)} (or .gz) in {root / FOLDER}, torchvision's layout"


def read_idx(path: Path, dims: int):
    """An idx file (LeCun's MNIST format) of unsigned bytes with ``dims`` dimensions, as a numpy array."""
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise UserError(f"fashion_mnist file {path} cannot be read: {error}") from None
    if len(data) < 4 + 4 * dims or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES or data[3] != dims:
        raise UserError(f"fashion_mnist file {path} is not an idx file of {dims}-D unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = data[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise UserError(f"fashion_mnist file {path} is truncated: {len(body)} bytes for shape {list(shape)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _read_split(root: Path, split: str) -> "ImageSet":
    import numpy as np
    import torch

    from robust_sparse.datasets.images import ImageSet

    images_file, labels_file = (_find(root, name) for name in FILES[split])
    assert images_file is not None and labels_file is not None
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(f"fashion_mnist {split} split in {root / FOLDER}: {len(images)} images of "
                        f"{list(images.shape[1:])} and {len(labels)} labels; expected 28x28 images, one label each")
    if len(labels) and labels.max() >= 10:
        raise UserError(f"fashion_mnist file {labels_file}: label {labels.max()} outside 0..9")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def load(settings: "DataSettings", need_train: bool, download_hint: str):
    root = Path(settings.root)
    splits = ("train", "test") if need_train else ("test",)
    missing = _missing(root, splits)
    if missing and settings.download:
        import torchvision.datasets as tvd

        try:
            tvd.FashionMNIST(str(root), train=True, download=True)
        except Exception as error:  # network errors come in many types; the message is what matters
            raise UserError(f"could not download fashion_mnist into {root}: {str(error).splitlines()[0]}") from None
        missing = _missing(root, splits)
    if missing:
        raise UserError(f"fashion_mnist not found: {_expected(root, missing)} ({download_hint})")
    return (_read_split(root, "train") if need_train else None), _read_split(root, "test")


def check_root(settings: "DataSettings") -> None:
    """Before any work: the four files are under data.root, unless data.download may fetch them."""
    root = Path(settings.root)
    missing = _missing(root, ("train", "test"))
    if missing and not settings.download:
        raise ConfigError(f"data.root = {settings.root!r}: {_expected(root, missing)}; put Fashion-MNIST there "
                          "or set data.download=true")


FASHION_MNIST = register_dataset(Dataset(
    name="fashion_mnist", description="Fashion-MNIST (torchvision's FashionMNIST/raw idx files)", num_classes=10,
    in_channels=1, image_size=28, mean=(0.2860,), std=(0.3530,), crop_padding=2, hflip=True, load=load,
    protocols={"linf": Protocol(eps=0.1, n_examples=10000), "l2": Protocol(eps=2.0, n_examples=10000)},
    train_images=60000, downloadable=True, check_root=check_root))
