"""Upper bounds of the numeric fields (issue 32): a value the machine cannot hold (a 120 GB image, 100,000 worker
processes, a batch of hundreds of GB) is one line naming the field and its bound, exit 2, before a run or results
directory exists."""

from __future__ import annotations

import pytest

from conftest import one_line_error
from robust_sparse.config import load_config, validation
from robust_sparse.config.validation import MAX_IMAGE_SIZE, max_workers
from robust_sparse.errors import ConfigError


@pytest.fixture(autouse=True)
def sixteen_gib(monkeypatch):
    """The batch rule reads the machine's memory: 16 GiB here, so that the bound each test states is fixed."""
    monkeypatch.setattr(validation, "_memory_bytes", lambda: 16 * 2**30)


@pytest.mark.parametrize("overrides, message", [
    (["data.workers=100000"], f"data.workers = 100000: must be in 0..{max_workers()}"),
    (["data.image_size=100000"], f"data.image_size = 100000: must be in 8..{MAX_IMAGE_SIZE}"),
    # imagefolder: a dataset whose classes the config gives (a registered one's count is checked against it first)
    (["data.dataset=imagefolder", "data.num_classes=1000000000000"],
     "data.num_classes = 1000000000000: must be in 0..100000"),
    (["sparsity.update_every=1000000000000"], "sparsity.update_every = 1000000000000: must be in 1..100000000"),
    (["trades_beta=1e12"], "trades_beta = 1000000000000.0: must be in 0..1e+06"),
    (["optim.factors=[0.1, 1e300]"], "optim.factors = [0.1, 1e+300]: each must be > 0 and <= 1e+06"),
    (["data.dataset=imagenet", "data.batch_size=1000000"], "data.batch_size = 1000000: one batch of 3x224x224 "
                                                           "float32 images is 560.8 GiB, more than this machine's "
                                                           "16.0 GiB of memory; must be <= 28532 at data.image_size "
                                                           "= 224"),
    (["data.dataset=imagenet", "data.image_size=2048", "data.eval_batch_size=100000"],
     "data.eval_batch_size = 100000: one batch of 3x2048x2048 float32 images is 4687.5 GiB"),
])
def test_a_field_past_its_bound_is_one_line_and_no_run_directory(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--set", "model.name=tiny_cnn", "--set", "device=cpu"]
    for override in overrides:
        argv += ["--set", override]
    line = one_line_error(argv, capsys)
    assert message in line, line
    assert not run.exists()  # refused before the run directory was claimed


def test_the_bounds_are_inclusive():
    """The largest value each bound allows is accepted: the bound is the one stated, not one below it."""
    config = load_config(None, [f"data.workers={max_workers()}", f"data.image_size={MAX_IMAGE_SIZE}",
                                "data.dataset=imagefolder", "data.num_classes=100000", "data.batch_size=1",
                                "data.eval_batch_size=1", "sparsity.update_every=100000000", "trades_beta=1e6"])
    assert config.data.workers == max_workers() and config.data.image_size == MAX_IMAGE_SIZE
    with pytest.raises(ConfigError, match=rf"data.workers = {max_workers() + 1}: must be in 0\.\.{max_workers()}"):
        load_config(None, [f"data.workers={max_workers() + 1}"])
    with pytest.raises(ConfigError, match=rf"data.image_size = {MAX_IMAGE_SIZE + 1}: must be in 8\.\."):
        load_config(None, [f"data.image_size={MAX_IMAGE_SIZE + 1}"])


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "imagenet", "--batch-size", "30000"], "--batch-size 30000: one batch of 3x224x224 float32 "
                                                         "images is 16.8 GiB, more than this machine's 16.0 GiB of "
                                                         "memory; must be <= 28532 at imagenet's 224x224 images"),
    (["--dataset", "cifar10", "--seeds", ",".join(map(str, range(1001)))], "--seeds: 1001 seeds; give at most 1000"),
    (["--dataset", "cifar10", "--eps", ",".join(f"{k}/255" for k in range(1, 102))],
     "--eps: 101 radii; give at most 100"),
    (["--dataset", "cifar10", "--n-examples", "0"], "--n-examples 0: must be in 1..100000000"),
    (["--dataset", "cifar10", "--restarts", "1000000"], "--restarts 1000000: must be in 1..100000"),
])
def test_eval_bounds_are_one_line_and_no_results_directory(tmp_path, capsys, flags, message):
    results = tmp_path / "results"
    line = one_line_error(["eval", "--robustbench-model", "Standard", "--model-dir", str(tmp_path / "models"),
                           "--results-dir", str(results), *flags], capsys)
    assert message in line, line
    assert not results.exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("value", ["0", "-5", "100000001"])
def test_report_test_n_must_count_points(tmp_path, capsys, value):
    stored = tmp_path / "runs.csv"
    stored.write_text("run_id,seed,test_clean_accuracy\na,0,0.5\n")
    line = one_line_error(["report", str(stored), "--test-n", value, "--out", str(tmp_path / "out")], capsys)
    assert f"report --test-n {value}: must be in 1..100000000" in line
    assert not (tmp_path / "out").exists()


def test_a_saved_config_from_a_larger_machine_still_loads():
    """A checkpoint's config was bounded by the machine that trained it: reading it here (eval, export, resume's
    comparison) applies the fixed bounds only, not this machine's worker and memory bounds."""
    from robust_sparse.config import config_from_dict, to_dict

    saved = to_dict(load_config(None, ["data.dataset=imagenet", "data.batch_size=1024"]))
    saved["data"]["workers"] = max_workers() + 1
    saved["data"]["batch_size"] = 200_000  # 112 GiB at 224 px: more than the 16 GiB this test's machine has
    config = config_from_dict(saved)
    assert config.data.workers == max_workers() + 1 and config.data.batch_size == 200_000
    saved["data"]["image_size"] = MAX_IMAGE_SIZE + 1  # a fixed bound holds for every machine
    with pytest.raises(ConfigError, match=rf"data.image_size = {MAX_IMAGE_SIZE + 1}: must be in 8\.\."):
        config_from_dict(saved)
