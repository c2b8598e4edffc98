"""The dataset records (robust_sparse/datasets/): complete, their protocols RobustBench's (or a stated choice),
and read by the config (data.dataset, the default attack.eps), eval, the corruptions track and the leaderboard."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import robust_sparse
from robust_sparse.cli import main
from robust_sparse.config import config_from_dict, load_config, to_dict
from robust_sparse.config.parsing import describe_eps
from robust_sparse.datasets import DATASETS, THREAT_MODELS, CorruptionLayout, Dataset, Protocol, register_dataset
from robust_sparse.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(robust_sparse.__file__).parent

# Written out by hand from RobustBench's leaderboards (robustbench.github.io: CIFAR-10/100 Linf 8/255 and L2 0.5 on
# the 10,000 test points, ImageNet Linf 4/255 on its 5000-image list), and the choices the record files state:
# SVHN at CIFAR's radii (no RobustBench track; HYDRA, BSR-Net), MNIST-5k and Fashion-MNIST at Linf 0.1 (the
# quickstart's radius; the literature's Fashion-MNIST radius), L2 2.0 for both (MNIST's usual), ImageNet L2 3.0.
PROTOCOLS = {
    ("cifar10", "linf"): (8 / 255, 10000), ("cifar10", "l2"): (0.5, 10000),
    ("cifar100", "linf"): (8 / 255, 10000), ("cifar100", "l2"): (0.5, 10000),
    ("imagenet", "linf"): (4 / 255, 5000), ("imagenet", "l2"): (3.0, 5000),
    ("svhn", "linf"): (8 / 255, 10000), ("svhn", "l2"): (0.5, 10000),
    ("mnist5k", "linf"): (0.1, 1000), ("mnist5k", "l2"): (2.0, 1000),
    ("fashion_mnist", "linf"): (0.1, 10000), ("fashion_mnist", "l2"): (2.0, 10000),
    ("imagefolder", "linf"): (4 / 255, 10000), ("imagefolder", "l2"): (3.0, 10000),
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_record_is_complete_and_in_a_file_named_after_it(name):
    record = DATASETS.get(name)
    assert record.name == name and record.description
    assert (PACKAGE / "datasets" / f"{name}.py").is_file()
    assert record.load.__module__ == f"robust_sparse.datasets.{name}" or name == "cifar100"  # CIFAR-10's reader
    assert record.in_channels in (1, 3) and len(record.mean) == len(record.std) == record.in_channels
    assert all(0 < m < 1 for m in record.mean) and all(0 < s < 1 for s in record.std)
    assert record.num_classes >= 2 or (record.num_classes == 0 and record.streamed)  # 0: data.num_classes
    assert record.image_size >= 8 and record.crop_padding >= 0
    assert set(record.protocols) == set(THREAT_MODELS)
    for threat, protocol in record.protocols.items():
        assert protocol.eps > 0 and protocol.n_examples >= 1 and (threat != "linf" or protocol.eps <= 1)
    if record.corruptions is not None:
        assert record.corruptions.folder and record.corruptions.source.startswith("https://")


def test_a_new_dataset_is_one_file_the_package_imports():
    """Every module of robust_sparse/datasets/ but the machinery is a dataset file registering the record named
    after it; the package imports them all, so no list elsewhere names them."""
    from robust_sparse.datasets import MACHINERY

    files = {path.stem for path in (PACKAGE / "datasets").glob("*.py")} - {"__init__", *MACHINERY}
    assert files == set(DATASETS.names())


def test_protocol_table_is_robustbenchs():
    assert {(name, threat) for name in DATASETS.names() for threat in THREAT_MODELS} == set(PROTOCOLS)
    for (name, threat), (eps, n) in PROTOCOLS.items():
        assert DATASETS.get(name).protocol(threat) == Protocol(eps=pytest.approx(eps, abs=1e-15), n_examples=n)


def test_corruption_sets_and_robustbench_names():
    having = {name: DATASETS.get(name).corruptions for name in DATASETS.names() if DATASETS.get(name).corruptions}
    assert {name: (s.folder, s.layout) for name, s in having.items()} == {
        "cifar10": ("CIFAR-10-C", CorruptionLayout.NPY), "cifar100": ("CIFAR-100-C", CorruptionLayout.NPY),
        "imagenet": ("ImageNet-C", CorruptionLayout.IMAGE_TREE)}
    assert {name for name in DATASETS.names() if DATASETS.get(name).robustbench} == {"cifar10", "cifar100", "imagenet"}


def test_an_incomplete_record_is_refused_when_registered():
    record = DATASETS.get("cifar10")
    from dataclasses import replace

    with pytest.raises(ValueError, match="no protocol for l2"):
        register_dataset(replace(record, name="half", protocols={"linf": record.protocol("linf")}))
    with pytest.raises(ValueError, match="one value per channel"):
        register_dataset(replace(record, name="grey", in_channels=1))
    assert "half" not in DATASETS and "grey" not in DATASETS


def test_a_config_without_eps_gets_its_datasets_protocol_eps():
    natural = load_config(REPO / "configs" / "cifar10_natural_resnet18.yaml")
    assert natural.attack.eps == pytest.approx(8 / 255) and natural.attack.step_size == pytest.approx(2 / 255)
    assert describe_eps(natural) == "cifar10's protocol eps for linf"
    l2 = load_config(None, ["data.dataset=cifar10", "attack.norm=l2"])
    assert (l2.attack.eps, l2.attack.step_size) == (0.5, 0.125)
    assert load_config(None, ["data.dataset=imagenet"]).attack.eps == pytest.approx(4 / 255)
    # saved with the resolved values: a checkpoint resumes and is evaluated with the eps it was trained with
    assert config_from_dict(to_dict(natural)).attack.eps == pytest.approx(8 / 255)


def test_a_config_that_sets_eps_keeps_it_and_its_step_size():
    given = load_config(None, ["data.dataset=cifar10", "attack.eps=4/255"])
    assert given.attack.eps == pytest.approx(4 / 255) and given.attack.step_size == 0.025  # as before the records
    assert describe_eps(given).startswith("not cifar10's protocol eps for linf")
    both = load_config(REPO / "configs" / "cifar10_pgdat_resnet18.yaml")
    assert both.attack.eps == pytest.approx(8 / 255) and both.attack.step_size == pytest.approx(2 / 255)
    step = load_config(None, ["data.dataset=cifar10", "attack.step_size=0.001"])
    assert step.attack.eps == pytest.approx(8 / 255) and step.attack.step_size == 0.001


def test_mnist_configs_are_unchanged():
    """MNIST-5k's protocol eps is the schema's old default, so its configs (and the quickstart, which sets it
    anyway) resolve to the values they always had."""
    for config in (load_config(), load_config(REPO / "configs" / "quickstart_mnist5k.yaml"),
                   load_config(None, ["model.name=tiny_cnn"])):
        assert (config.data.dataset, config.attack.eps, config.attack.step_size) == ("mnist5k", 0.1, 0.025)


def test_print_config_shows_the_protocol_eps(capsys):
    assert main(["train", str(REPO / "configs" / "cifar10_natural_resnet18.yaml"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["attack"]["eps"] == pytest.approx(8 / 255) and printed["data"]["dataset"] == "cifar10"


def test_unknown_dataset_is_one_line_with_the_allowed_names(capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.dataset=tinyimagenet"])
    assert str(error.value) == f"data.dataset: 'tinyimagenet' is not one of {', '.join(DATASETS.names())}"
    assert main(["train", "--set", "data.dataset=tinyimagenet", "--print-config"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "data.dataset: 'tinyimagenet' is not one of cifar10, cifar100" in lines[0]
    with pytest.raises(UserError, match="unknown dataset 'tinyimagenet'; choose one of: cifar10, cifar100"):
        DATASETS.get("tinyimagenet")


def test_class_counts_are_checked_against_the_record():
    with pytest.raises(ConfigError, match="data.num_classes = 100: cifar10 has 10 classes"):
        load_config(None, ["data.dataset=cifar10", "data.num_classes=100"])
    assert load_config(None, ["data.dataset=cifar10", "data.num_classes=10"]).data.num_classes == 10


def test_eval_corruptions_and_leaderboard_read_the_records():
    from robust_sparse.eval import corruptions, leaderboard, points

    assert points.protocol_eps("cifar10", "linf") == 8 / 255 and points.protocol_eps("imagenet", "l2") == 3.0
    assert points.parse_dataset("Fashion_MNIST") == "fashion_mnist"
    with pytest.raises(UserError, match="unknown dataset 'x'; choose one of: cifar10, cifar100"):
        points.parse_dataset("x")
    assert corruptions.corruption_folder("/data", "cifar100") == Path("/data/CIFAR-100-C")
    with pytest.raises(UserError, match="supported for cifar10, cifar100, imagenet .*not svhn"):
        corruptions.corruption_folder("/data", "svhn")
    assert [leaderboard.full_train_images(name) for name in ("cifar10", "svhn", "unknown")] == [50000, 73257, None]


def test_no_dataset_module_left_at_the_package_root():
    assert not (PACKAGE / "data.py").exists() and not (PACKAGE / "imagefolder.py").exists()
    assert isinstance(DATASETS.get("mnist5k"), Dataset)
