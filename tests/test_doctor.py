"""`robust-sparse doctor`: it must detect the known breakages and name the fix."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import subprocess
import sys

import pytest

from robust_sparse.environment import doctor


def _fake_robustbench(tmp_path):
    """A minimal installed-looking robustbench distribution (package + dist-info with hashed RECORD)."""
    package = tmp_path / "robustbench"
    package.mkdir()
    files = {"robustbench/__init__.py": b"from .eval import benchmark\n", "robustbench/eval.py": b"def benchmark(): ...\n"}
    record = []
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content)}")
    info = tmp_path / "robustbench-1.1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: robustbench\nVersion: 1.1.1\n")
    (info / "RECORD").write_text("\n".join(record + ["robustbench-1.1.1.dist-info/RECORD,,"]) + "\n")
    return metadata.PathDistribution(info)


def test_overwritten_robustbench_is_detected_with_the_reinstall_fix(tmp_path, monkeypatch):
    distribution = _fake_robustbench(tmp_path)
    monkeypatch.setattr(doctor.metadata, "distribution", lambda name: distribution)
    monkeypatch.setattr(doctor, "_version", lambda name: "1.1.1")
    assert doctor.check_robustbench_files().ok
    # what the torchattacks wheel does: a stale __init__ without `from .eval import benchmark`
    (tmp_path / "robustbench" / "__init__.py").write_text("# from .eval import benchmark\n")
    (tmp_path / "robustbench" / "eval.py").unlink()
    result = doctor.check_robustbench_files()
    assert not result.ok and "2 files" in result.detail
    assert "--force-reinstall --no-deps robustbench==1.1.1" in result.fix


def test_missing_pkg_resources_is_detected(monkeypatch):
    real_find_spec = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pkg_resources" else real_find_spec(name, *a))
    result = doctor.check_pkg_resources()
    assert not result.ok and '"setuptools<81"' in result.fix


def test_installed_stack_is_healthy():
    """The environment the tests run in was set up by the README command, `doctor --fix` included."""
    results = doctor.run_checks()
    report = doctor.format_report(results)
    assert all(r.ok for r in results), report


def test_plain_import_robustbench_in_fresh_interpreter(tmp_path):
    code = "import robustbench; from robustbench.eval import benchmark; from robustbench.utils import load_model"
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, cwd=tmp_path)


def test_autoattack_adapter_speaks_the_github_api():
    import torch

    from robust_sparse.environment.compat import import_autoattack

    autoattack = import_autoattack()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    attack = autoattack.AutoAttack(model, norm="Linf", eps=0.1, version="standard", device="cpu",
                                   log_path="/dev/null", seed=0)
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    # Points the model already gets wrong are returned untouched and cost nothing; use only those so the
    # call is instant but still goes through the real pyautoattack code path.
    if wrong.any():
        x_adv = attack.run_standard_evaluation(x[wrong], y[wrong], bs=2)
        assert isinstance(x_adv, torch.Tensor) and x_adv.shape == x[wrong].shape
    assert attack.epsilon == 0.1 and attack.norm == "Linf"
    assert attack.apgd.n_iter == 100 and attack.square.n_queries == 5000  # the original "standard" budget


def test_doctor_command_reports_in_one_table(capsys):
    from robust_sparse.cli import main

    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0 and "all checks passed" in out
    for name in ["torch", "torchvision", "robustbench files", "AutoAttack", "import robustbench", "devices"]:
        assert name in out
