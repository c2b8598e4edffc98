"""Long work is never silent, and resume means resume (issue 21, "a newcomer's hour")."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from robust_sparse import progress
from robust_sparse.files.checkpoint import load_checkpoint, save_checkpoint
from robust_sparse.cli import chance_note, main
from robust_sparse.config import load_config
from robust_sparse.eval.autoattack import PyAutoAttack
from robust_sparse.eval.runner import LEGACY_STATE_KIND, evaluate
from robust_sparse.eval.specs import parse_attacks
from robust_sparse.eval.store import flags_path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# heartbeats


def test_a_heartbeat_beats_while_a_silent_unit_runs_and_stops_with_it(caplog):
    with caplog.at_level(logging.INFO, logger="robust_sparse.progress"):
        with progress.Heartbeat("AutoAttack apgd-t batch 2/3", 40, points_after=60, seconds_per_point=0.5,
                                every_seconds=0.02):
            time.sleep(0.2)
        beats = len(caplog.records)
        time.sleep(0.1)
    assert beats >= 3 and len(caplog.records) == beats  # nothing after the unit ended
    line = caplog.records[0].getMessage()
    assert line.startswith("AutoAttack apgd-t batch 2/3: running on 40 points, 0 s so far, ETA ")
    assert "0.5 s per point measured, 100 points to go" in line
    # the ETA is what the measured cost leaves of (this batch + the later ones), never negative
    eta = float(re.search(r"ETA (\d+) s", line).group(1))
    assert 49 <= eta <= 50
    late = progress.Heartbeat("x", 2, seconds_per_point=0.1)
    assert "ETA 0 s" in late.line(now=late.started + 10)
    first = progress.Heartbeat("x", 2).line()
    assert first.endswith("ETA once a first batch has finished")


class SlowAutoAttack:
    """pyautoattack's API: each call takes a while and breaks nothing (the fake stands for one slow batch)."""

    def __init__(self, model, *, attacks=None, device="cpu", eps=0.3, norm="Linf", seed=None, version="standard"):
        self.attacks_to_run = ["apgd-ce"]

    def run_standard_evaluation(self, x_orig, y_orig, /, *, batch_size=250, state_path=None):
        time.sleep(0.15)
        return x_orig.clone(), y_orig


def test_autoattack_batches_get_heartbeats_with_an_eta_from_earlier_batches(trained_tiny, test_batch, caplog,
                                                                            monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.03)
    images, labels = test_batch[0][:32], test_batch[1][:32]
    with caplog.at_level(logging.INFO):
        evaluate(trained_tiny, images, labels, norm="linf", eps=0.1, attacks=parse_attacks("autoattack"),
                 batch_size=16, large_eps=None, progress=True, backend=PyAutoAttack(SlowAutoAttack))
    beats = [r.getMessage() for r in caplog.records if "points, " in r.getMessage() and "so far" in r.getMessage()]
    first = [b for b in beats if b.startswith("AutoAttack apgd-ce batch 1/2: running on 16 points")]
    second = [b for b in beats if b.startswith("AutoAttack apgd-ce batch 2/2: running on ")]
    assert first and second, beats
    # before any batch has finished: an estimate from APGD-CE's budget and the model's measured pass, said so
    assert "ETA ~" in first[0] and "an estimate from the attack's budget" in first[0]
    assert "s per point measured" in second[0]
    assert any(b.startswith("AutoAttack square batch") for b in beats)  # every sub-attack, not only the first


def test_the_probe_announces_itself(trained_tiny, test_batch, caplog):
    images, labels = test_batch
    with caplog.at_level(logging.INFO):
        evaluate(trained_tiny, images[:16], labels[:16], norm="linf", eps=0.1, attacks=parse_attacks("fgsm"),
                 batch_size=8, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    announced = next(i for i, m in enumerate(messages) if m.startswith("large-eps probe (gradient-masking check)"))
    finished = next(i for i, m in enumerate(messages) if m.startswith("large-eps probe: "))
    assert announced < finished and "--no-probe skips it" in messages[announced]


# ----------------------------------------------------------------------------------------------------------
# resume means resume


@pytest.fixture(scope="module")
def weights(trained_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(trained_tiny.state_dict(), path)
    return str(path)


def _eval(weights, results, *extra):
    return main(["eval", "--arch", "tiny_cnn", "--weights", weights, "--dataset", "mnist5k", "--device", "cpu",
                 "--no-progress", "--n-examples", "24", "--eps", "0.1", "--seed", "3", "--name", "tiny",
                 "--results-dir", str(results), *extra])


def _ran(log: str) -> list[str]:
    """The attacks (and probe) that ran, from their completion lines; finished ones log 'finished before'."""
    ran = re.findall(r"linf eps=0\.1 (\S+): \d+/24 robust \(", log)
    return ran + (["probe"] if "large-eps probe (gradient-masking check)" in log else [])


def _results(results: Path) -> pd.DataFrame:
    return pd.read_csv(results / "results.csv")


def test_changing_attacks_probe_or_batch_size_reuses_every_finished_attack(weights, tmp_path, caplog):
    results = tmp_path / "results"
    with caplog.at_level(logging.INFO):
        assert _eval(weights, results, "--attacks", "fgsm,pgd-3x1", "--batch-size", "10") == 0
    assert _ran(caplog.text) == ["FGSM", "PGD-3x1", "probe"]
    (flags,) = (results / "flags").glob("*.pt")
    first = _results(results).iloc[-1]

    caplog.clear()  # a subset of the attacks, no probe: nothing runs
    with caplog.at_level(logging.INFO):
        assert _eval(weights, results, "--attacks", "pgd-3x1", "--batch-size", "10", "--no-probe") == 0
    assert _ran(caplog.text) == [] and "PGD-3x1 finished before" in caplog.text
    assert _results(results).iloc[-1]["pgd_acc"] == first["pgd_acc"]

    caplog.clear()  # another order and one new attack: only the new one runs
    with caplog.at_level(logging.INFO):
        assert _eval(weights, results, "--attacks", "pgd-3x1,cw-2,fgsm", "--batch-size", "10") == 0
    assert _ran(caplog.text) == ["CW-2x1"]

    caplog.clear()  # another batch size: the attacks' batches and seeds change, the clean flags and probe do not
    with caplog.at_level(logging.INFO):
        assert _eval(weights, results, "--attacks", "fgsm", "--batch-size", "7") == 0
    assert _ran(caplog.text) == ["FGSM"]
    assert list((results / "flags").glob("*.pt")) == [flags]  # one file for the model, points, eps and seed
    saved = load_checkpoint(flags)
    assert sorted(saved["attacks"]) == ["cw-2x1@bs10", "fgsm@bs10", "fgsm@bs7", "pgd-3x1@bs10"]
    rows = _results(results)
    assert rows["large_eps_acc"].iloc[-1] == first["large_eps_acc"] and rows["clean_acc"].nunique() == 1


def test_flags_in_the_previous_layout_are_still_resumed(weights, tmp_path, caplog):
    results = tmp_path / "results"
    assert _eval(weights, results, "--attacks", "fgsm,pgd-3x1", "--batch-size", "10") == 0
    (flags,) = (results / "flags").glob("*.pt")
    state = load_checkpoint(flags)
    # the same work as the previous version stored it: one file per attack list, batch size and probe eps
    state["kind"] = LEGACY_STATE_KIND
    state["settings"] |= {"batch_size": 10, "attacks": ["fgsm", "pgd-3x1"], "large_eps": 0.5}
    state["attacks"] = {key.split("@")[0]: value for key, value in state["attacks"].items()}
    legacy = flags_path(results, model="tiny", dataset="mnist5k", threat_model="Linf", eps=0.1, settings={
        key: state["settings"][key] for key in ("model_fingerprint", "data_fingerprint", "autoattack_backend",
                                                "large_eps", "n", "seed", "batch_size", "chained", "attacks")})
    flags.unlink()
    save_checkpoint(state, legacy)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _eval(weights, results, "--attacks", "fgsm,pgd-3x1", "--batch-size", "10") == 0
    assert "(the previous flags layout)" in caplog.text and _ran(caplog.text) == []
    rows = _results(results)
    assert rows["pgd_acc"].iloc[-1] == rows["pgd_acc"].iloc[0]


# ----------------------------------------------------------------------------------------------------------
# a run at chance; where a config trains


def test_a_run_at_or_below_chance_says_so():
    config = load_config(None, ["model.name=tiny_cnn"])  # MNIST-5k: 10 classes, margin 0.02
    low = pd.DataFrame({"val_clean_accuracy": [0.3, 0.07]})
    note = chance_note(config, low, {"clean_accuracy": 0.119})
    assert note.startswith("test clean accuracy 0.1190 and final validation clean accuracy 0.0700 at or below "
                           "chance (1/10 = 0.10, + margin 0.02)")
    assert chance_note(config, pd.DataFrame({"val_clean_accuracy": [0.07, 0.5]}), {"clean_accuracy": 0.13}) is None
    assert chance_note(config, low.iloc[:0], None) is None


def test_train_prints_the_chance_warning_in_its_last_lines(tmp_path, capsys, monkeypatch):
    from robust_sparse import train

    fit = train.fit

    def fit_ending_at_chance(config, **kwargs):  # a real run whose last validation is below 1/10 + 0.02
        result = fit(config, **kwargs)
        result.metrics.loc[result.metrics.index[-1], "val_clean_accuracy"] = 0.07
        return result

    monkeypatch.setattr(train, "fit", fit_ending_at_chance)
    assert main(["train", "--set", "model.name=tiny_cnn", "--set", "sparsity.method=none",
                 "--set", "data.train_limit=64", "--set", "data.val_size=64", "--set", "optim.epochs=1",
                 "--set", "attack.steps=1", "--set", "val.pgd_steps=1", "--set", "val.max_examples=64",
                 "--set", "eval.n_examples=0", "--set", "eval.autoattack_examples=0", "--set", "device=cpu",
                 "--no-progress", "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("warning: final validation clean accuracy 0.0700 at or below chance")
    assert lines[-1] == f"run directory: {tmp_path / 'run'}"


def test_a_config_without_out_dir_trains_into_its_own_directory(tmp_path):
    path = tmp_path / "my_setting.yaml"
    path.write_text(yaml.safe_dump({"objective": "pgd_at"}))
    assert load_config(path).out_dir == "runs/my_setting"
    assert load_config(path, ["out_dir=elsewhere"]).out_dir == "elsewhere"
    for common in sorted((REPO / "configs" / "studies").glob("common_*.yaml")):
        assert load_config(common).out_dir == f"runs/studies/{common.stem}"


def test_the_studies_readme_names_only_files_that_exist():
    text = (REPO / "docs" / "studies" / "README.md").read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:configs|docs|benchmarks|runs|scripts)/[\w./-]+\.(?:sh|py|yaml|md))",
                           text))
    assert named  # the study commands name their sweep files
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing, f"docs/studies/README.md names files that are not in the repository: {missing}"
