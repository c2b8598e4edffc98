"""Streamed datasets (imagenet, imagefolder): the splits, RobustBench's test list and preprocessing, the
DataLoader-backed training loader, a PGD-AT run and its evaluation, and bad input; on a generated tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from robust_sparse.config import DataConfig, load_config
from robust_sparse.datasets.splits import in_memory, load_raw, load_splits
from robust_sparse.errors import ConfigError, UserError
from robust_sparse.datasets.folders import FolderLoader, FolderSet, robustbench_test_list

from image_tree import WNIDS, imagenet_label, make_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """(root, test list): 10 classes x 16 training and 4 validation JPEGs at 64 px, 12 of them listed."""
    root = tmp_path_factory.mktemp("tree")
    return root, make_tree(root)


def _data(root: Path, test_list: Path | None, dataset: str = "imagefolder", **fields) -> DataConfig:
    values = dict(dataset=dataset, root=str(root), num_classes=10 if dataset == "imagefolder" else 0,
                  test_list=None if test_list is None else str(test_list), image_size=32, val_size=20, workers=0)
    return DataConfig(**{**values, **fields})


def test_splits_keep_the_test_list_out_of_training_and_validation(tree):
    root, test_list = tree
    splits = load_splits(_data(root, test_list), seed=0)
    train, val, test = set(splits.train.paths), set(splits.val.paths), splits.test.paths
    listed = test_list.read_text().split()
    # the test split is the list, in its order, under val/; the model selection split is training images only
    assert test == [str(root / "val" / line) for line in listed]
    assert not (set(test) & (train | val)) and not (train & val)
    assert train | val == {str(p) for p in (root / "train").rglob("*.JPEG")}
    assert len(val) == 20 and len(train) == 160 - 20
    # a seeded subset: the same for the same seed, another for another
    assert load_splits(_data(root, test_list), seed=0).val.paths == splits.val.paths
    assert load_splits(_data(root, test_list), seed=1).val.paths != splits.val.paths
    assert splits.info.num_classes == 10 and splits.info.image_size == 32


def test_labels_are_robustbench_class_indices_for_imagenet_and_sorted_folders_for_imagefolder(tree):
    root, test_list = tree
    folder_train, folder_test = load_raw(_data(root, test_list))
    imagenet_train, imagenet_test = load_raw(_data(root, test_list, "imagenet"))
    for folder, imagenet in ((folder_train, imagenet_train), (folder_test, imagenet_test)):
        assert folder.paths == imagenet.paths
        for path, folder_label, imagenet_label_ in zip(folder.paths, folder.targets, imagenet.targets):
            wnid = Path(path).parent.name
            assert folder_label == sorted(WNIDS).index(wnid)
            assert imagenet_label_ == imagenet_label(wnid)
    assert set(imagenet_train.targets) != set(range(10))  # the map's indices, not 0..9


def test_imagefolder_without_a_list_tests_on_all_of_val_in_a_fixed_mixed_order(tree):
    root, _ = tree
    _, test = load_raw(_data(root, None))
    _, again = load_raw(_data(root, None))
    assert sorted(test.paths) == sorted(str(p) for p in (root / "val").rglob("*.JPEG")) and test.paths == again.paths
    assert len(set(test.targets[:10])) > 3  # "the first n" holds several classes, not class 0 only


def test_imagenet_defaults_to_robustbench_list_of_5000_images(tree):
    root, _ = tree
    lines = robustbench_test_list().read_text().split()
    assert len(lines) == 5000 and len(set(lines)) == 5000 and all(line.count("/") == 1 for line in lines)
    with pytest.raises(UserError, match=r"5000 of the 5000 test images listed in .*imagenet_test_image_ids.txt"):
        load_raw(_data(root, None, "imagenet"))


def test_test_images_are_robustbench_res256crop224_exactly(tmp_path):
    """At 224 px the test split is RobustBench's own transform of each file (stored as the uint8 it came from)."""
    from robustbench.data import PREPROCESSINGS

    make_tree(tmp_path, classes=2, train_per_class=1, val_per_class=2, size=(300, 260), listed=3)
    config = _data(tmp_path, tmp_path / "test_list.txt", num_classes=2, image_size=224)
    _, test = load_raw(config)
    images = in_memory(test).images
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 224, 224)
    for path, image in zip(test.paths, images):
        reference = PREPROCESSINGS["Res256Crop224"](Image.open(path).convert("RGB"))
        assert torch.equal(image.float() / 255, reference)


def test_folder_loader_batches_are_seeded_by_epoch_and_sharded_by_rank(tree):
    root, test_list = tree
    train = load_splits(_data(root, test_list), seed=0).train
    device = torch.device("cpu")

    def epoch(epoch: int, rank: int = 0, world_size: int = 1, workers: int = 0):
        loader = FolderLoader(train, 32, device, shuffle=True, seed=3, info=object(), augment_batches=True,
                              drop_last=True, rank=rank, world_size=world_size, workers=workers)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        return batches

    first = epoch(0, workers=2)
    assert len(first) == 140 // 32
    images, labels = first[0]
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1
    again = epoch(0, workers=2)  # workers seeded from (seed, epoch): the same crops and order
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(epoch(1, workers=2)[0][0], images)
    # two ranks: equal shards of one permutation, no image in both
    shards = [torch.cat([b[1] for b in epoch(0, rank, 2)]) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2 * 32
    sampler_shards = []
    for rank in (0, 1):
        loader = FolderLoader(train, 32, device, shuffle=True, seed=3, rank=rank, world_size=2)
        loader.set_epoch(0)
        sampler_shards.append(set(loader.sampler))
    assert not sampler_shards[0] & sampler_shards[1] and len(sampler_shards[0] | sampler_shards[1]) == 140


def test_pgd_at_epoch_on_a_torchvision_model_then_eval_on_the_streamed_test_list(tree, tmp_path):
    from robust_sparse.eval import job
    from robust_sparse.train import fit

    root, test_list = tree
    config = load_config(None, [
        "data.dataset=imagefolder", f"data.root={root}", "data.num_classes=10", f"data.test_list={test_list}",
        "data.image_size=32", "data.val_size=16", "data.train_limit=48", "data.batch_size=16", "data.workers=1",
        "model.name=torchvision:resnet18",
        "objective=pgd_at", "attack.eps=4/255", "attack.step_size=2/255", "attack.steps=1", "optim.epochs=1",
        "val.pgd_steps=1", "eval.pgd_steps=1", "eval.n_examples=12", "device=cpu", f"out_dir={tmp_path / 'run'}"])
    result = fit(config)
    assert len(result.metrics) == 1 and result.metrics["images_per_second"].iloc[0] > 0
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["n_examples"] == 12 and evaluation["dataset"] == "imagefolder"
    # robust-sparse eval on the checkpoint reads the same list through the checkpoint's data section
    from robust_sparse.eval.config import eval_config_from_dict

    outcome = job.run_job(eval_config_from_dict({"checkpoint": str(tmp_path / "run" / "best.pt"), "attacks": "pgd-2",
                                                 "probe": False, "progress": False, "device": "cpu"}))
    (row,) = outcome.rows
    assert row["n_examples"] == 12 and row["clean_acc"] == pytest.approx(evaluation["clean_accuracy"])


def test_bad_input_is_one_line_before_any_work(tree, tmp_path):
    root, test_list = tree
    with pytest.raises(ConfigError, match="data.num_classes: data.dataset = imagefolder needs the class count"):
        load_config(None, ["data.dataset=imagefolder"])
    with pytest.raises(ConfigError, match="data.num_classes = 7: .* has 10 class folders"):
        load_raw(_data(root, test_list, num_classes=7))
    with pytest.raises(ConfigError, match="data.num_classes = 10: imagenet has 1000 classes"):
        load_config(None, ["data.dataset=imagenet", "data.num_classes=10"])
    with pytest.raises(ConfigError, match="data.workers"):
        load_config(None, ["data.workers=-1"])
    with pytest.raises(UserError, match=r"data.root: .*train does not exist"):
        load_raw(_data(tmp_path, None))
    bad_list = tmp_path / "list.txt"
    bad_list.write_text("n99999999/x.JPEG\n")
    with pytest.raises(UserError, match="line 1: 'n99999999/x.JPEG' is not <class>/<file> of a known class"):
        load_raw(_data(root, bad_list))
    (tmp_path / "other" / "train" / "cats").mkdir(parents=True)
    (tmp_path / "other" / "val").mkdir()
    with pytest.raises(UserError, match="no ImageNet-2012 class"):
        load_raw(_data(tmp_path / "other", None, "imagenet"))
    from robust_sparse.datasets.splits import check_data_root

    with pytest.raises(ConfigError, match="data.download: imagenet cannot be downloaded"):
        check_data_root(_data(root, None, "imagenet", download=True))


def test_folder_set_take_keeps_paths_and_labels_together():
    data = FolderSet([f"f{i}" for i in range(5)], [i % 3 for i in range(5)], 32)
    picked = data.take(torch.tensor([4, 0]))
    assert picked.paths == ["f4", "f0"] and picked.targets == [1, 0] and torch.equal(picked.labels, torch.tensor([1, 0]))
    assert data.take(slice(1, 3)).paths == ["f1", "f2"] and len(data) == 5


@pytest.mark.slow  # two fresh interpreters under torchrun: 20-50 s on 2 shared cores
def test_two_ranks_under_torchrun_shard_the_streamed_split_and_stay_identical(tree, tmp_path):
    """torchrun, 2 CPU processes (gloo): the DistributedSampler shards the streamed training split and AGENT's
    g_tilde pass; masks, weights and AGENT's state stay identical on both ranks."""
    import os
    import subprocess
    import sys

    root, test_list = tree
    out = tmp_path / "ranks"
    out.mkdir()
    worker = Path(__file__).with_name("ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(out), "data.dataset=imagefolder", f"data.root={root}", "data.num_classes=10",
               f"data.test_list={test_list}", "data.image_size=32", "data.val_size=12", "data.train_limit=128",
               "data.batch_size=16", "data.workers=1", "model.name=tiny_cnn", "sparsity.method=rigl",
               "sparsity.density=0.3", "sparsity.update_every=2", "agent.enabled=true", "agent.probe_chunks=0",
               "optim.epochs=2", "attack.steps=1", "val.pgd_steps=1", "eval.n_examples=0", "device=cpu",
               f"out_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from test_distributed import _assert_identical

    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _assert_identical(rank0, rank1)  # weights, masks, AGENT's c, c_hat, g_tilde and snapshot
    assert rank0["masks"] and rank0["full_grads"] is not None
    # 128 images, 16 per batch: 8 batches in the g_tilde pass, 4 on each rank (the first refresh needs none)
    assert rank0["pass_batches"] == rank1["pass_batches"] == [0, 4]


def test_tree_is_listed_in_torchvision_order_with_nested_folders_and_links_inside_the_split(tmp_path):
    """The walk that refuses links out of a split or read twice lists a valid tree exactly as torchvision's
    ImageFolder (``make_dataset``) does: the seeded validation split of an existing run is unchanged."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    make_tree(tmp_path, classes=3, train_per_class=3, val_per_class=1, size=(16, 16), listed=2)
    first, second = (tmp_path / "train" / wnid for wnid in sorted(WNIDS[:3])[:2])
    (first / "b_nested" / "deeper").mkdir(parents=True)
    for k, folder in enumerate((first / "b_nested", first / "b_nested" / "deeper", second)):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(folder / f"a{k}.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "loose.JPEG")  # in the split, in no class folder
    (second / "Z_linked.JPEG").symlink_to("../loose.JPEG")  # a link inside the split, read once
    (first / "notes.txt").write_text("not an image, not listed\n")
    train, _ = load_raw(_data(tmp_path, None, num_classes=3))
    classes = {name: index for index, name in enumerate(sorted(WNIDS[:3]))}
    expected = make_dataset(str(tmp_path / "train"), classes, IMG_EXTENSIONS)
    assert list(zip(train.paths, train.targets)) == expected and len(expected) == 3 * 3 + 4
