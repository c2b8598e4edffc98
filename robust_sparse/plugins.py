"""Attacks and sparse methods registered from Python, in the processes a sweep starts.

``robust_sparse.register_attack`` and ``robust_sparse.register_sparsity_method`` add a name in the calling
process only, while a sweep trains and evaluates each run in a new process. Those processes import the modules
named in ``$ROBUST_SPARSE_PLUGINS`` (comma-separated) the first time a name is not found, and a sweep sets the
variable to the modules that registered the names its runs use. The same works from a shell::

    ROBUST_SPARSE_PLUGINS=my_methods robust-sparse train --set sparsity.method=my-method
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Iterable

from robust_sparse.errors import UserError

log = logging.getLogger(__name__)

VARIABLE = "ROBUST_SPARSE_PLUGINS"

_imported = False


def import_from_environment() -> bool:
    """Import the modules named in ``$ROBUST_SPARSE_PLUGINS`` (once per process); whether any were imported now."""
    global _imported
    if _imported:
        return False
    _imported = True
    names = [name.strip() for name in os.environ.get(VARIABLE, "").split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise UserError(f"{VARIABLE}: cannot import {name!r} ({error})") from None
        log.debug("imported %s (%s) for what it registers", name, VARIABLE)
    return bool(names)


def importable(module: str | None, what: str) -> str:
    """``module``, checked to be one a child process can import (``__main__`` is the parent's script)."""
    if not module or module == "__main__":
        raise UserError(f"{what} is registered from {module or 'an unknown module'}, which a sweep's processes cannot "
                        "import: register it in an importable module (or pass module=)")
    return module


def environment(env: dict[str, str], modules: Iterable[str]) -> dict[str, str]:
    """``env`` with ``modules`` added to ``$ROBUST_SPARSE_PLUGINS`` (kept in order, each once)."""
    names = [name for name in env.get(VARIABLE, "").split(",") if name]
    names += [module for module in modules if module not in names]
    return {**env, VARIABLE: ",".join(names)} if names else dict(env)
