"""No code and no exit from inputs: pickled CIFAR batches, --model factories, --attacks, SIGTERM."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.datasets.cifar10 import load_cifar
from robust_sparse.errors import UserError
from robust_sparse.files.plain_pickle import NotPlainPickle, load_plain

# the real CIFAR-10 prefix beside the repository, as the project's CI has it (never copied into the project)
REAL_PREFIX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-prefix"


def _one_error_line(captured) -> str:
    """stderr holds exactly one robust-sparse line, an error, and no traceback; returns it."""
    ours = [line for line in captured.err.strip().splitlines() if line.startswith("robust-sparse")]
    assert len(ours) == 1 and ours[0].startswith("robust-sparse: error: "), captured.err
    assert "Traceback" not in captured.err
    return ours[0]


# ----------------------------------------------------------------------------------------------------------
# CIFAR batches


class Payload:
    """What an attacker would pickle: unpickling it calls exec, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _cifar_root(tmp_path: Path, test_batch: dict) -> Path:
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(good))
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch))
    return tmp_path / "data"


def test_a_payload_in_a_cifar_batch_never_runs_and_is_one_line(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    root = _cifar_root(tmp_path, {b"data": Payload(marker), b"labels": [0]})
    assert pickle.loads(pickle.dumps(Payload(tmp_path / "control.txt"))) is None  # plain pickle would run it
    assert (tmp_path / "control.txt").read_text() == "ran"
    code = main(["train", "--set", "data.dataset=cifar10", "--set", f"data.root={root}", "--set", "data.val_size=2",
                 "--set", "model.name=tiny_cnn", "--set", "device=cpu", "--out", str(tmp_path / "run")])
    line = _one_error_line(capsys.readouterr())
    assert code == 2 and not marker.exists()
    assert "test_batch" in line and "builtins.exec" in line and "nothing in it was run" in line


@pytest.mark.parametrize("content, reason", [
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, "dtype"),
    ({b"data": np.array([object()] * 2, dtype=object), b"labels": [0, 1]}, "dtype"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"extra": {1, 2}.__class__}, "builtins.set"),
])
def test_anything_but_plain_types_is_refused_naming_the_file(tmp_path, content, reason):
    root = _cifar_root(tmp_path, content)
    with pytest.raises(UserError, match=f"test_batch is not a plain CIFAR batch.*{reason}"):
        load_cifar("cifar10", root, download=False, need_train=False)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_repickled_by_numpy_read_exactly(protocol):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    batch = {b"data": data, b"labels": [3, 1, 4], b"filenames": [b"a.png", "b.png"], "batch_label": "x"}
    read = load_plain(pickle.dumps(batch, protocol=protocol))
    assert np.array_equal(read[b"data"], data) and read[b"data"].dtype == np.uint8
    assert read[b"labels"] == [3, 1, 4] and read[b"filenames"] == [b"a.png", "b.png"]


def test_a_shape_that_does_not_match_the_bytes_is_refused():
    # a hand-made ndarray state claiming more pixels than it holds
    text = pickle.dumps({b"data": np.zeros(4, np.uint8)}, protocol=2).replace(b"K\x04\x85", b"K\x08\x85")
    with pytest.raises(NotPlainPickle, match="shape"):
        load_plain(text)


@pytest.mark.skipif(not REAL_PREFIX.is_dir(), reason=f"the real CIFAR-10 prefix is not at {REAL_PREFIX}")
def test_the_genuine_cifar_files_read_as_plain_pickle_would():
    train, test = load_cifar("cifar10", REAL_PREFIX, download=False)
    with open(REAL_PREFIX / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        reference = pickle.load(handle, encoding="bytes")  # the trusted copy the project ships with
    assert torch.equal(test.images, torch.from_numpy(reference[b"data"].reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == reference[b"labels"] and len(train) == 4660


# ----------------------------------------------------------------------------------------------------------
# --model factories


def _eval_factory(spec: str, tmp_path: Path) -> list[str]:
    return ["eval", "--model", spec, "--dataset", "mnist5k", "--n-examples", "4", "--attacks", "fgsm",
            "--no-probe", "--device", "cpu", "--no-progress", "--results-dir", str(tmp_path / "results")]


def test_a_factory_that_exits_at_import_is_one_line_and_our_exit_code(tmp_path, capsys):
    factory = tmp_path / "quits.py"
    factory.write_text("import sys\nsys.exit(0)\n")
    assert main(_eval_factory(f"{factory}:build", tmp_path)) == 2
    line = _one_error_line(capsys.readouterr())
    assert f"--model {factory}:build" in line and "SystemExit(0)" in line
    assert not (tmp_path / "results").exists()


def test_builtins_exit_as_a_factory_is_one_line(tmp_path, capsys):
    assert main(_eval_factory("builtins:exit", tmp_path)) == 2
    line = _one_error_line(capsys.readouterr())
    assert "--model builtins:exit" in line and "exit()" in line and "SystemExit" in line


def test_a_factory_with_its_own_argparse_speaks_under_its_own_name(tmp_path, capsys):
    factory = tmp_path / "cli_model.py"
    factory.write_text("import argparse\nparser = argparse.ArgumentParser()\n"
                       "parser.add_argument('--depth', type=int, required=True)\nargs = parser.parse_args()\n"
                       "def build():\n    raise AssertionError('never reached')\n")
    assert main(_eval_factory(f"{factory}:build", tmp_path)) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured)
    assert "SystemExit(2)" in line
    # argparse's own usage and error name the factory's file (its argv), never robust-sparse or our flags
    own = [text for text in captured.err.splitlines() if not text.startswith("robust-sparse")]
    assert any(text.startswith("usage: cli_model.py") for text in own), captured.err
    assert any("cli_model.py: error: the following arguments are required: --depth" in text for text in own)
    assert "--n-examples" not in captured.err


@pytest.mark.parametrize("name", ["model.txt", "model.pyc"])
def test_a_factory_path_that_is_not_python_is_one_line(tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("def build(): pass\n")
    for spec in (f"{name}:build", f"{tmp_path / name}:build"):
        assert main(_eval_factory(spec, tmp_path)) == 2
        line = _one_error_line(capsys.readouterr())
        assert f"--model {spec}" in line and "not a Python file" in line


# ----------------------------------------------------------------------------------------------------------
# --attacks


@pytest.mark.parametrize("attacks", [",", "", " , ,"])
def test_attacks_naming_no_attack_are_refused(attacks, tmp_path, capsys):
    argv = ["eval", "--arch", "tiny_cnn", "--weights", str(tmp_path / "absent.pt"), "--dataset", "mnist5k",
            "--attacks", attacks, "--results-dir", str(tmp_path / "results")]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr())
    assert "--attacks" in line and "names no attack" in line and "pgd" in line
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------------
# SIGTERM


TINY_TRAINING = ["--set", "model.name=tiny_cnn", "--set", "sparsity.method=none", "--set", "data.train_limit=256",
                 "--set", "data.val_size=64", "--set", "data.batch_size=64", "--set", "optim.epochs=2",
                 "--set", "attack.steps=1", "--set", "val.pgd_steps=1", "--set", "val.max_examples=64",
                 "--set", "eval.n_examples=0", "--set", "eval.autoattack_examples=0", "--set", "device=cpu",
                 "--no-progress"]


def test_sigterm_stops_training_in_one_line_and_resume_continues(tmp_path, capsys, monkeypatch):
    from robust_sparse import train

    run = tmp_path / "run"
    save_epoch = train._save_epoch
    saved = []

    def save_then_get_terminated(run_state, record, checkpoint, is_best):
        save_epoch(run_state, record, checkpoint, is_best)
        saved.append(checkpoint["epoch"])
        if len(saved) == 1:  # as a scheduler would: a real SIGTERM to this process, after epoch 1's checkpoint
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "_save_epoch", save_then_get_terminated)
    assert main(["train", *TINY_TRAINING, "--out", str(run)]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    ours = [line for line in captured.err.splitlines() if line.startswith("robust-sparse")]
    assert ours == ["robust-sparse: terminated (SIGTERM); resume with --resume"] and "Traceback" not in captured.err
    assert saved == [1] and load_checkpoint(run / "last.pt")["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() gives the handler back
    assert main(["train", *TINY_TRAINING, "--out", str(run), "--resume"]) == 0
    assert saved == [1, 2] and load_checkpoint(run / "last.pt")["epoch"] == 2
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + epochs 1..2, none twice
