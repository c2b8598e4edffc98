"""What training measures of its model: validation accuracy every epoch (model selection), the short test
evaluation of best.pt after training, and the sparsity columns of the metrics.

All accuracies come from :func:`robust_sparse.accuracy.evaluate_pgd`, the function ``robust-sparse eval`` uses.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from robust_sparse.accuracy import evaluate_pgd
from robust_sparse.config import TrainConfig
from robust_sparse.datasets.images import ImageSet
from robust_sparse.datasets.splits import in_memory
from robust_sparse.flops import FlopsCounter
from robust_sparse.precision import Amp
from robust_sparse.sparse import SparseMasker, views_of


def measure_validation(model: nn.Module, data: ImageSet, config: TrainConfig, device: torch.device,
                       progress: bool = False, amp: Amp | None = None) -> tuple[float, float]:
    """Clean and PGD accuracy on (at most ``val.max_examples`` of) the held-out validation split; ``amp``:
    autocast of the model's forwards (train.precision)."""
    subset = in_memory(data.take(slice(0, config.val.max_examples)), config.data.workers)
    images = subset.images.to(device).float().div_(255)
    result = evaluate_pgd(
        model, images, subset.labels.to(device), eps=config.attack.eps, norm=config.attack.norm.value,
        steps=config.val.pgd_steps, batch_size=config.data.eval_batch_size, progress=progress,
        description=f"validation PGD-{config.val.pgd_steps}",
        **({"autocast": amp.autocast} if amp is not None else {}),
    )
    return result.clean_accuracy, result.robust_accuracy


def evaluate_test(model: nn.Module, test: ImageSet, config: TrainConfig, device: torch.device,
                  progress: bool = False) -> dict[str, Any]:
    """The short post-training evaluation: clean and PGD accuracy on the first ``eval.n_examples`` test points,
    in ``eval.precision`` (fp32 by default, whatever the training precision)."""
    test = in_memory(test.take(slice(0, config.eval.n_examples)), config.data.workers)
    eps = config.eval.eps if config.eval.eps is not None else config.attack.eps
    amp = Amp(config.eval.precision, device, where="eval.precision")
    start = time.perf_counter()
    result = evaluate_pgd(
        model, test.images.to(device).float().div_(255), test.labels.to(device), eps=eps,
        norm=config.attack.norm.value, steps=config.eval.pgd_steps, restarts=config.eval.restarts,
        batch_size=config.data.eval_batch_size, progress=progress,
        description=f"test PGD-{config.eval.pgd_steps}x{config.eval.restarts}", autocast=amp.autocast,
    )
    return {
        "dataset": config.data.dataset, "model": config.model.name, "n_examples": len(test),
        "norm": config.attack.norm.value, "eps": eps, "pgd_steps": config.eval.pgd_steps,
        "restarts": config.eval.restarts, "clean_accuracy": result.clean_accuracy,
        "pgd_accuracy": result.robust_accuracy, "seconds": time.perf_counter() - start, "device": str(device),
        "precision": config.eval.precision.value,
    }


def evaluate_views(model: nn.Module, masker: SparseMasker | None, test: ImageSet, config: TrainConfig,
                   device: torch.device, flops: FlopsCounter, progress: bool = False) -> list[dict[str, Any]]:
    """:func:`evaluate_test` of every view of ``masker`` (the model itself without one), each row with its
    sub-net index and density (None for the model itself) and its FLOPs fields."""
    rows = []
    for view in views_of(masker):
        with view.activate():
            rows.append({"subnet": view.index, "density": view.density() if view.index is not None else None,
                         **evaluate_test(model, test, config, device, progress)})
        rows[-1].update(flops.evaluation_fields(view.masks, rows[-1]))
    return rows


def sparsity_metrics(masker: SparseMasker | None) -> dict[str, float]:
    """Density (of the first view, the densest sub-net where there are several, each in its own column too)
    and the exploration rate."""
    if masker is None:
        return {}
    views = masker.views()
    per_view = {f"density_subnet{view.index}": view.density() for view in views if view.index is not None}
    return {"density": views[0].density(), **per_view, "exploration_rate": masker.exploration_rate()}
