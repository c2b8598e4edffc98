"""Experiment tracking: TensorBoard event files read back, W&B in its offline mode, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from robust_sparse.cli import main
from robust_sparse.train import fit


def _scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_gets_every_epoch_metric_and_the_final_evaluation(tiny_config):
    pytest.importorskip("tensorboard")
    result = fit(tiny_config("tracking.tensorboard=true", "sparsity.method=rigl", "sparsity.density=0.3"))
    scalars = _scalars(result.run_dir / "tensorboard")
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    for column in ("train_loss", "val_clean_accuracy", "val_pgd_accuracy", "lr", "density", "train_flops"):
        logged = scalars[f"epoch/{column}"]
        assert [step for step, _ in logged] == [1, 2]
        assert [value for _, value in logged] == pytest.approx(metrics[column].tolist(), rel=1e-6)
    assert scalars["vs_train_flops/val_pgd_accuracy"] == [  # accuracy against the cumulative training FLOPs
        (int(flops), pytest.approx(value, rel=1e-6)) for flops, value in zip(metrics["train_flops"],
                                                                              metrics["val_pgd_accuracy"])]
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    ((step, value),) = scalars["test/pgd_accuracy"]
    assert step == evaluation["epoch"] and value == pytest.approx(evaluation["pgd_accuracy"], rel=1e-6)
    # a single run (no sweep around it) has its hyper-parameters in the HParams dashboard too
    hparams = _hparams(result.run_dir / "tensorboard")
    assert hparams["sparsity.method"] == "rigl" and hparams["sparsity.density"] == pytest.approx(0.3)
    assert hparams["seed"] == 0 and hparams["objective"] == "pgd_at"


def _hparams(event_dir) -> dict:
    """The hyper-parameters of the HParams dashboard's session record, ``key -> value``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in session.session_start_info.hparams.items()}


class _FakeWandbRun:
    """The part of W&B's run API the tracker uses: log(step=), summary.update, finish."""

    def __init__(self, **init):
        self.init, self.logged, self.summary, self.finished = init, [], {}, False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_gets_config_every_epoch_metric_and_the_final_evaluation(tiny_config, monkeypatch):
    """Against a stub of W&B's API (its offline mode writes a binary record file through a background service,
    which cannot be read back reliably in a test); the run id survives a resume."""
    import importlib.machinery
    import sys
    import types

    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what the config check's find_spec looks at
    fake.init = lambda **init: runs.append(_FakeWandbRun(**init)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    result = fit(tiny_config("tracking.wandb.project=robust-sparse-test", "tracking.wandb.mode=offline"))
    (run,) = runs
    assert run.init["project"] == "robust-sparse-test" and run.init["mode"] == "offline"
    assert run.init["dir"] == str(result.run_dir) and run.init["config"]["model"]["name"] == "tiny_cnn"
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    assert [step for step, _ in run.logged] == [1, 2]
    assert [values["epoch/val_pgd_accuracy"] for _, values in run.logged] == pytest.approx(
        metrics["val_pgd_accuracy"].tolist())
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    assert run.summary["test/clean_accuracy"] == pytest.approx(evaluation["clean_accuracy"]) and run.finished
    fit(tiny_config("tracking.wandb.project=robust-sparse-test", "tracking.wandb.mode=offline"), resume=True)
    assert runs[1].init["id"] == run.init["id"] and runs[1].init["resume"] == "allow"


def test_tracking_does_not_block_resume(tiny_config):
    pytest.importorskip("tensorboard")
    first = fit(tiny_config("optim.epochs=1"))
    resumed = fit(tiny_config("optim.epochs=1", "tracking.tensorboard=true"), resume=True)
    assert resumed.run_dir == first.run_dir


def test_empty_wandb_project_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text('model:\n  name: tiny_cnn\ntracking:\n  wandb:\n    project: ""\n')
    code = main(["train", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tracking.wandb.project" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("group", ['""', "x" * 129])
def test_bad_wandb_group_is_a_one_line_error(tmp_path, capsys, group):
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  name: tiny_cnn\ntracking:\n  wandb:\n    project: p\n    group: {group}\n")
    code = main(["train", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tracking.wandb.group" in err
    assert not (tmp_path / "run").exists()


def test_sweeps_in_folders_of_one_name_get_different_groups(tmp_path):
    """Two sweeps at a/gamma and b/gamma are two W&B groups; every run of one sweep is in the same group."""
    import yaml

    from robust_sparse.tracking import sweep_context

    groups = []
    for parent in ("a", "b"):
        sweep_dir = tmp_path / parent / "gamma"
        for run in ("seed=0", "seed=1"):
            (sweep_dir / "runs" / run).mkdir(parents=True)
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({"grid": {"seed": [0, 1]}}))
        first, second = (sweep_context(sweep_dir / "runs" / run)[0] for run in ("seed=0", "seed=1"))
        assert first == second and first.startswith("gamma-")
        groups.append(first)
    assert groups[0] != groups[1]


def test_tags_spell_values_as_the_run_names_do(tmp_path):
    """γ = 0 in the grid (written 0 or 0.0) is ``agent.gamma=0`` in the run's name and in its W&B tag, though the
    resolved config holds the float 0.0."""
    import yaml

    from robust_sparse.config import load_config, to_dict
    from robust_sparse.studies.sweep import expand, load_sweep, run_id
    from robust_sparse.tracking import Tracker

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "overrides": ["agent.enabled=true"],
                                    "grid": {"agent.gamma": [0, 0.5], "optim.lr": [1.0], "seed": [0]}}))
    for overrides in expand(load_sweep(path)):
        name = run_id(overrides)
        config = to_dict(load_config(None, ["agent.enabled=true", *overrides]))
        tags = Tracker._tags(config, ["agent.gamma", "optim.lr", "seed"])
        assert name == "__".join(tags)
    assert run_id(expand(load_sweep(path))[0]) == "agent.gamma=0__optim.lr=1__seed=0"


def _sweep_run_config(tiny_config, tmp_path, *overrides):
    """A run directory inside a sweep directory (``<sweep>/runs/<id>`` beside ``sweep.yaml``), as a sweep
    makes it; the sweep varies γ and the density."""
    import yaml

    sweep_dir = tmp_path / "gamma_sweep"
    run_dir = sweep_dir / "runs" / "agent.gamma=0.1__sparsity.density=0.3__seed=0"
    run_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(
        {"grid": {"agent.gamma": [0, 0.1], "sparsity.density": [0.3], "seed": [0]}}))
    return tiny_config("sparsity.method=rigl", "sparsity.density=0.3", "agent.enabled=true", "agent.gamma=0.1",
                       f"out_dir={run_dir}", *overrides)


def test_tensorboard_hparams_of_a_sweep_run_read_back_from_the_event_file(tiny_config, tmp_path):
    """Every swept key, the method, density and estimator against the final accuracies (the HParams dashboard);
    the config as YAML text; the evaluation's settings are not scalars; the per-step loss on request."""
    pytest.importorskip("tensorboard")
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result = fit(_sweep_run_config(tiny_config, tmp_path, "tracking.tensorboard=true", "tracking.step_loss=true"))
    accumulator = EventAccumulator(str(result.run_dir / "tensorboard"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    hparams = _hparams(result.run_dir / "tensorboard")
    assert hparams["agent.gamma"] == pytest.approx(0.1) and hparams["sparsity.density"] == pytest.approx(0.3)
    assert hparams["sparsity.method"] == "rigl" and hparams["agent.estimator"] == "paper"
    assert hparams["seed"] == 0 and hparams["agent.enabled"] == 1  # TensorBoard keeps a boolean as a number
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"test/clean_accuracy", "test/pgd_accuracy"} <= metrics
    scalars = _scalars(result.run_dir / "tensorboard")
    assert not {"test/n_examples", "test/eps", "test/pgd_steps", "test/restarts"} & set(scalars)
    steps = scalars["step/train_loss"]  # 512 training images, batch 64: 8 steps an epoch, 2 epochs
    assert [step for step, _ in steps] == list(range(1, 17))
    (text,) = [tag for tag in accumulator.Tags()["tensors"] if tag.startswith("config")]
    shown = accumulator.Tensors(text)[0].tensor_proto.string_val[0].decode()
    config = yaml.safe_load(shown.removeprefix("```yaml\n").removesuffix("```"))
    assert not shown.lstrip("`yaml\n").startswith("{") and config["agent"]["gamma"] == pytest.approx(0.1)


def test_wandb_run_of_a_sweep_joins_the_sweep_group_tagged_with_its_swept_keys(tiny_config, tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **init: runs.append(_FakeWandbRun(**init)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from robust_sparse.tracking import sweep_group

    fit(_sweep_run_config(tiny_config, tmp_path, "tracking.wandb.project=p", "tracking.wandb.mode=offline"))
    (run,) = runs
    assert run.init["group"] == sweep_group(tmp_path / "gamma_sweep") and run.init["group"].startswith("gamma_sweep-")
    assert sorted(run.init["tags"]) == ["agent.gamma=0.1", "seed=0", "sparsity.density=0.3"]
    assert "test/n_examples" not in run.summary and "test/pgd_accuracy" in run.summary
    fit(tiny_config("tracking.wandb.project=p", "tracking.wandb.mode=offline"))  # not in a sweep: no group
    assert "group" not in runs[1].init and "tags" not in runs[1].init
    # a group set in the config wins, for a single run as for a sweep's
    from robust_sparse.config import to_dict
    from robust_sparse.tracking import Tracker

    for config in (tiny_config("tracking.wandb.project=p", "tracking.wandb.mode=offline", "tracking.wandb.group=ab"),
                   _sweep_run_config(tiny_config, tmp_path / "again", "tracking.wandb.project=p",
                                     "tracking.wandb.mode=offline", "tracking.wandb.group=ab")):
        Tracker(config.tracking, config, Path(config.out_dir)).close()
        assert runs[-1].init["group"] == "ab"
