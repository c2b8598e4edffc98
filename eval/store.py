"""The results store: one directory with ``results.csv``, ``results.json`` and ``flags/``.

Every evaluation (one model at one eps) appends one row to both files (the JSON holds the nested fields as
objects, the CSV as JSON strings) and keeps its per-point flags in ``flags/<key>.pt``, where the key names the
model, dataset, threat model and eps plus a hash of everything else that determines its flags (n, the attack seed,
chained mode, model and data fingerprints: ``eval --seeds 0,1,2`` writes one row and one flags file per seed); the
attacks, keyed with their batch size, and the probe live inside it, so a
rerun resumes every finished attack whatever the attack list, batch size or probe flag.

The tidy results. A stored row is one evaluation, its accuracies side by side; :func:`tidy` (and
:func:`load_tidy`) turns rows into one DataFrame with one row per model x attack x eps x seed x sub-net, the
shape :meth:`robust_sparse.eval.Evaluation.to_frame` gives for an evaluation in memory. Its columns
(:data:`TIDY_COLUMNS`):

* ``model``: the model's name without its sub-net; ``subnet``: the sub-net's index in an AST checkpoint
  (``/subnet{k}`` in a stored name, robust_sparse.eval.sources), <NA> for a model of one network;
* ``dataset``, ``threat_model`` (``Linf``, ``L2``, ``corruptions``), ``eps`` (0 for corruptions);
* ``seed``: the attacks' seed (<NA> for corruptions, which draw nothing); ``mode``: ``standalone`` or
  ``chained`` (then an attack's accuracy is cumulative over the attacks before it);
* ``attack``: ``clean``, an attack's label (``PGD-50x10``, ``AutoAttack``), a part of a multi-unit attack
  (``AutoAttack/apgd-ce``, cumulative), ``worst case`` (every evaluation has it, one attack's too), the
  corruptions mean (``corruptions``) or a corruption
  cell (``fog/3``); ``kind`` says which: ``clean``, ``attack``, ``unit``, ``worst``, ``corruptions mean``,
  ``corruption``;
* ``accuracy``: a fraction in [0, 1]; ``n``: the points it is measured on; ``correct``: how many of them
  (the rounded product for a mean over corruption cells);
* ``ci_low``, ``ci_high``: its 95% interval: Wilson on ``n`` points, but the corruptions mean's t interval over
  the images (robust_sparse.eval.corruptions), NaN where a row does not hold it.

:func:`evaluation_rows` reads a checkpoint's rows back as a model card lists them (``robust-sparse export --hub``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from robust_sparse.files.atomic import write_atomic
from robust_sparse.errors import UserError
from robust_sparse.eval.intervals import wilson_interval

log = logging.getLogger(__name__)

# a threat model as results name it (RobustBench's spelling)
ROBUSTBENCH_THREATS = {"linf": "Linf", "l2": "L2"}


def threat_label(norm: str) -> str:
    """``linf`` -> ``Linf`` (RobustBench's spelling, used in results)."""
    return ROBUSTBENCH_THREATS[norm]

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
FLAGS_DIR = "flags"
#: Columns every row has, in this order (CSV and JSON).
COLUMNS = [
    "timestamp", "model", "source", "path", "architecture", "dataset", "threat_model", "eps", "n_examples",
    "train_images", "epochs", "epoch", "selection", "estimator",
    "seed", "batch_size", "mode", "attacks", "clean_acc", "pgd_attack", "pgd_acc", "autoattack_acc", "worst_acc",
    "per_attack", "sparsity", "params", "nonzero_params", "train_flops", "train_flops_vs_dense",
    "inference_flops", "inference_flops_vs_dense", "wall_seconds", "device", "autoattack_backend",
    "large_eps", "large_eps_acc", "warnings", "model_fingerprint", "data_fingerprint", "flags_file",
    "torch_version",
]
NESTED = ("per_attack", "warnings")
#: The tidy frame's columns, in this order (see the module docstring).
TIDY_COLUMNS = ["model", "subnet", "dataset", "threat_model", "eps", "seed", "mode", "attack", "kind", "accuracy",
                "n", "correct", "ci_low", "ci_high"]
WORST = "worst case"  # the attack column's name of the pointwise worst case over an evaluation's attacks
CORRUPTIONS = "corruptions"  # the corruptions track's threat_model (robust_sparse.eval.corruptions.THREAT)
_SUBNET = re.compile(r"^(?P<model>.*)/subnet(?P<k>\d+)$")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def flags_path(results_dir: str | Path, *, model: str, dataset: str, threat_model: str, eps: float,
               settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{_slug(model)}__{dataset}__{threat_model}__eps{eps:.6g}__{digest}.pt"
    return Path(results_dir) / FLAGS_DIR / name


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """All rows of a store, nested fields decoded (empty frame with :data:`COLUMNS` if there is none)."""
    path = Path(results_dir) / RESULTS_JSON
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno}); fix or remove it") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a list of result rows")
    # a row written before the attack seed was recorded was attacked with seed 0, the only one there was
    # (the corruptions track has no seed and writes None)
    frame = pd.DataFrame([{"seed": 0, **row} if isinstance(row, dict) and "seed" not in row else row for row in rows])
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame


#: What a rerun of the same finished evaluation changes in its row; a row equal to a stored one but for these is
#: that evaluation again and is not appended a second time.
RERUN_COLUMNS = ("timestamp", "wall_seconds", "session_seconds")  # what a rerun of the same evaluation changes


def _identity(row: dict[str, Any]) -> str:
    plain = json.loads(json.dumps(_plain(row), default=str))  # as the row reads back from results.json
    # 3 and 3.0 are one value (a store rewritten through pandas once held whole numbers as floats)
    return json.dumps({k: int(v) if isinstance(v, float) and v.is_integer() else v
                       for k, v in plain.items() if k not in RERUN_COLUMNS}, sort_keys=True)


def append_result(results_dir: str | Path, row: dict[str, Any]) -> int:
    """Append ``row`` to ``results.json`` and ``results.csv``; returns its index in the store (that of the stored
    row when the same evaluation is already there, which is then left as it is)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    json_path = results_dir / RESULTS_JSON
    new = {column: row.get(column) for column in COLUMNS} | {k: v for k, v in row.items() if k not in COLUMNS}
    if json_path.is_file():
        load_results(results_dir)  # one-line errors for a broken store
        stored = json.loads(json_path.read_text())
        # the rows as written, not through a DataFrame (which turns a column of whole numbers with a gap to floats)
        rows = [{column: old.get(column) for column in COLUMNS} | {k: v for k, v in old.items() if k not in COLUMNS}
                for old in stored]
        same = [i for i, old in enumerate(stored) if isinstance(old, dict) and _identity(old) == _identity(new)]
        if same:
            log.info("%s already holds this evaluation (row %d); not appended again", json_path, same[-1])
            return same[-1]
    rows.append(new)
    rows = [_plain(r) for r in rows]
    frame = pd.DataFrame(rows)
    for column in NESTED:
        if column in frame:
            frame[column] = [json.dumps(v) for v in frame[column]]
    # Both atomic, the JSON (what the store is read from) last: a kill in between leaves the CSV one row ahead,
    # and the rerun's append rewrites it from the JSON.
    write_atomic(results_dir / RESULTS_CSV, frame.to_csv(index=False))
    write_atomic(json_path, json.dumps(rows, indent=1, default=str) + "\n")
    return len(rows) - 1


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (pandas' missing value) -> None, so the JSON stays valid."""
    clean = {}
    for key, value in row.items():
        if isinstance(value, float) and value != value:
            value = None
        clean[key] = value
    return clean


# ----------------------------------------------------------------------------------------------------------
# the tidy results: one row per model x attack x eps x seed x sub-net


def split_subnet(name: str) -> tuple[str, int | None]:
    """``runs/a/best/subnet1`` -> (``runs/a/best``, 1); a name without the sub-net suffix -> (name, None)."""
    match = _SUBNET.match(str(name))
    return (match["model"], int(match["k"])) if match else (str(name), None)


def tidy_rows(identity: dict[str, Any], n: int,
              entries: list[tuple[str, str, float, int | None, tuple[float, float] | None]]) -> list[dict[str, Any]]:
    """The tidy rows of one evaluation. ``identity``: model (its sub-net suffix split off into ``subnet``),
    dataset, threat_model, eps, seed, mode; ``entries``: (attack, kind, accuracy, correct or None for
    round(accuracy * n), interval or None for Wilson's on ``n``)."""
    model, subnet = split_subnet(identity.get("model") or "")
    if identity.get("subnet") is not None:
        subnet = identity["subnet"]
    rows = []
    for attack, kind, accuracy, correct, interval in entries:
        accuracy = float("nan") if accuracy is None else float(accuracy)
        if correct is None and accuracy == accuracy:
            correct = round(accuracy * n)
        low, high = interval if interval is not None else wilson_interval(accuracy, n)
        rows.append({"model": model, "subnet": subnet, "dataset": identity.get("dataset"),
                     "threat_model": identity.get("threat_model"), "eps": float(identity.get("eps") or 0.0),
                     "seed": identity.get("seed"), "mode": identity.get("mode"), "attack": attack, "kind": kind,
                     "accuracy": accuracy, "n": n, "correct": correct, "ci_low": low, "ci_high": high})
    return rows


def tidy_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """:data:`TIDY_COLUMNS`, with integer columns that may be missing as pandas' nullable integers."""
    frame = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    for column in ("subnet", "seed", "n", "correct"):
        frame[column] = pd.array([None if v is None or v != v else int(v) for v in frame[column]], dtype="Int64")
    return frame


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)


def tidy(results: pd.DataFrame) -> pd.DataFrame:
    """Stored rows (:func:`load_results`, or several stores' concatenated) as the tidy frame of the module
    docstring: per row its clean accuracy, every per-attack entry and the worst case (a corruptions row's
    mean, its cells and clean accuracy)."""
    rows: list[dict[str, Any]] = []
    for record in results.to_dict("records"):
        n = int(record["n_examples"])
        per_attack = record.get("per_attack") if isinstance(record.get("per_attack"), dict) else {}
        entries = [("clean", "clean", record.get("clean_acc"), None, None)]
        seed = record.get("seed")
        identity = {**record, "seed": int(seed) if _present(seed) else None}
        if record.get("threat_model") == CORRUPTIONS:
            stored = record.get("corruptions_interval")
            interval = tuple(stored) if isinstance(stored, (list, tuple)) and len(stored) == 2 else (math.nan,) * 2
            for label, value in per_attack.items():  # the mean first, then the cells (corruptions.per_attack)
                entries.append((label, "corruption", value, None, None) if "/" in label else
                               (label, "corruptions mean", value, None, interval))
        else:
            for label, value in per_attack.items():
                entries.append((label, "unit" if "/" in label else "attack", value, None, None))
            entries.append((WORST, "worst", record.get("worst_acc"), None, None))
        rows += tidy_rows(identity, n, entries)
    return tidy_frame(rows)


def load_tidy(results_dir: str | Path) -> pd.DataFrame:
    """The tidy frame (:func:`tidy`) of a store's rows."""
    return tidy(load_results(results_dir))


def evaluation_rows(checkpoint: str | Path, subnet: int | None = None,
                    results_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """What a model card shows of a checkpoint's evaluations: the results store's rows of this checkpoint
    (``results_dir``, default ``<run dir>/eval``; sub-net ``subnet`` of an AST checkpoint), each attack one row,
    or, without any, the test PGD run that training wrote (``eval.json``). Rows: attack, threat_model, eps, n,
    accuracy."""
    checkpoint = Path(checkpoint)
    store = Path(results_dir) if results_dir is not None else checkpoint.parent / "eval"
    frame = load_results(store)
    rows: list[dict[str, Any]] = []
    if len(frame):
        same = frame["path"].map(lambda p: isinstance(p, str) and Path(p).resolve() == checkpoint.resolve())
        suffix = f"/subnet{subnet}"
        mine = frame[same & frame["model"].map(lambda m: str(m).endswith(suffix) if subnet is not None
                                               else "/subnet" not in str(m))]
        # the store's own tidy rows (one per attack and its parts): the card lists the whole attacks and clean
        shown = tidy(mine) if len(mine) else mine
        for row in shown[shown["kind"].isin(["clean", "attack"])].to_dict("records") if len(mine) else []:
            rows.append({"attack": str(row["attack"]), "threat_model": row["threat_model"],
                         "eps": 0.0 if row["kind"] == "clean" else float(row["eps"]), "n": int(row["n"]),
                         "accuracy": float(row["accuracy"])})
    if rows:
        return rows
    trained = checkpoint.parent / "eval.json"
    try:
        record = json.loads(trained.read_text()) if trained.is_file() else {}
    except (OSError, ValueError):
        record = {}
    if subnet is not None:
        record = next((s for s in record.get("subnets") or [] if s.get("subnet") == subnet), {}) | {
            key: record.get(key) for key in ("norm", "eps", "n_examples", "pgd_steps", "restarts")}
    if record.get("clean_accuracy") is None:
        return []
    threat = {"linf": "Linf", "l2": "L2"}.get(record.get("norm"), record.get("norm"))
    n = int(record.get("n_examples") or 0)
    rows.append({"attack": "clean", "threat_model": threat, "eps": 0.0, "n": n,
                 "accuracy": float(record["clean_accuracy"])})
    if record.get("pgd_accuracy") is not None:
        rows.append({"attack": f"PGD-{record.get('pgd_steps')}x{record.get('restarts')}", "threat_model": threat,
                     "eps": float(record["eps"]), "n": n, "accuracy": float(record["pgd_accuracy"])})
    return rows
