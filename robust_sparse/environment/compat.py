"""Importing the third-party stack reliably: robustbench and AutoAttack."""

from __future__ import annotations

import contextlib
import types
import warnings
from typing import Iterator

from robust_sparse.environment import autoattack_alias as _autoattack_alias
from robust_sparse.errors import UserError


@contextlib.contextmanager
def dependency_warnings_filtered() -> Iterator[None]:
    """Around the first import of timm or robustbench: their import-time warnings are about their own code
    (timm's ``torch.jit.interface``, robustbench's ``pkg_resources``), nothing a user of this toolkit can act
    on, and printed before a refusal they would push the toolkit's one line off the first line of stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        yield


def import_autoattack() -> types.ModuleType:
    """The AutoAttack module with the GitHub API: the real ``autoattack`` if installed, else the adapter."""
    _autoattack_alias.install()
    try:
        import autoattack
    except ImportError:
        raise UserError("AutoAttack is not installed: pip install pyautoattack (or run robust-sparse doctor)") from None
    return autoattack


def import_robustbench() -> types.ModuleType:
    """``robustbench`` with AutoAttack importable; a one-line error naming the fix if it is broken."""
    import_autoattack()
    try:
        with dependency_warnings_filtered():
            import robustbench
            import robustbench.eval  # noqa: F401  (the module torchattacks' stale copy empties)
    except Exception as error:
        raise UserError(f"robustbench cannot be imported ({type(error).__name__}: {error}); "
                        "run `robust-sparse doctor` for the fix") from None
    return robustbench
