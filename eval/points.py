"""The protocol's inputs: which dataset and threat model, at what radius, on which test points.

Names given on the command line (:func:`parse_dataset`, :func:`parse_threat`), a dataset's protocol radius
(:func:`protocol_eps`), the test points (:func:`load_points`: the RobustBench protocol's first ``n`` points of the
test split, in order, or a data file's) and their hash (:func:`data_fingerprint`).
Each dataset's protocol (radius and test points per threat model) is its record's: robust_sparse/datasets/.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from robust_sparse.files.checkpoint import safe_load
from robust_sparse.config import DataConfig
from robust_sparse.datasets import DATASETS
from robust_sparse.errors import UserError
from robust_sparse.eval.runner import check_inputs

_THREATS = {"linf": "linf", "l2": "l2"}


def parse_dataset(text: str) -> str:
    """A registered dataset's name (any case); one line with the allowed names otherwise."""
    dataset = text.strip().lower()
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {text!r}; choose one of: {', '.join(DATASETS.names())}")
    if DATASETS.get(dataset).num_classes == 0:  # imagefolder: its class count and folders are in a checkpoint's config
        raise UserError(f"--dataset {dataset}: evaluate a CHECKPOINT trained on it (its config names the classes)")
    return dataset


def protocol_eps(dataset: str, norm: str) -> float:
    """The dataset's protocol radius for ``norm`` (its record's; RobustBench's where it has a track)."""
    return DATASETS.get(dataset).protocol(norm).eps


def parse_threat(text: str) -> str:
    """``Linf``/``linf`` -> ``linf``; ``L2``/``l2`` -> ``l2``."""
    try:
        return _THREATS[text.strip().lower()]
    except KeyError:
        raise UserError(f"unknown threat model {text!r}; choose Linf or L2") from None


def load_points(dataset: str, n: int | None, *, root: str = "data", download: bool = False,
                data_file: str | Path | None = None, data: DataConfig | None = None,
                norm: str = "linf") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test points in order, as float [0,1] images and int64 labels (RobustBench protocol).

    ``data_file`` replaces the dataset's test split with a torch file holding ``{"images", "labels"}``
    (uint8 0-255, or float in [0, 1]). ``n=None`` takes the dataset's protocol count for ``norm`` (CIFAR's
    10000, ImageNet's 5000) or the whole split where it is smaller; a larger ``n`` is an error.
    ``data`` (a checkpoint's data section) describes a streamed dataset's test split; only its first ``n`` images
    are read (ImageNet: RobustBench's list and preprocessing).
    """
    from robust_sparse.datasets.splits import EVAL_DOWNLOAD_HINT, dataset_info, in_memory, load_raw

    config = replace(data, root=root) if data is not None and data.dataset == dataset else \
        DataConfig(dataset=dataset, root=root, download=download)
    if data_file is not None:
        images, labels = _read_points(Path(data_file))
    else:
        _, test = load_raw(config, need_train=False, download_hint=EVAL_DOWNLOAD_HINT)
        if n is not None and 1 <= n <= len(test):  # a streamed split: read only the points evaluated
            test = test.take(slice(0, n))
        test = in_memory(test, config.workers)
        images, labels = test.images, test.labels
    total = len(labels)
    if n is None:
        n = min(DATASETS.get(dataset).protocol(norm).n_examples, total)
    if n < 1:
        raise UserError(f"--n-examples {n}: must be >= 1")
    if n > total:
        raise UserError(f"--n-examples {n}: the test set has only {total} points")
    images, labels = images[:n], labels[:n]
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    check_inputs(images, labels, dataset_info(config).num_classes)
    return images.float(), labels.long()


def _read_points(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    payload = safe_load(path, "data file")
    if not isinstance(payload, dict) or not {"images", "labels"} <= set(payload):
        raise UserError(f"data file {path} must hold a dict with 'images' [N,C,H,W] and 'labels' [N]")
    images, labels = payload["images"], payload["labels"]
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise UserError(f"data file {path}: 'images' and 'labels' must be tensors")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise UserError(f"data file {path}: images must be uint8 (0-255) or float in [0, 1], got {images.dtype}")
    return images, labels



def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

