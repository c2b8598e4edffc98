"""CIFAR-100, read from ``data.root/cifar-100-python`` (torchvision's layout; ``data.download`` fetches it) by
CIFAR-10's reader (``cifar10.py``), fine labels.

Protocol: RobustBench's, L-inf 8/255 and L2 0.5 on the first 10,000 test points (the whole test split).
Corruptions: CIFAR-100-C.
"""

from __future__ import annotations

from robust_sparse.datasets.cifar10 import load
from robust_sparse.datasets.registry import (CorruptionLayout, CorruptionSet, Dataset, Protocol,
                                             register_dataset)

CIFAR100 = register_dataset(Dataset(
    name="cifar100", description="CIFAR-100 (torchvision's cifar-100-python)", num_classes=100, in_channels=3,
    image_size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), crop_padding=4, hflip=True,
    load=load, protocols={"linf": Protocol(eps=8 / 255, n_examples=10000), "l2": Protocol(eps=0.5, n_examples=10000)},
    train_images=50000, downloadable=True, robustbench="cifar100",
    corruptions=CorruptionSet("CIFAR-100-C", CorruptionLayout.NPY,
                              "https://zenodo.org/record/3555552 (CIFAR-100-C.tar)")))
