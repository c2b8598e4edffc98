"""Griffe extensions for the API pages.

:class:`PackageDir`: the packages that pyproject.toml's ``[tool.setuptools.package-dir]``
installs from another folder (``attacks/`` as ``robust_sparse.attacks``, ``eval/`` as ``robust_sparse.eval``, so
that no generic top-level name lands in site-packages) are read from their folders and attached where they are
imported from. Griffe's static analysis finds a package's modules by path, and would not find these.

:class:`RstRoles`: the docstrings cite code the reStructuredText way (``:func:`name```, ``:class:`~a.B```), which
Markdown would print as it stands; the API pages show the name as code instead."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import griffe

REPO = Path(__file__).resolve().parents[2]


def package_dirs() -> dict[str, Path]:
    """Import path -> folder, from pyproject.toml (only those mapped into another package)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    return {name: REPO / folder for name, folder in setuptools.get("package-dir", {}).items()
            if "." in name and (REPO / folder / "__init__.py").is_file()}  # code, not a data-only folder (configs/)


class PackageDir(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for name, folder in package_dirs().items():
            parent, _, child = name.rpartition(".")
            if parent != pkg.path or child in pkg.members:
                continue
            module = loader.load(folder, find_stubs_package=False)
            loader.modules_collection.del_member(module.name)
            module.name = child
            pkg.set_member(child, module)


_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|mod|attr|obj|exc|const):`~?([^`]+)`")


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
