"""Shipped configs by name: `robust-sparse train NAME`, `sweep NAME`, a sweep's `base: NAME`, and `configs`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from robust_sparse.cli import QUICKSTART, main
from robust_sparse.errors import ConfigError
from robust_sparse.files import shipped

from conftest import one_line_error

REPO = Path(__file__).resolve().parents[1]
ON_DISK = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                 for p in (REPO / "configs").rglob("*.yaml"))


def _printed(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_shipped_folder_is_the_checkouts_configs():
    assert shipped.folder().resolve() == (REPO / "configs").resolve()
    assert sorted(c.name for c in shipped.shipped()) == ON_DISK


def test_the_quickstart_is_the_shipped_quickstart_file_only():
    assert QUICKSTART.resolve() == (REPO / "configs" / "quickstart_mnist5k.yaml").resolve()
    assert not (REPO / "robust_sparse" / "quickstart.yaml").exists()  # no second copy to drift


def test_no_config_trains_the_same_as_the_quickstart_by_name(capsys):
    assert _printed(["train", "--print-config"], capsys) == _printed(
        ["train", "--print-config", "quickstart_mnist5k"], capsys)


@pytest.mark.parametrize("spelling", ["cifar10_pgdat_resnet18", "configs:cifar10_pgdat_resnet18",
                                      "cifar10_pgdat_resnet18.yaml", "configs/cifar10_pgdat_resnet18.yaml"])
def test_train_finds_a_shipped_config_by_name(spelling, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    printed = _printed(["train", "--print-config", spelling], capsys)
    assert printed == yaml.safe_load(_as_printed(REPO / "configs" / "cifar10_pgdat_resnet18.yaml", capsys))
    assert printed["data"]["dataset"] == "cifar10" and printed["out_dir"] == "runs/cifar10_pgdat_resnet18"


def _as_printed(path: Path, capsys) -> str:
    assert main(["train", "--print-config", str(path)]) == 0
    return capsys.readouterr().out


def test_a_subfolders_config_is_named_by_its_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed = _printed(["train", "--print-config", "papers/bsrnet_vgg16_cifar10_pgdat"], capsys)
    assert printed["out_dir"] == yaml.safe_load((REPO / "configs/papers/bsrnet_vgg16_cifar10_pgdat.yaml")
                                                .read_text())["out_dir"]


def test_a_path_wins_over_a_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("cifar10_pgdat_resnet18").write_text("objective: natural\nout_dir: runs/mine\n")
    printed = _printed(["train", "--print-config", "cifar10_pgdat_resnet18"], capsys)
    assert printed["out_dir"] == "runs/mine" and printed["objective"] == "natural"
    # the prefix asks for the shipped one whatever lies in the folder
    assert _printed(["train", "--print-config", "configs:cifar10_pgdat_resnet18"], capsys)["out_dir"] == \
        "runs/cifar10_pgdat_resnet18"


def test_an_unknown_name_is_one_line_naming_the_argument_and_the_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(["train", "--print-config", "cifar10_pgdat_resnt18"], capsys)
    assert line.startswith("robust-sparse: error: CONFIG: cifar10_pgdat_resnt18 not found")
    assert "(did you mean cifar10_pgdat_resnet18" in line
    trainable = [c.name for c in shipped.shipped() if c.kind is shipped.Kind.TRAIN]
    assert all(name in line for name in trainable)
    assert "studies/engines_mnist5k" not in line  # a sweep is not a CONFIG
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_name_escaping_the_folder_is_unknown(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("# A.\nobjective: natural\n")
    (tmp_path / "outside.yaml").write_text("# Outside.\nobjective: natural\n")
    monkeypatch.setattr(shipped, "folder", lambda: tmp_path / "configs")
    assert shipped.lookup("a", "CONFIG") == tmp_path / "configs" / "a.yaml"
    with pytest.raises(ConfigError, match=r"^CONFIG: \.\./outside not found: .*; shipped: a \("):
        shipped.lookup("../outside", "CONFIG")


def test_a_sweep_given_to_train_says_how_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(["train", "studies/engines_mnist5k"], capsys)
    assert "CONFIG: studies/engines_mnist5k is a shipped sweep file" in line
    assert "robust-sparse sweep studies/engines_mnist5k" in line
    line = one_line_error(["sweep", "cifar10_pgdat_resnet18"], capsys)
    assert "SWEEP_FILE: cifar10_pgdat_resnet18 is a shipped training config" in line


def test_an_unknown_sweep_name_lists_the_sweeps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(["sweep", "studies/engines_mnist"], capsys)
    assert "SWEEP_FILE: studies/engines_mnist not found" in line and "did you mean studies/engines_mnist5k" in line
    assert "cifar10_pgdat_resnet18" not in line.split("did you mean")[1]


def test_sweep_runs_a_shipped_sweep_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "studies/dense_mnist5k", "--dry-run", "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert out.count("pending") == 3  # its 3 seeds, each with the shipped base beside it


def test_a_sweeps_base_may_be_a_shipped_name(tmp_path):
    from robust_sparse.studies.sweep import load_sweep

    sweep_file = tmp_path / "mine.yaml"
    sweep_file.write_text(f"base: quickstart_mnist5k\ngrid:\n  seed: [0]\nout_dir: {tmp_path / 'out'}\n")
    assert load_sweep(sweep_file).base.resolve() == QUICKSTART.resolve()
    (tmp_path / "quickstart_mnist5k").write_text("objective: natural\n")  # beside the sweep file: it wins
    assert load_sweep(sweep_file).base == (tmp_path / "quickstart_mnist5k").resolve()
    sweep_file.write_text(f"base: quickstart_mnist\ngrid:\n  seed: [0]\nout_dir: {tmp_path / 'out'}\n")
    with pytest.raises(ConfigError, match=r"^sweep base: quickstart_mnist not found: no file .*quickstart_mnist, "
                                          r"nor a shipped training config of that name \(did you mean "
                                          r"quickstart_mnist5k\?\)"):
        load_sweep(sweep_file)


def test_configs_lists_every_shipped_file_with_its_description(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "DESCRIPTION"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert sorted(rows) == ON_DISK
    assert lines[-1].startswith(f"files: {shipped.folder()}")
    for config in shipped.shipped():
        # a description is one whole sentence (not a header's first line cut mid-phrase) that fits a terminal row
        assert config.description.endswith(".") and 20 <= len(config.description) <= 120, config.name
        assert rows[config.name].endswith(config.description)
    kinds = {c.name: c.kind for c in shipped.shipped()}
    assert kinds["cifar10_pgdat_resnet18"] == "train" and kinds["studies/common_mnist5k"] == "train"
    assert kinds["studies/engines_mnist5k"] == "sweep"


def test_configs_name_prints_the_file(capsys):
    assert main(["configs", "papers/bsrnet_vgg16_cifar10_pgdat"]) == 0
    assert capsys.readouterr().out == (REPO / "configs/papers/bsrnet_vgg16_cifar10_pgdat.yaml").read_text()
    line = one_line_error(["configs", "bsrnet_vgg16"], capsys)
    assert line.startswith("robust-sparse: error: NAME: bsrnet_vgg16 not found") and "studies/" in line
    assert "NAME: must not be empty" in one_line_error(["configs", ""], capsys)


def test_the_description_is_the_first_comment_line(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("\n# First line.\n# Second line.\nobjective: natural\n")
    (tmp_path / "b.yaml").write_text("objective: natural  # not a header\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("# A sweep.\nbase: ../a.yaml\ngrid: {seed: [0]}\n")
    monkeypatch.setattr(shipped, "folder", lambda: tmp_path)
    found = {c.name: (c.kind, c.description) for c in shipped.shipped()}
    assert found == {"a": ("train", "First line."), "b": ("train", ""), "sub/c": ("sweep", "A sweep.")}
    assert [c.name for c in shipped.shipped()] == ["a", "b", "sub/c"]  # top-level first


def test_a_reader_that_leaves_early_ends_the_listing_quietly(tmp_path):
    """`robust-sparse configs | head -1`: the listing meets a closed pipe; like a Unix tool the command stops
    without a word on stderr and with the shell's code for SIGPIPE, 141."""
    import subprocess
    import sys

    listing = subprocess.Popen([sys.executable, "-c", "from robust_sparse.cli import main; raise SystemExit(main())",
                                "configs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    listing.stdout.close()  # the reader has gone before the command writes its first line (it imports for ~1 s)
    error = listing.stderr.read().decode()
    assert listing.wait(timeout=60) == 141 and "error" not in error and "Traceback" not in error, error
