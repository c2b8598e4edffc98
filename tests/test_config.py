"""Config loading, overrides and one-line validation errors from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from robust_sparse.cli import QUICKSTART, main
from robust_sparse.config import Norm, TrainConfig, load_config, parse_override, to_dict, validate
from robust_sparse.errors import ConfigError
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_valid_embedded_quickstart():
    config = load_config()
    assert config.data.dataset == "mnist5k"
    validate(config)


def test_the_quickstart_is_the_shipped_quickstart_mnist5k():
    # one file: `robust-sparse train` with no CONFIG runs configs/quickstart_mnist5k.yaml, not a copy of it
    assert QUICKSTART.resolve() == (REPO / "configs" / "quickstart_mnist5k.yaml").resolve()
    assert not (REPO / "robust_sparse" / "quickstart.yaml").exists()
    config = load_config(QUICKSTART)
    assert config.sparsity.method == "bsrnet" and config.sparsity.density == 0.1


@pytest.mark.parametrize("overrides, optimizer", [
    ([], "sgdw"),  # the quickstart itself: BSR-Net with BSR-Net's optimizer
    (["sparsity.method=none"], "sgd"),  # a dense baseline derived from it gets the dense default
    (["sparsity.method=rigl"], "sgd"),
    (["sparsity.method=none", "optim.optimizer=sgdw"], "sgdw"),  # an optimizer given by hand is kept
    (["optim.optimizer=sgd"], "sgd"),
])
def test_the_quickstarts_optimizer_follows_the_method_unless_given(overrides, optimizer):
    assert load_config(QUICKSTART, overrides).optim.optimizer.value == optimizer


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\n  epochs: 3\nattack:\n  eps: 8/255\n  norm: l2\n")
    config = load_config(path, ["optim.lr=0.3", "optim.milestones=[0.3, 0.6]"])
    assert config.optim.lr == 0.3 and config.optim.epochs == 3
    assert config.attack.eps == pytest.approx(8 / 255)
    assert config.attack.norm is Norm.L2
    assert config.optim.milestones == [0.3, 0.6]


def test_to_dict_round_trip():
    config = load_config(None, ["objective=trades", "eval.eps=0.05"])
    from robust_sparse.config import config_from_dict

    assert config_from_dict(to_dict(config)) == config


def test_parse_override_nests():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    config = load_config(path, [f"data.root={tmp_path}"])
    assert isinstance(config, TrainConfig)


BAD_INPUTS = {
    "negative eps": (["--set", "attack.eps=-0.1"], "attack.eps"),
    "linf eps above 1": (["--set", "attack.eps=2"], "attack.eps"),
    "unknown model": (["--set", "model.name=resnet9000"], "model.name"),
    "unknown dataset": (["--set", "data.dataset=tinyimagenet"], "data.dataset"),
    "missing data dir": (["--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent/cifar"], "data.root"),
    "zero attack steps": (["--set", "attack.steps=0"], "attack.steps"),
    "negative lr": (["--set", "optim.lr=-1"], "optim.lr"),
    "momentum of one": (["--set", "optim.momentum=1.0"], "optim.momentum"),
    "zero batch size": (["--set", "data.batch_size=0"], "data.batch_size"),
    "zero epochs": (["--set", "optim.epochs=0"], "optim.epochs"),
    "negative trades beta": (["--set", "trades_beta=-1"], "trades_beta"),
    "unknown field": (["--set", "optim.lrr=0.1"], "optim.lrr"),
    "wrong type": (["--set", "optim.epochs=ten"], "optim.epochs"),
    "float for int": (["--set", "optim.epochs=2.5"], "optim.epochs"),
    "milestone outside (0,1)": (["--set", "optim.milestones=[0.5, 1.5]"], "optim.milestones"),
    "milestones and factors differ": (["--set", "optim.factors=[0.1]"], "optim.milestones"),
    "bad norm": (["--set", "attack.norm=l1"], "attack.norm"),
    "malformed override": (["--set", "optim.lr"], "override"),
    "division by zero": (["--set", "attack.eps=8/0"], "attack.eps"),
    "bad device": (["--device", "tpu"], "--device"),
    "missing config file": (["/nonexistent/config.yaml"], "not found"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_nonzero_exit(name, capsys, tmp_path):
    arguments, field_name = BAD_INPUTS[name]
    code = main(["train", *arguments, "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("robust-sparse: error:") and field_name in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was started


def test_invalid_yaml_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: [unclosed\n")
    assert main(["train", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_yaml_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text("optim: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    assert main(["train", str(path)]) == 2
    assert not (tmp_path / "pwned").exists()


def test_console_script_reports_error_without_traceback(tmp_path):
    executable = Path(sys.executable).with_name("robust-sparse")
    result = subprocess.run([str(executable), "train", "--set", "attack.eps=-1"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "robust-sparse: error: attack.eps = -1.0: must be >= 0 (pixel units, inputs in [0,1])"
    ]


def test_print_config_shows_the_resolved_yaml_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--print-config", "--set", "optim.lr=0.01", "--set", "attack.eps=8/255"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.01 and printed["attack"]["eps"] == pytest.approx(8 / 255)
    assert printed["sparsity"]["method"] == "bsrnet"  # no CONFIG: the quickstart, as `train` would run it
    assert load_config(QUICKSTART).optim.epochs == printed["optim"]["epochs"]
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_version_and_top_level_help(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"robust-sparse {version('robust-sparse')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text  # no reStructuredText markup in a terminal
    for command in ("train", "eval", "export", "sweep", "report", "doctor"):
        assert command in text


# ----------------------------------------------------------------------------------------------------------
# layering: config reads and checks values; what the values name is checked where it is used


def test_config_imports_nothing_above_it():
    """Importing the config package, and loading, validating and writing back a config, import no torch and
    nothing above config: the sparse methods' settings are the config's own (config/builtin_methods.py), so no
    method file, model, data loading or training code is imported; the dataset records (data.dataset's names,
    the protocol eps) are plain data too."""
    code = ("import sys\n"
            "before = set(sys.modules)\n"  # a .pth hook of `doctor --fix` may import robust_sparse at start-up
            "from robust_sparse.config import config_from_dict, load_config, to_dict\n"
            "assert 'torch' not in sys.modules, 'importing robust_sparse.config imported torch'\n"
            f"config_from_dict(to_dict(load_config({str(QUICKSTART)!r}, ['agent.enabled=true'])))\n"
            "assert 'torch' not in sys.modules, 'loading a config imported torch'\n"
            "loaded = sorted(m for m in set(sys.modules) - before if m.startswith('robust_sparse'))\n"
            "allowed = ('robust_sparse.config', 'robust_sparse.errors', 'robust_sparse.registry',"
            " 'robust_sparse.plugins', 'robust_sparse.files.atomic', 'robust_sparse.datasets', 'robust_sparse.chance')\n"
            "assert all(m in ('robust_sparse', 'robust_sparse.files') or m.startswith(allowed) for m in loaded), loaded\n"
            "assert not any(m.startswith('robust_sparse.datasets.' + kind) for m in loaded"
            " for kind in ('images', 'folders', 'splits')), loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_method_the_config_knows_runs_and_back():
    """The config's method settings (config/builtin_methods.py) and the sparse registry's implementations
    (sparse/*.py) name the same methods, and each method's allocations are the ones its settings name."""
    from robust_sparse.config import SPARSITY_METHODS
    from robust_sparse.config.sparsity import SHARED_DISTRIBUTIONS
    from robust_sparse.sparse import METHODS
    from robust_sparse.sparse.methods import SHARED_ALLOCATIONS

    assert SPARSITY_METHODS.names() == METHODS.names()
    assert tuple(SHARED_ALLOCATIONS) == SHARED_DISTRIBUTIONS
    for name, method in METHODS.entries():
        assert method.settings is SPARSITY_METHODS.get(name)
        assert set(method.allocations) == set(method.settings.distributions), name


@pytest.fixture
def elsewhere(tmp_path):
    """Overrides naming things this machine does not have: a data directory, a run directory below a file."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    return {"data.root": ["data.dataset=cifar10", f"data.root={tmp_path / 'no-data'}"],
            "out_dir": [f"out_dir={blocker / 'run'}"],
            "model.name": ["model.name=resnet9000"],
            "tracking.tensorboard": ["tracking.tensorboard=true"]}


def _without_tensorboard(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))


@pytest.mark.parametrize("field", ["data.root", "out_dir", "model.name", "tracking.tensorboard"])
def test_what_a_config_names_is_checked_before_training_not_when_it_loads(field, elsewhere, tmp_path, monkeypatch):
    import robust_sparse.train as train_module
    from robust_sparse.config import config_from_dict

    _without_tensorboard(monkeypatch)
    overrides = ["device=cpu", f"out_dir={tmp_path / 'run'}", *elsewhere[field]]
    config = load_config(None, overrides)  # a stored config must load on any machine (eval, resume, report)
    assert config_from_dict(to_dict(config)) == config
    monkeypatch.setattr("robust_sparse.run_setup.load_splits", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ConfigError, match=rf"^{field}[: ]") as error:
        train_module.fit(config)
    assert "\n" not in str(error.value)
    assert (tmp_path / "notes.txt").read_text() == "keep me\n" and not (tmp_path / "run").exists()


def test_cli_names_the_missing_tracker_package_in_one_line(tmp_path, capsys, monkeypatch):
    _without_tensorboard(monkeypatch)
    assert main(["train", "--set", "tracking.tensorboard=true", "--out", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "tracking.tensorboard = true needs the tensorboard package" in line
    assert not (tmp_path / "run").exists()


def test_checkpoint_evaluates_where_its_training_data_directory_does_not_exist(tmp_path):
    """eval reads a checkpoint's config as it was saved (data and run directories of the machine it trained on):
    no rewrite of data.root needed to get past validation."""
    from robust_sparse.files.checkpoint import save_checkpoint
    from robust_sparse.datasets import DATASETS
    from robust_sparse.eval.sources import from_checkpoint
    from robust_sparse.models import build_model

    (tmp_path / "notes.txt").write_text("a file where the run directory was\n")
    stored = load_config(None, ["model.name=tiny_cnn", "data.dataset=cifar10", "data.root=/nonexistent/data",
                                f"out_dir={tmp_path / 'notes.txt' / 'run'}"])
    info = DATASETS.get("cifar10")
    model = build_model("tiny_cnn", info.num_classes, info.in_channels, info.mean, info.std)
    save_checkpoint({"config": to_dict(stored), "model": model.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    assert from_checkpoint(tmp_path / "best.pt").data_root == "/nonexistent/data"
    assert from_checkpoint(tmp_path / "best.pt", data_root=str(tmp_path)).data_root == str(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# closed choices are Enums


def _str_fields(cls: type, prefix: str = ""):
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            yield from _str_fields(annotation, f"{prefix}{f.name}.")
        elif str in (annotation, *typing.get_args(annotation)):
            yield f"{prefix}{f.name}"


def test_only_open_ended_fields_are_plain_strings():
    """Names of things (paths, registered models, W&B projects) are strings; every closed choice is an Enum, so
    a typo is rejected with the allowed values (the sparsity section has its own per-method schema)."""
    plain = {name for name in _str_fields(TrainConfig) if not name.startswith("sparsity.")}
    # data.test_list is a path; model.kwargs maps a factory's keyword names to values; data.dataset names a
    # registered dataset (robust_sparse/datasets/, checked against the registry like sparsity.method)
    assert plain == {"data.dataset", "data.root", "data.test_list", "model.name", "model.kwargs", "tracking.wandb.project",
                     "tracking.wandb.entity", "tracking.wandb.group", "out_dir"}


@pytest.mark.parametrize("field,value,allowed", [
    ("agent.full_grad_inputs", "adversarial", "clean, adversarial"),
    ("agent.full_grad_bn", "eval", "train, eval"),
    ("agent.snapshot_mask", "current", "snapshot, current, none"),
])
def test_agent_choices_are_enums_written_as_plain_strings(field, value, allowed, tmp_path):
    from robust_sparse.config import config_from_dict, save_config

    section, name = field.split(".")
    config = load_config(None, [f"{field}={value}"])
    chosen = getattr(config.agent, name)
    assert chosen == value and chosen.value == value  # a str Enum: string comparisons keep working
    save_config(config, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert type(written[section][name]) is str and written[section][name] == value
    assert config_from_dict(written) == config
    with pytest.raises(ConfigError, match=rf"^{field}: 'sometimes' is not one of {allowed}$"):
        load_config(None, [f"{field}=sometimes"])


def test_sweep_checks_what_every_run_names_before_any_runs(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sweep"), "overrides": ["device=cpu"],
                                    "grid": {"model.name": ["tiny_cnn", "resnet9000"]}}))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.name: unknown model 'resnet9000'" in line
    assert not (tmp_path / "sweep").exists()
