"""Two CPU processes under torchrun (gloo): masks, BSR-Net rewiring and AGENT's state stay identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(tmp_path, *overrides):
    out = tmp_path / "ranks"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(out), "model.name=tiny_cnn", "data.train_limit=512", "data.val_size=64", "data.batch_size=32",
               "optim.epochs=2", "attack.steps=1", "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "device=cpu", f"out_dir={tmp_path / 'run'}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _assert_identical(a, b, path="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("engine", ["bsrnet", "rigl", "ast"])
def test_two_ranks_keep_masks_rewiring_and_agent_state_identical(tmp_path, engine):
    # AST's sub-nets have densities of their own (it refuses sparsity.density)
    extra = ["sparsity.ast_densities=[0.3, 0.1]", "sparsity.update_every=2"] if engine == "ast" else \
        ["sparsity.density=0.3"]
    rank0, rank1 = _run(tmp_path, f"sparsity.method={engine}", "sparsity.update_every=3",
                        "sparsity.distribution=erk", "agent.enabled=true", "agent.gamma=0.1", *extra)
    _assert_identical(rank0, rank1)  # c, c_hat and every sub-net's g_tilde included
    assert rank0["masks"] and rank0["full_grads"] is not None  # the engines and AGENT really ran
    assert torch.isfinite(rank0["c_hat"])
    # AGENT's g_tilde pass is sharded: of the 512 // 32 = 16 batches of the pass, each rank ran 8 (the first
    # refresh needs no pass), and the all-reduce gave both the same g_tilde and c.
    assert rank0["pass_batches"] == rank1["pass_batches"] == [0, 8]
    from robust_sparse.files.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "run" / "last.pt")  # written once, by rank 0
    _assert_identical(saved["model"], rank0["model"])
    assert saved["epoch"] == 2


def test_two_ranks_report_the_whole_run_once(tmp_path):
    """metrics.csv holds the epoch's figures over both ranks' batches, and only rank 0 prints or logs."""
    import pandas as pd

    out, logs, run_dir = tmp_path / "ranks", tmp_path / "logs", tmp_path / "run"
    out.mkdir()
    sets = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "data.batch_size=32", "optim.epochs=2",
            "attack.steps=1", "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=32", "eval.pgd_steps=1",
            "eval.autoattack_examples=0", "sparsity.method=rigl", "sparsity.density=0.3", "device=cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--redirects", "3", str(WORKER), "--cli", str(out), "--out", str(run_dir),
               *(part for item in sets for part in ("--set", item))]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True)["batches"] for r in (0, 1)]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 2
    for epoch, row in metrics.iterrows():
        union = torch.cat([batches[epoch] for batches in per_rank])  # (loss * n, correct, n) per batch
        assert union[:, 2].sum() == 256  # each rank trained its own 4 batches of 32
        assert row["train_loss"] == pytest.approx(float(union[:, 0].sum() / union[:, 2].sum()), rel=1e-5)
        assert row["train_accuracy"] == pytest.approx(float(union[:, 1].sum() / union[:, 2].sum()), abs=1e-12)
        assert row["images_per_second"] * row["train_seconds"] == pytest.approx(256)
        shard = per_rank[0][epoch]  # rank 0's own figure differs: the reduction is what made the row
        assert row["train_loss"] != pytest.approx(float(shard[:, 0].sum() / shard[:, 2].sum()), rel=1e-5)

    def output(rank):
        return "".join(path.read_text() for path in sorted(logs.rglob(f"{rank}/std*.log")))

    rank0, rank1 = output(0), output(1)
    assert rank0.count("run directory:") == 1 and rank0.count("epoch 2/2") == 1 and "test (first 32" in rank0
    assert rank1 == ""  # neither the metrics table nor a log line: rank 0 speaks for the run


def test_sync_bn_on_cpu_ranks_is_refused_in_one_line(tmp_path, monkeypatch):
    """SyncBatchNorm runs on CUDA only: several CPU (gloo) ranks with train.sync_bn stop before any data is read."""
    from robust_sparse import distributed
    from robust_sparse.config import load_config
    from robust_sparse.errors import UserError
    from robust_sparse.train import fit

    monkeypatch.setattr(distributed, "setup", lambda device: distributed.Context(rank=0, world_size=2, device=device))
    monkeypatch.setattr("robust_sparse.run_setup.load_splits", lambda *args: pytest.fail("data read before the check"))
    config = load_config(None, ["model.name=tiny_cnn", "device=cpu", "train.sync_bn=true", f"out_dir={tmp_path}"])
    with pytest.raises(UserError, match="train.sync_bn = true: SyncBatchNorm runs on CUDA devices only"):
        fit(config)


def test_a_run_directory_in_use_is_refused_before_the_process_group_forms(tmp_path, monkeypatch):
    """Only rank 0 takes the run directory's lock, once the process group has formed; a directory another run
    holds must be refused before that, on every rank, or the others would wait for rank 0 until the timeout."""
    from robust_sparse import distributed
    from robust_sparse.files import rundir
    from robust_sparse.config import load_config
    from robust_sparse.errors import OutputError
    from robust_sparse.train import fit

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed, "setup", lambda device: pytest.fail("the process group formed before the check"))
    config = load_config(None, ["model.name=tiny_cnn", "device=cpu", f"out_dir={tmp_path / 'run'}"])
    with rundir.locked(tmp_path / "run", rundir.Kind.TRAIN, "out_dir"):
        with pytest.raises(OutputError, match=f"^out_dir {tmp_path / 'run'}: in use by pid {os.getpid()} on "):
            fit(config)


def test_every_rank_stops_with_the_same_line_when_the_run_directory_is_in_use(tmp_path):
    """Under torchrun, a run directory another process holds: each rank prints the one-line refusal and nothing
    else (before the fix, rank 1 went on into the process group and died there with a traceback)."""
    from robust_sparse.files import rundir

    out, logs, run_dir = tmp_path / "ranks", tmp_path / "logs", tmp_path / "run"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(logs), "--redirects", "3", str(WORKER), "--cli", str(out), "--out", str(run_dir),
               "--set", "model.name=tiny_cnn", "--set", "device=cpu"]
    with rundir.locked(run_dir, rundir.Kind.TRAIN, "out_dir"):  # another run holds it
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                timeout=300)
    assert result.returncode != 0
    errors = [[line for line in path.read_text().splitlines() if line.strip()]
              for rank in (0, 1) for path in sorted(logs.rglob(f"{rank}/stderr.log"))]
    expected = f"robust-sparse: error: out_dir {run_dir}: in use by pid {os.getpid()} on "
    assert len(errors) == 2 and all(len(lines) == 1 and lines[0].startswith(expected) for lines in errors), errors
    assert errors[0] == errors[1]
