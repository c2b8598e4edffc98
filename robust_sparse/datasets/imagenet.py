"""ImageNet-2012, streamed from ``data.root/{train,val}/<wnid>/*.JPEG`` (:mod:`robust_sparse.datasets.folders`).

The test split is RobustBench's: its list of 5000 validation images (``data.test_list`` may name another), its
class map and its 'Res256Crop224' preprocessing. Protocol: RobustBench's ImageNet track, L-inf 4/255 on those
5000 points; L2 3.0, the usual ImageNet radius (Engstrom et al.'s robustness library; RobustBench has no ImageNet
L2 track). Corruptions: ImageNet-C, read as robustbench's ``load_imagenetc`` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from robust_sparse.datasets.registry import (CorruptionLayout, CorruptionSet, Dataset, Protocol,
                                             register_dataset)

if TYPE_CHECKING:
    from robust_sparse.datasets.registry import DataSettings

TEST_IMAGES = 5000  # RobustBench's list


def _load(settings: "DataSettings", need_train: bool, download_hint: str):
    from robust_sparse.datasets.folders import imagenet_classes, read_tree, robustbench_test_list

    return read_tree(settings, need_train, classes=imagenet_classes(), test_list=robustbench_test_list())


def _check_root(settings: "DataSettings") -> None:
    from robust_sparse.datasets.folders import check_tree_root

    check_tree_root(settings)


IMAGENET = register_dataset(Dataset(
    name="imagenet", description="ImageNet-2012 as train/<wnid>/ and val/<wnid>/ folders", num_classes=1000,
    in_channels=3, image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_padding=0,
    hflip=True, load=_load, streamed=True, check_root=_check_root, robustbench="imagenet", train_images=1281167,
    protocols={"linf": Protocol(eps=4 / 255, n_examples=TEST_IMAGES), "l2": Protocol(eps=3.0, n_examples=TEST_IMAGES)},
    corruptions=CorruptionSet("ImageNet-C", CorruptionLayout.IMAGE_TREE,
                              "https://zenodo.org/record/2235448 (blur, digital, noise, weather .tar)")))
