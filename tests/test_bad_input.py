"""Bad input (issue 12): one line on stderr naming the flag, field or file, exit 2, no traceback, and nothing
written or changed, because every check runs before data, models or attacks are loaded."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import typing

import pytest
import torch
import yaml

from conftest import make_tiny_model
from robust_sparse.files.checkpoint import FORMAT, save_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import TrainConfig, load_config, save_config, to_dict
from robust_sparse.errors import ConfigError
from robust_sparse.studies.sweep import load_sweep


def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("robust-sparse: error: ")
    return lines[0]


def snapshot(directory) -> dict[str, str]:
    """Every file under ``directory`` by its SHA-256 (folders as "dir"): compared before and after a command."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


# ----------------------------------------------------------------------------------------------------------
# config files and fields


def test_binary_config_file(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x80\x81\xfe\xff\x00 binary")
    line = one_line_error(["train", str(path), "--out", str(tmp_path / "run")], capsys)
    assert "model.bin" in line and "UTF-8" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_config_file_is_an_error_not_the_schema_defaults(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = one_line_error(["train", str(path), "--out", str(tmp_path / "run")], capsys)
    assert "empty.yaml is empty" in line and "quickstart" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("yaml_text,overrides", [
    ("attack: 0.1\n", ["attack.eps=0.2"]),
    ("seed: 1\n", ["attack.eps=0.2", "attack=0.1", "attack.steps=2"]),
])
def test_scalar_section_is_not_silently_replaced_by_an_override(tmp_path, capsys, yaml_text, overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    sets = [part for text in overrides for part in ("--set", text)]
    line = one_line_error(["train", str(path), *sets, "--out", str(tmp_path / "run")], capsys)
    assert "attack: expected a mapping" in line and "0.1" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,field", [
    ("optim.lr=1e999", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("trades_beta=.inf", "trades_beta"),
    ("attack.eps=.nan", "attack.eps"),
    ("attack.eps=1e300/1e-300", "attack.eps"),
    ("eval.eps=1e999", "eval.eps"),
    ("sparsity.temperature=.inf", "sparsity.bsrnet.temperature"),
    ("optim.milestones=[0.5, .nan]", "optim.milestones[1]"),
    # upper bounds
    ("attack.step_size=2", "attack.step_size"),
    ("eval.eps=2", "eval.eps"),
])
def test_non_finite_and_out_of_range_floats(tmp_path, capsys, override, field):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    before = snapshot(run)
    line = one_line_error(["train", "--set", override, "--out", str(run)], capsys)
    assert f"error: {field}" in line
    assert snapshot(run) == before


def test_weight_decay_that_wipes_the_weights(tmp_path, capsys):
    line = one_line_error(["train", "--set", "optim.optimizer=sgdw", "--set", "optim.weight_decay=1",
                           "--out", str(tmp_path / "run")], capsys)
    assert "optim.weight_decay" in line and not (tmp_path / "run").exists()


def test_non_finite_number_in_a_yaml_file(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    assert "optim.lr: inf is not a finite number" in one_line_error(["train", str(path)], capsys)


def _float_fields(cls: type, prefix: str = ""):
    for f in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[f.name]
        if "inline" in f.metadata:  # the sparse methods' sections, sparsity.<method>.*, from the registry
            for name, section in f.metadata["inline"]().items():
                yield from _float_fields(section, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(annotation):
            yield from _float_fields(annotation, f"{prefix}{f.name}.")
        elif typing.get_origin(annotation) is list:
            if typing.get_args(annotation) == (float,):
                yield f"{prefix}{f.name}", True
        elif float in (annotation, *typing.get_args(annotation)):  # float, float | None
            yield f"{prefix}{f.name}", False


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_every_float_field_rejects_non_finite_values(value):
    fields = list(_float_fields(TrainConfig))
    assert len(fields) > 20 and ("optim.lr", False) in fields and ("optim.factors", True) in fields
    for name, is_list in fields:
        with pytest.raises(ConfigError, match=rf"^{name}(\[0\])?: .* is not a finite number$"):
            load_config(None, [f"{name}=[{value}]" if is_list else f"{name}={value}"])


# ----------------------------------------------------------------------------------------------------------
# output directories that are files


def test_train_out_naming_an_existing_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    for out in (target, target / "run"):
        line = one_line_error(["train", "--set", "model.name=tiny_cnn", "--out", str(out)], capsys)
        assert "out_dir" in line and "--out" in line and "notes.txt is an existing file" in line
    assert target.read_text() == "keep me\n"


def test_export_out_naming_an_existing_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    # the checkpoint does not exist either: the --out check runs first, before anything is read
    line = one_line_error(["export", str(tmp_path / "missing.pt"), "--out", str(target)], capsys)
    assert "export --out" in line and "notes.txt is an existing file" in line
    assert target.read_text() == "keep me\n"


# ----------------------------------------------------------------------------------------------------------
# damaged or unsafe checkpoints, weights and data files


def _damage(path, kind: str) -> None:
    if kind == "random bytes":
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(1024)))
    elif kind == "pickled":  # a well-formed torch file that needs arbitrary unpickling
        torch.save({"format": FORMAT, "model": make_tiny_model().state_dict(), "args": argparse.Namespace(lr=0.1)},
                   path)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(b"")


EXPECTED = {"random bytes": "random bytes", "pickled": "not a safe checkpoint", "truncated": "truncated",
            "empty": "is corrupted: empty"}


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as train leaves it (config.yaml, best.pt); a test damages its checkpoint."""
    directory = tmp_path / "run"
    config = load_config(None, ["model.name=tiny_cnn", "device=cpu", f"out_dir={directory}"])
    directory.mkdir()
    save_config(config, directory / "config.yaml")
    save_checkpoint({"config": to_dict(config), "model": make_tiny_model().state_dict(), "epoch": 1},
                    directory / "best.pt")
    return directory


@pytest.mark.parametrize("command", ["eval", "export"])
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_damaged_or_unsafe_checkpoint(run_dir, capsys, kind, command):
    checkpoint = run_dir / "best.pt"
    _damage(checkpoint, kind)
    before = snapshot(run_dir)
    argv = ["eval", str(checkpoint)] if command == "eval" else ["export", str(checkpoint), "--out",
                                                                str(run_dir / "export")]
    line = one_line_error(argv, capsys)
    assert f"checkpoint {checkpoint}" in line and EXPECTED[kind] in line
    assert "weights_only=False" not in line and len(line.replace(str(checkpoint), "")) < 250
    if kind == "pickled":
        assert "argparse.Namespace" in line
    assert snapshot(run_dir) == before  # no eval/ or export/ folder, nothing rewritten


@pytest.mark.parametrize("flags,named", [
    (["--large-eps", "-1"], "--large-eps -1"),
    (["--large-eps", "1e999"], "--large-eps"),
    (["--large-eps", "0.5", "--no-probe"], "--large-eps and --no-probe"),
    (["--n-examples", "0"], "--n-examples 0"),
    (["--eps", "1e999"], "--eps"),
    (["--eps", "-0.1"], "--eps"),
    (["--output", "no/such/folder/result.json"], "--output no/such/folder/result.json"),
    (["--output", "."], "--output .: is a directory"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--chained", "--cross-check-torchattacks"], "drop --chained"),
])
def test_bad_eval_flags_fail_before_any_work(run_dir, capsys, monkeypatch, flags, named):
    """Each flag is checked before the test points are read: no attack runs and no eval/ folder appears."""
    from robust_sparse.eval import points

    def no_data(*args, **kwargs):
        raise AssertionError("the test points were read before the flags were checked")

    monkeypatch.setattr(points, "load_points", no_data)
    monkeypatch.chdir(run_dir)
    before = snapshot(run_dir)
    line = one_line_error(["eval", str(run_dir / "best.pt"), "--attacks", "pgd-1x1", *flags], capsys)
    assert named in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_damaged_or_unsafe_weights_and_data_files(tmp_path, capsys, kind):
    weights, data = tmp_path / "weights.pt", tmp_path / "points.pt"
    torch.save(make_tiny_model().state_dict(), weights)
    torch.save({"images": torch.zeros(4, 1, 28, 28), "labels": torch.zeros(4, dtype=torch.long)}, data)
    results = tmp_path / "results"
    for bad, flag in ((weights, "weights file"), (data, "data file")):
        good = bad.read_bytes()
        _damage(bad, kind)
        line = one_line_error(["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "mnist5k",
                               "--data-file", str(data), "--results-dir", str(results)], capsys)
        assert f"{flag} {bad}" in line and EXPECTED[kind] in line and "weights_only=False" not in line
        bad.write_bytes(good)
    assert not results.exists()


def test_weights_that_do_not_fit_name_the_keys_and_shapes(tmp_path, capsys):
    path = tmp_path / "tiny.pt"
    torch.save(make_tiny_model().state_dict(), path)
    line = one_line_error(["eval", "--arch", "small_cnn", "--weights", str(path), "--dataset", "mnist5k",
                           "--results-dir", str(tmp_path / "results")], capsys)
    assert "weights do not fit small_cnn: missing" in line and "features.3.weight" in line  # small_cnn only
    assert "unexpected" in line and "features.5.weight" not in line.split("unexpected")[0]
    assert "shape mismatch" in line and "features.0.weight [8, 1, 3, 3] in the file, [32, 1, 3, 3] in the model" in line

    state = make_tiny_model().state_dict()
    del state["classifier.1.bias"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    line = one_line_error(["eval", "--arch", "tiny_cnn", "--weights", str(path), "--dataset", "mnist5k",
                           "--results-dir", str(tmp_path / "results")], capsys)
    assert line.endswith("weights do not fit tiny_cnn: missing 1 (classifier.1.bias); unexpected 1 (extra.weight)")
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------------
# a missing dataset: the hint speaks the command's language


def test_missing_cifar_hint_on_train_names_the_config_field(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    line = one_line_error(["train", "--set", "data.dataset=cifar10", "--set", f"data.root={tmp_path / 'data'}",
                           "--set", "model.name=tiny_cnn", "--out", str(tmp_path / "run")], capsys)
    assert "cifar10 not found" in line and "data.download=true" in line
    assert not (tmp_path / "run").exists()


def test_missing_cifar_hint_on_eval_names_the_flags(tmp_path, capsys):
    from robust_sparse.datasets import DATASETS
    from robust_sparse.models import build_model

    (tmp_path / "data").mkdir()
    info = DATASETS.get("cifar10")
    path = tmp_path / "weights.pt"
    torch.save(build_model("tiny_cnn", 10, 3, info.mean, info.std).state_dict(), path)
    line = one_line_error(["eval", "--arch", "tiny_cnn", "--weights", str(path), "--dataset", "cifar10",
                           "--data-root", str(tmp_path / "data"), "--results-dir", str(tmp_path / "results")],
                          capsys)
    assert "cifar10 not found" in line and "--download" in line and "--data-root" in line
    assert "data.download" not in line
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------------
# sweep files: every key validated like a config field


@pytest.mark.parametrize("content,key", [
    ({"random": {"samples": "many", "space": {"optim.lr": {"uniform": [0.01, 0.1]}}}}, "sweep random.samples"),
    ({"random": {"samples": -1}}, "sweep random.samples"),
    ({"random": {"samples": 2, "seed": "x", "space": {"optim.lr": {"uniform": [0.01, 0.1]}}}}, "sweep random.seed"),
    ({"random": {"samples": 2}}, "sweep random.samples"),
    ({"random": 5}, "sweep random"),
    ({"random": {"samples": 2, "space": 0.1}}, "sweep random.space"),
    ({"random": {"samples": 2, "space": {"optim.lr": {"uniform": 0.1}}}}, "sweep random.space.optim.lr.uniform"),
    ({"random": {"samples": 2, "space": {"optim.lr": 0.1}}}, "sweep random.space.optim.lr"),
    ({"random": {"samples": 2, "space": {"optim.lr": {"normal": [0, 1]}}}}, "sweep random.space.optim.lr"),
    ({"random": {"samples": 2, "space": {"optim.lr": {"uniform": [0.1, 0.01]}}}}, "low < high"),
    ({"random": {"samples": 2, "space": {"optim.lr": {"uniform": [0.01, float("inf")]}}}}, "not a finite number"),
    ({"random": {"samples": 2, "space": {"optim.lr": {"uniform": [0.01, "big"]}}}}, "sweep random.space.optim.lr"),
    ({"random": {"samples": 2, "space": {"optim.lr": {"log_uniform": [0, 0.1]}}}}, "needs low > 0"),
    ({"grid": {"seed": [0]}, "devices": 3}, "sweep devices"),
    ({"grid": {"seed": [0]}, "devices": ["tpu"]}, "sweep devices"),
    ({"grid": {"seed": [0]}, "devices": []}, "sweep devices"),
    ({"grid": {"seed": [0]}, "parallel": "two"}, "sweep parallel"),
    ({"grid": {"seed": [0]}, "parallel": True}, "sweep parallel"),
    ({"grid": {"seed": [0]}, "backend": ["local"]}, "sweep backend"),
    ({"grid": {"seed": [0]}, "slurm": "gpu"}, "sweep slurm"),
    ({"grid": {"seed": [0]}, "overrides": "optim.lr=0.1"}, "sweep overrides"),
    ({"grid": {"seed": [0]}, "overrides": [{"optim.lr": 0.1}]}, "sweep overrides"),
    ({"grid": {"seed": [0]}, "overrides": ["optim.lr"]}, "override 'optim.lr'"),
    ({"grid": {"seed": [0]}, "base": 3}, "sweep base"),
    ({"grid": {"seed": [0]}, "out_dir": 3}, "sweep out_dir"),
])
def test_bad_sweep_fields(tmp_path, capsys, content, key):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), **content}))
    assert key in one_line_error(["sweep", str(path)], capsys)
    assert not (tmp_path / "out").exists()


def test_sweep_out_dir_naming_an_existing_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"grid": {"seed": [0]}, "out_dir": str(target)}))
    assert "sweep out_dir" in one_line_error(["sweep", str(path)], capsys)
    assert "sweep out_dir" in one_line_error(["sweep", str(path), "--out", str(target / "sub")], capsys)
    assert target.read_text() == "keep me\n"


def test_a_sweep_checks_its_runs_directories_not_the_base_configs_out_dir(tmp_path):
    """The runs train in <sweep>/runs/<id>: an unusable out_dir in the base config is never used, so it is not
    an error; the run directories are what is checked."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"grid": {"seed": [0]}, "overrides": [f"out_dir={blocker / 'run'}"]}))
    sweep = load_sweep(path, str(tmp_path / "out"))
    assert sweep.out_dir == tmp_path / "out"
    with pytest.raises(ConfigError, match="out_dir"):  # a run directory that cannot be made is still refused
        load_sweep(path, str(blocker))
