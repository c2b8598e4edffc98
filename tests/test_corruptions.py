"""The corruptions track end to end on a generated miniature corruption set.

The set is NOT CIFAR-10-C: it is 200 real MNIST-5k digits padded to 3x32x32, corrupted here with two simple
corruptions (Gaussian noise, lowered contrast) at two severities, written in the exact layout robustbench's
loader reads (``<root>/CIFAR-10-C/<corruption>.npy`` with 10000 rows per severity, ``labels.npy``). Only the rows
of severities 1 and 2 that are read are filled (the files are sparse on disk).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from robust_sparse.cli import main
from robust_sparse.datasets import DATASETS
from robust_sparse.eval import corruptions as track
from robust_sparse.models import build_model

N = 200
SEVERITY_SCALES = {1: 0.3, 2: 0.6}
NAMES = ("gaussian_noise", "contrast")  # both in RobustBench's list


def _corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    scale = SEVERITY_SCALES[severity]
    x = images.astype(np.float32) / 255
    if name == "gaussian_noise":
        x = x + np.random.default_rng(severity).normal(0, scale, x.shape)
    else:  # contrast: towards the mean
        x = (x - x.mean()) * (1 - scale) + x.mean()
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def mini(mnist, tmp_path_factory):
    _, test = mnist
    root = tmp_path_factory.mktemp("corruptions")
    clean = torch.nn.functional.pad(test.images[:N], (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # uint8 [N, 3, 32, 32]
    hwc = clean.permute(0, 2, 3, 1).numpy()
    folder = root / "CIFAR-10-C"
    folder.mkdir()
    labels = np.zeros(5 * track.ROWS_PER_SEVERITY, dtype=np.uint8)
    labels[:N] = test.labels[:N].numpy()
    np.save(folder / "labels.npy", labels)
    for name in NAMES:
        array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8,
                                          shape=(2 * track.ROWS_PER_SEVERITY, 32, 32, 3))
        for severity in SEVERITY_SCALES:
            start = (severity - 1) * track.ROWS_PER_SEVERITY
            array[start:start + N] = _corrupt(hwc, name, severity)
        array.flush()
        del array
    # the clean test split beside it, in torchvision's layout (robust-sparse eval's clean accuracy)
    (root / "cifar-10-batches-py").mkdir()
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": clean.reshape(N, -1).numpy(), b"labels": test.labels[:N].tolist()}, handle)
    return root


@pytest.fixture(scope="module")
def cifar_shaped_model(mnist, tmp_path_factory):
    """tiny_cnn on 3x32x32 inputs, trained briefly on the padded digits: well above chance, not perfect."""
    train, _ = mnist
    info = DATASETS.get("cifar10")
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 3, info.mean, info.std)
    images = torch.nn.functional.pad(train.images[:1000], (2, 2, 2, 2)).repeat(1, 3, 1, 1).float() / 255
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for start in range(0, 1000, 50):
            loss = torch.nn.functional.cross_entropy(model(images[start:start + 50]), train.labels[start:start + 50])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("weights") / "tiny32.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), str(path)


def _plain_flags(model, root, name, severity):
    """A forward pass over the arrays as robustbench slices them: which points are classified correctly."""
    images = np.load(root / "CIFAR-10-C" / f"{name}.npy")[(severity - 1) * track.ROWS_PER_SEVERITY:][:N]
    labels = np.load(root / "CIFAR-10-C" / "labels.npy")[:N]
    x = torch.tensor(np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / 255)
    with torch.no_grad():
        return (model(x).argmax(1) == torch.tensor(labels).long()).numpy()


def _plain_accuracy(model, root, name, severity):
    return int(_plain_flags(model, root, name, severity).sum()) / N


def test_reader_matches_robustbench_loader(mini):
    from robustbench.data import load_cifar10c

    for name in NAMES:
        for severity in SEVERITY_SCALES:
            ours = track.load_corruption(mini, "cifar10", name, severity, N)
            theirs = load_cifar10c(N, severity, str(mini), corruptions=[name])
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1].long())


def test_cli_end_to_end_equals_a_plain_forward_pass(mini, cifar_shaped_model, tmp_path, capsys):
    model, weights = cifar_shaped_model
    results = tmp_path / "results"
    code = main(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "cifar10", "--data-root", str(mini),
                 "--threat-model", "corruptions", "--corruptions", ",".join(NAMES), "--severities", "1,2",
                 "--n-examples", str(N), "--results-dir", str(results), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    row = json.loads((results / "results.json").read_text())[0]
    assert row["threat_model"] == "corruptions" and row["n_examples"] == N
    expected = {f"{name}/{s}": _plain_accuracy(model, mini, name, s) for name in NAMES for s in SEVERITY_SCALES}
    cells = {k: v for k, v in row["per_attack"].items() if "/" in k}
    assert cells == pytest.approx(expected, abs=0)
    label = "corruptions (2 of 15, severities 1,2)"  # a subset: never the leaderboard's "corruptions"
    assert row["per_attack"][label] == pytest.approx(np.mean(list(expected.values())))
    assert 0.2 < row["clean_acc"] <= 1 and row["clean_acc"] > min(expected.values())  # noise hurts
    assert "gaussian_noise" in out and label.split(" (")[0] in out
    # the mean's interval: a t interval over the images of each image's fraction of the 4 cells it gets right
    scores = np.mean([_plain_flags(model, mini, name, s) for name in NAMES for s in SEVERITY_SCALES], axis=0)
    half = 1.971957 * scores.std(ddof=1) / np.sqrt(N)  # t quantile 0.975 with 199 degrees of freedom
    assert row["corruptions_interval"] == pytest.approx([scores.mean() - half, scores.mean() + half], abs=1e-6)

    from robust_sparse.eval.report import build_report

    text = build_report([results]).read_text()
    assert "## Common corruptions" in text and "| gaussian_noise |" in text
    low, high = (100 * v for v in row["corruptions_interval"])
    mean_line = next(line for line in text.splitlines() if line.startswith(f"| {row['model']} |") and label in line)
    assert f"[{low:.1f}, {high:.1f}] (t over images)" in mean_line  # not a Wilson interval on the 200 points
    assert "no gradient-masking check applies" in text
    assert f"{100 * expected['contrast/2']:.2f}" in text


def test_the_aggregate_interval_is_a_t_interval_over_the_images():
    """3 cells x 6 images: the images' scores are 2/3, 1/3, 1/3, 1, 0, 2/3 (the fraction of cells each is right
    in), mean 0.5, sample sd 0.3496; t(0.975, 5 df) = 2.570582, half width 0.3669: [0.1331, 0.8669]."""
    correct = np.array([[1, 0, 0, 1, 0, 1],
                        [1, 1, 0, 1, 0, 0],
                        [0, 0, 1, 1, 0, 1]], dtype=bool)
    scores = [2 / 3, 1 / 3, 1 / 3, 1, 0, 2 / 3]
    mean = sum(scores) / 6
    sd = (sum((v - mean) ** 2 for v in scores) / 5) ** 0.5
    half = 2.570582 * sd / 6 ** 0.5
    assert track.aggregate_interval(correct) == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert track.aggregate_interval(correct) == pytest.approx((0.1331, 0.8669), abs=1e-4)
    assert correct.mean() == pytest.approx(mean)  # the interval is about the aggregate itself
    assert track.aggregate_interval(np.ones((75, 10), dtype=bool)) == (1.0, 1.0)


def test_python_api_defaults_and_aggregate(mini, cifar_shaped_model):
    model, _ = cifar_shaped_model
    frame = track.evaluate_corruptions(model, mini, "cifar10", corruptions=NAMES, severities=(2,),
                                       n_examples=50)
    assert list(frame["corruption"]) == list(NAMES) and set(frame["severity"]) == {2}
    assert track.aggregate(frame) == pytest.approx(frame["accuracy"].mean())
    assert track.default_corruptions()[0] == "shot_noise" and len(track.default_corruptions()) == 15
    assert track.aggregate_label(track.default_corruptions(), track.SEVERITIES) == "corruptions"


@pytest.mark.parametrize("extra, message", [
    (["--corruptions", "fog"], "corruption data not found: {root}/CIFAR-10-C/fog.npy"),
    (["--corruptions", "sunburn"], "unknown corruption 'sunburn'"),
    (["--severities", "0,6"], "--severities '0,6': distinct integers from 1 to 5"),
    (["--corruptions", "contrast", "--severities", "5"], "rows, 50000 needed"),  # severity 5 is not in the file
    (["--eps", "8/255"], "has no radius or attacks"),
])
def test_bad_input_is_one_line(mini, cifar_shaped_model, extra, message, tmp_path, capsys):
    _, weights = cifar_shaped_model
    code = main(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "cifar10", "--data-root", str(mini),
                 "--threat-model", "corruptions", "--n-examples", "10000", "--results-dir", str(tmp_path / "r"),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert message.format(root=mini) in err
    assert not (tmp_path / "r").exists()


def test_missing_folder_names_zenodo(tmp_path, capsys):
    with pytest.raises(Exception, match=r"CIFAR-100-C/labels.npy .*zenodo.org/record/3555552"):
        track.check_files(tmp_path, "cifar100", ["fog"], [1], 10)
    assert not (tmp_path / "CIFAR-100-C").exists()  # nothing downloaded, nothing created


def test_leaderboard_comparison_of_the_corruptions_track(tmp_path):
    """Only the full RobustBench set (15 corruptions x 5 severities, 10000 points) compares with its rows."""
    from robust_sparse.eval.leaderboard import load_leaderboard
    from robust_sparse.eval.report import build_report
    from robust_sparse.eval.store import append_result

    board = load_leaderboard()
    rows = board[board["threat_model"] == "corruptions"]
    assert {"Diffenderfer2021Winning_LRR", "Hendrycks2020AugMixResNeXt"} <= set(rows["name"])
    assert rows["source_url"].str.contains("RobustBench/robustbench/blob/.*/model_info/cifar10/corruptions/").all()
    base = {"timestamp": "2026-01-01T00:00:00+00:00", "source": "weights", "path": "w.pt", "architecture": "tiny_cnn",
            "dataset": "cifar10", "threat_model": "corruptions", "eps": 0.0, "n_examples": 10000, "seed": None,
            "batch_size": 500, "mode": "standalone", "clean_acc": 0.9, "pgd_attack": None, "pgd_acc": None,
            "autoattack_acc": None, "sparsity": 0.9, "params": 100, "nonzero_params": 10, "wall_seconds": 1.0,
            "device": "cpu", "warnings": [], "data_fingerprint": "d", "large_eps": None, "large_eps_acc": None}
    full = {"corruptions": 0.8, **{f"{c}/{s}": 0.8 for c in track.default_corruptions() for s in track.SEVERITIES}}
    append_result(tmp_path, {**base, "model": "full", "model_fingerprint": "a", "attacks": "all", "worst_acc": 0.8,
                             "per_attack": full})
    subset = {"corruptions (1 of 15, severities 1)": 0.7, "fog/1": 0.7}
    append_result(tmp_path, {**base, "model": "subset", "model_fingerprint": "b", "attacks": "fog@1", "worst_acc": 0.7,
                             "per_attack": subset})
    text = build_report([tmp_path]).read_text()
    comparison = text.split("## Leaderboard comparison: cifar10 corruptions")[1]
    lrr = next(line for line in comparison.splitlines() if line.startswith("| Diffenderfer2021Winning_LRR |"))
    assert "yes: full (corruptions)" in lrr and "subset" not in lrr.split("yes:")[1]
    assert "| **subset** |" in comparison and "| 95.0% |" in lrr
    # rows written without the aggregate's interval show none, never a Wilson interval on n
    assert "| full | cifar10 | corruptions | 0 | corruptions | 80.00 | not recorded |" in text

    import matplotlib.pyplot as plt
    from robust_sparse.eval.report import collect, sparsity_figure

    figure = sparsity_figure(collect([tmp_path]), board, "cifar10", "corruptions")
    (axes,) = figure.axes
    assert axes.get_ylabel().startswith("corruption accuracy (%)") and "robust" not in axes.get_title()
    stars = [text.get_text() for text in axes.texts]
    assert sorted(stars) == ["full (mean over corruptions)", "subset (mean over corruptions (1 of 15, severities 1))"]
    plt.close(figure)


def test_sweep_evaluation_stage_for_the_corruptions_track(tmp_path):
    from robust_sparse.errors import ConfigError
    from robust_sparse.studies.sweep import _eval_stage

    stage = _eval_stage({"threat_model": "corruptions", "corruptions": ["fog", "snow"], "severities": "1,5",
                         "n_examples": 100, "seeds": [0]})
    config = stage.for_run(tmp_path / "run")  # what the evaluation child reads
    assert config.corruptions_track and config.attacks is None and config.eps is None
    assert config.corruptions == ["fog", "snow"] and config.severities == [1, 5] and config.n_examples == 100
    assert stage.settings() == {"attacks": "corruptions", "n_examples": 100, "eps": None, "batch_size": 500,
                                "probe": False, "threat_model": "corruptions", "corruptions": "fog,snow",
                                "severities": "1,5"}
    # a stage with attacks keeps the settings it had before the corruptions keys existed (no re-evaluation)
    attacks = _eval_stage({"attacks": "fgsm"})
    assert attacks.settings() == {"attacks": "fgsm", "n_examples": None, "eps": None, "batch_size": 500,
                                  "probe": True}
    for value, message in (({"threat_model": "Linf", "attacks": "fgsm"}, "only 'corruptions'"),
                           ({"threat_model": "corruptions", "attacks": "fgsm"}, "has no radius or attacks: drop sweep eval.attacks"),
                           ({"threat_model": "corruptions", "severities": [7]}, "severities '7'"),
                           ({"corruptions": "fog"}, "only 'corruptions'")):
        with pytest.raises(ConfigError, match=message):
            _eval_stage(value)


@pytest.mark.slow  # about a minute on 2 shared cores: a training run and an evaluation child process
def test_sweep_runs_the_corruptions_stage_end_to_end(mini, mnist, tmp_path):
    """Train one tiny CIFAR-shaped run (padded digits as CIFAR-10 training batches), then the sweep's
    corruptions stage on its best.pt; the row reaches sweep_eval.json and the sweep report's columns."""
    import yaml

    from robust_sparse.studies.local import EVAL_RESULT
    from robust_sparse.studies.sweep import load_sweep, run_sweep
    from robust_sparse.studies.report import collect

    train, _ = mnist
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "CIFAR-10-C").symlink_to(mini / "CIFAR-10-C")
    (root / "cifar-10-batches-py" / "test_batch").symlink_to(mini / "cifar-10-batches-py" / "test_batch")
    padded = torch.nn.functional.pad(train.images[:400], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    for index in range(5):
        part = slice(80 * index, 80 * (index + 1))
        with open(root / "cifar-10-batches-py" / f"data_batch_{index + 1}", "wb") as handle:
            pickle.dump({b"data": padded[part].reshape(80, -1).numpy(), b"labels": train.labels[part].tolist()},
                        handle)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "out"), "threads": 1, "grid": {"seed": [0]},
        "overrides": ["model.name=tiny_cnn", "data.dataset=cifar10", f"data.root={root}", "data.train_limit=256",
                      "data.val_size=64", "optim.epochs=1", "attack.steps=1", "val.pgd_steps=1",
                      "val.max_examples=64", "eval.n_examples=64", "eval.pgd_steps=1", "device=cpu"],
        "eval": {"threat_model": "corruptions", "corruptions": list(NAMES), "severities": [1, 2], "n_examples": 50},
    }, sort_keys=False))
    index = run_sweep(load_sweep(path))
    assert list(index["status"]) == ["done"] and list(index["eval"]) == ["done"], index.to_dict("records")
    record = json.loads((tmp_path / "out" / "runs" / "seed=0" / EVAL_RESULT).read_text())
    row = record["results"][0]
    assert row["threat_model"] == "corruptions" and len([k for k in row["per_attack"] if "/" in k]) == 4
    runs, _ = collect(tmp_path / "out")
    assert runs["eval_corruptions (2 of 15, severities 1,2)_accuracy"].iloc[0] == pytest.approx(
        np.mean([v for k, v in row["per_attack"].items() if "/" in k]))


# ----------------------------------------------------------------------------------------------------------
# arrays that break the protocol (issue 32): one line naming the file, before any model runs


def _protocol_root(tmp_path, images=None, labels=None):
    """A CIFAR-10-C folder holding fog.npy and labels.npy as given (default: valid, 20 points at severity 1)."""
    folder = tmp_path / "data" / "CIFAR-10-C"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8) if images is None else images
    labels = rng.integers(0, 10, 20).astype(np.uint8) if labels is None else labels
    for name, array in (("fog", images), ("labels", labels)):
        if isinstance(array, bytes):
            (folder / f"{name}.npy").write_bytes(array)
        else:
            np.save(folder / f"{name}.npy", array, allow_pickle=True)
    return tmp_path / "data"


_PIXELS = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("images, labels, file, message", [
    (_PIXELS / 255.0, None, "fog.npy", "dtype float64, expected uint8 images"),  # would be divided by 255 again
    (_PIXELS[..., :1], None, "fog.npy", "shape [20, 32, 32, 1], expected [N, 32, 32, 3]"),
    (_PIXELS[:, :16, :16], None, "fog.npy", "shape [20, 16, 16, 3], expected [N, 32, 32, 3]"),
    (_PIXELS.transpose(0, 3, 1, 2).copy(), None, "fog.npy", "shape [20, 3, 32, 32], expected [N, 32, 32, 3]"),
    (None, np.zeros((20, 1), dtype=np.int64), "labels.npy", "shape [20, 1], expected 1-D labels"),
    (None, np.full(20, 200, dtype=np.int64), "labels.npy", "label 200 at row 0 is outside 0..9"),
    (None, np.full(20, -1, dtype=np.int64), "labels.npy", "label -1 at row 0 is outside 0..9"),
    (None, np.zeros(20, dtype=np.float32), "labels.npy", "dtype float32, expected integer class labels"),
    (None, np.zeros(5, dtype=np.int64), "labels.npy", "5 labels, 20 needed"),
    (None, np.array([{"a": 1}] * 20, dtype=object), "labels.npy", "not a readable .npy file"),
    (b"a text file, not an array\n", None, "fog.npy", "not a readable .npy file"),
    (np.lib.format.magic(1, 0) + b"\x10\x00{'descr': '|u1'", None, "fog.npy", "not a readable .npy file"),  # cut
    (_npy_bytes(_PIXELS)[:-1000], None, "fog.npy", "not a readable .npy file"),  # a download cut short
])
def test_arrays_that_break_the_protocol_are_one_line_naming_the_file(cifar_shaped_model, tmp_path, capsys, images,
                                                                     labels, file, message):
    from conftest import one_line_error, snapshot

    _, weights = cifar_shaped_model
    root = _protocol_root(tmp_path, images, labels)
    before = snapshot(root)
    line = one_line_error(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "cifar10", "--data-root",
                           str(root), "--threat-model", "corruptions", "--corruptions", "fog", "--severities", "1",
                           "--n-examples", "20", "--results-dir", str(tmp_path / "r"), "--no-progress"], capsys)
    assert f"{root / 'CIFAR-10-C' / file}: " in line and message in line, line
    assert not (tmp_path / "r").exists() and snapshot(root) == before
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        track.load_corruption(root, "cifar10", "fog", 1, 20)  # the Python API refuses it too


def test_valid_arrays_of_other_integer_dtypes_are_read(tmp_path):
    """int64 labels (what np.save of a Python list writes) are as good as CIFAR-10-C's uint8 ones."""
    labels = np.arange(20, dtype=np.int64) % 10
    root = _protocol_root(tmp_path, _PIXELS, labels)
    images, read = track.load_corruption(root, "cifar10", "fog", 1, 20)
    assert read.tolist() == labels.tolist() and images.shape == (20, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(_PIXELS.transpose(0, 3, 1, 2).astype(np.float32) / 255))
