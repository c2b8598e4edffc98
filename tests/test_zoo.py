"""RobustBench both ways: ``robust-sparse export --robustbench`` into the zoo layout (robustbench's own ModelInfo,
read back by robustbench's own code), ``register`` + ``robustbench.utils.load_model`` giving identical logits, in
this process and in a fresh one following the exported recipe, and ``robustbench.eval.benchmark`` itself on local
points (on the real CIFAR-10 prefix agreeing with ``robust-sparse eval``; skipped without the prefix)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_sparse.files.checkpoint import save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config, to_dict
from robust_sparse.datasets import DATASETS
from robust_sparse.errors import UserError
from robust_sparse.eval import zoo
from robust_sparse.eval.store import append_result, load_results
from robust_sparse.models import build_model

# the project's shared data beside the checkout (or inside it, as on a device machine)
CIFAR_PREFIX = next((root / "shared" / "data" / "cifar10-prefix" for root in Path(__file__).resolve().parents[1:3]
                     if (root / "shared" / "data" / "cifar10-prefix").is_dir()),
                    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-prefix")
needs_cifar_prefix = pytest.mark.skipif(
    not (CIFAR_PREFIX / "cifar-10-batches-py" / "test_batch").is_file(),
    reason=f"the real CIFAR-10 prefix is not at {CIFAR_PREFIX}")


def _cifar_tiny(seed: int = 0, zero_fraction: float = 0.5) -> torch.nn.Module:
    info = DATASETS.get("cifar10")
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", 10, 3, info.mean, info.std)
    with torch.no_grad():  # a sparse model: half of every conv/linear weight is exactly zero
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight[torch.rand_like(module.weight) < zero_fraction] = 0
    return model.eval()


@pytest.fixture(scope="module")
def run(mnist, tmp_path_factory):
    """A CIFAR-10 checkpoint of tiny_cnn and a CIFAR-10 test batch of real MNIST digits padded to 3x32x32."""
    _, test = mnist
    base = tmp_path_factory.mktemp("zoo_run")
    (base / "data" / "cifar-10-batches-py").mkdir(parents=True)
    images = torch.nn.functional.pad(test.images[:40], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    with open(base / "data" / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": images.reshape(40, -1).numpy(), b"labels": test.labels[:40].tolist()}, handle)
    config = load_config(None, ["model.name=tiny_cnn", "data.dataset=cifar10", f"data.root={base / 'data'}",
                                "attack.eps=0.03137254901960784", "sparsity.method=rigl", "sparsity.density=0.5"])
    model = _cifar_tiny()
    checkpoint = base / "run" / "best.pt"
    checkpoint.parent.mkdir()
    save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "epoch": 3}, checkpoint)
    return checkpoint, model


NAME = "Mine2026Sparse"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """run's checkpoint evaluated (FGSM on 40 points), with an AutoAttack row of the same weights on more points and
    one of other weights, then exported as NAME; yields (the export's --out, the model)."""
    checkpoint, model = run
    assert main(["eval", str(checkpoint), "--attacks", "fgsm", "--no-probe", "--n-examples", "40", "--device", "cpu",
                 "--no-progress"]) == 0
    stored = load_results(checkpoint.parent / "eval").iloc[-1].to_dict()
    # an AutoAttack row of the same weights, on more points (AutoAttack itself is run by the benchmark tests)
    append_result(checkpoint.parent / "eval", {**stored, "n_examples": 1000, "attacks": "autoattack",
                                               "autoattack_acc": 0.125, "clean_acc": 0.5})
    append_result(checkpoint.parent / "eval", {**stored, "n_examples": 5000, "autoattack_acc": 0.9,
                                               "model_fingerprint": "other weights"})
    out = tmp_path_factory.mktemp("zoo_export") / "models"
    assert main(["export", str(checkpoint), "--out", str(out), "--robustbench", NAME]) == 0
    yield out, model
    # register() is process-wide by design; the tests leave robustbench's model dictionary as they found it
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf].pop(NAME, None)


def test_export_writes_robustbench_model_info(exported):
    from robustbench.utils import ModelInfo

    out, model = exported
    folder = out / "cifar10" / "Linf"
    state = torch.load(folder / f"{NAME}.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state) and set(state) == set(model.state_dict())

    info = json.loads((folder / f"{NAME}.json").read_text())
    entry = {k: v for k, v in info.items() if k != "robust_sparse"}
    # exactly robustbench's dataclass, in its field order, as its update_json writes it, plus our one key
    assert list(entry) == [field.name for field in dataclasses.fields(ModelInfo)]
    assert list(info) == list(entry) + ["robust_sparse"]
    assert dataclasses.asdict(ModelInfo(**entry)) == entry
    assert (entry["dataset"], entry["eps"], entry["architecture"]) == ("cifar10", "8/255", "tiny_cnn")
    assert entry["venue"] == "N/A"  # RobustBench's mark for a model without a paper
    assert (entry["clean_acc"], entry["autoattack_acc"]) == ("50.00", "12.50")  # the AutoAttack row of these weights
    assert entry["corruptions_acc"] is None and entry["additional_data"] is False
    extra = info["robust_sparse"]
    assert extra["training_method"] == "rigl" and extra["objective"] == "pgd_at"
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert extra["sparsity"] == pytest.approx(zeros / total)
    assert extra["commands"][0].startswith("robust-sparse train") and f"--robustbench {NAME}" in extra["commands"][-1]
    assert "--attacks autoattack" in extra["commands"][1] and "--n-examples 1000" in extra["commands"][1]


def test_robustbench_reads_the_model_info_back(exported, tmp_path, monkeypatch, capsys):
    """robustbench's own readers of model_info/<dataset>/<threat>/NAME.json (paths relative to the working
    directory, as in its repository): the leaderboard table, the bibtex list, and update_json, its writer."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import get_leaderboard_bibtex, list_available_models, update_json

    out, _ = exported
    zoo.register(NAME, out, "cifar10", "Linf")  # list_available_models lists registered names only
    info_path = tmp_path / "model_info" / "cifar10" / "Linf" / f"{NAME}.json"
    info_path.parent.mkdir(parents=True)
    info_path.write_text((out / "cifar10" / "Linf" / f"{NAME}.json").read_text())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    list_available_models("cifar10", "Linf")
    rows = [line for line in capsys.readouterr().out.splitlines() if NAME in line]
    assert len(rows) == 1
    assert all(cell in rows[0] for cell in ("50.00%", "12.50%", "tiny_cnn", "N/A"))
    assert get_leaderboard_bibtex("cifar10", "Linf")[0] == set()  # venue N/A: no paper to cite, and no crash
    capsys.readouterr()

    before = json.loads(info_path.read_text())
    update_json(BenchmarkDataset.cifar_10, ThreatModel.Linf, NAME, 0.75, 0.25, eps=None)  # benchmark(to_disk=True)
    after = json.loads(info_path.read_text())
    assert (after["clean_acc"], after["autoattack_acc"]) == ("75.0", "25.0")
    assert after["robust_sparse"] == before["robust_sparse"] and after["footnote"] == before["footnote"]


def test_register_load_model_identical_logits(exported):
    from robustbench.utils import load_model

    out, model = exported
    zoo.register(NAME, out, "cifar10", "Linf")
    loaded = load_model(NAME, model_dir=str(out), dataset="cifar10", threat_model="Linf")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_exported_recipe_loads_in_a_fresh_process(exported, tmp_path):
    """What the user hit: in a process that never imported robust_sparse.eval.zoo, robustbench's load_model raises
    KeyError; NAME.md's code block, run as written, then loads the model with the toolkit's logits."""
    out, model = exported
    recipe = (out / "cifar10" / "Linf" / f"{NAME}.md").read_text()
    assert f"KeyError: '{NAME}'" in recipe
    code = re.search(r"```python\n(.*?)```", recipe, re.DOTALL).group(1)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.save(images, tmp_path / "images.pt")
    script = f"""
import sys
import torch
from robust_sparse.environment.compat import import_robustbench
import_robustbench()  # what makes robustbench importable with only PyPI's pyautoattack; it registers nothing
from robustbench.utils import load_model
assert "robust_sparse.eval.zoo" not in sys.modules
try:
    load_model({NAME!r}, model_dir={str(out)!r}, dataset="cifar10", threat_model="Linf")
except KeyError as error:
    missing = error.args[0]
else:
    raise SystemExit("robustbench knew the name before register")
{code}
with torch.no_grad():
    logits = model(torch.load("images.pt", weights_only=True))
torch.save({{"missing": missing, "logits": logits}}, "result.pt")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["missing"] == NAME
    with torch.no_grad():
        assert torch.equal(result["logits"], model(images))


def test_register_errors(tmp_path):
    with pytest.raises(Exception, match=r"Nope.pt not found .*--robustbench Nope"):
        zoo.register("Nope", tmp_path, "cifar10", "Linf")
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    (folder / "Standard.pt").write_bytes(b"")
    (folder / "Standard.json").write_text(json.dumps({"robust_sparse": {"dataset": "cifar10", "architecture": "tiny_cnn",
                                                                        "num_classes": 10}}))
    with pytest.raises(Exception, match="RobustBench's own zoo"):
        zoo.register("Standard", tmp_path, "cifar10", "Linf")
    with pytest.raises(Exception, match="dataset 'mnist'"):
        zoo.register("Standard", tmp_path, "mnist", "Linf")
    # a model-info file claiming a classifier no machine holds is refused before load_model builds it
    (folder / "Huge.pt").write_bytes(b"")
    (folder / "Huge.json").write_text(json.dumps({"robust_sparse": {"dataset": "cifar10", "architecture": "tiny_cnn",
                                                                    "num_classes": 10**12}}))
    with pytest.raises(UserError, match=r"Huge.json: robust_sparse.num_classes is 1000000000000, not a whole number"):
        zoo.register("Huge", tmp_path, "cifar10", "Linf")


def test_export_refuses_bad_names_and_datasets(run, mnist, tmp_path, capsys):
    checkpoint, _ = run
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "o"), "--robustbench", "a/b"]) == 2
    assert "a zoo name is letters" in capsys.readouterr().err
    config = load_config(None, ["model.name=tiny_cnn"])  # MNIST-5k: not a RobustBench data set
    mnist_checkpoint = tmp_path / "m" / "best.pt"
    mnist_checkpoint.parent.mkdir()
    info = DATASETS.get("mnist5k")
    save_checkpoint({"config": to_dict(config), "epoch": 1,
                     "model": build_model("tiny_cnn", 10, 1, info.mean, info.std).state_dict()}, mnist_checkpoint)
    assert main(["export", str(mnist_checkpoint), "--out", str(tmp_path / "o"), "--robustbench", "X"]) == 2
    assert "trained on mnist5k" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert zoo.eps_text(8 / 255) == "8/255" and zoo.eps_text(0.5) == "0.5"


def _export_argv(checkpoint, out, name, *extra):
    return ["export", str(checkpoint), "--out", str(out), "--robustbench", name, *extra]


def test_export_records_the_weights_checksum_and_replaces_only_its_own_files(exported, run, tmp_path, capsys):
    import hashlib

    out, _ = exported
    folder = out / "cifar10" / "Linf"
    record = json.loads((folder / f"{NAME}.json").read_text())["robust_sparse"]
    assert record["weights_sha256"] == hashlib.sha256((folder / f"{NAME}.pt").read_bytes()).hexdigest()
    # exporting again over its own export: allowed, same record
    again = tmp_path / "models"
    assert main(_export_argv(run[0], again, NAME)) == 0
    assert main(_export_argv(run[0], again, NAME)) == 0
    capsys.readouterr()


def test_export_refuses_a_file_it_did_not_write_and_force_replaces_it(run, tmp_path, capsys):
    from conftest import one_line_error, snapshot

    out = tmp_path / "models"
    folder = out / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    foreign = folder / "Theirs2026.pt"
    torch.save({"someone": torch.ones(3)}, foreign)  # another program's model, no model-info file beside it
    before = snapshot(out)
    line = one_line_error(_export_argv(run[0], out, "Theirs2026"), capsys)
    assert str(foreign) in line and "not written by robust-sparse export" in line and "--force" in line
    assert snapshot(out) == before
    # a model-info file of someone else's (RobustBench's own ModelInfo, no robust_sparse key): still not ours
    (folder / "Theirs2026.json").write_text(json.dumps({"name": "Theirs2026", "dataset": "cifar10"}))
    before = snapshot(out)
    line = one_line_error(_export_argv(run[0], out, "Theirs2026"), capsys)
    assert str(foreign) in line and "Theirs2026.json is not its model-info file" in line
    assert snapshot(out) == before
    # --force replaces it deliberately, and from then on the file is the toolkit's
    assert main(_export_argv(run[0], out, "Theirs2026", "--force")) == 0
    assert set(torch.load(foreign, weights_only=True)) == set(run[1].state_dict())
    assert main(_export_argv(run[0], out, "Theirs2026")) == 0
    capsys.readouterr()


def test_export_refuses_its_own_file_changed_since(run, tmp_path, capsys):
    from conftest import one_line_error, snapshot

    out = tmp_path / "models"
    assert main(_export_argv(run[0], out, "Edited")) == 0
    weights = out / "cifar10" / "Linf" / "Edited.pt"
    torch.save({"retrained": torch.zeros(2)}, weights)  # replaced by hand: the record no longer matches
    before = snapshot(out)
    capsys.readouterr()
    line = one_line_error(_export_argv(run[0], out, "Edited"), capsys)
    assert str(weights) in line and "SHA-256 differs" in line and "Edited.json" in line
    assert snapshot(out) == before
    # a stray recipe or model-info file alone is also not the toolkit's to replace
    (out / "cifar10" / "Linf" / "Recipe.md").write_text("# my notes\n")
    before = snapshot(out)
    line = one_line_error(_export_argv(run[0], out, "Recipe"), capsys)
    assert str(out / "cifar10" / "Linf" / "Recipe.md") in line and "Recipe.json is missing" in line
    assert snapshot(out) == before


def test_export_refuses_a_name_of_robustbenchs_own_zoo_unless_forced(run, tmp_path, capsys):
    from conftest import one_line_error

    out = tmp_path / "models"
    line = one_line_error(_export_argv(run[0], out, "Standard"), capsys)
    assert "--robustbench Standard" in line and "RobustBench's own zoo (cifar10, Linf)" in line and "--force" in line
    assert not out.exists()
    assert main(_export_argv(run[0], out, "Standard", "--force")) == 0
    assert (out / "cifar10" / "Linf" / "Standard.pt").is_file()
    line = one_line_error(["export", str(run[0]), "--out", str(tmp_path / "plain"), "--force"], capsys)
    assert "--force goes with --robustbench" in line and not (tmp_path / "plain").exists()


def _digit_points(test_batch, n=8):
    """n real digits as CIFAR-shaped float [0,1] points (3x32x32)."""
    images, labels = test_batch
    return torch.nn.functional.pad(images[:n], (2, 2, 2, 2)).repeat(1, 3, 1, 1), labels[:n]


def test_benchmark_goes_through_the_rebound_globals(run, test_batch):
    """The two robustbench.eval names local_points rebinds exist in the installed robustbench (this fails when one
    disappears), and benchmark() itself, AutoAttack included, goes through them: the given points, the given seed."""
    import autoattack
    import robustbench.data as rb_data
    import robustbench.eval as rb_eval
    from robustbench.model_zoo.enums import BenchmarkDataset

    assert zoo.BENCHMARK_GLOBALS == ("load_clean_dataset", "AutoAttack")
    assert rb_eval.load_clean_dataset is rb_data.load_clean_dataset and rb_eval.AutoAttack is autoattack.AutoAttack
    _, model = run
    images, _ = _digit_points(test_batch)
    with torch.no_grad():  # labelled as the model predicts: every point is attacked, and eps 0.5 breaks them all
        labels = model(images).argmax(1)
    assert zoo.benchmark_on_points(model, images, labels, eps=0.5, batch_size=8, seed=3) == (1.0, 0.0)
    with zoo.local_points(images, labels, seed=3) as record:
        attack = rb_eval.AutoAttack(model, norm="Linf", eps=0.5, version="standard", device="cpu")
        assert torch.equal(rb_eval.load_clean_dataset(BenchmarkDataset.cifar_10, 5, "./data", None)[0], images[:5])
    assert attack.seed == 3 and (record.points_read, record.attacks_built) == (1, 1)
    assert rb_eval.load_clean_dataset is rb_data.load_clean_dataset and rb_eval.AutoAttack is autoattack.AutoAttack


@pytest.mark.parametrize("gone", zoo.BENCHMARK_GLOBALS)
def test_a_robustbench_without_a_rebound_global_is_one_line(gone, test_batch, monkeypatch):
    import robustbench.eval as rb_eval

    kept = [name for name in zoo.BENCHMARK_GLOBALS if name != gone][0]
    original = getattr(rb_eval, kept)
    monkeypatch.delattr(rb_eval, gone)
    with pytest.raises(UserError) as caught:
        with zoo.local_points(*_digit_points(test_batch)):
            pass
    message = str(caught.value)
    assert message.startswith(f"robustbench {zoo.robustbench_version()}: robustbench.eval has no {gone} any more")
    assert "\n" not in message and "robustbench 1.1.1" in message
    assert getattr(rb_eval, kept) is original  # nothing was rebound


def test_a_benchmark_that_bypasses_the_globals_is_one_line(run, test_batch, monkeypatch):
    """A robustbench whose benchmark() stopped calling the rebound names would evaluate its own test set: refused."""
    import robustbench.eval as rb_eval

    monkeypatch.setattr(rb_eval, "benchmark", lambda model, **options: (1.0, 1.0))
    with pytest.raises(UserError, match=r"^robustbench \S+: benchmark\(\) ran without calling "
                                        r"robustbench\.eval\.load_clean_dataset"):
        zoo.benchmark_on_points(run[1], *_digit_points(test_batch))


def test_a_robustbench_without_model_dicts_or_model_info_is_one_line(run, tmp_path, monkeypatch, capsys):
    import robustbench.model_zoo as rb_zoo
    import robustbench.utils as rb_utils

    version = re.escape(zoo.robustbench_version())
    monkeypatch.delattr(rb_zoo, "model_dicts")
    with pytest.raises(UserError, match=rf"^robustbench {version}: robustbench\.model_zoo\.model_dicts, the model "
                                        "dictionary load_model reads, is gone"):
        zoo.register(NAME, tmp_path, "cifar10", "Linf")
    # export looks the name up in that dictionary (RobustBench's own names are refused) before writing anything
    assert main(["export", str(run[0]), "--out", str(tmp_path / "o"), "--robustbench", "X"]) == 2
    assert f"robustbench {zoo.robustbench_version()}: robustbench.model_zoo.model_dicts" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.delattr(rb_utils, "ModelInfo")
    assert main(["export", str(run[0]), "--out", str(tmp_path / "o"), "--robustbench", "X"]) == 2
    assert f"robustbench {zoo.robustbench_version()}: robustbench.utils.ModelInfo" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prefix_model():
    """tiny_cnn trained for one epoch on the prefix's 4660 training images: above chance, far from robust."""
    from robust_sparse.config import DataConfig
    from robust_sparse.datasets.splits import load_raw

    train, test = load_raw(DataConfig(dataset="cifar10", root=str(CIFAR_PREFIX)))
    model = _cifar_tiny(zero_fraction=0.0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = train.images.float() / 255
    for start in range(0, len(images), 64):
        loss = torch.nn.functional.cross_entropy(model(images[start:start + 64]), train.labels[start:start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), test


def _eval_points(model, tmp_path, attacks, n, eps="8/255"):
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    output = tmp_path / "row.json"
    code = main(["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "cifar10", "--data-root",
                 str(CIFAR_PREFIX), "--n-examples", str(n), "--attacks", attacks, "--eps", eps, "--no-probe", "--batch-size",
                 str(n), "--seed", "0", "--results-dir", str(tmp_path / "r"), "--output", str(output),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    return json.loads(output.read_text())


class _StopBeforeAutoAttack(Exception):
    pass


@needs_cifar_prefix
def test_benchmark_clean_accuracy_on_the_prefix(prefix_model, tmp_path, capsys):
    """benchmark() itself on 100 local prefix points prints robust-sparse eval's clean accuracy (stopped before
    its AutoAttack, which the next test runs on fewer points)."""
    import robustbench.eval as rb_eval

    model, test = prefix_model
    n = 100
    images, labels = test.images[:n].float() / 255, test.labels[:n]
    row = _eval_points(model, tmp_path, "fgsm", n)
    capsys.readouterr()
    calls = []

    def no_autoattack(*args, **options):
        calls.append(options)
        raise _StopBeforeAutoAttack

    with zoo.local_points(images, labels, "cifar10"):
        seeded = rb_eval.AutoAttack
        rb_eval.AutoAttack = no_autoattack
        try:
            with pytest.raises(_StopBeforeAutoAttack):
                rb_eval.benchmark(model, n_examples=n, dataset="cifar10", threat_model="Linf", eps=8 / 255,
                                  batch_size=n)
        finally:
            rb_eval.AutoAttack = seeded
    printed = capsys.readouterr().out
    assert f"Clean accuracy: {round(row['clean_acc'] * n) / n:.2%}" in printed  # benchmark()'s own line
    assert calls[0]["eps"] == pytest.approx(8 / 255) and calls[0]["version"] == "standard"
    assert 0.15 < row["clean_acc"] < 1  # trained: above chance


@needs_cifar_prefix
@pytest.mark.parametrize("eps_text, survivors", [
    ("8/255", False),  # seconds: APGD-CE breaks every point
    pytest.param("1/255", True, marks=pytest.mark.slow),  # ~6 min on 2 CPU cores: Square runs on the survivors
])
def test_benchmark_autoattack_equals_robust_sparse_eval(prefix_model, tmp_path, eps_text, survivors):
    """robustbench.eval.benchmark itself (AutoAttack standard) on 24 prefix points = robust-sparse eval."""
    model, test = prefix_model
    n = 24
    images, labels = test.images[:n].float() / 255, test.labels[:n]
    row = _eval_points(model, tmp_path, "autoattack", n, eps=eps_text)
    eps = int(eps_text.split("/")[0]) / 255
    clean, robust = zoo.benchmark_on_points(model, images, labels, dataset="cifar10", threat_model="Linf",
                                            eps=eps, batch_size=n, seed=0)
    assert round(clean * n) == round(row["clean_acc"] * n) > 0
    assert round(robust * n) == round(row["autoattack_acc"] * n)
    assert (0 < robust < clean) if survivors else robust < clean
    # the loader is restored: outside the block benchmark() would read torchvision's test set again
    import robustbench.data as rb_data
    import robustbench.eval as rb_eval

    assert rb_eval.load_clean_dataset is rb_data.load_clean_dataset
