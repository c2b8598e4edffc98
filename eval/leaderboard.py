"""The curated leaderboard shipped with the package (``leaderboard.csv``) and what "comparable" means.

The table holds RobustBench CIFAR-10/100 entries relevant to sparse and small models (the two compressed
entries, Sehwag2020Hydra and Kundu2020Tunable, and dense references), the adversarial-pruning benchmark's
AutoAttack re-evaluation (Piras et al.) and published robust-sparse results (HYDRA, BSR-Net, A-BSR-Net,
Flying Bird), each with its protocol (eps, attack, number of test points), source URL and date. Accuracies
are in percent; ``sparsity`` is the fraction of pruned weights (empty when the source does not say).

A row is *comparable* with one of our results when the dataset, threat model, eps, attack and number of
test points all match and, for a model trained here, when it was trained on the dataset's whole training set
without extra data, as the published rows were; :func:`differences` says in words which of them do not.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd

from robust_sparse.config import _coerce
from robust_sparse.errors import ConfigError, UserError

REQUIRED = ["name", "kind", "method", "dataset", "threat_model", "eps", "attack", "n_examples", "architecture",
            "sparsity", "clean_acc", "robust_acc", "source_url", "source_date"]
EPS_RELATIVE_TOLERANCE = 1e-3  # 8/255 = 0.031373 and 0.031 differ by 1.2%: not the same eps


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
        frame["eps"] = [_coerce(v, float, f"{source} eps") for v in frame["eps"]]
    except ConfigError as error:
        raise UserError(str(error)) from None
    for column in ("sparsity", "clean_acc", "robust_acc", "n_examples"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
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


#: Training images of the published protocol (the whole training split; extra data is flagged per entry).
FULL_TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257}


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def differences(entry: dict[str, Any], *, dataset: str, threat_model: str, eps: float, attack: str,
                n_examples: int, train_images: int | None = None, epochs: int | None = None) -> list[str]:
    """Why a leaderboard ``entry`` is not comparable with a result (empty list: it is).

    ``train_images``/``epochs``: the recipe of a model trained here (unknown for outside models). Published rows
    train on the whole training split (plus extra data where the entry says so), so a model trained on a subset
    of it answers another question, whatever its attack and n.
    """
    reasons = []
    full = FULL_TRAIN_IMAGES.get(str(entry["dataset"]))
    extra = str(entry.get("extra_data", "")).strip().lower() == "true"
    if _known(train_images) and entry["dataset"] == dataset and full is not None:
        ours = f"trained on {int(train_images):,} images" + (f" for {int(epochs)} epochs" if _known(epochs) else "")
        if extra:
            reasons.append(f"{ours}; the entry used {full:,} plus extra data")
        elif int(train_images) < 0.8 * full:  # a validation split of up to 20% is the usual protocol
            reasons.append(f"{ours}; the entry used the {full:,} of the training split")
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
