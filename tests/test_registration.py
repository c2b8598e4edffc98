"""Registering extensions from Python and using them by name in a config."""

from __future__ import annotations

import os

import pytest
import torch

import robust_sparse
from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import load_config
from robust_sparse.sparse.masker import StaticEngine
from robust_sparse.train import fit

TOY_SPARSE = "toy_fixed_mask"


def _every_other_position(setup):
    """A fixed mask: every other position of every sparse layer, by flat index; StaticEngine never rewires."""
    masks = {}
    for name, shape in setup.shapes.items():
        flat = torch.zeros(torch.Size(shape).numel(), dtype=torch.bool)
        flat[::2] = True
        masks[name] = flat.view(shape).to(setup.device)
    return masks, StaticEngine()


@pytest.fixture
def toy_sparse():
    """TOY_SPARSE registered for one test, and taken back after it: a method left in the registries would be
    one the other test modules' every-method checks (test_sparse.py) do not know."""
    from robust_sparse.config import REGISTERED_SPARSITY_METHODS, SPARSITY_METHODS
    from robust_sparse.sparse import METHODS

    robust_sparse.register_sparsity_method(TOY_SPARSE, _every_other_position)
    yield TOY_SPARSE
    METHODS.remove(TOY_SPARSE)
    SPARSITY_METHODS.remove(TOY_SPARSE)
    REGISTERED_SPARSITY_METHODS.pop(TOY_SPARSE, None)


def test_a_sparse_method_registered_from_python_trains_by_name(toy_sparse, tiny_config, tmp_path):
    config = load_config(None, [f"sparsity.method={TOY_SPARSE}", "model.name=tiny_cnn", "data.train_limit=128",
                                "data.val_size=64", "data.batch_size=64", "optim.epochs=1", "attack.steps=1",
                                "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "device=cpu",
                                f"out_dir={tmp_path / 'run'}"])
    assert config.sparsity.method == TOY_SPARSE
    result = fit(config)
    state = load_checkpoint(result.run_dir / "last.pt")
    assert state["config"]["sparsity"]["method"] == TOY_SPARSE
    masks = state["sparsity"]["masks"]
    assert set(masks) == {name for name, p in result.model.named_parameters() if p.dim() > 1}
    for name, mask in masks.items():
        expected = torch.zeros(mask.numel(), dtype=torch.bool)
        expected[::2] = True
        assert torch.equal(mask.flatten().cpu(), expected), name  # the toy engine's mask, unchanged by training
        weight = state["model"][name]
        assert torch.all(weight[~mask] == 0), f"{name}: weights off the mask are not zero"
        assert torch.count_nonzero(weight[mask]) > 0.9 * int(mask.sum())  # and the kept ones trained
    assert result.metrics["density"].tolist() == [sum(int(m.sum()) for m in masks.values())
                                                  / sum(m.numel() for m in masks.values())]
    # the saved config loads again by name (resume, eval and export re-validate it)
    again = load_config(result.run_dir / "config.yaml")
    assert again.sparsity.method == TOY_SPARSE
    # a name taken twice is a programming error
    try:
        robust_sparse.register_sparsity_method(TOY_SPARSE, _every_other_position)
    except ValueError as error:
        assert "already registered" in str(error)
    else:
        raise AssertionError("registering a taken name must raise")

TOY_ATTACKS = '''
"""A user's attacks, registered on import (as a plugin module would)."""
import robust_sparse
from robust_sparse.attacks import Attack

CALLS = []  # points per call


def to_grey(images, eps):
    """Every pixel as close to 0.5 as the L-inf ball allows: at eps >= 0.5 the image is a flat 0.5 grey."""
    return images + (0.5 - images).clamp(-eps, eps)


def fill(model, images, labels, *, norm, eps):
    CALLS.append(len(images))
    return to_grey(images, eps)


class Fill(Attack):
    def __init__(self, model, *, norm, eps):
        super().__init__(model)
        self.eps = eps

    def forward(self, images, labels):
        CALLS.append(len(images))
        return to_grey(images, self.eps)


robust_sparse.register_attack("toy-fill", fill, label="Toy fill")
robust_sparse.register_attack("toy-fill-class", Fill, label="Toy fill (class)")
'''


def _plugin_module(name: str, source: str, tmp_path, monkeypatch):
    """``source`` as module ``name``, imported here and importable by child processes (PYTHONPATH)."""
    import importlib

    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return importlib.import_module(name)


@pytest.fixture
def toy_attacks(tmp_path, monkeypatch):
    """The module above, importable here and in child processes; its attacks unregistered afterwards."""
    import sys

    from robust_sparse.eval.specs import ATTACKS

    module = _plugin_module("toy_attacks", TOY_ATTACKS, tmp_path, monkeypatch)
    yield module
    ATTACKS.remove("toy-fill")
    ATTACKS.remove("toy-fill-class")
    sys.modules.pop("toy_attacks", None)


def test_a_registered_attack_is_used_by_name(toy_attacks, trained_tiny, mnist, tmp_path, capsys):
    import json

    import torch

    from robust_sparse.files.checkpoint import save_checkpoint
    from robust_sparse.cli import main
    from robust_sparse.config import load_config, to_dict
    from robust_sparse.errors import UserError
    from robust_sparse.eval import evaluate, parse_attacks
    from robust_sparse.studies.local import EVAL_RESULT, run_evaluation
    from robust_sparse.studies.sweep import _eval_stage

    _, test = mnist
    images, labels = test.images[:40].float() / 255, test.labels[:40]
    with torch.no_grad():  # the class the model gives a flat grey image: the only label that survives the toy
        grey_class = trained_tiny(torch.full_like(images[:1], 0.5)).argmax(1).item()
        clean = trained_tiny(images).argmax(1) == labels
    expected = (clean & (labels == grey_class)).float().mean().item()
    assert 0 < expected < clean.float().mean().item()  # the toy breaks some points, not all

    # evaluate() and the spec parser: by name, next to a built-in; each call attacks the clean-correct points
    result = evaluate(trained_tiny, images, labels, norm="linf", eps=0.5, large_eps=None, batch_size=16,
                      attacks=parse_attacks("fgsm,toy-fill,toy-fill-class"))
    assert [o.label for o in result.outcomes] == ["FGSM", "Toy fill", "Toy fill (class)"]
    assert result.accuracies()["Toy fill"] == result.accuracies()["Toy fill (class)"] == pytest.approx(expected)
    assert toy_attacks.CALLS == [16, 16, int(clean.sum()) - 32] * 2  # batches of 16 over the clean-correct points
    with pytest.raises(UserError, match=r"^unknown attack 'toy-fil'; choose from: fgsm, pgd\[-K\[xR\]\], .*toy-fill"):
        parse_attacks("toy-fil")
    with pytest.raises(UserError, match="already registered"):
        toy_attacks.robust_sparse.register_attack("toy-fill", toy_attacks.fill)

    # robust-sparse eval --attacks NAME, in process: the result row carries the toy's accuracy under its label
    checkpoint = tmp_path / "run" / "best.pt"
    config = load_config(None, ["model.name=tiny_cnn", "attack.eps=0.5"])
    save_checkpoint({"config": to_dict(config), "model": trained_tiny.state_dict(), "epoch": 2}, checkpoint)
    common = [str(checkpoint), "--n-examples", "40", "--eps", "0.5", "--no-probe", "--batch-size", "16",
              "--device", "cpu", "--no-progress"]
    assert main(["eval", *common, "--attacks", "toy-fill", "--output", str(tmp_path / "row.json")]) == 0
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["per_attack"] == {"Toy fill": pytest.approx(expected)}
    assert "Toy fill" in capsys.readouterr().out
    assert main(["eval", *common, "--attacks", "nope"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "unknown attack 'nope'" in error and "toy-fill-class" in error

    # a sweep file's eval stage: checked by name, then run by `robust-sparse eval` in a child process, which
    # imports the registering module
    stage = _eval_stage({"attacks": ["toy-fill"], "n_examples": 40, "eps": 0.5, "batch_size": 16, "probe": False})
    assert stage.config.attacks == "toy-fill" and stage.modules == ("toy_attacks",)
    assert run_evaluation(checkpoint.parent, stage, stage.modules, "cpu", 1) == "done", \
        (checkpoint.parent / "eval.log").read_text()
    record = json.loads((checkpoint.parent / EVAL_RESULT).read_text())
    assert record["results"][0]["per_attack"] == {"Toy fill": pytest.approx(expected)}


TOY_METHODS = '''
"""A user's sparse method, registered on import (as a plugin module would)."""
import torch

import robust_sparse
from robust_sparse.sparse.masker import StaticEngine


def every_third(setup):
    masks = {}
    for name, shape in setup.shapes.items():
        flat = torch.zeros(torch.Size(shape).numel(), dtype=torch.bool)
        flat[::3] = True
        masks[name] = flat.view(shape).to(setup.device)
    return masks, StaticEngine()


robust_sparse.register_sparsity_method("toy_every_third", every_third)
'''


def test_a_sweep_trains_a_method_registered_from_python_in_its_child_processes(tmp_path, monkeypatch):
    """The sweep's runs are new processes: they import the registering module ($ROBUST_SPARSE_PLUGINS)."""
    import sys

    import yaml

    from robust_sparse.config import REGISTERED_SPARSITY_METHODS, SPARSITY_METHODS
    from robust_sparse.errors import UserError
    from robust_sparse.sparse import METHODS
    from robust_sparse.studies.sweep import load_sweep, run_sweep

    monkeypatch.delenv("ROBUST_SPARSE_PLUGINS", raising=False)
    _plugin_module("toy_methods", TOY_METHODS, tmp_path, monkeypatch)
    try:
        assert REGISTERED_SPARSITY_METHODS["toy_every_third"] == "toy_methods"
        sweep_file = tmp_path / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "overrides": ["sparsity.method=toy_every_third", "model.name=tiny_cnn", "data.train_limit=128",
                          "data.val_size=64", "optim.epochs=1", "attack.steps=1", "val.pgd_steps=1",
                          "val.max_examples=64", "eval.n_examples=0", "device=cpu"],
            "grid": {"seed": [0]}}))
        sweep = load_sweep(sweep_file, str(tmp_path / "out"))
        assert sweep.plugins == ("toy_methods",)
        index = run_sweep(sweep)
        run_dir = tmp_path / "out" / "runs" / "seed=0"
        assert index["status"].tolist() == ["done"], (run_dir / "train.log").read_text()
        masks = load_checkpoint(run_dir / "last.pt")["sparsity"]["masks"]
        for mask in masks.values():  # the child trained with the plugin's mask
            assert torch.equal(mask.flatten().cpu(), torch.arange(mask.numel()) % 3 == 0)
        # a method registered from a script (__main__) cannot reach the child processes: one line, up front
        REGISTERED_SPARSITY_METHODS["toy_every_third"] = "__main__"
        with pytest.raises(UserError, match="sparsity method 'toy_every_third' is registered from __main__"):
            load_sweep(sweep_file, str(tmp_path / "out2"))
    finally:
        METHODS.remove("toy_every_third")
        SPARSITY_METHODS.remove("toy_every_third")  # its settings, which the config holds
        REGISTERED_SPARSITY_METHODS.pop("toy_every_third", None)
        sys.modules.pop("toy_methods", None)
