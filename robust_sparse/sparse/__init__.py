"""Sparse training: one mask owner, one file per method, layer-wise density allocation.

:func:`build_sparsity` looks ``sparsity.method`` up in :data:`METHODS` and returns a :class:`SparseMasker`
attached to the model and its optimizer (or None for dense training). Where each method lives, with its
defaults (the published ones: docs/papers.md has each paper's setting and config):

================  ===================  ==========  =========  ========  ============  ===========
method            file                 growth      prune      schedule  update every  init
================  ===================  ==========  =========  ========  ============  ===========
set, rigl, itop   prune_regrow.py      random,     0.3, 0.3,  constant, 100, 100,     erk
                  (``DEFAULTS``)       gradient,   0.5        cosine,   1500
                                       random                 cosine
bsrnet            bsrnet.py            random      (every step, zero crossing, global budget)  bsrnet
gse               gse.py               |g| on      0.2        cosine    1000          gse_er
                                       candidates
ast               ast.py               |g|         0.5        cosine    999 // K      erk at
                                                              per sub-net             ast_init_density
static,           static.py            (never)                                        erk /
magnitude_prune                                                                       largest |W|
================  ===================  ==========  =========  ========  ============  ===========

``masker.py`` holds the mask owner and the :class:`Engine` protocol, ``methods.py`` the registry,
``density.py`` the shared allocations, ``strategies.py`` the prune/grow functions, ``export.py`` the export.
"""

from __future__ import annotations

from robust_sparse.sparse.masker import Engine, SparseMasker, View, sparsifiable, views_of
from robust_sparse.sparse.methods import (METHODS, SavedView, Setup, SparseMethod, build_sparsity,
                                          pick_view, random_masks, register_sparsity_method, saved_views)
from robust_sparse.sparse import ast, bsrnet, gse, prune_regrow, static  # noqa: E402,F401  (each registers itself)

__all__ = ["Engine", "METHODS", "SavedView", "Setup", "SparseMasker", "SparseMethod", "View", "build_sparsity",
           "pick_view", "random_masks", "register_sparsity_method", "saved_views", "sparsifiable",
           "views_of"]
