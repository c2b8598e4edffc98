"""Fashion-MNIST, the dataset added as one file (robust_sparse/datasets/fashion_mnist.py): read from a tiny copy in
torchvision's layout written here (nothing is downloaded), trained one quick step, its protocol eps the record's."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from robust_sparse.cli import main
from robust_sparse.config import load_config
from robust_sparse.datasets import DATASETS
from robust_sparse.datasets.splits import check_data_root, load_raw, load_splits
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.files.checkpoint import load_checkpoint

TRAIN, TEST = 64, 20


def _idx(array: np.ndarray) -> bytes:
    """LeCun's idx format: two zero bytes, the type (0x08: unsigned byte), the rank, big-endian sizes, the data."""
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape) + \
        array.astype(np.uint8).tobytes()


def write_copy(root, zipped: bool = True):
    """A tiny Fashion-MNIST under root/FashionMNIST/raw: the training files gzipped (as torchvision downloads
    them), the test files plain (as torchvision leaves them after extracting), so both spellings are read."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    splits = {"train": TRAIN, "t10k": TEST}
    for prefix, count in splits.items():
        images = generator.integers(0, 256, (count, 28, 28))
        labels = np.arange(count) % 10
        for kind, array, dims in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{dims}-ubyte"
            if zipped and prefix == "train":
                (raw / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
            else:
                (raw / name).write_bytes(_idx(array))
    return raw


def _config(root, *overrides):
    return load_config(None, ["data.dataset=fashion_mnist", f"data.root={root}", "data.val_size=16",
                              "model.name=tiny_cnn", *overrides])


def test_the_record_shape_classes_normalisation_and_protocol():
    record = DATASETS.get("fashion_mnist")
    assert (record.num_classes, record.in_channels, record.image_size) == (10, 1, 28)
    assert (record.mean, record.std) == ((0.2860,), (0.3530,))
    # the stated choice: L-inf 0.1, the literature's Fashion-MNIST radius (RobustBench has no track for it)
    assert record.protocol("linf").eps == 0.1 and record.protocol("l2").eps == 2.0
    assert record.protocol("linf").n_examples == 10000


def test_a_local_copy_loads_as_batches_of_the_records_shape(tmp_path):
    write_copy(tmp_path)
    config = _config(tmp_path)
    assert (config.attack.eps, config.attack.step_size) == (0.1, 0.025)  # the protocol eps, set by no config
    check_data_root(config.data)
    splits = load_splits(config.data, seed=0)
    assert len(splits.train) == TRAIN - 16 and len(splits.val) == 16 and len(splits.test) == TEST
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.labels.tolist() == [i % 10 for i in range(TEST)]
    assert splits.info is DATASETS.get("fashion_mnist")
    _, test = load_raw(config.data, need_train=False)  # evaluation reads the test files alone
    assert torch.equal(test.images, splits.test.images)


def test_one_quick_training_step(tmp_path, capsys, caplog):
    """A config of its own that sets no eps (the quickstart sets 0.1 itself): the run takes the protocol's."""
    write_copy(tmp_path / "data")
    out = tmp_path / "run"
    config = tmp_path / "fashion.yaml"
    config.write_text(f"data: {{dataset: fashion_mnist, root: {tmp_path / 'data'}, val_size: 16, batch_size: 48}}\n"
                      "model: {name: tiny_cnn}\noptim: {epochs: 1}\nattack: {steps: 1}\nval: {pgd_steps: 1}\n"
                      "eval: {pgd_steps: 1, n_examples: 8}\n")
    with caplog.at_level("INFO", logger="robust_sparse.train"):
        assert main(["train", str(config), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "linf eps=0.1" in capsys.readouterr().out  # the test line: the protocol eps
    state = load_checkpoint(out / "best.pt")
    assert state["config"]["data"]["dataset"] == "fashion_mnist" and state["config"]["attack"]["eps"] == 0.1
    assert "attack: linf eps=0.1 (fashion_mnist's protocol eps for linf), step size 0.025" in caplog.text


def test_a_missing_copy_is_one_line_naming_data_root_and_the_files(tmp_path):
    config = _config(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as error:
        check_data_root(config.data)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"data.root = '{tmp_path / 'nowhere'}': expected ")
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "FashionMNIST/raw" in message
    with pytest.raises(UserError, match="fashion_mnist not found: expected train-images-idx3-ubyte"):
        load_raw(config.data)


def test_a_broken_file_is_one_line_naming_it(tmp_path):
    raw = write_copy(tmp_path, zipped=False)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0\0\0\x05")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte is not an idx file of 3-D unsigned bytes"):
        load_raw(_config(tmp_path).data, need_train=False)
