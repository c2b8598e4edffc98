"""The curated leaderboard shipped with the package (``leaderboard.csv``) and what "comparable" means.

The table holds RobustBench CIFAR-10/100 entries relevant to sparse and small models (the two compressed
entries, Sehwag2020Hydra and Kundu2020Tunable, and dense references), the adversarial-pruning benchmark's
AutoAttack re-evaluation (Piras et al.) and published robust-sparse results (HYDRA, BSR-Net, A-BSR-Net,
Flying Bird), each with its protocol (eps, attack, number of test points), source URL and date. Accuracies
are in percent; ``sparsity`` is the fraction of pruned weights (empty when the source does not say). Rows of
the common-corruptions track (``threat_model`` and ``attack`` ``corruptions``, ``eps`` 0: no radius) hold
RobustBench's CIFAR-10-C mean accuracy over its 15 corruptions x 5 severities, from its ``model_info`` files.

Each row also states what it knows of its training recipe (empty where the source does not say):
``epochs``, ``selection`` (which checkpoint was reported, a :class:`Selection`) and ``estimator`` (AGENT's c_t
estimator, ``none`` for a method without AGENT).

A row is *comparable* with one of our results when the dataset, threat model, eps, attack and number of
test points all match and, for a model trained here, when its recipe matches too: the dataset's whole training
set without extra data (as the published rows use), the same number of epochs, the same model selection rule
and, when both sides use AGENT, the same estimator. A recipe field the row does not state counts as a
difference ("unknown for the entry"): comparability is claimed only where it is known. :func:`differences`
says in words which fields differ.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd

from robust_sparse.config import AgentEstimator, coerce
from robust_sparse.errors import ConfigError, UserError

REQUIRED = ["name", "kind", "method", "dataset", "threat_model", "eps", "attack", "n_examples", "architecture",
            "sparsity", "clean_acc", "robust_acc", "source_url", "source_date"]
EPS_RELATIVE_TOLERANCE = 1e-3  # 8/255 = 0.031373 and 0.031 differ by 1.2%: not the same eps
RECIPE = ["epochs", "selection", "estimator"]  # optional columns: a leaderboard without them states no recipe
NO_AGENT = "none"  # the estimator of a method without AGENT


class Selection(str, Enum):
    """Which checkpoint of a training run is reported."""

    BEST_VAL_ROBUST = "best-val-robust"  # robust-sparse's best.pt: best PGD accuracy on held-out training images
    BEST_VAL_CLEAN = "best-val-clean"
    BEST_TEST_ROBUST = "best-test-robust"  # early stopping on the test set (reads the test set)
    BEST_TEST_CLEAN = "best-test-clean"  # the BSR-Net code's *_best_weights
    LAST = "last"  # the final epoch's weights


SELECTION_WORDS = {
    Selection.BEST_VAL_ROBUST: "best validation robust accuracy",
    Selection.BEST_VAL_CLEAN: "best validation clean accuracy",
    Selection.BEST_TEST_ROBUST: "best test robust accuracy",
    Selection.BEST_TEST_CLEAN: "best test clean accuracy",
    Selection.LAST: "last epoch",
}
ESTIMATORS = [NO_AGENT] + [e.value for e in AgentEstimator]


def checkpoint_selection(state: dict[str, Any]) -> Selection | None:
    """The rule that wrote a robust-sparse checkpoint: training marks the epoch that became ``best.pt`` in its
    history, so a checkpoint whose last epoch is marked is best-by-validation; any other is the latest epoch
    (``last.pt``). None when the history predates the mark."""
    history = state.get("history") or []
    if not history or not isinstance(history[-1], dict) or "best" not in history[-1]:
        return None
    return Selection.BEST_VAL_ROBUST if history[-1]["best"] else Selection.LAST


def load_leaderboard(path: str | Path | None = None) -> pd.DataFrame:
    """The shipped table (or ``path``), with ``eps`` as a number and ``eps_text`` as written."""
    if path is None:
        text = resources.files("robust_sparse.eval").joinpath("leaderboard.csv").read_text()
        source = "robust_sparse/eval/leaderboard.csv"
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"leaderboard file not found: {path}")
        text, source = path.read_text(), str(path)
    frame = pd.read_csv(StringIO(text), dtype={"eps": str, "source_date": str})
    missing = [c for c in REQUIRED if c not in frame]
    if missing:
        raise UserError(f"{source}: missing columns {', '.join(missing)}")
    frame["eps_text"] = frame["eps"]
    try:
        frame["eps"] = [coerce(v, float, f"{source} eps") for v in frame["eps"]]
    except ConfigError as error:
        raise UserError(str(error)) from None
    for column in RECIPE:
        if column not in frame:
            frame[column] = None
    for column in ("sparsity", "clean_acc", "robust_acc", "n_examples", "epochs"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column, allowed in (("selection", [s.value for s in Selection]), ("estimator", ESTIMATORS)):
        values = [str(v).strip() or None if _known(v) else None for v in frame[column]]
        bad = [(i, v) for i, v in enumerate(values) if v is not None and v not in allowed]
        if bad:
            row, value = bad[0]
            raise UserError(f"{source} line {row + 2}: {column} {value!r}; allowed: "
                            f"{', '.join(allowed)} or empty (unknown)")
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


def normalize_attack(label: Any) -> str:
    """``AutoAttack``/``autoattack`` -> ``autoattack``; ``PGD-20`` and ``pgd-20x1`` -> ``pgd-20x1``; else lower case."""
    text = str(label).strip().lower()
    if text in ("autoattack", "aa", "autoattack standard", "autoattack (standard)"):
        return "autoattack"
    match = re.fullmatch(r"(pgd|cw)-(\d+)(?:x(\d+))?", text)
    if match:
        return f"{match.group(1)}-{match.group(2)}x{match.group(3) or 1}"
    return text


def full_train_images(dataset: str) -> int | None:
    """Training images of the published protocol: the whole training split, its record's ``train_images``
    (robust_sparse/datasets/; extra data is flagged per entry). None for a dataset not registered here."""
    from robust_sparse.datasets import DATASETS

    return DATASETS.get(dataset).train_images if dataset in DATASETS else None


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def differences(entry: dict[str, Any], *, dataset: str, threat_model: str, eps: float, attack: str,
                n_examples: int, train_images: int | None = None, epochs: int | None = None,
                selection: str | None = None, epoch: int | None = None, estimator: str | None = None) -> list[str]:
    """Why a leaderboard ``entry`` is not comparable with a result (empty list: it is).

    ``train_images``, ``epochs`` (planned), ``selection`` (a :class:`Selection`), ``epoch`` (the checkpoint's)
    and ``estimator`` (AGENT's, or ``none``): the recipe of a model trained here, each None when unknown (an
    outside model), and then not compared. Published rows train on the whole training split (plus extra data
    where the entry says so), so a model trained on a subset of it answers another question, whatever its
    attack and n; so does one trained for other epochs or reported at another checkpoint.
    """
    reasons = []
    full = full_train_images(str(entry["dataset"]))
    extra = str(entry.get("extra_data", "")).strip().lower() == "true"
    if _known(train_images) and entry["dataset"] == dataset and full is not None:
        ours = f"trained on {int(train_images):,} images"
        if extra:
            reasons.append(f"{ours}; the entry used {full:,} plus extra data")
        elif int(train_images) < 0.8 * full:  # a validation split of up to 20% is the usual protocol
            reasons.append(f"{ours}; the entry used the {full:,} of the training split")
    reasons += _recipe_differences(entry, epochs, selection, epoch, estimator)
    if entry["dataset"] != dataset:
        reasons.append(f"dataset {entry['dataset']}")
    if str(entry["threat_model"]).lower() != threat_model.lower():
        reasons.append(f"threat model {entry['threat_model']}")
    if not math.isclose(float(entry["eps"]), eps, rel_tol=EPS_RELATIVE_TOLERANCE):
        reasons.append(f"eps {entry.get('eps_text', entry['eps'])} vs {eps:.4g}")
    if normalize_attack(entry["attack"]) != normalize_attack(attack):
        reasons.append(f"attack {entry['attack']} vs {attack}")
    n = entry.get("n_examples")
    if n is None or (isinstance(n, float) and math.isnan(n)):
        reasons.append("n unknown")
    elif int(n) != int(n_examples):
        reasons.append(f"n {int(n)} vs {int(n_examples)}")
    return reasons


def _recipe_differences(entry: dict[str, Any], epochs: Any, selection: Any, epoch: Any, estimator: Any) -> list[str]:
    """Epochs, model selection and AGENT estimator of a model trained here against the entry's, in words."""
    reasons = []
    if _known(epochs):
        theirs = entry.get("epochs")
        if not _known(theirs) or not str(theirs).strip():
            reasons.append(f"epochs: {int(epochs)} here, unknown for the entry")
        elif int(float(theirs)) != int(epochs):
            reasons.append(f"epochs: {int(epochs)} here, {int(float(theirs))} in the entry")
    if _known(selection):
        rule = Selection(selection)
        finished = _known(epoch) and _known(epochs) and int(epoch) >= int(epochs)
        if rule is Selection.LAST and _known(epoch) and not finished:
            rules = set()  # last.pt of a run that had not finished: no published rule reports that
        else:  # best.pt written at the final epoch holds the last epoch's weights too
            rules = {rule} | ({Selection.LAST} if finished else set())
        ours = SELECTION_WORDS[rule] + (f" (epoch {int(epoch)} of {int(epochs)})"
                                        if _known(epoch) and _known(epochs) else "")
        theirs = _stated(entry, "selection")
        if theirs is None:
            reasons.append(f"model selection: {ours} here, unknown for the entry")
        elif Selection(theirs) not in rules:
            reasons.append(f"model selection: {ours} here, {SELECTION_WORDS[Selection(theirs)]} in the entry")
    if _known(estimator) and estimator != NO_AGENT:
        # A method without AGENT has no estimator to match: setting A-BSR-Net beside BSR-Net compares methods.
        theirs = _stated(entry, "estimator")
        if theirs is None:
            reasons.append(f"AGENT estimator: {estimator} here, unknown for the entry")
        elif theirs not in (NO_AGENT, estimator):
            reasons.append(f"AGENT estimator: {estimator} here, {theirs} in the entry")
    return reasons


def _stated(entry: dict[str, Any], column: str) -> str | None:
    value = entry.get(column)
    return str(value).strip() or None if _known(value) else None
