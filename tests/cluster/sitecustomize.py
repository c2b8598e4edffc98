"""Imported at start-up by every Python process of tests/test_slurm_cluster.py's sweeps (Python's site hook:
tests/cluster is on their PYTHONPATH, and Slurm jobs inherit the submitter's environment). A training process
(``train ... --out RUN_DIR``) writes ``RUN_DIR/probe.<pid>.json``: its pid and the Slurm variables it runs
under, so a test can check that the run trained inside a Slurm job, and send its training process a signal."""

import json
import os
import sys
from pathlib import Path

if "train" in sys.argv and "--out" in sys.argv[:-1]:
    _run_dir = Path(sys.argv[sys.argv.index("--out") + 1])
    if _run_dir.is_dir():
        (_run_dir / f"probe.{os.getpid()}.json").write_text(json.dumps(
            {"pid": os.getpid(), **{name: os.environ.get(name) for name in
                                    ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")}}))
