"""robust-sparse: train adversarially robust sparse networks and evaluate them honestly.

The public API is small and imported lazily, so that ``import robust_sparse`` (which a ``.pth`` hook of
``robust-sparse doctor --fix`` does at interpreter start) stays cheap and never imports torch by itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": "robust_sparse.config",
    "fit": "robust_sparse.train",
    "build_model": "robust_sparse.models",
    "build_sparsity": "robust_sparse.sparse",
    "SparseMasker": "robust_sparse.sparse",
    "sparse_inference": "robust_sparse.deploy.inference",
    "load_sparse_inference": "robust_sparse.deploy.inference",
    "load_pretrained": "robust_sparse.deploy.pretrained",
    "load_dynamic": "robust_sparse.deploy.dynamic",
    "apply_cifar_stem": "robust_sparse.models",
    "AGENT": "robust_sparse.agent",
    "PGD": "robust_sparse.attacks",
    "TradesKL": "robust_sparse.attacks",
    "evaluate_pgd": "robust_sparse.accuracy",
    "register_attack": "robust_sparse.eval.specs",
    "register_sparsity_method": "robust_sparse.sparse",
    "register_model": "robust_sparse.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'robust_sparse' has no attribute {name!r}")
