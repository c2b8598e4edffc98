"""Every benchmark script runs end to end at tiny sizes, so that none can silently rot.

The scripts are discovered by globbing ``benchmarks/*.py`` and ``benchmarks/*.sh``: a new benchmark without a
smoke mode fails here. Python scripts run with ``--smoke``, shell scripts with ``bash SCRIPT --smoke`` and
``$PYTHON`` pointing at this interpreter; each must exit 0 within seconds and print something.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_ast_cost_smoke_ratios_are_the_flops_accounting_of_the_two_runs(tmp_path):
    """benchmarks/ast_cost.py --smoke: every ratio is finite and positive, the time ratio is the ratio of the two
    sides' medians, and the FLOPs ratio is what robust_sparse.flops counts for AST's run and the baseline's run
    (recounted here, in this process, for AST and the sparsest RigL run)."""
    output = tmp_path / "ast_cost.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/ast_cost.py", "--smoke", "--json", str(output)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    seconds, flops = report["seconds"], report["train_flops"]
    assert report["sides"] == ["ast", "rigl@densest", "rigl@sparsest", "gmp@densest", "gmp@sparsest"]
    assert all(len(seconds[side]) == 2 and min(seconds[side]) > 0 for side in report["sides"])
    # the same steps of the same objective: every side's dense-equivalent work is the same
    assert len(set(report["dense_train_flops"].values())) == 1
    for side in report["sides"]:  # sparse training counts less than the dense model's steps, but not nothing
        assert 0 < flops[side] < report["dense_train_flops"][side]
    for row in report["rows"]:
        base = row["baseline"]
        for key in ("time ratio", "ratio min", "ratio max", "FLOPs ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (base, key, row[key])
        assert row["ratio min"] <= row["ratio max"]
        assert row["time ratio"] == pytest.approx(statistics.median(seconds["ast"]) / statistics.median(seconds[base]))
        assert row["FLOPs ratio"] == flops["ast"] / flops[base]

    spec = importlib.util.spec_from_file_location("ast_cost", BENCHMARKS / "ast_cost.py")
    ast_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ast_cost)
    args = argparse.Namespace(**report["run"])
    data = ast_cost.real_batches(args.batches * args.batch_size, 1, 28)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran: AST's global |W| threshold sees the same float sums
    try:
        recount = {side: ast_cost.measure(args, side, data, torch.device("cpu"))[1]
                   for side in ("ast", "rigl@sparsest")}
    finally:
        torch.set_num_threads(threads)
    assert {side: counter.train_flops for side, counter in recount.items()} == {
        "ast": flops["ast"], "rigl@sparsest": flops["rigl@sparsest"]}
    row = next(row for row in report["rows"] if row["baseline"] == "rigl@sparsest")
    assert row["FLOPs ratio"] == recount["ast"].train_flops / recount["rigl@sparsest"].train_flops
