"""``robust-sparse eval`` and ``robust-sparse report`` end to end: every option, resume, and one-line errors."""

from __future__ import annotations

import json
import logging
import pickle

import pandas as pd
import pytest
import torch

from robust_sparse.files.checkpoint import save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config, to_dict


@pytest.fixture(scope="module")
def weights(trained_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(trained_tiny.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(trained_tiny, tmp_path_factory):
    config = load_config(None, ["model.name=tiny_cnn", "attack.eps=0.2"])
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint({"config": to_dict(config), "model": trained_tiny.state_dict(), "epoch": 2}, path)
    return path


@pytest.fixture(scope="module")
def cifar_root(mnist, tmp_path_factory):
    """A CIFAR-10 test batch in torchvision's layout made of real MNIST-5k digits padded to 3x32x32."""
    _, test = mnist
    root = tmp_path_factory.mktemp("data")
    images = torch.nn.functional.pad(test.images[:50], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    (root / "cifar-10-batches-py").mkdir()
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": images.reshape(50, -1).numpy(), b"labels": test.labels[:50].tolist()}, handle)
    return str(root)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from robust_sparse.environment.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("zoo")
    (directory / "cifar10" / "Linf").mkdir(parents=True)
    state = {f"module.{k}": v for k, v in WideResNet(depth=28, widen_factor=10).state_dict().items()}
    torch.save({"state_dict": state}, directory / "cifar10" / "Linf" / "Standard.pt")
    return str(directory)


def _rows(results_dir):
    return json.loads((results_dir / "results.json").read_text())


def _tiny(weights, *extra):
    return ["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "mnist5k", "--device", "cpu",
            "--no-progress", *extra]


def test_eval_weights_writes_the_store_and_resumes(weights, tmp_path, capsys, caplog):
    results = tmp_path / "results"
    argv = _tiny(weights, "--n-examples", "24", "--eps", "0.05,0.1", "--attacks", "fgsm,pgd-5x2,cw-5", "--seed", "1",
                 "--batch-size", "10", "--name", "tiny", "--results-dir", str(results), "--output",
                 str(tmp_path / "out.json"))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tiny on mnist5k (24 points, Linf eps=0.05" in out and "clean accuracy" in out and "PGD-5x2" in out
    rows = _rows(results)
    assert [r["eps"] for r in rows] == [0.05, 0.1] and all(r["n_examples"] == 24 and r["seed"] == 1 for r in rows)
    assert rows[0]["per_attack"].keys() == {"FGSM", "PGD-5x2", "CW-5x1"} and rows[0]["pgd_attack"] == "PGD-5x2"
    assert rows[1]["worst_acc"] <= rows[1]["pgd_acc"] <= rows[1]["clean_acc"]
    assert rows[0]["large_eps"] == 0.5 and rows[0]["large_eps_acc"] == 0.0 and rows[0]["warnings"] == []
    assert len(pd.read_csv(results / "results.csv")) == 2 and len(list((results / "flags").glob("*.pt"))) == 2
    output = json.loads((tmp_path / "out.json").read_text())
    assert [o["pgd_accuracy"] for o in output] == [r["pgd_acc"] for r in rows]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0  # same settings: resumes from the flags, nothing attacked again
    assert "resuming from" in caplog.text and "FGSM:" not in caplog.text
    assert _rows(results) == rows  # the same finished evaluations: not appended a second time (issue 21)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(argv + ["--fresh"]) == 0
    assert "resuming from" not in caplog.text and "FGSM:" in caplog.text


def test_eval_pgd_step_size_and_zero_start_are_stored_with_the_attack(weights, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(_tiny(weights, "--n-examples", "16", "--attacks", "pgd:step=2/255:start=zero", "--pgd-steps", "3",
                      "--no-probe", "--results-dir", str(results))) == 0
    assert "PGD-3x1:step=2/255:start=zero" in capsys.readouterr().out
    (row,) = _rows(results)
    assert row["attacks"] == "pgd-3x1:step=2/255:start=zero" and row["pgd_attack"] == "PGD-3x1:step=2/255:start=zero"
    assert row["per_attack"].keys() == {"PGD-3x1:step=2/255:start=zero"}


def test_eval_checkpoint_defaults_to_the_run(checkpoint, capsys):
    assert main(["eval", str(checkpoint), "--n-examples", "40", "--attacks", "pgd", "--pgd-steps", "3", "--restarts",
                 "2", "--no-probe", "--device", "cpu", "--no-progress"]) == 0
    (row,) = _rows(checkpoint.parent / "eval")  # default store: next to the checkpoint
    assert (row["model"], row["eps"], row["threat_model"], row["pgd_attack"]) == (f"{checkpoint.parent.name}/best", 0.2,
                                                                                 "Linf", "PGD-3x2")
    assert row["large_eps"] is None and row["source"] == "checkpoint"
    assert main(["eval", str(checkpoint), "--n-examples", "20", "--attacks", "fgsm", "--threat-model", "L2",
                 "--no-probe", "--results-dir", str(checkpoint.parent / "l2")]) == 0
    (row,) = _rows(checkpoint.parent / "l2")
    assert (row["threat_model"], row["eps"]) == ("L2", 2.0)  # the protocol's MNIST L2 radius


def test_eval_robustbench_model_from_a_local_model_dir(zoo, cifar_root, tmp_path, capsys):
    results = tmp_path / "rb"
    assert main(["eval", "--robustbench-model", "Standard", "--dataset", "cifar10", "--threat-model", "Linf",
                 "--model-dir", zoo, "--data-root", cifar_root, "--n-examples", "3", "--attacks", "fgsm", "--no-probe",
                 "--results-dir", str(results)]) == 0
    (row,) = _rows(results)
    assert (row["model"], row["source"], row["dataset"], row["n_examples"]) == ("Standard", "robustbench", "cifar10", 3)
    assert row["eps"] == pytest.approx(8 / 255) and row["params"] == 36_479_194


def test_cross_check_large_eps_and_backend_options(weights, tmp_path, capsys):
    results = tmp_path / "x"
    assert main(_tiny(weights, "--n-examples", "8", "--eps", "0.3", "--attacks", "pgd-5x1", "--cross-check-torchattacks",
                      "--autoattack-backend", "github", "--large-eps", "0.6", "--results-dir", str(results))) == 0
    out = capsys.readouterr().out
    assert "cross-check: torchattacks-AA (configured to match)" in out
    (row,) = _rows(results)
    assert row["cross_check"]["difference"] == 0.0 and row["large_eps"] == 0.6
    assert row["attacks"] == "pgd-5x1,autoattack,torchattacks-aa" and row["autoattack_backend"] == "autoattack (GitHub API)"


def test_chained_mode(weights, tmp_path):
    results = tmp_path / "c"
    assert main(_tiny(weights, "--n-examples", "16", "--eps", "0.08", "--attacks", "pgd-5x1,fgsm", "--chained",
                      "--no-probe", "--results-dir", str(results))) == 0
    (row,) = _rows(results)
    assert row["mode"] == "chained" and row["per_attack"]["FGSM"] <= row["per_attack"]["PGD-5x1"]


def test_data_file_option(weights, mnist, tmp_path):
    _, test = mnist
    path = tmp_path / "points.pt"
    torch.save({"images": test.images[100:110].float() / 255, "labels": test.labels[100:110]}, path)
    assert main(_tiny(weights, "--data-file", str(path), "--attacks", "fgsm", "--no-probe", "--results-dir",
                      str(tmp_path / "d"))) == 0
    (row,) = _rows(tmp_path / "d")
    assert row["n_examples"] == 10


def test_download_option_reports_a_failed_download_in_one_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    from robust_sparse.datasets import DATASETS
    from robust_sparse.models import build_model

    info = DATASETS.get("cifar10")
    path = tmp_path / "cifar_tiny.pt"
    torch.save(build_model("tiny_cnn", 10, 3, info.mean, info.std).state_dict(), path)
    requested = []

    def offline(root, train=True, download=False):
        requested.append(download)
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    code = main(["eval", "--arch", "tiny_cnn", "--weights", str(path), "--dataset", "cifar10", "--data-root",
                 str(tmp_path), "--download"])
    error = capsys.readouterr().err.strip().splitlines()
    assert requested == [True] and code == 2 and len(error) == 1
    assert error[0].startswith("robust-sparse: error: could not download cifar10")
    assert main(["eval", "--arch", "tiny_cnn", "--weights", str(path), "--dataset", "cifar10", "--data-root",
                 str(tmp_path)]) == 2  # without --download: no attempt, a message saying what is missing
    assert requested == [True] and "cifar10 not found" in capsys.readouterr().err


def _float_255_file(mnist, tmp_path):
    _, test = mnist
    path = tmp_path / "bad_range.pt"
    torch.save({"images": test.images[:8].float(), "labels": test.labels[:8]}, path)  # 0-255 floats
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (lambda w, c, z, m, t: ["eval"], "exactly one model"),
    (lambda w, c, z, m, t: ["eval", str(c), "--arch", "tiny_cnn", "--weights", w], "exactly one model"),
    (lambda w, c, z, m, t: ["eval", "--arch", "tiny_cnn", "--dataset", "mnist5k"], "--arch needs --weights"),
    (lambda w, c, z, m, t: ["eval", "--arch", "tiny_cnn", "--weights", w], "--dataset is required"),
    (lambda w, c, z, m, t: ["eval", "--arch", "nope", "--weights", w, "--dataset", "mnist5k"], "unknown model 'nope'"),
    (lambda w, c, z, m, t: ["eval", "--robustbench-model", "Nope", "--dataset", "cifar10", "--model-dir", z],
     "unknown RobustBench model 'Nope'"),
    (lambda w, c, z, m, t: ["eval", str(t / "missing.pt")], "checkpoint not found"),
    (lambda w, c, z, m, t: _tiny(w, "--n-examples", "5000"), "the test set has only 1000 points"),
    (lambda w, c, z, m, t: _tiny(w, "--attacks", "pgd,deepfool"), "unknown attack 'deepfool'"),
    (lambda w, c, z, m, t: _tiny(w, "--attacks", "fgsm,pgd-5x1:step=2/0"),
     "--attacks: attack 'pgd-5x1:step=2/0': step=2/0: must be a finite size > 0 in pixel units"),
    (lambda w, c, z, m, t: _tiny(w, "--attacks", "fgsm:start=zero"), "--attacks: attack 'fgsm:start=zero': fgsm takes no"),
    (lambda w, c, z, m, t: _tiny(w, "--attacks", ","), "--attacks ',': names no attack"),
    (lambda w, c, z, m, t: _tiny(w, "--data-file", _float_255_file(m, t)), r"must lie in [0, 1]"),
    (lambda w, c, z, m, t: _tiny(w, "--eps", "eight"), "expected a number"),
    (lambda w, c, z, m, t: _tiny(w, "--eps", "2", "--n-examples", "4"), "must be <= 1 for linf"),
    (lambda w, c, z, m, t: _tiny(w, "--threat-model", "L1"), "--threat-model: 'L1' is not one of linf, l2, corruptions"),
    (lambda w, c, z, m, t: _tiny(w, "--batch-size", "0"), "--batch-size 0"),
    (lambda w, c, z, m, t: _tiny(w, "--autoattack-backend", "foolbox"), "invalid choice"),
    (lambda w, c, z, m, t: _tiny(w, "--chained", "--cross-check-torchattacks"), "drop --chained"),
    (lambda w, c, z, m, t: ["eval", str(c), "--dataset", "cifar10"], "the checkpoint was trained on mnist5k"),
    (lambda w, c, z, m, t: ["eval", "--arch", "tiny_cnn", "--weights", w, "--dataset", "tinyimagenet"],
     "--dataset: 'tinyimagenet' is not one of"),
    (lambda w, c, z, m, t: ["report", str(t / "nothing")], "no results in"),
])
def test_bad_inputs_are_one_line_errors(argv, message, weights, checkpoint, zoo, mnist, tmp_path, capsys):
    code = main(argv(weights, checkpoint, zoo, mnist, tmp_path))
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1 and error[0].startswith("robust-sparse: error: ") and message in error[0]


def test_missing_robustbench_weights_offline_is_one_line(monkeypatch, tmp_path, capsys, cifar_root):
    import requests
    import robustbench.utils

    def offline(gdrive_id, path):
        raise requests.exceptions.ConnectionError("HTTPSConnectionPool(host='drive.google.com', port=443): Max retries")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    code = main(["eval", "--robustbench-model", "Wong2020Fast", "--dataset", "cifar10", "--model-dir", str(tmp_path),
                 "--data-root", cifar_root])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "weights not found at" in error[0] and "download failed" in error[0]
