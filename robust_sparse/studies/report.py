"""Aggregate a sweep directory: per-run table, mean ± std over seeds, epochs needed to reach given accuracies
(the paper's Figure 4 metric) against the γ = 0 / no-AGENT runs, and the figures of robust_sparse.studies.plots
(convergence, γ sensitivity, robust accuracy against sparsity and against training FLOPs, AGENT over epochs and
its cosine per density). Beside the accuracies, each setting's cost: training and inference FLOPs against dense
(robust_sparse.flops); each run's test accuracies with their Wilson intervals and every setting's per-seed paired
differences against a reference setting (robust_sparse.studies.stats), which a stored report's runs.csv alone can also give.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from robust_sparse.studies import plots, stats
from robust_sparse.studies.hooks import Context, Place, default_reference, hooks
# the studies whose runs log more than accuracies register their part of the report (their columns, flags,
# default reference and sections) on import
from robust_sparse.studies import agent_gamma  # noqa: F401

from robust_sparse.files import rundir
from robust_sparse.files.atomic import write_atomic
from robust_sparse.chance import CHANCE_MARGIN, at_chance
from robust_sparse.errors import UserError
from robust_sparse.studies.local import EVAL_RESULT, run_status

log = logging.getLogger(__name__)

FINAL = ["test_clean_accuracy", "test_pgd_accuracy", "val_clean_accuracy", "val_pgd_accuracy"]
COST = ["train_flops_vs_dense", "inference_flops_vs_dense"]  # robust_sparse.flops, from eval.json or metrics.csv
STAGE = "eval_"  # columns of the sweep's evaluation stage: eval_n, eval_clean_accuracy, eval_<attack>_accuracy


def _stage_columns(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's result rows of ``robust-sparse eval``, one per attack seed (the stage's ``attack_seeds``), as
    report columns: the accuracies averaged over the seeds, the warnings and seconds summed, the seeds listed
    (their spread is in the run's own store: ``robust-sparse report RUN/eval``)."""
    per_seed = [_record_columns(record) for record in records]
    if len(per_seed) == 1:
        return per_seed[0]
    merged = dict(per_seed[0])
    for key in merged:
        values = [columns.get(key) for columns in per_seed]
        if key.endswith("_accuracy") and all(isinstance(v, (int, float)) for v in values):
            merged[key] = sum(values) / len(values)
        elif key in (f"{STAGE}warnings", f"{STAGE}seconds") and all(isinstance(v, (int, float)) for v in values):
            merged[key] = sum(values)
        elif key == f"{STAGE}warning_text":
            merged[key] = " | ".join(dict.fromkeys(text for v in values for text in str(v or "").split(" | ") if text))
    merged[f"{STAGE}seed"] = ",".join(str(record.get("seed")) for record in records)
    return merged


def _by_model(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The stage's rows grouped by model (an AST checkpoint's sub-nets are models of their own), in order."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record.get("model"), []).append(record)
    return list(groups.values())


def _record_columns(record: dict[str, Any]) -> dict[str, Any]:
    """One result row of ``robust-sparse eval`` as report columns: n, clean and each attack's accuracy (the
    attacks' totals, not their sub-attacks) and the worst case over them."""
    columns = {f"{STAGE}n": record["n_examples"], f"{STAGE}clean_accuracy": record["clean_acc"],
               f"{STAGE}seed": record.get("seed")}  # the attacks' seed (PGD's random starts, AutoAttack's)
    for label, accuracy in (record.get("per_attack") or {}).items():
        if "/" not in label:
            columns[f"{STAGE}{label}_accuracy"] = accuracy
    if len([label for label in record.get("per_attack") or {} if "/" not in label]) > 1:
        columns[f"{STAGE}worst_accuracy"] = record["worst_acc"]
    columns[f"{STAGE}warnings"] = len(record.get("warnings") or [])  # gradient-masking checks that fired
    columns[f"{STAGE}warning_text"] = " | ".join(record.get("warnings") or [])
    columns[f"{STAGE}seconds"] = record.get("wall_seconds")
    return columns


def _stage_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / EVAL_RESULT
    if not path.is_file():
        return []
    results = _read_json(path).get("results")
    if not isinstance(results, list) or not all(isinstance(row, dict) and {"n_examples", "clean_acc"} <= set(row)
                                                for row in results):
        raise UserError(f"{path}: no list of result rows under 'results' (damaged; rerun robust-sparse sweep to "
                        "evaluate the run again)")
    return results


def _evaluation(path: Path) -> dict[str, Any]:
    """A run's eval.json with the fields the report reads (an AST run's for each of its sub-nets), or one line
    naming it."""
    evaluation = _read_json(path)
    needed = {"epoch", "clean_accuracy", "pgd_accuracy"}
    subnets = evaluation.get("subnets", [])
    missing = sorted(needed - set(evaluation))
    if not missing and (not isinstance(subnets, list) or not all(
            isinstance(subnet, dict) and {"subnet", "density", "clean_accuracy", "pgd_accuracy"} <= set(subnet)
            for subnet in subnets)):
        missing = ["a sub-net's subnet, density or accuracies"]
    if missing:
        raise UserError(f"{path}: cannot read it as JSON written by robust-sparse (no {missing[0]}); evaluate the "
                        "run again")
    return evaluation


def _unreadable(path: Path, what: str, error: Exception) -> UserError:
    """The one-line refusal of a stored file that cannot be read: its path, what it should be and why not."""
    if isinstance(error, UnicodeDecodeError):
        reason = f"not UTF-8 text (byte {error.start}): a binary or damaged file"
    elif isinstance(error, OSError):
        reason = rundir.describe(error)
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"{path}: cannot read it as {what} ({reason})")


def _read_csv(path: Path, what: str, **options: Any) -> pd.DataFrame:
    """``path`` as a table, or one line naming it: a stored file may be binary, truncated or not a CSV at all."""
    try:
        return pd.read_csv(path, **options)
    except (UnicodeDecodeError, pd.errors.ParserError, OSError) as error:
        raise _unreadable(path, what, error) from None


def _read_json(path: Path) -> dict[str, Any]:
    """A run's JSON record (eval.json, sweep_eval.json) as a mapping, or one line naming it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, OSError) as error:
        raise _unreadable(path, "JSON written by robust-sparse", error) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: cannot read it as JSON written by robust-sparse (not a mapping)")
    return data


def _cell(value: Any) -> Any:
    """A table cell: lists and mappings (e.g. AST's densities) as their YAML flow text, so they group."""
    return yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, (list, dict)) else value


def _parse_items(items: list[str], where: str = "override", *, strict: bool = False) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{"a.b": 1, ...}``, values read as YAML; ``where`` names the items' source in a
    one-line error. ``strict``: a value that is not YAML is refused (``report --reference``); else it is its text,
    as ``--set`` reads it (the overrides a sweep recorded)."""
    from robust_sparse.config.yaml_input import load_yaml

    values = {}
    for item in items:
        key, _, raw = str(item).partition("=")
        if not strict:
            values[key.strip()] = _cell(load_yaml(raw, f"{where} {item!r}", if_invalid=raw.strip()))
            continue
        try:
            values[key.strip()] = _cell(load_yaml(raw, f"{where} {item!r}"))
        except UserError as error:
            raise UserError(f"{error}; give KEY=VALUE with a YAML value, e.g. sparsity.density=0.1") from None
    return values


def _parse_overrides(text: Any, where: str = "override") -> dict[str, Any]:
    return _parse_items(str(text).split(), where)


def _read_metrics(path: Path) -> pd.DataFrame:
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        metrics = pd.DataFrame()
    if metrics.empty or "epoch" not in metrics:
        raise UserError(f"{path} is empty or damaged; rewrite it from the run's last.pt: robust-sparse train "
                        f"{path.parent / 'config.yaml'} --resume --out {path.parent}")
    return metrics


def _chance(run_dir: Path) -> float | None:
    """1 / number of classes of the run's dataset (from its config.yaml), None if unknown."""
    from robust_sparse.datasets import DATASETS

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
        if data["dataset"] not in DATASETS:
            return None
        classes = DATASETS.get(data["dataset"]).num_classes or int(data.get("num_classes") or 0)  # imagefolder's
        return 1.0 / classes if classes > 0 else None
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _chance_margin(run_dir: Path) -> float:
    """The margin over chance the run was trained with (its config.yaml's ``divergence.chance_margin``), so that
    the report judges it by the rule its training stopped on; the default where the config is older or unread."""
    try:
        return float(yaml.safe_load((run_dir / "config.yaml").read_text())["divergence"]["chance_margin"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return CHANCE_MARGIN


def _at_chance(runs: pd.DataFrame, column: str) -> tuple[pd.DataFrame, str]:
    """The runs whose ``column`` accuracy is at chance by their own rule (robust_sparse.chance: below 1/classes +
    the margin each was trained with; a run of unknown chance never is), and that margin in words."""
    chance = pd.to_numeric(runs["chance"], errors="coerce")  # 1 / classes
    margin = (pd.to_numeric(runs["chance_margin"], errors="coerce").fillna(CHANCE_MARGIN)
              if "chance_margin" in runs else pd.Series(CHANCE_MARGIN, index=runs.index))
    found = runs[at_chance(pd.to_numeric(runs[column], errors="coerce"), 1.0 / chance, margin).fillna(False)]
    margins = sorted(set(margin[found.index]))
    if len(margins) == 1:
        return found, f"{margins[0]:g}"
    return found, "each run's margin, " + ", ".join(f"{m:g}" for m in margins)


def run_flags(runs: pd.DataFrame) -> list[str]:
    """What a reader must know before reading the tables, in words: runs that diverged, that ended at chance
    accuracy, and what each study's hook flags (robust_sparse.studies.hooks)."""
    flags = []
    if "diverged" in runs and runs["diverged"].fillna(False).astype(bool).any():
        diverged = runs[runs["diverged"].fillna(False).astype(bool)]
        early = diverged["epochs"].isna() if "epochs" in diverged else pd.Series(True, index=diverged.index)
        names = sorted(diverged.loc[~early, "run_id"].unique())
        if names:
            flags.append(f"{len(names)} run(s) diverged (NaN loss or validation accuracy stuck at chance), their "
                         f"numbers are from the best checkpoint before that: {', '.join(names)}")
        names = sorted(diverged.loc[early, "run_id"].unique())
        if names:
            flags.append(f"{len(names)} run(s) diverged before their first epoch ended (NaN loss): they have no "
                         f"numbers: {', '.join(names)}")
    if "chance" in runs and "val_clean_accuracy" in runs:
        found, margin = _at_chance(runs, "val_clean_accuracy")
        if not found.empty:
            names = sorted(found["run_id"].unique())
            flags.append(f"{len(names)} run(s) ended with validation clean accuracy at chance (below 1/classes + "
                         f"{margin}): they learned nothing, and their robust accuracy means nothing: "
                         f"{', '.join(names)}")
    if "chance" in runs and "test_clean_accuracy" in runs:  # what each run itself warned about at its end
        found, margin = _at_chance(runs, "test_clean_accuracy")
        if not found.empty:
            names = sorted(found["run_id"].unique())
            flags.append(f"{len(names)} run(s) ended with test clean accuracy at chance (below 1/classes + "
                         f"{margin}): their robust accuracy means nothing: {', '.join(names)}")
    for hook in hooks():
        flags += hook.flags(runs)
    return flags


DIVERGED_LINE = "robust-sparse: diverged:"  # what train writes on stderr (train.log) as it exits with code 3


def _diverged(run_dir: Path, status: str, recorded: Any) -> bool:
    """Whether the run diverged, by what it left: the sweep's diverged.json (written on exit code 3, as
    :func:`robust_sparse.studies.local.run_status` reads it), the status runs.csv recorded, or train's own line in
    train.log (a sweep stopped before it wrote the marker). A run that finished since is not diverged."""
    if status == "diverged" or (status != "done" and str(recorded).strip() == "diverged"):
        return True
    log_path = run_dir / "train.log"
    if status == "done" or not log_path.is_file():
        return False
    try:
        with open(log_path, "rb") as handle:  # the last verdict counts: a run restarted by hand since ends anew
            verdicts = [line for line in handle if line.startswith(b"robust-sparse: ")]
        return bool(verdicts) and verdicts[-1].startswith(DIVERGED_LINE.encode())
    except OSError:
        return False  # an unreadable log says nothing either way; the marker and runs.csv said no


def collect(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves): one row per run with its grid values and final numbers; one row per run and epoch."""
    sweep_dir = Path(sweep_dir)
    index_path = sweep_dir / "runs.csv"
    if not index_path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no runs.csv); run robust-sparse sweep first")
    index = _read_csv(index_path, "a sweep's runs.csv (run_id, overrides, status)", keep_default_na=False)
    missing = [column for column in ("run_id", "overrides") if column not in index]
    if missing:
        raise UserError(f"{index_path}: cannot read it as a sweep's runs.csv (no {missing[0]} column); rerun "
                        "robust-sparse sweep on its sweep.yaml to rewrite it")
    runs, curves = [], []
    for _, entry in index.iterrows():
        run_dir = sweep_dir / "runs" / str(entry["run_id"])
        # runs.csv is a file anyone may edit: a run id is one folder under runs/, never a path out of the sweep
        if run_dir.resolve().parent != (sweep_dir / "runs").resolve() or str(entry["run_id"]) in ("", ".", ".."):
            raise UserError(f"{index_path}: run_id {entry['run_id']!r} is not a folder under {sweep_dir / 'runs'}")
        status = run_status(run_dir)
        overrides = _parse_overrides(entry["overrides"], f"{index_path} override")
        row: dict[str, Any] = {"run_id": entry["run_id"], **overrides, "status": status,
                               # a run that diverged before its first epoch ended wrote no metrics: it counts
                               "diverged": _diverged(run_dir, status, entry.get("status"))}
        metrics_path = run_dir / "metrics.csv"
        if metrics_path.exists():
            metrics = _read_metrics(metrics_path)
            metrics.insert(0, "run_id", entry["run_id"])
            curves.append(metrics)
            last = metrics.iloc[-1]
            row.update({"epochs": int(last["epoch"]), "val_clean_accuracy": last["val_clean_accuracy"],
                        "val_pgd_accuracy": last["val_pgd_accuracy"]})
            row["diverged"] = row["diverged"] or bool(last["train_loss"] != last["train_loss"])
            row["chance"] = _chance(run_dir)
            row["chance_margin"] = _chance_margin(run_dir)
            for hook in hooks():
                row.update(hook.run_columns(run_dir, metrics))
            row.update({column: last[column] for column in COST if column in metrics})  # before any evaluation
        evaluation = _evaluation(run_dir / "eval.json") if (run_dir / "eval.json").exists() else {}
        if evaluation:
            row.update({"test_clean_accuracy": evaluation["clean_accuracy"],
                        "test_pgd_accuracy": evaluation["pgd_accuracy"], "test_n": evaluation.get("n_examples"),
                        "best_epoch": evaluation["epoch"], "test_seconds": evaluation.get("seconds"),
                        **{column: evaluation[column] for column in COST if evaluation.get(column) is not None}})
        stage = _by_model(_stage_records(run_dir))
        if "subnets" not in evaluation:
            runs.append({**row, **(_stage_columns(stage[0]) if stage else {})})
            continue
        for subnet in evaluation["subnets"]:  # AST: one row per sub-net, its density a grid-like key
            k = subnet["subnet"]
            subnet_row = {**row, "subnet": k, "subnet_density": round(subnet["density"], 4),
                          "test_clean_accuracy": subnet["clean_accuracy"], "test_pgd_accuracy": subnet["pgd_accuracy"],
                          **{column: subnet[column] for column in COST if subnet.get(column) is not None}}
            if metrics_path.exists():
                subnet_row.update({"val_clean_accuracy": last[f"val_clean_accuracy_subnet{k}"],
                                   "val_pgd_accuracy": last[f"val_pgd_accuracy_subnet{k}"]})
            runs.append({**subnet_row, **(_stage_columns(stage[k]) if k < len(stage) else {})})
    return pd.DataFrame(runs), (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame())


def grid_keys(runs: pd.DataFrame) -> list[str]:
    reserved = {"run_id", "status", "epochs", "diverged", "best_epoch", "test_seconds", "test_n", "chance",
                "chance_margin", *FINAL, *COST}
    prefixes = (STAGE, *(prefix for hook in hooks() for prefix in hook.prefixes))  # the hooks' columns
    return [c for c in runs.columns if c not in reserved and not c.startswith(prefixes)
            and not c.endswith((" wilson_low", " wilson_high"))]


def stage_metrics(runs: pd.DataFrame) -> list[str]:
    """The evaluation stage's accuracy columns, in the order they first appear."""
    return [c for c in runs.columns if c.startswith(STAGE) and c.endswith("_accuracy")]


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of the final numbers, one row per setting."""
    keys = [k for k in grid_keys(runs) if k != "seed"]
    present = [c for c in FINAL if c in runs] + [c for c in COST if c in runs] + stage_metrics(runs) + \
        [c for hook in hooks() for c in hook.averaged if c in runs]
    grouped = runs.groupby(keys, dropna=False) if keys else runs.assign(_all=0).groupby("_all")
    table = grouped[present].agg(["mean", "std"]) if present else grouped.size().to_frame("_").drop(columns="_")
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns] if present else []
    table["runs"] = grouped.size()
    table["diverged"] = grouped["diverged"].sum() if "diverged" in runs else 0
    # neither done nor diverged: not started, still running, or stopped before its end (a report cannot tell which)
    table["unfinished"] = grouped["status"].apply(lambda s: int((~s.isin(["done", "diverged"])).sum()))
    for low, high in (pair for hook in hooks() for pair in hook.ranges):  # a range over all seeds' epochs
        if low in runs:
            table[low], table[high] = grouped[low].min(), grouped[high].max()
    if f"{STAGE}n" in runs:  # how many runs the evaluation stage covered, on how many points
        table[f"{STAGE}runs"] = grouped[f"{STAGE}n"].count()
        table[f"{STAGE}n"] = grouped[f"{STAGE}n"].max()
        table[f"{STAGE}warnings"] = grouped[f"{STAGE}warnings"].sum()
    return table.reset_index()


def epochs_to_accuracy(runs: pd.DataFrame, curves: pd.DataFrame, thresholds: list[float],
                       column: str = "val_clean_accuracy") -> pd.DataFrame:
    """The first epoch whose ``column`` reaches each threshold, as the median over *all* seeds of a setting.

    A seed that never reaches the level is censored at its last epoch: it counts as later than every epoch it
    ran, never as missing (averaging only the seeds that got there reads like a speed-up). The median is NaN
    when it falls on a censored seed; ``... censored at`` then holds the last epoch, shown as ``>E``.
    ``... reached`` says how many seeds got there.
    """
    keys = [k for k in grid_keys(runs) if k != "seed"]
    merged = curves.merge(runs[["run_id", *keys]], on="run_id")
    rows = []
    for setting, group in (merged.groupby(keys, dropna=False) if keys else [((), merged)]):
        setting = setting if isinstance(setting, tuple) else (setting,)
        row = dict(zip(keys, setting))
        for threshold in thresholds:
            firsts, last_epochs = [], []
            for _, run in group.groupby("run_id"):
                reached = run.loc[run[column] >= threshold, "epoch"]
                firsts.append(float(reached.min()) if len(reached) else math.inf)
                last_epochs.append(int(run["epoch"].max()))
            median = pd.Series(firsts).median()
            name = f"{column} >= {threshold:g}"
            row[name] = median if math.isfinite(median) else float("nan")
            row[f"{name} reached"] = f"{sum(math.isfinite(f) for f in firsts)}/{len(firsts)}"
            row[f"{name} censored at"] = max(last_epochs) if not math.isfinite(median) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def collect_many(sweep_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Several sweeps in one table: a ``sweep`` column (the directory's name) leads the grid keys."""
    names = [d.name for d in sweep_dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in sweep_dirs]
    fixed = [_fixed_overrides(d) for d in sweep_dirs]
    # a field one sweep fixes and another varies or fixes differently tells the sweeps apart: show it
    telling = [key for key in dict.fromkeys(k for f in fixed for k in f)
               if len({repr(f.get(key)) for f in fixed}) > 1]
    all_runs, all_curves = [], []
    for sweep_dir, label, overrides in zip(sweep_dirs, labels, fixed):
        runs, curves = collect(sweep_dir)
        for frame in (runs, curves):
            if not frame.empty:
                frame["run_id"] = label + "/" + frame["run_id"]
        for key in telling:
            if key in overrides and (key not in runs or runs[key].isna().all()):
                runs[key] = [overrides[key]] * len(runs)
        runs.insert(0, "sweep", label)
        all_runs.append(runs)
        all_curves.append(curves)
    return pd.concat(all_runs, ignore_index=True), pd.concat(all_curves, ignore_index=True)


def _fixed_overrides(sweep_dir: Path) -> dict[str, Any]:
    """The ``overrides`` of a sweep directory's sweep.yaml, as field -> value."""
    path = sweep_dir / "sweep.yaml"
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError, OSError) as error:
        raise _unreadable(path, "a sweep file", error) from None
    overrides = data.get("overrides") if isinstance(data, dict) else None
    return _parse_items(overrides if isinstance(overrides, list) else [], f"{path} override")


def write_report(sweep_dir: str | Path | list[str | Path], out: str | Path | None = None,
                 thresholds: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9),
                 robust_thresholds: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8),
                 reference: dict[str, Any] | None = None,
                 correction: stats.Correction | str = stats.Correction.HOLM,
                 family: stats.Family | str = stats.Family.SPLIT) -> Path:
    """The report of one sweep directory, or of several side by side (e.g. a γ study and its baselines).
    ``reference``: the setting paired differences are taken against (by default the first a study's hook names
    that the runs have, e.g. γ = 0: robust_sparse.studies.hooks.default_reference); ``correction`` and
    ``family``: how the p-values of its intervals are adjusted, over which intervals together
    (robust_sparse.studies.stats)."""
    sweep_dirs = [Path(d) for d in (sweep_dir if isinstance(sweep_dir, list) else [sweep_dir])]
    out = Path(out) if out else rundir.report_dir(sweep_dirs[0])  # beside the sweep, never inside it
    rundir.check_owned(out, rundir.Kind.REPORT, "report --out")
    runs, curves = collect(sweep_dirs[0]) if len(sweep_dirs) == 1 else collect_many(sweep_dirs)
    sweep_dir = ", ".join(map(str, sweep_dirs))
    table = aggregate(runs)
    keys = [k for k in grid_keys(runs) if k != "seed"]
    check_reference(runs, keys, reference)
    # claimed only now: a sweep that cannot be read, or a reference no run has, leaves no report folder behind
    rundir.claim(out, rundir.Kind.REPORT, "report --out")
    labels = plots.metric_labels(p for d in sweep_dirs for p in sorted((d / "runs").glob("*")) if p.is_dir())
    write_atomic(out / "runs.csv", with_wilson(runs).to_csv(index=False))
    if not curves.empty:
        write_atomic(out / "curves.csv", curves.to_csv(index=False))  # every run's metrics.csv, one row per run and epoch
    write_atomic(out / "summary.csv", table.to_csv(index=False))
    flags = run_flags(runs)
    lines = [f"# Sweep report: {sweep_dir}", "", f"{len(runs)} runs; {int(runs.get('diverged', pd.Series()).sum())} "
             "diverged (NaN loss or validation accuracy at chance).", ""]
    if flags:
        lines += ["## Read this first", "", *[f"- **{flag}**" for flag in flags], ""]
    lines += ["## Final accuracy, mean ± std over seeds", "", _markdown(table), ""]
    lines += _sampling_section(runs)
    lines += _paired_section(runs, keys, reference, out, correction, family)
    lines += _stage_section(runs)
    if not curves.empty and "probe_perturbed_correlation" in curves and \
            curves["probe_perturbed_correlation"].notna().any():
        lines += _correlation_section(runs, curves, out)
    steps = None

    def context() -> Context:  # what the hooks' sections see, steps included once they are known
        return Context(runs=runs, curves=curves, table=table, keys=keys, labels=labels, reference=reference, out=out,
                       steps=steps, figure=_figure, markdown=_markdown,
                       paired=lambda chosen: paired_table(runs, keys, chosen, correction, family))

    lines += _sections(Place.AFTER_TABLES, context())
    if not curves.empty:
        clean_steps = epochs_to_accuracy(runs, curves, list(thresholds))
        robust_steps = epochs_to_accuracy(runs, curves, list(robust_thresholds), column="val_pgd_accuracy")
        steps = clean_steps.merge(robust_steps, on=keys) if keys else pd.concat([clean_steps, robust_steps], axis=1)
        write_atomic(out / "epochs_to_accuracy.csv", steps.to_csv(index=False))
        lines += ["## Epochs to reach a validation accuracy", "",
                  "Median first epoch over all seeds; a seed that never reached the level counts as later than its "
                  "last epoch (censored), so '>E' means the median seed did not get there within E epochs; "
                  "(reached/seeds) in brackets.",
                  "", _markdown(_with_reached(clean_steps)), "", _markdown(_with_reached(robust_steps)), ""]
        lines += _figure(plots.convergence_figure(runs, curves, keys, labels), out, "convergence.png")
    lines += _sections(Place.AFTER_CONVERGENCE, context())
    if "test_pgd_accuracy" in runs:
        lines += _figure(plots.sparsity_figure(runs, curves, keys, labels), out, "robust_vs_sparsity.png",
                         "## Robust accuracy against sparsity", "Test accuracy of each setting at each density "
                         "(a dense run at 1); mean ± std over seeds.")
    if "test_pgd_accuracy" in runs and "train_flops_vs_dense" in runs:
        lines += _figure(plots.flops_figure(runs, curves, keys, labels), out, "robust_vs_train_flops.png",
                         "## Robust accuracy against training FLOPs", "Test accuracy of each setting against its "
                         "training FLOPs as a fraction of dense training with the same objective and epochs "
                         "(robust_sparse.flops; the dotted line is dense); mean ± std over seeds.")
    write_atomic(out / "report.md", "\n".join(lines))
    return out / "report.md"


# ------------------------------------------------------------------ paired differences and sampling error

TEST_N = {"test_clean_accuracy": "test_n", "test_pgd_accuracy": "test_n"}  # accuracy column -> its points' column


def _points_column(metric: str) -> str | None:
    """The column holding how many test points ``metric`` was measured on (None: not a test accuracy)."""
    if metric in TEST_N:
        return TEST_N[metric]
    return f"{STAGE}n" if metric.startswith(STAGE) and metric.endswith("_accuracy") else None


def paired_metrics(runs: pd.DataFrame) -> list[str]:
    """Every final metric a paired comparison covers: test, validation and evaluation-stage accuracies."""
    return [c for c in FINAL if c in runs] + stage_metrics(runs)


def check_reference(runs: pd.DataFrame, keys: list[str], reference: dict[str, Any] | None) -> None:
    """A ``report --reference`` the runs can be compared against: its keys are grid keys and some run has it."""
    if not reference:
        return
    missing = [key for key in reference if key not in runs]
    if missing:
        raise UserError(f"report --reference {missing[0]}=...: not a grid key of these sweeps "
                        f"(grid keys: {', '.join(k for k in keys) or 'none'})")
    if not stats.is_reference(runs, reference).any():
        text = " ".join(f"{k}={v}" for k, v in reference.items())
        raise UserError(f"report --reference {text}: no run has this setting")


def paired_table(runs: pd.DataFrame, keys: list[str], reference: dict[str, Any] | None = None,
                 correction: stats.Correction | str = stats.Correction.HOLM,
                 family: stats.Family | str = stats.Family.SPLIT) -> pd.DataFrame:
    """Per-seed paired differences of every final metric against ``reference`` (default: default_reference),
    their p-values adjusted per ``family`` (stats.adjust_table)."""
    reference = reference if reference is not None else default_reference(runs)
    if not reference:
        return pd.DataFrame()
    check_reference(runs, keys, reference)
    table = stats.paired_differences(runs, reference, paired_metrics(runs), [k for k in keys if k != "seed"])
    return stats.adjust_table(table, correction, family)


def _families_text(table: pd.DataFrame, correction: stats.Correction) -> str:
    """One sentence per family: its size, the intervals that would exclude 0 by chance, what is established."""
    parts = []
    for name, rows in table.groupby("family", sort=False):
        size = int(rows["family_size"].iloc[0])
        raw = int(((rows["low"].fillna(0) > 0) | (rows["high"].fillna(0) < 0)).sum())
        parts.append(f"**{name}**: {size} intervals, of which {stats.LEVEL:.0%} ({stats.LEVEL * size:.1f}) would "
                     f"exclude 0 by chance if nothing differed; {raw} exclude 0 before adjustment, "
                     f"{int(rows['established'].sum())} established after the {correction.value} adjustment")
    return "; ".join(parts) + "."


def _paired_section(runs: pd.DataFrame, keys: list[str], reference: dict[str, Any] | None, out: Path,
                    correction: stats.Correction | str = stats.Correction.HOLM,
                    family: stats.Family | str = stats.Family.SPLIT) -> list[str]:
    reference = reference if reference is not None else default_reference(runs)
    correction, family = stats.Correction(correction), stats.Family(family)
    table = paired_table(runs, keys, reference, correction, family)
    if table.empty:
        return []
    write_atomic(out / "paired.csv", table.to_csv(index=False))
    ref_text = ", ".join(f"{plots.display_name(k)}={plots.format_value(k, v)}" for k, v in reference.items())
    settings = [c for c in table.columns if c not in stats.PAIRED_COLUMNS]
    adjusted = correction is not stats.Correction.NONE
    shown = table.assign(
        interval=[f"[{lo:+.4f}, {hi:+.4f}]" if lo == lo else "-" for lo, hi in zip(table["low"], table["high"])],
        p=[f"{p:.3g}" if p == p else "-" for p in table["p"]],
        consistent=[f"{k} of {n}" for k, n in zip(table["consistent"], table["n"])])
    columns = [*settings, "metric", "n", "differences", "mean", "interval", "p"]
    if adjusted:
        shown[f"p {correction.value}"] = [f"{p:.3g}" if p == p else "-" for p in table["p_adjusted"]]
        shown["simultaneous interval"] = [f"[{lo:+.4f}, {hi:+.4f}]" if lo == lo else "-"
                                          for lo, hi in zip(table["low_adjusted"], table["high_adjusted"])]
        columns += [f"p {correction.value}", "simultaneous interval"]
    shown = shown[[*columns, "consistent", "established"]]
    sentences = []
    for row in table[table["metric"].str.startswith(("test_", STAGE))].to_dict("records"):
        label = plots.setting_label(settings, [row[k] for k in settings]) or "all runs"
        sentences.append("- " + stats.paired_sentence(row, label, ref_text, row["metric"].replace("_", " ")))
    treated = table.drop_duplicates(settings).shape[0] if settings else 1
    family_text = {stats.Family.SPLIT: "every test-set interval of this report together (test and evaluation-stage "
                                       "metrics), and every validation interval together apart from them",
                   stats.Family.METRIC: "the intervals of one metric across every setting",
                   stats.Family.REPORT: "every interval of this report"}[family]
    method = {stats.Correction.HOLM: "Holm's step-down adjustment (family-wise error 5%, valid under any "
                                     "dependence between the comparisons)",
              stats.Correction.BH: "the Benjamini-Hochberg adjustment (false discovery rate 5%)",
              stats.Correction.NONE: "no adjustment (each interval on its own: expect false positives)"}[correction]
    return ["## Paired differences against " + ref_text, "",
            f"Each setting minus the {ref_text} run of the same seed (and the same value of every key on which the "
            "reference runs vary); mean over seeds, paired 95% t interval (n - 1 degrees of freedom), the two-sided "
            "paired t test's p-value, and the seeds whose difference has the mean's sign. With 3 seeds the t "
            "quantile is 4.30: only an effect steady across seeds gets there. paired.csv holds the table.", "",
            f"**Many comparisons.** Families (corrected together): {family_text}. P-values are adjusted with "
            f"{method}; 'established' means the adjusted p-value is below 0.05"
            + ("; the simultaneous interval is Bonferroni's (each at 1 - 0.05/family size): one clear of 0 is "
               "established, and Holm may establish a little more." if adjusted else ".") + " "
            + _families_text(table, correction), "",
            f"**Shared reference.** All {treated} settings are compared with the {ref_text} run of their seed (of "
            "their value of every key the reference runs vary on): the comparisons that share a reference run "
            "share its value, so they are correlated, not independent tests (Holm's adjustment does not assume "
            "independence).", "",
            _markdown(shown), "", *sentences, ""]


def with_wilson(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``<metric> wilson_low`` and ``<metric> wilson_high`` beside every test accuracy: its 95%
    Wilson interval on the points it was measured on."""
    runs = runs.copy()
    for metric in [m for m in paired_metrics(runs) if _points_column(m) in runs]:
        bounds = [stats.wilson_interval(a, int(n)) if n == n and a == a else (math.nan, math.nan)
                  for a, n in zip(runs[metric], runs[_points_column(metric)])]
        runs[f"{metric} wilson_low"] = [low for low, _ in bounds]
        runs[f"{metric} wilson_high"] = [high for _, high in bounds]
    return runs


def _sampling_section(runs: pd.DataFrame) -> list[str]:
    """Each run's test accuracies with their 95% Wilson intervals on the points they were measured on: the
    sampling error of one run, beside the seed-to-seed spread of the summary."""
    metrics = [m for m in paired_metrics(runs) if _points_column(m) in runs]
    if not metrics:
        return []
    keys = [k for k in grid_keys(runs)]
    shown = runs[[c for c in ("run_id", *keys) if c in runs and c != "run_id"]].copy()
    for metric in metrics:
        shown[metric.replace("_accuracy", "").replace("_", " ")] = [
            stats.format_wilson(a, int(n)) if n == n else "-"
            for a, n in zip(runs[metric], runs[_points_column(metric)])]
    sizes = sorted({int(n) for m in metrics for n in runs[_points_column(m)].dropna()})
    half = [f"n = {n}: up to ±{100 * (stats.wilson_interval(0.5, n)[1] - 0.5):.1f} points" for n in sizes]
    return ["## Test accuracy of each run with its sampling error", "",
            "Accuracy [95% Wilson interval] on the n test points it was measured on (" + "; ".join(half) +
            "): the binomial error of one run, before any seed-to-seed spread.", "", _markdown(shown), ""]


def write_stored_report(runs_csv: str | Path, out: str | Path, reference: dict[str, Any] | None = None,
                        test_n: int | None = None, correction: stats.Correction | str = stats.Correction.HOLM,
                        family: stats.Family | str = stats.Family.SPLIT,
                        thresholds: tuple[float, ...] | None = None,
                        robust_thresholds: tuple[float, ...] | None = None) -> Path:
    """The statistics of a report from its stored ``runs.csv`` alone (a study whose run directories are gone):
    each run's test accuracies with Wilson intervals and the paired differences, in ``paired.md`` and
    ``paired.csv`` under ``out``. ``test_n``: the test points behind ``test_*`` accuracies where the file does
    not record them (a ``test_n`` column, written by reports since the paired analysis)."""
    runs_csv, out = Path(runs_csv), Path(out)
    if not runs_csv.is_file():
        raise UserError(f"{runs_csv}: no such file (a runs.csv written by robust-sparse report)")
    runs = _read_csv(runs_csv, "a sweep report's runs.csv")
    if "run_id" not in runs or "seed" not in runs:
        raise UserError(f"{runs_csv} is not a sweep report's runs.csv (needs run_id and seed columns)")
    if "test_n" not in runs or runs["test_n"].isna().all():
        if test_n is None and "test_clean_accuracy" in runs:
            raise UserError(f"{runs_csv} does not record how many test points its accuracies used: give --test-n N")
        runs["test_n"] = test_n
    keys = grid_keys(runs)
    check_reference(runs, keys, reference)
    curves_csv = runs_csv.parent / "curves.csv"
    curves = (_read_csv(curves_csv, "a sweep report's curves.csv")
              if (thresholds or robust_thresholds) and curves_csv.is_file() else None)
    # claimed only now: an unreadable file or a reference no run has leaves no report folder behind
    rundir.claim(out, rundir.Kind.REPORT, "report --out")
    lines = [f"# Paired analysis of {runs_csv}", "", f"{len(runs)} runs, regenerated from the stored runs.csv (no "
             "retraining); test accuracies on " + (f"{test_n} points (--test-n)" if test_n else "test_n points") +
             ".", ""]
    lines += (_paired_section(runs, keys, reference, out, correction, family)
              or ["No reference setting: give --reference KEY=VALUE.", ""])
    lines += _sampling_section(runs)
    if curves is not None:  # the epochs table again, at other levels
        tables = [epochs_to_accuracy(runs, curves, list(levels), column=column)
                  for levels, column in ((thresholds, "val_clean_accuracy"), (robust_thresholds, "val_pgd_accuracy"))
                  if levels]
        write_atomic(out / "epochs_to_accuracy.csv", pd.concat(tables, axis=1).loc[
            :, lambda frame: ~frame.columns.duplicated()].to_csv(index=False))
        lines += ["## Epochs to reach a validation accuracy", "",
                  f"From the stored curves.csv at the levels given (--thresholds, --robust-thresholds). Median first "
                  "epoch over all seeds; a seed that never reached the level counts as later than its last epoch "
                  "(censored), so '>E' means the median seed did not get there within E epochs; (reached/seeds) in "
                  "brackets.", "", *[line for table in tables for line in (_markdown(_with_reached(table)), "")]]
    write_atomic(out / "paired.md", "\n".join(lines))
    return out / "paired.md"


def _sections(place: Place, context: Context) -> list[str]:
    """Every hook's section at ``place``, in the order the hooks registered."""
    return [line for hook in hooks() if place in hook.sections for line in hook.sections[place](context)]


def _figure(figure: Any, out: Path, name: str, heading: str = "", text: str = "") -> list[str]:
    """Save ``figure`` (None: the question does not arise here) and return the report's lines that show it."""
    if figure is None:
        return []
    plots.save(figure, out / name)
    alt = name.removesuffix(".png").replace("_", " ")
    return ([heading, ""] if heading else []) + ([text, ""] if text else []) + [f"![{alt}]({name})", ""]


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")


def _stage_section(runs: pd.DataFrame) -> list[str]:
    """The sweep's evaluation stage (robust-sparse eval on best.pt): mean ± std over the runs it covered."""
    metrics = stage_metrics(runs)
    if not metrics:
        return []
    keys = [k for k in grid_keys(runs) if k != "seed"]
    covered = runs[runs[f"{STAGE}n"].notna()]
    rows = []
    for setting, group in (covered.groupby(keys, dropna=False) if keys else [((), covered)]):
        setting = setting if isinstance(setting, tuple) else (setting,)
        rows.append({**dict(zip(keys, setting)), "runs": len(group), "n": int(group[f"{STAGE}n"].max()),
                     **{m[len(STAGE):].replace("_accuracy", "").replace("_", " "): _mean_std(group[m])
                        for m in metrics},
                     "warnings": int(group[f"{STAGE}warnings"].sum()) if f"{STAGE}warnings" in group else 0})
    return ["## Evaluation stage (robust-sparse eval on each run's best.pt)", "",
            "Accuracy on the first n test points; mean ± std over the runs evaluated (no ± for one run). The "
            "attacks run standalone (each on every point); worst = robust to all of them; warnings = gradient-masking "
            "checks of robust-sparse eval that fired (in each run's sweep_eval.json).", "",
            _markdown(pd.DataFrame(rows)), ""]


PROBE = ("probe_perturbed_correlation", "probe_snapshot_cosine", "probe_snapshot_correlation", "probe_c_hat")


def correlation_table(runs: pd.DataFrame, curves: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The gradient-correlation probe per setting: each run's values at its last probed epoch, then per sparse
    method, sparsity (1 - the measured density; a dense run at 0, shown on every method's line) and any other key
    that varies (the objective, say), the mean, std and 95% t interval over seeds; and the keys that varied."""
    logged = curves.dropna(subset=["probe_perturbed_correlation"])
    last = logged.sort_values("epoch").groupby("run_id").tail(1)
    keys = [k for k in grid_keys(runs) if k not in ("seed", "sparsity.density", "sparsity.method", "sweep")]
    frame = last.merge(runs.drop_duplicates("run_id")[["run_id", *[k for k in ("sparsity.method", *keys)
                                                                   if k in runs]]], on="run_id")
    density = frame["density"] if "density" in frame else pd.Series(1.0, index=frame.index)
    frame["sparsity"] = (1 - density.fillna(1.0)).round(2)
    if "sparsity.method" not in frame:
        frame["sparsity.method"] = "none"
    varying = [k for k in keys if k in frame and frame[k].astype(str).nunique() > 1]
    methods = [m for m in frame["sparsity.method"].astype(str).unique() if m != "none"] or ["none"]
    dense = frame[frame["sparsity.method"].astype(str) == "none"]
    # the dense runs are every method's 0% point
    frame = pd.concat([frame[frame["sparsity.method"].astype(str) != "none"],
                       *[dense.assign(**{"sparsity.method": m}) for m in methods]], ignore_index=True)
    rows = []
    for setting, group in frame.groupby(["sparsity.method", *varying, "sparsity"], dropna=False, sort=True):
        row = dict(zip(["sparsity.method", *varying, "sparsity"], setting))
        row["runs"] = len(group)
        for metric in PROBE:
            mean, low, high = stats.mean_interval(group[metric].dropna().tolist())
            if metric != "probe_c_hat":  # a correlation or cosine: its interval clipped to where it can lie
                low, high = max(low, -1.0), min(high, 1.0)
            row.update({f"{metric} mean": mean, f"{metric} std": group[metric].std(), f"{metric} low": low,
                        f"{metric} high": high})
        row["epoch"] = int(group["epoch"].max())
        rows.append(row)
    return pd.DataFrame(rows), varying


def _correlation_section(runs: pd.DataFrame, curves: pd.DataFrame, out: Path) -> list[str]:
    table, varying = correlation_table(runs, curves)
    write_atomic(out / "correlation.csv", table.to_csv(index=False))
    shown = table[["sparsity.method", *varying, "sparsity", "runs"]].copy()
    for metric in PROBE:
        shown[metric.replace("probe_", "").replace("_", " ")] = [
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo else (f"{m:.3f}" if m == m else "-")
            for m, lo, hi in zip(table[f"{metric} mean"], table[f"{metric} low"], table[f"{metric} high"])]
    lines = ["## Gradient correlation against sparsity (the probe)", "",
             "robust_sparse/probe.py at each run's last probed epoch: the Pearson correlation of the gradient with "
             "the gradient after a Gaussian perturbation of the active weights (probe.perturbation x each layer's "
             "active RMS; the paper's Table 9 quantity as this toolkit reads it), the cosine and correlation of the "
             "gradient with that of the weights at the start of the epoch (what AGENT's c_t stands for), and the "
             "loss-based c_hat AGENT would compute from the probe batches; mean [95% t interval] over seeds (clipped to "
             "[-1, 1] for the correlations and cosines). "
             "correlation.csv holds the table.", "", _markdown(shown), ""]
    return lines + _figure(plots.correlation_figure(table, varying), out, "correlation.png",
                           "", "The dashed grey lines are the paper's Table 9 (ResNet-50 on CIFAR-100, its own "
                           "perturbation), for the direction of the trend, not its level.")


def _with_reached(steps: pd.DataFrame) -> pd.DataFrame:
    """Fold each threshold's columns into one cell: ``2 (3/3)``, or ``>4 (1/3)`` when the median seed never got
    there within its 4 epochs."""
    table = steps.copy()
    for column in [c for c in table.columns if c.endswith(" reached")]:
        base = column[: -len(" reached")]
        censored = table[f"{base} censored at"]
        table[base] = [(f">{int(last)}" if pd.isna(value) else f"{value:g}") + f" ({reached})"
                       for value, last, reached in zip(table[base], censored, table[column])]
        table = table.drop(columns=[column, f"{base} censored at"])
    return table


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
