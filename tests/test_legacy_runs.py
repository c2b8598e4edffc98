"""Run and sweep directories written by an older version (2026-12-01, before the sparse-wing redesign; made by
``tests/fixtures/make_legacy_runs.py``) still resume, evaluate, export and report: their configs use the flat
sparsity names of that version (``sparsity.ast_densities``, ``sparsity.gse_candidates``, ...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config, to_dict
from robust_sparse.eval import sources
from robust_sparse.sparse.export import export_checkpoint
from robust_sparse.studies.sweep import load_sweep, run_sweep
from robust_sparse.train import fit

LEGACY = Path(__file__).parent / "fixtures" / "legacy_2026_12"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED["runs"]))
def test_a_run_killed_by_the_old_version_resumes_to_what_it_gave_uninterrupted(name, tmp_path):
    run_dir = tmp_path / name
    shutil.copytree(LEGACY / "runs" / name, run_dir)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    # the run's own config.yaml, as the old version wrote it (flat sparsity names), is what a user resumes with
    config = load_config(run_dir / "config.yaml", [f"out_dir={run_dir}"])
    metrics = fit(config, resume=True).metrics
    expected = EXPECTED["runs"][name]
    assert metrics["epoch"].tolist() == [1, 2]
    # epoch 1 is read back from the old files; epoch 2 is trained now from the old last.pt (its masks, optimizer,
    # AGENT/AST state and random state), so it matches the uninterrupted run up to float reassociation
    assert metrics["train_loss"].tolist() == pytest.approx(expected["train_loss"], rel=1e-3, abs=1e-4)
    for column in ("val_clean_accuracy", "val_pgd_accuracy"):  # 64 validation images: one image is 0.0156
        assert metrics[column].tolist() == pytest.approx(expected[column], abs=1.5 / 64)
    # the same config from the command-line names gives the same fields (the old names still parse)
    fresh = load_config(None, [*EXPECTED["common"], *expected["overrides"], f"out_dir={run_dir}"])
    assert to_dict(fresh)["sparsity"] == to_dict(config)["sparsity"]


def test_an_old_ast_checkpoint_loads_every_subnet_and_exports_one(tmp_path):
    path = LEGACY / "sweep" / "runs" / "seed=0" / "last.pt"  # trained to the end: each sub-net at its density
    models = sources.from_checkpoint_subnets(path)
    assert [m.name.split("/")[-1] for m in models] == ["subnet0", "subnet1"]
    densities = []
    for loaded in models:
        weights = [p for n, p in loaded.model.named_parameters() if n.endswith("weight") and p.dim() > 1]
        densities.append(sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights))
    assert densities == pytest.approx([0.5, 0.2], abs=0.02)  # sub-net 0 the densest, as the sweep asked
    summary = export_checkpoint(path, tmp_path / "export", subnet=1)
    assert summary["subnet"] == 1
    dynamic = export_checkpoint(path, tmp_path / "export-all")  # no --subnet: every sub-net in one model
    assert dynamic["dynamic"]["densities"] == pytest.approx(densities)


def test_an_old_sweep_directory_reruns_as_done_and_reports(tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(LEGACY / "sweep", sweep_dir)
    before = {p: p.read_bytes() for p in sweep_dir.rglob("last.pt")}
    index = run_sweep(load_sweep(LEGACY / "sweep.yaml", str(sweep_dir)))
    assert index["status"].tolist() == ["done", "done"]
    assert {p: p.read_bytes() for p in sweep_dir.rglob("last.pt")} == before  # nothing was retrained
    assert main(["report", str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert sorted(runs["subnet"].unique().tolist()) == [0, 1] and len(runs) == 4
    assert torch.isfinite(torch.tensor(runs["val_pgd_accuracy"].to_numpy())).all()
