"""Config loading, overrides and one-line validation errors from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from robust_sparse.cli import QUICKSTART, main
from robust_sparse.config import DatasetName, Norm, TrainConfig, load_config, parse_override, to_dict, validate
from robust_sparse.errors import ConfigError
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_valid_embedded_quickstart():
    config = load_config()
    assert config.data.dataset is DatasetName.MNIST5K
    validate(config)


def test_shipped_quickstart_copy_matches_the_embedded_one():
    from robust_sparse.cli import QUICKSTART

    assert (REPO / "configs" / "quickstart_mnist5k.yaml").read_text() == QUICKSTART.read_text()
    config = load_config(QUICKSTART)
    assert config.sparsity.method.value == "bsrnet" and config.sparsity.density == 0.1


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
    "unknown dataset": (["--set", "data.dataset=imagenet"], "data.dataset"),
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
