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
        _import(name)
        log.debug("imported %s (%s) for what it registers", name, VARIABLE)
    return bool(names)


def _import(name: str) -> None:
    """Import one plugin module; whatever goes wrong in it is one line naming the module and the error."""
    # A relative name (".mod") has no package to be relative to here, and importlib's own errors for it and for
    # "a..b" or "my mod" are TypeErrors and ValueErrors that name neither the variable nor the rule.
    if not all(part.isidentifier() for part in name.split(".")):
        raise UserError(f"{VARIABLE}: {name!r} is not a module name; give absolute dotted names such as "
                        "my_package.methods, comma-separated")
    try:
        importlib.import_module(name)
    except SystemExit as error:
        # A plugin that exits would end `train` there, with its exit code (0 for sys.exit()), having trained
        # nothing; importing a plugin must either register names or fail.
        raise UserError(f"{VARIABLE}: importing {name!r} called sys.exit({error.code!r}); a plugin module must "
                        "not exit") from None
    except SyntaxError as error:
        where = f"{error.filename}, line {error.lineno}" if error.filename else f"line {error.lineno}"
        raise UserError(f"{VARIABLE}: cannot import {name!r}: SyntaxError: {error.msg} ({where})") from None
    except ImportError as error:
        raise UserError(f"{VARIABLE}: cannot import {name!r} ({_one_line(error)})") from None
    except Exception as error:  # the module's own code raised: any type, so catch them all and name it
        raise UserError(f"{VARIABLE}: importing {name!r} raised {type(error).__name__}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


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
