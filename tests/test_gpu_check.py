"""benchmarks/gpu_check.py at tiny sizes on the CPU: every section runs and the JSON and Markdown are complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_on_cpu_writes_every_section(tmp_path):
    output = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--output",
                           str(output), "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert {"command", "date", "device", "tiny", "machine", "seconds", "section_seconds", "quickstart", "smoke",
            "throughput", "agent_overhead", "sparse_overhead", "autoattack"} <= set(report)
    assert report["tiny"] is True and report["device"] == "cpu"
    assert report["quickstart"]["exit_code"] == 0 and report["quickstart"]["epochs"] == 1
    assert 0 <= report["quickstart"]["pgd_accuracy"] <= report["quickstart"]["clean_accuracy"] <= 1
    assert report["smoke"]["bf16_channels_last"]["exit_code"] == 0
    assert report["smoke"]["bf16_channels_last"]["finite_losses"] is True
    rows = report["throughput"]
    assert {(r["batch_size"], r["precision"]) for r in rows} == {(8, "fp32"), (8, "bf16"), (16, "fp32"), (16, "bf16")}
    for row in rows:
        assert len(row["toolkit_img_s"]) == len(row["baseline_img_s"]) == row["repeats"] == 2
        assert row["toolkit_median_img_s"] > 0 and row["baseline_median_img_s"] > 0
        assert row["ratio"] == row["toolkit_median_img_s"] / row["baseline_median_img_s"]
        assert row["toolkit_peak_mib"] is None  # CPU: no CUDA memory figure
    assert set(report["agent_overhead"]["sides"]) == {"bsrnet", "bsrnet+agent_full", "bsrnet+agent_quarter"}
    assert set(report["sparse_overhead"]["sides"]) == {"dense", "bsrnet", "rigl"}
    for key in ("agent_overhead", "sparse_overhead"):
        base = report[key]["sides"][report[key]["baseline_side"]]
        assert base["ratio"] == 1.0 and len(base["seconds"]) == 2
    aa = report["autoattack"]
    if (REPO / ".." / "shared" / "data" / "cifar10-prefix" / "cifar-10-batches-py").is_dir():
        assert aa["n_points"] == 8 and 0 <= aa["autoattack_accuracy"] <= aa["clean_accuracy"]
    else:
        assert "absent" in aa["skipped"]
    table = output.with_suffix(".md").read_text()
    for title in ("## Quickstart", "## Smoke runs", "## PGD-10 AT throughput", "## AGENT overhead",
                  "## Sparse-engine overhead", "## AutoAttack"):
        assert title in table
