"""Every benchmark script runs end to end at tiny sizes, so that none can silently rot.

The scripts are discovered by globbing ``benchmarks/*.py`` and ``benchmarks/*.sh``: a new benchmark without a
smoke mode fails here. Python scripts run with ``--smoke``, shell scripts with ``bash SCRIPT --smoke`` and
``$PYTHON`` pointing at this interpreter; each must exit 0 within seconds and print something.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TIMEOUT_S = 120

# Scripts not run here, each with the reason: a tiny run another test already makes (with flags of its own), or
# a helper another benchmark runs (not a benchmark of its own). Anything else in benchmarks/ must have --smoke.
NOT_RUN_HERE = {
    # `gpu_check.py --tiny --device cpu --output ... --work-dir ...`: tests/test_gpu_check.py runs it and checks
    # every section of its JSON and Markdown report.
    "gpu_check.py": "its tiny run is covered by tests/test_gpu_check.py",
    # sparse_inference.py runs it with DeepSparse's own python (deepsparse needs numpy<2: not in this venv).
    "deepsparse_timer.py": "a helper that sparse_inference.py runs under DeepSparse's own python",
}


def discover() -> list[Path]:
    return sorted([*BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("*.sh")])


def smoke_command(script: Path) -> list[str]:
    if script.suffix == ".sh":
        return ["bash", str(script.relative_to(REPO)), "--smoke"]
    return [sys.executable, str(script.relative_to(REPO)), "--smoke"]


def test_discovery_finds_the_benchmarks():
    names = {script.name for script in discover()}
    assert {"sparse_overhead.py", "sparse_training.py", "sparse_inference.py", "throughput.py",
            "epoch_cost.sh", "gpu_check.py"} <= names


@pytest.mark.parametrize("script", discover(), ids=lambda script: script.name)
def test_benchmark_smoke_run(script: Path):
    if script.name in NOT_RUN_HERE:
        pytest.skip(f"{script.name}: {NOT_RUN_HERE[script.name]}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(smoke_command(script), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert done.stdout.strip(), f"no output on stdout\n{done.stderr[-2000:]}"
