"""Fixed topologies: a static random mask (ERK or uniform), and magnitude pruning of a trained dense model
(keep the largest weights, then fine-tune with the mask fixed). :class:`StaticEngine` never rewires."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from robust_sparse.config import PruneScope
from robust_sparse.errors import ConfigError
from robust_sparse.sparse.masker import Engine, StaticEngine
from robust_sparse.sparse.methods import Setup, SparseMethod, register


def build_static(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    return setup.random_masks(setup.densities()), StaticEngine()


def build_magnitude_prune(setup: Setup) -> tuple[dict[str, torch.Tensor], Engine]:
    """Load ``sparsity.magnitude_prune.dense_checkpoint`` into the model, then keep its largest-magnitude weights."""
    from robust_sparse.files.checkpoint import load_checkpoint

    config = setup.config
    path = setup.section.dense_checkpoint
    if not Path(path).is_file():  # checked where it is read: a saved config stays loadable when the file moves
        raise ConfigError(f"sparsity.magnitude_prune.dense_checkpoint: file {path!r} does not exist")
    dense = load_checkpoint(path, map_location=setup.device)
    try:
        setup.model.load_state_dict(dense["model"])
    except RuntimeError as error:
        raise ConfigError(f"sparsity.magnitude_prune.dense_checkpoint: weights do not fit {setup.model_name}: "
                          f"{str(error).splitlines()[0]}") from None
    return magnitude_masks(setup.params, config.density, config.prune_scope), StaticEngine()


def magnitude_masks(params: dict[str, nn.Parameter], density: float, scope: PruneScope) -> dict[str, torch.Tensor]:
    """Keep the largest-magnitude weights: ``density`` of all of them (global) or of each layer."""
    if scope is PruneScope.LAYERWISE:
        return {name: _top_fraction(p.detach().abs(), density) for name, p in params.items()}
    scores = torch.cat([p.detach().abs().flatten() for p in params.values()])
    keep = max(1, round(density * scores.numel()))
    threshold_index = torch.topk(scores, keep, sorted=False).indices
    flat = torch.zeros_like(scores, dtype=torch.bool)
    flat[threshold_index] = True
    masks, offset = {}, 0
    for name, p in params.items():
        masks[name] = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return masks


def _top_fraction(scores: torch.Tensor, density: float) -> torch.Tensor:
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[torch.topk(scores.flatten(), max(1, round(density * scores.numel())), sorted=False).indices] = True
    return flat.view_as(scores)


register(SparseMethod("static", build_static))
# magnitude_prune's settings (its section, rules): robust_sparse/config/builtin_methods.py
register(SparseMethod("magnitude_prune", build_magnitude_prune))
