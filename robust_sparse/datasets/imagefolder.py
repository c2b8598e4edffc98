"""Any image-classification tree in torchvision's ImageFolder layout, streamed from
``data.root/{train,val}/<class>/<image>`` (:mod:`robust_sparse.datasets.folders`); ``data.num_classes`` gives the
class count, the sorted class folders the labels.

The test split: ``data.test_list``'s lines, else every image of ``val/`` in one fixed shuffled order. Protocol:
ImageNet's radii (L-inf 4/255, L2 3.0) as the default for natural images at ImageNet sizes, on the first 10,000
test points (at most the split; eval's count before the records); a tree of small images sets ``attack.eps``. The normalisation is ImageNet's, which
pretrained torchvision/timm models expect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from robust_sparse.datasets.imagenet import IMAGENET
from robust_sparse.datasets.registry import Dataset, Protocol, register_dataset

if TYPE_CHECKING:
    from robust_sparse.datasets.registry import DataSettings


def _load(settings: "DataSettings", need_train: bool, download_hint: str):
    from robust_sparse.datasets.folders import read_tree

    return read_tree(settings, need_train)


IMAGEFOLDER = register_dataset(Dataset(
    name="imagefolder", description="an ImageFolder tree, train/<class>/ and val/<class>/", num_classes=0,
    in_channels=3, image_size=224, mean=IMAGENET.mean, std=IMAGENET.std, crop_padding=0, hflip=True, load=_load,
    streamed=True, check_root=IMAGENET.check_root,
    protocols={threat: Protocol(eps=protocol.eps, n_examples=10000) for threat, protocol in IMAGENET.protocols.items()}))
