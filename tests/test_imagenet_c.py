"""The corruptions track on ImageNet-C's layout, end to end on a generated miniature tree.

The tree is NOT ImageNet-C: 3 ImageNet classes x 4 generated 64 px JPEGs (tests/image_tree.py), 8 of them in a
test list of RobustBench's format, corrupted here with two simple corruptions (Gaussian noise, lowered contrast) at
two severities and written as ``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/<file>.JPEG`` (the layout
robustbench's ``load_imagenetc`` reads). The list stands in for RobustBench's 5000-image list (monkeypatched).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from robust_sparse.datasets import folders
from robust_sparse.cli import main
from robust_sparse.datasets import DATASETS
from robust_sparse.eval import corruptions as track
from robust_sparse.models import build_model

from image_tree import make_tree

N = 8
NAMES = ("gaussian_noise", "contrast")
SEVERITY_SCALES = {1: 0.4, 2: 0.97}


def _corrupt(pixels: np.ndarray, name: str, severity: int) -> np.ndarray:
    scale, x = SEVERITY_SCALES[severity], pixels.astype(np.float32) / 255
    if name == "gaussian_noise":
        x = x + np.random.default_rng(severity).normal(0, scale, x.shape)
    else:
        x = (x - x.mean()) * (1 - scale) + x.mean()
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(root, list): the clean tree (train/, val/) and ImageNet-C/ beside it."""
    root = tmp_path_factory.mktemp("imagenet_c")
    listed = make_tree(root, classes=3, train_per_class=8, val_per_class=4, listed=N)
    for line in listed.read_text().split():
        clean = np.asarray(Image.open(root / "val" / line).convert("RGB"))
        for name in NAMES:
            for severity in SEVERITY_SCALES:
                path = root / "ImageNet-C" / name / str(severity) / line
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_corrupt(clean, name, severity)).save(path, quality=85)
    return root, listed


@pytest.fixture()
def rb_list(mini, monkeypatch):
    monkeypatch.setattr(folders, "robustbench_test_list", lambda: mini[1])
    return mini


@pytest.fixture(scope="module")
def model_weights(mini, tmp_path_factory):
    """tiny_cnn with ImageNet's 1000 outputs, trained a few steps on the tree's training images (class colour)."""
    from robustbench.data import PREPROCESSINGS

    root, _ = mini
    info = DATASETS.get("imagenet")
    torch.manual_seed(0)
    model = build_model("tiny_cnn", info.num_classes, 3, info.mean, info.std)
    paths = sorted((root / "train").rglob("*.JPEG"))
    x = torch.stack([PREPROCESSINGS["Res224"](Image.open(p).convert("RGB")) for p in paths])
    y = torch.tensor([folders.imagenet_classes()[p.parent.name] for p in paths])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("weights") / "tiny224.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), str(path)


def _plain_accuracy(model, root, listed, name, severity):
    """A forward pass over the listed files through robustbench's own 'Res224' transform."""
    from robustbench.data import PREPROCESSINGS

    lines = listed.read_text().split()[:N]
    x = torch.stack([PREPROCESSINGS["Res224"](Image.open(root / "ImageNet-C" / name / str(severity) / line)
                                              .convert("RGB")) for line in lines])
    y = torch.tensor([folders.imagenet_classes()[line.split("/")[0]] for line in lines])
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / N


def test_cli_end_to_end_equals_a_plain_forward_pass(rb_list, model_weights, tmp_path, capsys):
    root, listed = rb_list
    model, weights = model_weights
    results = tmp_path / "results"
    code = main(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "imagenet", "--data-root", str(root),
                 "--threat-model", "corruptions", "--corruptions", ",".join(NAMES), "--severities", "1,2",
                 "--n-examples", str(N), "--batch-size", "3", "--results-dir", str(results), "--device", "cpu",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    row = json.loads((results / "results.json").read_text())[0]
    assert row["dataset"] == "imagenet" and row["threat_model"] == "corruptions" and row["n_examples"] == N
    expected = {f"{name}/{s}": _plain_accuracy(model, root, listed, name, s) for name in NAMES for s in SEVERITY_SCALES}
    cells = {k: v for k, v in row["per_attack"].items() if "/" in k}
    assert cells == pytest.approx(expected, abs=0)
    assert len(set(expected.values())) > 1  # the cells differ: the comparison can fail
    assert row["per_attack"]["corruptions (2 of 15, severities 1,2)"] == pytest.approx(np.mean(list(expected.values())))
    assert 0 <= row["clean_acc"] <= 1 and "gaussian_noise" in out


def test_n_examples_takes_the_first_listed_images_in_order(rb_list, model_weights):
    root, listed = rb_list
    lines = listed.read_text().split()
    images, labels = track.load_corruption(root, "imagenet", "contrast", 2, 5)
    assert images.shape == (5, 3, 224, 224) and images.dtype == torch.float32
    assert labels.tolist() == [folders.imagenet_classes()[line.split("/")[0]] for line in lines[:5]]
    from robustbench.data import PREPROCESSINGS

    first = PREPROCESSINGS["Res224"](Image.open(root / "ImageNet-C" / "contrast" / "2" / lines[0]).convert("RGB"))
    assert torch.equal(images[0], first)
    model, _ = model_weights
    frame = track.evaluate_corruptions(model, root, "imagenet", corruptions=["contrast"], severities=(2,),
                                       n_examples=5, batch_size=2)
    with torch.no_grad():
        assert list(frame["n"]) == [5] and frame["accuracy"][0] == float((model(images).argmax(1) == labels).sum()) / 5


def test_missing_folder_is_one_line_naming_the_path_and_zenodo(rb_list, model_weights, tmp_path, capsys):
    root, _ = rb_list
    _, weights = model_weights
    code = main(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "imagenet", "--data-root", str(root),
                 "--threat-model", "corruptions", "--corruptions", "fog", "--severities", "1", "--n-examples", "4",
                 "--results-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"corruption data not found: {root}/ImageNet-C/fog/1 " in err and "zenodo.org/record/2235448" in err
    assert not (tmp_path / "r").exists() and not (root / "ImageNet-C" / "fog").exists()
    with pytest.raises(Exception, match=r"--n-examples 9: the ImageNet-C track has 8 points per severity"):
        track.check_files(root, "imagenet", NAMES, (1,), 9)


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]), "truncated"),
    (lambda path: path.write_bytes(b""), "empty"),
    (lambda path: path.write_text("not an image\n"), "cannot identify image file"),
])
def test_a_damaged_imagenet_c_file_is_one_line_naming_it_before_any_model_runs(rb_list, model_weights, tmp_path,
                                                                               capsys, damage, reason):
    """Issue 32: a truncated file printed 'cannot use an output'. It is an input: the line names it and why."""
    import shutil

    from conftest import one_line_error, snapshot

    root, listed = rb_list
    _, weights = model_weights
    copy = tmp_path / "data"
    shutil.copytree(root / "ImageNet-C" / "contrast" / "1", copy / "ImageNet-C" / "contrast" / "1")
    victim = copy / "ImageNet-C" / "contrast" / "1" / listed.read_text().split()[N - 1]  # the last one read
    damage(victim)
    before = snapshot(copy)
    line = one_line_error(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "imagenet",
                           "--data-root", str(copy), "--threat-model", "corruptions", "--corruptions", "contrast",
                           "--severities", "1", "--n-examples", str(N), "--results-dir", str(tmp_path / "r"),
                           "--no-progress"], capsys)
    assert str(victim) in line and reason in line and "cannot use an output" not in line, line
    assert not (tmp_path / "r").exists() and snapshot(copy) == before
