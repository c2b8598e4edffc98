"""Datasets as records: one file per dataset registers its :class:`~robust_sparse.datasets.registry.Dataset`.

Importing this package registers every dataset file in it (``mnist5k``, ``cifar10``, ``cifar100``, ``svhn``,
``imagenet``, ``imagefolder``, ``fashion_mnist``); :data:`DATASETS` then holds them by name, which is what
``data.dataset`` accepts. A new dataset is one new file here (its loader and its record, passed to
:func:`register_dataset`) plus its test; nothing else names datasets.

The machinery the records use lives beside them: :mod:`~robust_sparse.datasets.images` (in-memory sets, batching
and augmentation), :mod:`~robust_sparse.datasets.folders` (image trees streamed from files) and
:mod:`~robust_sparse.datasets.splits` (a config's train/validation/test splits). This module and the record files
import no torch: reading the records (the config does) stays cheap.
"""

from robust_sparse.datasets.registry import (DATASETS, THREAT_MODELS, CorruptionLayout, CorruptionSet,
                                             DataSettings, Dataset, Protocol, register_dataset)

# every dataset of the package, each registering its record (the order of listings)
from robust_sparse.datasets import mnist5k, cifar10, cifar100, svhn, imagenet, imagefolder  # noqa: E402,F401
from robust_sparse.datasets import fashion_mnist  # noqa: E402,F401

__all__ = ["DATASETS", "THREAT_MODELS", "CorruptionLayout", "CorruptionSet", "DataSettings", "Dataset", "Protocol",
           "register_dataset"]
