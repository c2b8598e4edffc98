"""``robust-sparse report``: Markdown tables and PNG plots from one or more results stores.

Writes ``report.md`` with the results, the per-attack breakdown, the gradient-masking warnings (stored ones
and a non-monotone-in-eps check across the stored rows) and, per dataset and threat model, our results
placed among the curated leaderboard rows with a *comparable* column; and plots of robust accuracy against
sparsity (leaderboard rows as reference) and of accuracy against eps.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from robust_sparse.files import rundir
from robust_sparse.files.atomic import save_figure, write_atomic
from robust_sparse.errors import UserError
from robust_sparse.eval.intervals import wilson_interval
from robust_sparse.eval.leaderboard import differences, load_leaderboard
import robust_sparse.eval.corruptions as corruptions
import robust_sparse.eval.tradeoff as tradeoff
from robust_sparse.eval.sanity import checks_summary, monotone_warnings
from robust_sparse.eval.spread import GROUP as SPREAD_GROUP, seed_spread
from robust_sparse.eval.store import RESULTS_JSON, load_results

IDENTITY = ["model", "model_fingerprint", "dataset", "threat_model", "eps", "n_examples", "seed", "attacks", "mode"]


def collect(results_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """All rows of the given stores; a rerun of the same evaluation keeps only its latest row."""
    frames = []
    for directory in results_dirs:
        directory = Path(directory)
        if not (directory / RESULTS_JSON).is_file() and (directory / "eval" / RESULTS_JSON).is_file():
            directory = directory / "eval"  # a run directory: its evaluations are in eval/
        if not (directory / RESULTS_JSON).is_file():
            hint = (f"; {directory} is a run directory: run robust-sparse eval {directory / 'best.pt'} first"
                    if (directory / "best.pt").is_file() else "; run robust-sparse eval first")
            raise UserError(f"no results in {directory} (expected {RESULTS_JSON}){hint}")
        try:
            frames.append(load_results(directory))
        except (UnicodeDecodeError, OSError) as error:  # a store is a file anyone may have damaged or replaced
            why = (f"not UTF-8 text (byte {error.start}): a binary or damaged file"
                   if isinstance(error, UnicodeDecodeError) else rundir.describe(error))
            raise UserError(f"{directory / RESULTS_JSON}: cannot read it as a results store ({why})") from None
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.drop_duplicates(subset=IDENTITY, keep="last").reset_index(drop=True)
    frame["per_attack"] = [v if isinstance(v, dict) else {} for v in frame["per_attack"]]
    frame["warnings"] = [v if isinstance(v, list) else [] for v in frame["warnings"]]
    return frame


def headline(row: pd.Series) -> tuple[str, float]:
    """The number a result is compared by: AutoAttack if run, else its PGD, else the worst case; for the
    corruptions track its aggregate."""
    if row.get("threat_model") == corruptions.THREAT:
        return corruptions.mean_of(row)
    if _present(row.get("autoattack_acc")):
        return "AutoAttack", float(row["autoattack_acc"])
    if _present(row.get("pgd_acc")):
        return str(row["pgd_attack"]), float(row["pgd_acc"])
    return "worst case", float(row["worst_acc"])


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}" if _present(value) else ""


def _wilson(value: Any, n: Any) -> str:
    """The 95% Wilson interval of an accuracy on ``n`` points, in %: ``[81.2, 87.5]`` (empty without both)."""
    if not _present(value) or not _present(n) or int(n) <= 0:
        return ""
    low, high = wilson_interval(float(value), int(n))
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _intervals(row: pd.Series) -> str:
    """The sampling error of a result row's accuracies: ``clean [..]; PGD [..]; ...`` on its n points; a
    corruptions row's mean has its own (:func:`_attack_interval`)."""
    if row["threat_model"] == corruptions.THREAT:
        label, value = corruptions.mean_of(row)
        parts = [("clean", _wilson(row["clean_acc"], row["n_examples"])), ("mean", _attack_interval(row, label, value))]
    else:
        parts = [(name, _wilson(row[column], row["n_examples"])) for name, column in
                 (("clean", "clean_acc"), ("PGD", "pgd_acc"), ("AA", "autoattack_acc"), ("worst", "worst_acc"))]
    return "; ".join(f"{name} {interval}" for name, interval in parts if interval)


def _attack_interval(row: pd.Series, label: str, value: Any) -> str:
    """The 95% interval of a per-attack accuracy: Wilson on the n points, except for the corruptions aggregate, a
    mean over cells of the same images, whose t interval over the images is stored with it
    (robust_sparse.eval.corruptions); none for a row written before that was."""
    if row["threat_model"] == corruptions.THREAT and "/" not in label:
        interval = corruptions.interval_of(row)
        return f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}] (t over images)" if interval else "not recorded"
    return _wilson(value, row["n_examples"])


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def build_report(results_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
                 leaderboard: str | Path | None = None, exports: Sequence[str | Path] = ()) -> Path:
    """Write ``report.md`` and the plots into ``out_dir`` (default: a new folder beside the first results
    directory, :func:`robust_sparse.files.rundir.report_dir`); ``exports``: dynamic AST export folders whose measured
    latencies the AST trade-off section shows (:mod:`robust_sparse.eval.tradeoff`)."""
    frame = collect(results_dirs)
    try:
        board = load_leaderboard(leaderboard)
    except (UnicodeDecodeError, pd.errors.ParserError) as error:
        why = (f"not UTF-8 text (byte {error.start}): a binary or damaged file"
               if isinstance(error, UnicodeDecodeError) else str(error).strip().splitlines()[0])
        raise UserError(f"report --leaderboard {leaderboard}: cannot read it as a leaderboard CSV ({why})") from None
    latency = tradeoff.exported_latency(exports)  # every --exports folder read and checked before the claim
    if exports and not any(tradeoff.SUBNET.match(str(model)) for model in frame["model"]):
        raise UserError("report --exports: the results hold no AST sub-net rows (robust-sparse eval an AST "
                        "checkpoint first)")
    out = Path(out_dir) if out_dir is not None else rundir.report_dir(results_dirs[0])
    # claimed only now, once every input is read and checked: a refused report leaves no folder behind
    rundir.claim(out, rundir.Kind.REPORT, "report --out")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# robust-sparse evaluation report", "",
        f"Generated {now} from {', '.join(str(d) for d in results_dirs)}: {len(frame)} results; "
        f"{len(board)} leaderboard rows. Accuracies in %. Each attack's accuracy is its own (standalone mode) "
        "unless the mode says chained; *worst case* is the pointwise minimum over the attacks run. *train FLOPs* and "
        "*inference FLOPs* are against dense (training: the same objective and epochs, counted up to the evaluated "
        "checkpoint's epoch, so a best.pt's can be below its run's eval.json; robust_sparse.flops). An "
        "accuracy on n points carries binomial sampling error: its 95% Wilson interval is beside it (the corruptions "
        "mean, over cells of the same images, has a t interval over the images instead); seed = the "
        "attacks' seed (PGD's random starts and AutoAttack's).", "",
        "## Results", "",
    ]
    lines += _table(
        ["model", "source", "dataset", "threat", "eps", "n", "clean", "PGD", "AutoAttack", "worst case", "sparsity",
         "non-zero params", "train FLOPs", "inference FLOPs", "time (s)", "device", "mode", "seed",
         "95% Wilson intervals on the n points"],
        [[r["model"], r["source"], r["dataset"], r["threat_model"], f"{float(r['eps']):.4g}", r["n_examples"],
          _pct(r["clean_acc"]), f"{_pct(r['pgd_acc'])} ({r['pgd_attack']})" if _present(r["pgd_acc"]) else "",
          _pct(r["autoattack_acc"]), _pct(r["worst_acc"]), f"{100 * float(r['sparsity']):.2f}%",
          f"{int(r['nonzero_params']):,}", _versus_dense(r.get("train_flops_vs_dense")),
          _versus_dense(r.get("inference_flops_vs_dense")), f"{float(r['wall_seconds']):.1f}", r["device"], r["mode"],
          r["seed"] if _present(r.get("seed")) else "", _intervals(r)]
         for _, r in frame.iterrows()])
    lines += ["", "## Per-attack breakdown", ""]
    breakdown = [[r["model"], r["dataset"], r["threat_model"], f"{float(r['eps']):.4g}", label, _pct(value),
                  _attack_interval(r, label, value)]
                 for _, r in frame.iterrows() for label, value in r["per_attack"].items()]
    lines += _table(["model", "dataset", "threat", "eps", "attack", "accuracy", "95% interval"], breakdown)
    spread = seed_spread(frame)
    spread = spread[spread["seeds"] > 1]
    if len(spread):  # evaluated under several attack seeds (eval --seeds): how much the random starts alone move
        lines += ["", "## Spread over attack seeds", "",
                  "Rows that differ only in the attacks' seed, per metric: mean, sample standard deviation (n - 1), "
                  "min and max over the seeds (robust_sparse.eval.spread).", ""]
        lines += _table(["model", "dataset", "threat", "eps", "n", "metric", "seeds", "mean", "std", "min", "max"],
                        [[r["model"], r["dataset"], r["threat_model"], f"{float(r['eps']):.4g}", r["n_examples"],
                          r["metric"], f"{r['seeds']} ({r['seed_list']})", _pct(r["mean"]), _pct(r["std"]),
                          _pct(r["min"]), _pct(r["max"])] for _, r in spread.iterrows()])
    cross = [r for _, r in frame.iterrows() if isinstance(r.get("cross_check"), dict)]
    if cross:
        lines += ["", "### torchattacks-AA (configured to match) against the original AutoAttack", ""]
        lines += _table(["model", "eps", "n", "original AA", "torchattacks-AA", "difference (points)", "points disagreeing"],
                        [[r["model"], f"{float(r['eps']):.4g}", r["n_examples"], _pct(r["cross_check"]["autoattack_acc"]),
                          _pct(r["cross_check"]["torchattacks_acc"]), f"{100 * r['cross_check']['difference']:+.2f}",
                          r["cross_check"]["points_disagreeing"]] for r in cross])
    lines += ["", "## Gradient-masking checks", ""]
    warnings = [f"- **{r['model']}** ({r['dataset']} {r['threat_model']} eps={float(r['eps']):.4g}): {w}"
                for _, r in frame.iterrows() for w in r["warnings"]]
    monotone = _monotone(frame)
    warnings += [f"- {w}" for w in monotone]
    # each sentence states only what the stored rows support (robust_sparse.eval.sanity.checks_summary)
    summary = " ".join(checks_summary(frame, monotone_fired=len(monotone)))
    lines += warnings + ([""] if warnings and summary else []) + ([summary] if summary else [])
    lines += corruptions.report_lines(frame)
    ast_lines, plots = tradeoff.report_lines(frame, out, headline, latency)
    lines += ast_lines
    for (dataset, threat), group in frame.groupby(["dataset", "threat_model"], sort=True):
        lines += ["", f"## Leaderboard comparison: {dataset} {threat}", ""]
        lines += _comparison(group, board[(board["dataset"] == dataset) & (board["threat_model"] == threat)])
        image = _plot_sparsity(group, board, dataset, threat, out)
        plots.append(image)
        lines += ["", f"![{'corruption' if threat == corruptions.THREAT else 'robust'} accuracy against sparsity]"
                      f"({image.name})"]
        eps_image = _plot_eps(group, dataset, threat, out)
        if eps_image is not None:
            plots.append(eps_image)
            lines += ["", f"![accuracy against eps]({eps_image.name})"]
    path = out / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _monotone(frame: pd.DataFrame) -> list[str]:
    rows = []
    for _, r in frame.iterrows():
        for label, value in r["per_attack"].items():
            if "/" in label:
                continue
            rows.append({"model": r["model"], "fingerprint": r["model_fingerprint"], "dataset": r["dataset"],
                         "threat": r["threat_model"], "n": r["n_examples"], "seed": r["seed"], "attack": label,
                         "eps": float(r["eps"]), "accuracy": float(value)})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return []
    warnings = []
    for _, group in frame.groupby(["model", "fingerprint", "dataset", "threat", "n", "seed"], sort=False):
        first = group.iloc[0]
        warnings += monotone_warnings(group, ["attack"],
                                      prefix=f"**{first['model']}** ({first['dataset']} {first['threat']}, across eps): ")
    return warnings


def _versus_dense(ratio: Any) -> str:
    """A cost against dense (robust_sparse.flops), e.g. ``0.123x``; blank where the store has none (an old row, a
    model not trained here)."""
    return f"{float(ratio):.3g}x" if _present(ratio) else ""


def _comparison(ours: pd.DataFrame, board: pd.DataFrame) -> list[str]:
    """Our rows among the leaderboard rows of the same dataset and threat model, by robust accuracy."""
    entries = []
    for _, r in ours.iterrows():
        attack, value = headline(r)
        entries.append({"entry": f"**{r['model']}**", "kind": "this project", "architecture": r["architecture"],
                        "sparsity": 100 * float(r["sparsity"]), "attack": attack, "eps": f"{float(r['eps']):.4g}",
                        "n": int(r["n_examples"]), "clean": _pct(r["clean_acc"]), "robust": 100 * value,
                        "comparable": "", "source": r["path"], "date": str(r["timestamp"])[:10]})
    for _, entry in board.iterrows():
        verdicts = []
        for _, r in ours.iterrows():
            for label in r["per_attack"]:
                if "/" in label:
                    continue
                reasons = _differences(entry.to_dict(), r, label)
                verdicts.append((len(reasons), reasons, r["model"], label))
        verdicts.sort(key=lambda v: v[0])
        matches = sorted({f"{model} ({label})" for count, _, model, label in verdicts if count == 0})
        if matches:
            comparable = "yes: " + ", ".join(matches)
        elif verdicts:
            comparable = "no: " + "; ".join(verdicts[0][1])
        else:
            comparable = "no"
        n = entry["n_examples"]
        entries.append({"entry": entry["name"], "kind": entry["kind"], "architecture": entry["architecture"],
                        "sparsity": float(entry["sparsity"]) * 100 if _present(entry["sparsity"]) else float("nan"),
                        "attack": entry["attack"], "eps": entry["eps_text"], "n": int(n) if _present(n) else "?",
                        "clean": f"{entry['clean_acc']:.2f}" if _present(entry["clean_acc"]) else "",
                        "robust": float(entry["robust_acc"]), "comparable": comparable,
                        "source": f"[link]({entry['source_url']})", "date": entry["source_date"]})
    if len(entries) == len(ours):
        return ["No leaderboard rows for this dataset and threat model.", ""] + _entries_table(entries)
    entries.sort(key=lambda e: -e["robust"])
    return _entries_table(entries)


def _entries_table(entries: list[dict[str, Any]]) -> list[str]:
    header = ["entry", "kind", "architecture", "sparsity", "attack", "eps", "n", "clean", "robust", "comparable",
              "source", "date"]
    rows = []
    for e in entries:
        sparsity = f"{e['sparsity']:.1f}%" if _present(e["sparsity"]) else "?"
        rows.append([e["entry"], e["kind"], e["architecture"], sparsity, e["attack"], e["eps"], e["n"], e["clean"],
                     f"{e['robust']:.2f}", e["comparable"], e["source"], e["date"]])
    return _table(header, rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_sparsity(ours: pd.DataFrame, board: pd.DataFrame, dataset: str, threat: str, out: Path) -> Path:
    figure = sparsity_figure(ours, board, dataset, threat)
    path = out / f"robust_vs_sparsity_{dataset}_{threat}.png"
    save_figure(figure, path, dpi=120)
    _pyplot().close(figure)
    return path


def sparsity_figure(ours: pd.DataFrame, board: pd.DataFrame, dataset: str, threat: str) -> Any:
    """Our results (stars) among the leaderboard's rows of ``dataset`` and ``threat``: the headline accuracy
    (:func:`headline`) in % against sparsity; for the corruptions track the corruption accuracy (the mean over its
    corruptions and severities), which no attack or eps belongs to."""
    plt = _pyplot()
    corrupted = threat == corruptions.THREAT
    measure = "corruption accuracy" if corrupted else "robust accuracy"
    board = board[(board["dataset"] == dataset) & (board["threat_model"] == threat)]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    markers = {"robustbench": "o", "reevaluation": "s", "paper": "^"}
    board = board.assign(comparable=[_comparable_with_any(entry, ours) for entry in board.to_dict("records")])
    for (kind, comparable), rows in board[board["sparsity"].notna()].groupby(["kind", "comparable"]):
        attacks = ", ".join(sorted(set(rows["attack"])))
        axes.scatter(100 * rows["sparsity"], rows["robust_acc"], marker=markers.get(kind, "o"),
                     facecolors="tab:blue" if comparable else "none", edgecolors="tab:blue" if comparable else "tab:gray",
                     label=f"{kind}, {'comparable' if comparable else 'not comparable'} ({attacks[:50]})")
    for index, (_, entry) in enumerate(board[board["sparsity"].isna()].iterrows()):
        axes.axhline(entry["robust_acc"], linestyle=":", color=("tab:green", "tab:purple", "tab:olive", "tab:cyan")[index % 4],
                     label=f"{entry['name']} ({entry['attack']}, sparsity not given)")
    # one star per evaluation: the rows of its attack seeds (eval --seeds) give its mean, with a bar from the
    # lowest to the highest seed, not a star each
    keys = [key for key in SPREAD_GROUP if key in ours]
    evaluations = []
    for _, rows in ours.groupby(keys, sort=False, dropna=False):
        rows = rows.drop_duplicates("seed", keep="last") if "seed" in rows else rows
        headlines = [headline(r) for _, r in rows.iterrows()]
        evaluations.append((rows.iloc[0], headlines[0][0], [100 * value for _, value in headlines]))
    several = any(len(accuracies) > 1 for _, _, accuracies in evaluations)
    for index, (r, attack, accuracies) in enumerate(evaluations):
        x, mean = 100 * float(r["sparsity"]), sum(accuracies) / len(accuracies)
        if len(accuracies) > 1:
            axes.errorbar([x], [mean], yerr=[[mean - min(accuracies)], [max(accuracies) - mean]], color="tab:red",
                          capsize=4, zorder=4)
        axes.scatter([x], [mean], marker="*", s=180, color="tab:red", zorder=5,
                     label=("this project" + (" (bar: min to max over attack seeds)" if several else ""))
                     if index == 0 else None)
        seeds = f", mean of {len(accuracies)} attack seeds" if len(accuracies) > 1 else ""
        right = x > 50  # labels of sparse models go to the left of their star, inside the axes
        what = f"mean over {attack}" if corrupted else f"{attack}, eps {float(r['eps']):.3g}{seeds}"
        axes.annotate(f"{r['model']} ({what})", (x, mean),
                      textcoords="offset points", xytext=(-8 if right else 6, 4), ha="right" if right else "left",
                      fontsize=7)
    axes.set_xlabel("sparsity (% of conv/linear weights that are zero)")
    axes.set_ylabel(f"{measure} (%)" + (": mean over corruptions and severities" if corrupted else ""))
    axes.set_title(f"{dataset} {threat}: {measure} against sparsity")
    axes.set_xlim(-3, 103)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def _comparable_with_any(entry: dict[str, Any], ours: pd.DataFrame) -> bool:
    return any(not _differences(entry, r, label)
               for _, r in ours.iterrows() for label in r["per_attack"] if "/" not in label)


def _differences(entry: dict[str, Any], ours: pd.Series, attack: str) -> list[str]:
    """Why ``entry`` is not comparable with our result row ``ours`` under ``attack``."""
    return differences(entry, dataset=ours["dataset"], threat_model=ours["threat_model"], eps=float(ours["eps"]),
                       attack=attack, n_examples=int(ours["n_examples"]), train_images=ours.get("train_images"),
                       epochs=ours.get("epochs"), selection=ours.get("selection"), epoch=ours.get("epoch"),
                       estimator=ours.get("estimator"))


def _plot_eps(ours: pd.DataFrame, dataset: str, threat: str, out: Path) -> Path | None:
    rows = [(r["model"], float(r["eps"]), label, 100 * float(v)) for _, r in ours.iterrows()
            for label, v in {"clean": r["clean_acc"], **r["per_attack"], "worst case": r["worst_acc"]}.items()
            if "/" not in label]
    frame = pd.DataFrame(rows, columns=["model", "eps", "attack", "accuracy"])
    if frame.empty or frame.groupby("model")["eps"].nunique().max() < 2:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for (model, attack), group in frame.groupby(["model", "attack"], sort=False):
        group = group.groupby("eps", as_index=False)["accuracy"].min()
        axes.plot(group["eps"], group["accuracy"], marker="o", label=f"{model}: {attack}")
    axes.set_xlabel(f"eps ({threat})")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{dataset} {threat}: accuracy against eps")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path = out / f"accuracy_vs_eps_{dataset}_{threat}.png"
    save_figure(figure, path, dpi=120)
    plt.close(figure)
    return path

