"""Sparse training: one mask owner, one file per method, layer-wise density allocation.

:func:`build_sparsity` looks ``sparsity.method`` up in :data:`METHODS` and returns a :class:`SparseMasker`
attached to the model and its optimizer (or None for dense training). Each method's settings (its section, rules
and the published defaults: docs/papers.md has each paper's setting and config) are the config's, declared in
robust_sparse/config/builtin_methods.py under the method's name; this package imports the config, never the
reverse.

``masker.py`` holds the mask owner, the :class:`Engine` protocol and :class:`StaticEngine`, ``methods.py`` the
registry, ``density.py`` the shared allocations, ``strategies.py`` the prune/grow functions, ``export.py`` the
export. Every other module of this package is a method file: importing the package imports each of them, and
each registers its :class:`SparseMethod` record, so a new method is one file here plus its settings there.
"""

from __future__ import annotations

import importlib
import pkgutil

from robust_sparse.sparse.masker import Engine, SparseMasker, StaticEngine, View, sparsifiable, views_of
from robust_sparse.sparse.methods import (METHODS, SavedView, Setup, SparseMethod, TrainingData, build_sparsity,
                                          pick_view, random_masks, register, register_sparsity_method, saved_views)

# the modules that are not methods; every other one registers itself when imported
_INFRASTRUCTURE = frozenset({"masker", "methods", "density", "strategies", "export"})
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Engine", "METHODS", "SavedView", "Setup", "SparseMasker", "SparseMethod", "StaticEngine", "TrainingData",
           "View", "build_sparsity", "pick_view", "random_masks", "register", "register_sparsity_method",
           "saved_views", "sparsifiable", "views_of"]
