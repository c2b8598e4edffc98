"""Packaging: attacks/ and eval/ install only as robust_sparse.attacks and robust_sparse.eval."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["robust_sparse", "attacks", "eval", "tests", "benchmarks"]


def test_wheel_holds_only_the_robust_sparse_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("robust_sparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"robust_sparse"}
    assert "robust_sparse/attacks/pgd.py" in names and "robust_sparse/eval/runner.py" in names
    for module in ["robust_sparse/sparse/masker.py", "robust_sparse/models/vgg.py", "robust_sparse/quickstart.yaml",
                   "robust_sparse/eval/leaderboard.csv"]:
        assert module in names, module
    # every package in the source tree is shipped
    for init in (REPO / "robust_sparse").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, init
    assert not any(name.startswith(("tests/", "configs/", "attacks/", "eval/")) for name in names)


def test_bare_names_are_not_importable_outside_the_checkout(tmp_path):
    code = (
        "import importlib.util, sys, robust_sparse.attacks, robust_sparse.eval, robust_sparse.train\n"
        "assert importlib.util.find_spec('attacks') is None, 'bare attacks importable'\n"
        "assert importlib.util.find_spec('eval') is None, 'bare eval importable'\n"
        "assert 'attacks' not in sys.modules and 'eval' not in sys.modules\n"
        "assert callable(eval), 'the builtin eval was shadowed'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("path", sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_imports_bare_attacks_or_eval(path):
    assert not _imported_modules(path) & {"attacks", "eval"}


def test_no_print_in_library_code():
    offenders = []
    for folder in ["robust_sparse", "attacks", "eval"]:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"print", "eval", "exec"}:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders


def test_public_api_is_small_and_lazy():
    code = ("import sys, robust_sparse\n"
            "assert 'torch' not in sys.modules, 'importing the package imported torch'\n"
            "assert all(callable(getattr(robust_sparse, name)) for name in robust_sparse.__all__)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_imports_nothing_from_eval():
    """Layering: attacks <- core <- eval. Training must not pull in the evaluation suite (AutoAttack runner)."""
    code = ("import sys, robust_sparse.train, robust_sparse.studies.sweep; "
            "print([m for m in sys.modules if m.startswith('robust_sparse.eval')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
