"""Datasets as records: one file per dataset registers its :class:`~robust_sparse.datasets.registry.Dataset`.

Every module of this package other than the machinery below is a dataset file (``mnist5k``, ``cifar10``,
``cifar100``, ``svhn``, ``imagenet``, ``imagefolder``, ``fashion_mnist``): importing the package imports each of
them, and :data:`DATASETS` then holds their records by name, which is what ``data.dataset`` accepts. A new dataset
is one new file here (its loader and its record, passed to :func:`register_dataset`) plus its test; nothing else
names datasets.

The machinery the records use: :mod:`~robust_sparse.datasets.registry` (the record and the registry),
:mod:`~robust_sparse.datasets.images` (in-memory sets, batching and augmentation),
:mod:`~robust_sparse.datasets.folders` (image trees streamed from files) and :mod:`~robust_sparse.datasets.splits`
(a config's train/validation/test splits). This module and the dataset files import no torch at import time
(their loaders do, when they run): the config reads the records to check ``data.dataset`` and its default eps.
"""

from __future__ import annotations

import importlib
import pkgutil

from robust_sparse.datasets.registry import (DATASETS, THREAT_MODELS, CorruptionLayout, CorruptionSet,
                                             DataSettings, Dataset, Protocol, register_dataset)

# the modules that are not datasets; every other one registers its record when imported
MACHINERY = ("registry", "images", "folders", "splits")
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module not in MACHINERY:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["DATASETS", "MACHINERY", "THREAT_MODELS", "CorruptionLayout", "CorruptionSet", "DataSettings", "Dataset",
           "Protocol", "register_dataset"]
