"""``robust-sparse eval --model FILE.py:FACTORY``: any model, its weights, and one-line errors for bad specs.

The last tests use real data and a real outside model: CIFAR-10's genuine batches cut to their first 932 images
(``../shared/data/cifar10-prefix``, skipped when absent) and the standard-trained ResNet-18 that pyautoattack's
wheel ships in ``examples/``.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
import torch

from robust_sparse.cli import main
from robust_sparse.eval import points, sources

CIFAR_PREFIX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-prefix"
needs_cifar_prefix = pytest.mark.skipif(
    not (CIFAR_PREFIX / "cifar-10-batches-py" / "test_batch").is_file(),
    reason=f"the real CIFAR-10 prefix is not at {CIFAR_PREFIX} (it ships with the project's CI, not with a clone)")


def _pyautoattack_examples() -> Path | None:
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "examples"
    return folder if (folder / "model_test.pt").is_file() and (folder / "resnet.py").is_file() else None


TINY_FACTORY = """
    from robust_sparse.datasets import DATASETS
    from robust_sparse.models import build_model

    def build():
        info = DATASETS.get("mnist5k")
        return build_model("tiny_cnn", info.num_classes, info.in_channels, info.mean, info.std)

    def broken():
        raise RuntimeError("no GPU here")

    def not_a_model():
        return 42

    def wrong_classes():
        import torch
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))

    NOT_CALLABLE = 3
"""


@pytest.fixture(scope="module")
def factory_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("factory") / "my_models.py"
    path.write_text(textwrap.dedent(TINY_FACTORY))
    return path


@pytest.fixture(scope="module")
def tiny_weights(trained_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    plain = folder / "plain.pt"
    torch.save(trained_tiny.state_dict(), plain)
    nested = folder / "nested.pt"
    torch.save({"epoch": 3, "ema": trained_tiny.state_dict()}, nested)
    return plain, nested


def test_factory_model_matches_the_weights_it_was_given(factory_file, tiny_weights, trained_tiny, test_batch):
    plain, nested = tiny_weights
    images, _ = test_batch
    for path, key in ((plain, None), (nested, "ema")):
        loaded = sources.from_factory(f"{factory_file}:build", "mnist5k", path, key)
        assert loaded.source == "factory" and loaded.architecture == "TinyCNN"
        assert not loaded.model.training
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(images), trained_tiny(images), atol=0, rtol=0)


def test_eval_cli_with_a_factory_writes_results_and_resumes(factory_file, tiny_weights, trained_tiny, tmp_path,
                                                            capsys):
    plain, _ = tiny_weights
    results = tmp_path / "results"
    argv = ["eval", "--model", f"{factory_file}:build", "--weights", str(plain), "--dataset", "mnist5k",
            "--n-examples", "64", "--attacks", "pgd-3x1", "--eps", "0.2", "--results-dir", str(results),
            "--no-progress", "--output", str(tmp_path / "result.json")]
    assert main(argv) == 0
    first = json.loads((tmp_path / "result.json").read_text())
    assert first["source"] == "factory" and first["model"] == "my_models:build:plain"
    assert first["n_examples"] == 64 and first["eps"] == pytest.approx(0.2)
    # the masking probe ran (CLI default) and a naturally trained model falls to ~0 at L-inf 0.5
    assert first["large_eps"] == 0.5 and first["large_eps_acc"] <= 0.01
    # the same request again resumes from the saved flags: identical numbers, and the store keeps its one row of
    # that finished evaluation (issue 21: not appended twice)
    assert main(argv) == 0
    second = json.loads((tmp_path / "result.json").read_text())
    assert (second["clean_acc"], second["pgd_acc"]) == (first["clean_acc"], first["pgd_acc"])
    assert len(json.loads((results / "results.json").read_text())) == 1
    report = tmp_path / "report"
    assert main(["report", str(results), "--out", str(report)]) == 0
    assert "my_models:build:plain" in (report / "report.md").read_text()


@pytest.mark.parametrize("spec_suffix, extra, message", [
    (":build", ["--weights", "missing.pt"], "--weights: file not found: missing.pt"),
    (":nope", [], "has no attribute 'nope'"),
    (":NOT_CALLABLE", [], "NOT_CALLABLE is a int, not a callable factory"),
    (":broken", [], "broken() raised RuntimeError: no GPU here"),
    (":not_a_model", [], "not_a_model() returned a int, not a torch.nn.Module"),
    (":wrong_classes", [], "must return logits of shape [batch, 10]"),
    ("", [], "expected FILE.py:FACTORY or package.module:FACTORY"),
    (":build", ["--weights-key", "ema"], "--weights-key needs --weights"),
])
def test_bad_factory_specs_are_one_line_errors_before_any_work(factory_file, spec_suffix, extra, message, tmp_path,
                                                               capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_data(*args, **kwargs):  # a bad spec must fail before the test points are read
        raise AssertionError("test points were read")

    if message.startswith("--weights") or "expected FILE" in message:
        monkeypatch.setattr(points, "load_points", no_data)
    code = main(["eval", "--model", f"{factory_file}{spec_suffix}", "--dataset", "mnist5k", "--n-examples", "8",
                 "--attacks", "pgd-1x1", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_weights_that_do_not_fit_name_the_keys(factory_file, tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    code = main(["eval", "--model", f"{factory_file}:build", "--weights", str(path), "--dataset", "mnist5k",
                 "--n-examples", "8", "--attacks", "pgd-1x1", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "weights do not fit" in err and "fc.weight" in err
    key = main(["eval", "--model", f"{factory_file}:build", "--weights", str(path), "--weights-key", "ema",
                "--dataset", "mnist5k", "--n-examples", "8", "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert key == 2 and "--weights-key 'ema'" in err and "fc.weight" in err
    assert not (tmp_path / "r").exists()


def test_module_path_factory(tmp_path, monkeypatch, trained_tiny, test_batch):
    package = tmp_path / "zoo_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(TINY_FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = sources.from_factory("zoo_pkg.nets:build", "mnist5k")
    assert loaded.name == "zoo_pkg.nets:build"
    with pytest.raises(Exception, match="no module 'zoo_pkg.missing'"):
        sources.from_factory("zoo_pkg.missing:build", "mnist5k")


@needs_cifar_prefix
def test_cifar_reader_on_the_real_prefix():
    from robust_sparse.config import DataConfig
    from robust_sparse.datasets.splits import load_raw

    train, test = load_raw(DataConfig(dataset="cifar10", root=str(CIFAR_PREFIX)))
    assert tuple(train.images.shape) == (4660, 3, 32, 32) and tuple(test.images.shape) == (932, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert test.labels[:20].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    assert sorted(torch.bincount(test.labels, minlength=10).nonzero().flatten().tolist()) == list(range(10))


@needs_cifar_prefix
def test_pyautoattack_resnet18_on_the_real_prefix(tmp_path, capsys):
    """The issue's acceptance check: a three-line factory, clean 0.9356 (872/932) and PGD-5 0 at 8/255."""
    examples = _pyautoattack_examples()
    if examples is None:
        pytest.skip("pyautoattack's wheel has no examples/model_test.pt here")
    factory = tmp_path / "factory.py"
    factory.write_text("from pyautoattack.examples.resnet import ResNet18\n\n"
                       "def build():\n    return ResNet18()\n")
    output = tmp_path / "result.json"
    code = main(["eval", "--model", f"{factory}:build", "--weights", str(examples / "model_test.pt"),
                 "--dataset", "cifar10", "--data-root", str(CIFAR_PREFIX), "--n-examples", "932",
                 "--attacks", "pgd-5x1", "--no-probe", "--results-dir", str(tmp_path / "results"),
                 "--output", str(output), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    row = json.loads(output.read_text())
    assert row["n_examples"] == 932 and row["eps"] == pytest.approx(8 / 255)
    assert row["clean_acc"] == pytest.approx(872 / 932)
    assert row["pgd_acc"] == 0.0
