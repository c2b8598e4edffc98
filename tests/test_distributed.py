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
    extra = ["sparsity.ast_densities=[0.3, 0.1]", "sparsity.update_every=2"] if engine == "ast" else []
    rank0, rank1 = _run(tmp_path, f"sparsity.method={engine}", "sparsity.density=0.3", "sparsity.update_every=3",
                        "sparsity.distribution=erk", "agent.enabled=true", "agent.gamma=0.1", *extra)
    _assert_identical(rank0, rank1)  # c, c_hat and every sub-net's g_tilde included
    assert rank0["masks"] and rank0["full_grads"] is not None  # the engines and AGENT really ran
    assert torch.isfinite(rank0["c_hat"])
    # AGENT's g_tilde pass is sharded: of the 512 // 32 = 16 batches of the pass, each rank ran 8 (the first
    # refresh needs no pass), and the all-reduce gave both the same g_tilde and c.
    assert rank0["pass_batches"] == rank1["pass_batches"] == [0, 8]
    from robust_sparse.checkpoint import load_checkpoint

    saved = load_checkpoint(tmp_path / "run" / "last.pt")  # written once, by rank 0
    _assert_identical(saved["model"], rank0["model"])
    assert saved["epoch"] == 2
