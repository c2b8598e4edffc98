"""Inputs from the wide world (issue 32): plugin modules, the Python API's loaders and the warnings of the
libraries imported on the way to a refusal. Each bad input is one line naming the module or file, never a
traceback, and nothing outside the output is changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line_error, snapshot
from robust_sparse import plugins

# ----------------------------------------------------------------------------------------------------------
# $ROBUST_SPARSE_PLUGINS


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    """A folder on sys.path for plugin modules, with the once-per-process import flag reset."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "_imported", False)
    yield folder
    for path in folder.glob("*.py"):
        sys.modules.pop(path.stem, None)


PLUGINS = {
    "exits_zero": ("import sys\nsys.exit(0)\n", "sys.exit(0)"),
    "exits_text": ("raise SystemExit('bye')\n", "sys.exit('bye')"),
    "raises": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    "broken_syntax": ("def f(:\n    pass\n", "SyntaxError"),
    "imports_missing": ("import no_such_dependency_xyz\n", "no_such_dependency_xyz"),
}


@pytest.mark.parametrize("module", sorted(PLUGINS))
def test_a_plugin_that_fails_or_exits_is_one_line_naming_it_and_nothing_trains(module, plugin_folder, tmp_path,
                                                                              monkeypatch, capsys):
    source, reason = PLUGINS[module]
    (plugin_folder / f"{module}.py").write_text(source)
    monkeypatch.setenv(plugins.VARIABLE, module)
    run = tmp_path / "run"
    line = one_line_error(["train", "--set", "model.name=tiny_cnn", "--set", "sparsity.method=plugin-method",
                           "--set", "device=cpu", "--out", str(run)], capsys)
    assert plugins.VARIABLE in line and repr(module) in line and reason in line, line
    assert not run.exists()


@pytest.mark.parametrize("name", [".relative", "a..b", "my plugin", "my-plugin", "1st"])
def test_a_plugin_name_that_is_no_module_name_is_refused_naming_it(name, plugin_folder, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv(plugins.VARIABLE, f"os,{name}")
    run = tmp_path / "run"
    line = one_line_error(["train", "--set", "model.name=no_such_model", "--set", "device=cpu", "--out", str(run)],
                          capsys)
    assert plugins.VARIABLE in line and repr(name) in line and "not a module name" in line, line
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------------
# the first line of a refusal is the toolkit's, not a dependency's import-time warning


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: timm and robustbench warn only when first imported, which this test process may
    # have done already. Default warning filters, as a user's shell has them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "robust_sparse.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def weights(tmp_path):
    import torch

    path = tmp_path / "weights.pt"
    torch.save({}, path)
    return path


@pytest.mark.parametrize("argv,named", [
    (["--arch", "timm:NO_SUCH", "--dataset", "cifar10"], "NO_SUCH"),
    (["--arch", "resnet18", "--dataset", "cifar10", "--threat-model", "corruptions", "--corruptions", "nosuch"],
     "--corruptions"),
])
def test_a_refusal_after_importing_timm_or_robustbench_is_exactly_one_line(argv, named, weights, tmp_path):
    before = snapshot(tmp_path)
    result = _cli(tmp_path, "eval", "--weights", str(weights), *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("robust-sparse: error: ") and named in lines[0], result.stderr
    assert snapshot(tmp_path) == before
