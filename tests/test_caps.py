"""Issue 21, caps: YAML that repeats a key or expands an alias bomb, integers outside their field's sane range and
sweeps of very many runs are refused in one line, before anything is written or run."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from conftest import make_tiny_model, one_line_error
from robust_sparse.studies import sweep as sweep_module
from robust_sparse.cli import main
from robust_sparse.config import load_config, parse_override
from robust_sparse.config.yaml_input import MAX_EXPANDED_NODES
from robust_sparse.errors import ConfigError

TINY = ["model.name=tiny_cnn", "data.train_limit=256", "data.val_size=64", "optim.epochs=1", "attack.steps=1",
        "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=0", "eval.autoattack_examples=0", "device=cpu"]
# nine levels of ten aliases each: 10**9 list items once expanded, a few hundred bytes on disk
BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))


def test_a_duplicate_key_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  name: tiny_cnn\noptim:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    line = one_line_error(["train", str(path), "--out", str(tmp_path / "run")], capsys)
    assert line.endswith(f"config file {path}: duplicate key 'lr' (line 4 and line 6); give each key once")
    assert not (tmp_path / "run").exists()
    path.write_text("optim: {lr: 0.1, lr: 0.5}\n")  # a flow mapping: both on one line
    line = one_line_error(["train", str(path), "--out", str(tmp_path / "run")], capsys)
    assert line.endswith(f"config file {path}: duplicate key 'lr' (twice on line 1); give each key once")
    # the same key in two different mappings, and a merge key overridden, are not duplicates
    path.write_text("base: &base {lr: 0.1}\noptim:\n  <<: *base\n  lr: 0.2\nother:\n  lr: 0.3\n")
    assert sweep_module.read_yaml(path)["optim"] == {"lr": 0.2}


@pytest.mark.parametrize("where", ["config", "sweep", "--set"])
def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys, where):
    path = tmp_path / "file.yaml"
    path.write_text(BOMB + ("grid: {seed: [0]}\n" if where == "sweep" else ""))
    start = time.perf_counter()
    if where == "--set":
        with pytest.raises(ConfigError, match=r"^--set optim.lr: its aliases expand to more than 100,000 values"):
            parse_override("optim.lr=" + "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}")
    else:
        argv = ["train", str(path)] if where == "config" else ["sweep", str(path), "--out", str(tmp_path / "out")]
        line = one_line_error(argv, capsys)
        assert line.endswith(f"file {path}: its aliases expand to more than {MAX_EXPANDED_NODES:,} values "
                             "(an alias bomb?)")
    assert time.perf_counter() - start < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.yaml"]


def test_aliases_below_the_cap_and_a_recursive_alias(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("common: &lr 0.1\noptim: {lr: *lr, milestones: &m [0.5, 0.75]}\nkeep: *m\n")
    assert sweep_module.read_yaml(path)["optim"] == {"lr": 0.1, "milestones": [0.5, 0.75]}
    path.write_text("a: &loop [1, *loop]\n")
    with pytest.raises(ConfigError, match="recursive structure"):
        sweep_module.read_yaml(path)


@pytest.mark.parametrize("override,message", [
    ("optim.epochs=1000000000000", "optim.epochs = 1000000000000: must be in 1..100000"),
    (f"seed={2**64}", f"seed = {2**64}: must be in 0..4294967295"),
    (f"seed={2**32}", f"seed = {2**32}: must be in 0..4294967295"),
    ("data.batch_size=1000000000", "data.batch_size = 1000000000: must be in 1..1000000"),
    ("eval.n_examples=1000000000000", "eval.n_examples = 1000000000000: must be in 0..100000000"),
    ("attack.steps=10000000", "attack.steps = 10000000: must be in 1..100000"),
    ("data.val_size=1000000000000", "data.val_size = 1000000000000: must be in 0..100000000"),
    (f"data.split_seed={2**64}", f"data.split_seed = {2**64}: must be in 0..4294967295"),
])
def test_integers_outside_their_fields_range(tmp_path, capsys, override, message):
    line = one_line_error(["train", "--set", "model.name=tiny_cnn", "--set", override, "--out",
                           str(tmp_path / "run")], capsys)
    assert line.endswith(message)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_numpy_and_torch_accept_is_valid():
    assert load_config(None, [*TINY, f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("flags,message", [
    (["--seed", str(2**64)], f"--seed {2**64}: must be in 0..4294967295"),
    (["--seed", "-1"], "--seed -1: must be in 0..4294967295"),
    (["--batch-size", "1000000000"], "--batch-size 1000000000: must be in 1..1000000"),
    (["--n-examples", "1000000000000"], "--n-examples 1000000000000: must be in 1..100000000"),
    (["--pgd-steps", "1000000000"], "--pgd-steps 1000000000: must be in 1..100000"),
])
def test_eval_integer_flags_outside_their_range_fail_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    from robust_sparse.eval import points

    def no_data(*args, **kwargs):
        raise AssertionError("the test points were read before the flags were checked")

    monkeypatch.setattr(points, "load_points", no_data)
    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_model().state_dict(), weights)
    line = one_line_error(["eval", "--arch", "tiny_cnn", "--weights", str(weights), "--dataset", "mnist5k",
                           "--results-dir", str(tmp_path / "store"), *flags], capsys)
    assert line.endswith(message)
    assert not (tmp_path / "store").exists()


def _sweep(tmp_path, **content) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": TINY, **content}))
    return str(path)


def test_random_samples_past_the_cap(tmp_path, capsys):
    path = _sweep(tmp_path, random={"samples": 10**9, "space": {"optim.lr": {"uniform": [0.01, 0.1]}}})
    assert one_line_error(["sweep", path], capsys).endswith("sweep random.samples = 1000000000: must be in 0..100000")
    assert not (tmp_path / "out").exists()


def test_a_sweep_of_more_than_256_runs_asks_for_yes(tmp_path, capsys, monkeypatch):
    path = _sweep(tmp_path, grid={"seed": list(range(17)), "optim.lr": [0.01 * (k + 1) for k in range(16)]})
    line = one_line_error(["sweep", path, "--dry-run"], capsys)
    assert line.endswith("272 runs (more than 256); check the grid, and pass --yes to start them all")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(sweep_module, "CONFIRM_RUNS", 3)  # the same rule on a grid small enough to prepare
    path = _sweep(tmp_path, grid={"seed": [0, 1, 2, 3]})
    assert "4 runs (more than 3)" in one_line_error(["sweep", path, "--dry-run"], capsys)
    assert main(["sweep", path, "--dry-run", "--yes"]) == 0
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 4


@pytest.mark.parametrize("grid,message", [
    ({"optim.lr": [0.01, 0.01]}, "sweep grid 'optim.lr': the value 0.01 is listed twice"),
    ({"seed": [0, 1, 0]}, "sweep grid 'seed': the value 0 is listed twice"),
    ({"data.root": ["x/y", "x_y"]}, "the runs 'data.root=x/y' and 'data.root=x_y' map to one run directory "
                                    "runs/data.root=x_y"),
])
def test_duplicate_grid_points_and_run_id_collisions_are_refused_before_anything_starts(tmp_path, capsys, grid,
                                                                                       message):
    line = one_line_error(["sweep", _sweep(tmp_path, grid=grid)], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()
