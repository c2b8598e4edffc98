"""Make ``import autoattack`` work when only PyPI's ``pyautoattack`` is installed.

robustbench 1.1.1 imports ``autoattack`` (the GitHub package, API of commit a39220048), but on PyPI it
depends on ``pyautoattack``: the same attacks under another module name and a changed API (keyword-only
constructor, ``attacks`` for ``attacks_to_run``, no ``log_path``/``verbose``, ``batch_size`` for ``bs``, and a
``(x_adv, y_adv)`` return). :func:`install` appends a finder to the *end* of ``sys.meta_path`` that serves
``autoattack`` as an adapter with the GitHub API, so a genuine ``autoattack`` installation always wins.

This module must stay free of heavy imports: ``robust-sparse doctor --fix`` installs a ``.pth`` line that
calls :func:`install` at interpreter start, so that a plain ``import robustbench`` works in the environment.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

ALIAS = "autoattack"
TARGET = "pyautoattack"


def _build_adapter(module: types.ModuleType) -> None:
    """Fill the ``autoattack`` package module with the GitHub-API ``AutoAttack`` and pyautoattack's names."""
    target = importlib.import_module(TARGET)
    base = target.AutoAttack

    class AutoAttack(base):  # type: ignore[misc, valid-type]
        """``autoattack.AutoAttack`` (GitHub API) implemented by ``pyautoattack.AutoAttack``."""

        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            if is_tf_model:
                raise NotImplementedError("TensorFlow models are not supported by the pyautoattack adapter")
            # GitHub AutoAttack ignores attacks_to_run unless version='custom'; pyautoattack raises instead.
            attacks = list(attacks_to_run) if version == "custom" else None
            super().__init__(model, attacks=attacks, device=device, eps=eps, norm=norm, seed=seed, version=version)
            self.verbose, self.log_path = verbose, log_path

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
            x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

    for name in getattr(target, "__all__", [n for n in dir(target) if not n.startswith("_")]):
        setattr(module, name, getattr(target, name))
    module.AutoAttack = AutoAttack
    module.__robust_sparse_adapter__ = True  # lets `robust-sparse doctor` tell the adapter from the real thing


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        if spec.name == ALIAS:
            return None  # a fresh package module, filled in exec_module
        return importlib.import_module(TARGET + spec.name[len(ALIAS):])  # autoattack.state -> pyautoattack.state

    def exec_module(self, module):
        if module.__name__ == ALIAS:
            _build_adapter(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        if importlib.machinery.PathFinder.find_spec(TARGET) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=fullname == ALIAS)


def install() -> None:
    """Idempotent; the finder goes last so that an installed GitHub ``autoattack`` takes precedence."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
