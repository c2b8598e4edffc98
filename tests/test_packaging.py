"""Packaging: attacks/, eval/ and configs/ install only as robust_sparse.attacks, robust_sparse.eval and
robust_sparse.configs, and an installed wheel runs a shipped config by name."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ["robust_sparse", "attacks", "eval", "tests", "benchmarks"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source tree: setuptools reuses the checkout's build/ folder, so a file
    removed from the sources would still ship from a stale build/lib (and two builds at once would share it)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "data",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(source)], check=True, capture_output=True)
    (built,) = (work / "dist").glob("robust_sparse-*.whl")
    return built


def test_wheel_holds_only_the_robust_sparse_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"robust_sparse"}
    assert "robust_sparse/attacks/pgd.py" in names and "robust_sparse/eval/runner.py" in names
    for module in ["robust_sparse/sparse/masker.py", "robust_sparse/models/vgg.py",
                   "robust_sparse/configs/quickstart_mnist5k.yaml", "robust_sparse/eval/leaderboard.csv"]:
        assert module in names, module
    # every package in the source tree is shipped
    for init in (REPO / "robust_sparse").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, init
    assert not any(name.startswith(("tests/", "configs/", "attacks/", "eval/")) for name in names)


def test_wheel_ships_every_config_once(wheel):
    """configs/ (its subfolders too) is the package data robust_sparse.configs, byte for byte; the quickstart is
    one of them, not a second copy beside the code."""
    archive = zipfile.ZipFile(wheel)
    shipped = {name.removeprefix("robust_sparse/configs/"): archive.read(name) for name in archive.namelist()
               if name.startswith("robust_sparse/configs/")}
    source = {path.relative_to(REPO / "configs").as_posix(): path.read_bytes()
              for path in (REPO / "configs").rglob("*") if path.is_file()}
    assert source and shipped == source
    assert not any(name.endswith("quickstart.yaml") for name in archive.namelist())


def test_installed_wheel_runs_a_shipped_config_by_name(wheel, tmp_path):
    """The wheel in a fresh virtual environment (no -e), from a folder without configs/: the name finds the
    shipped file. The environment borrows this one's dependencies through a plain path line in a .pth file, which
    does not run this environment's own .pth files, so the editable install's finder stays off and only the wheel's
    robust_sparse is importable."""
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    borrowed = [entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages")]
    Path(site, "borrowed.pth").write_text("".join(f"{entry}\n" for entry in borrowed))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([python, "-c", "import robust_sparse; print(robust_sparse.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(fresh), where
    result = subprocess.run([fresh / "bin" / "robust-sparse", "train", "--print-config", "cifar10_pgdat_resnet18"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dataset: cifar10" in result.stdout and "out_dir: runs/cifar10_pgdat_resnet18" in result.stdout
    assert str(fresh) in result.stderr  # the log line names the installed file it used
    listing = subprocess.run([fresh / "bin" / "robust-sparse", "configs"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "papers/bsrnet_vgg16_cifar10_pgdat" in listing and str(fresh) in listing


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
