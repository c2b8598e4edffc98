"""The report's "Gradient-masking checks" paragraph says only what the stored rows support: one test per
sentence, for the rows that support it and for the rows that do not."""

from __future__ import annotations

import pandas as pd
import pytest

from robust_sparse.eval.report import build_report, collect
from robust_sparse.eval.sanity import checks_summary
from robust_sparse.eval.store import append_result


def _row(**changes):
    row = {
        "timestamp": "2026-01-01T00:00:00+00:00", "model": "m", "source": "weights", "path": "m.pt",
        "architecture": "tiny_cnn", "dataset": "cifar10", "threat_model": "Linf", "eps": 8 / 255, "n_examples": 100,
        "seed": 0, "batch_size": 100, "mode": "standalone", "attacks": "pgd-50x10,autoattack", "clean_acc": 0.7,
        "pgd_attack": "PGD-50x10", "pgd_acc": 0.42, "autoattack_acc": 0.38, "worst_acc": 0.38,
        "per_attack": {"PGD-50x10": 0.42, "AutoAttack": 0.38}, "sparsity": 0.9, "params": 1000,
        "nonzero_params": 100, "wall_seconds": 1.0, "device": "cpu", "warnings": [], "model_fingerprint": "abc",
        "data_fingerprint": "def", "large_eps": 0.5, "large_eps_acc": 0.0,
    }
    row.update(changes)
    return row


def _pgd_only(**changes):
    return _row(attacks="pgd-50x10", autoattack_acc=None, worst_acc=0.42, per_attack={"PGD-50x10": 0.42}, **changes)


def _sentences(*rows, monotone_fired=0):
    frame = pd.DataFrame(list(rows))
    frame["warnings"] = [w if isinstance(w, list) else [] for w in frame["warnings"]]
    return " ".join(checks_summary(frame, monotone_fired=monotone_fired))


def test_autoattack_against_pgd_only_where_both_ran():
    assert "AutoAttack is not above PGD in any of the 1 results that ran both." in _sentences(_row())
    assert "AutoAttack is above PGD in 1 of the 2 results that ran both" in _sentences(
        _row(), _row(eps=4 / 255, autoattack_acc=0.5, pgd_acc=0.45))
    text = _sentences(_pgd_only())
    assert "AutoAttack" not in text and "PGD" not in text  # no comparison without both attacks
    assert "AutoAttack is" not in _sentences(_row(mode="chained"))  # chained numbers are cumulative


def test_square_only_where_it_ran():
    assert "Square broke no more than 0.2% of the points the white-box attacks left robust in any of the 1" \
        in _sentences(_row())
    fired = _row(warnings=["Linf eps=0.03137: the black-box Square attack broke 9 points (9.00%) that ..."])
    assert "A black-box attack broke points every white-box attack left robust in 1 of the 1" in _sentences(fired)
    assert "Square" not in _sentences(_pgd_only()) and "black-box" not in _sentences(_pgd_only())


def test_probe_that_ran():
    assert "The large-eps probe fell to at most 1% in all 2 results that ran it." in _sentences(
        _row(), _row(eps=4 / 255))
    text = _sentences(_row(large_eps_acc=0.3), _row(eps=4 / 255))
    assert "The large-eps probe left more than 1% of the points robust in 1 of the 2 results" in text
    assert "fell to" not in text


def test_probe_not_run_says_not_run():
    text = _sentences(_row(large_eps=None, large_eps_acc=None), _row(eps=4 / 255, large_eps=None,
                                                                     large_eps_acc=float("nan")))
    assert "The large-eps probe was not run for 2 of the 2 results (--no-probe)" in text
    assert "fell to" not in text and "left more than" not in text
    assert "was not run for 1 of the 2" in _sentences(_row(), _row(eps=4 / 255, large_eps_acc=None))
    assert "not run" not in _sentences(_row())


def test_monotone_only_across_several_eps():
    several = (_row(), _row(eps=4 / 255))
    assert "Accuracy does not rise with eps for any of the 1 models evaluated at several eps." in _sentences(*several)
    assert "Accuracy rises with eps in 2 places (see above) across the 1 models" in _sentences(*several,
                                                                                             monotone_fired=2)
    text = _sentences(_row())
    assert "Monotonicity in eps was not checked: no model was evaluated at more than one eps." in text
    assert "does not rise" not in text


def test_corruption_rows_have_no_gradient_checks():
    corrupted = _row(threat_model="corruptions", eps=0.0, attacks="fog@1", pgd_acc=None, autoattack_acc=None,
                     pgd_attack=None, large_eps=None, large_eps_acc=None, per_attack={"corruptions": 0.8})
    text = _sentences(corrupted)
    assert text == "The 1 corruptions results are plain accuracies on fixed images: no gradient-masking check applies to them."
    assert "not run" not in text  # the probe does not apply there: not "not run" either


def test_the_issue_store_pgd_only_without_probe(tmp_path):
    """The store of the issue: every row --no-probe, none with both PGD and AutoAttack, one eps each."""
    append_result(tmp_path, _pgd_only(large_eps=None, large_eps_acc=None))
    append_result(tmp_path, _pgd_only(model="n", model_fingerprint="other", large_eps=None, large_eps_acc=None))
    text = build_report([tmp_path]).read_text()
    checks = text.split("## Gradient-masking checks")[1].split("##")[0]
    assert "No check fired" not in checks and "fell to" not in checks and "AutoAttack is" not in checks
    assert "The large-eps probe was not run for 2 of the 2 results" in checks
    assert "Monotonicity in eps was not checked" in checks
    assert len(collect([tmp_path])) == 2
