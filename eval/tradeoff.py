"""AST's trade-off in a report: one trained weight tensor, several sub-nets, accuracy against what each costs.

``robust-sparse eval`` of an AST checkpoint stores one row per sub-net (its model name ends in ``/subnet<k>``).
This module gathers those rows per checkpoint and draws clean and robust accuracy against each sub-net's density
and, where an export of the same checkpoint is given (``report --exports DIR``: its ``export.json`` of
``kind: ast-dynamic`` holds the latency measured at export, :mod:`robust_sparse.sparse.export`), against its
measured sparse-inference latency at batch 1. Latency is a property of the machine that measured it, so the
figure and the table say which export each number comes from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from robust_sparse.files.atomic import save_figure
from robust_sparse.errors import UserError

SUBNET = re.compile(r"^(?P<base>.+)/subnet(?P<k>\d+)$")
COLUMNS = ["model", "subnet", "path", "dataset", "threat_model", "eps", "n_examples", "density", "clean_acc",
           "robust_acc", "robust_attack", "latency_ms", "dense_latency_ms", "latency_source"]


# headline(row) -> (attack, accuracy): the report's choice of the number a row is compared by (AutoAttack if run,
# else PGD, else the worst case), passed in so that this module does not import the report back
Headline = Callable[[pd.Series], "tuple[str, float]"]


def exported_latency(export_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per sub-net of each dynamic AST export: its checkpoint (resolved), index and batch-1 latencies."""
    rows = []
    for directory in export_dirs:
        manifest = Path(directory) / "export.json"
        try:
            summary = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise UserError(f"report --exports {directory}: no readable export.json there "
                            "(run robust-sparse export on the AST checkpoint)") from None
        if summary.get("kind") != "ast-dynamic":
            raise UserError(f"report --exports {directory}: not a dynamic AST export (export an AST checkpoint "
                            "without --subnet)")
        checkpoint = str(Path(summary["checkpoint"]).resolve())
        for subnet in summary["subnets"]:
            rows.append({"path": checkpoint, "subnet": int(subnet["subnet"]),
                         "latency_ms": float(subnet["batch1_sparse_ms"]),
                         "dense_latency_ms": float(subnet["batch1_dense_ms"]), "latency_source": str(manifest)})
    return pd.DataFrame(rows, columns=["path", "subnet", "latency_ms", "dense_latency_ms", "latency_source"])


def tradeoff_table(frame: pd.DataFrame, headline: Headline, latency: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every stored sub-net row: density, clean and robust accuracy (fractions), latency where ``latency``
    (:func:`exported_latency` of the exports) has it."""
    rows = []
    for _, row in frame.iterrows():
        match = SUBNET.match(str(row["model"]))
        if match is None:
            continue
        attack, robust = headline(row)
        rows.append({"model": match["base"], "subnet": int(match["k"]),
                     "path": str(Path(str(row["path"])).resolve()), "dataset": row["dataset"],
                     "threat_model": row["threat_model"], "eps": float(row["eps"]),
                     "n_examples": int(row["n_examples"]), "density": 1.0 - float(row["sparsity"]),
                     "clean_acc": float(row["clean_acc"]), "robust_acc": robust, "robust_attack": attack})
    table = pd.DataFrame(rows, columns=COLUMNS[:11])
    table = table.merge(latency if latency is not None else exported_latency(()), on=["path", "subnet"], how="left")
    return table.sort_values(["model", "eps", "subnet"]).reset_index(drop=True)[COLUMNS]


def plot_tradeoff(table: pd.DataFrame, out: Path) -> Path:
    """Two panels, accuracy (%) against density (%) and against batch-1 latency (ms); one colour per checkpoint
    and eps, solid robust, dashed clean, each point labelled with its sub-net."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_latency = table["latency_ms"].notna().any()
    figure, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(11 if has_latency else 6, 4.2), squeeze=False)
    panels = [("density", "density of the sub-net (% of weights kept)", 100.0)]
    if has_latency:
        panels.append(("latency_ms", "sparse-inference latency, batch 1 (ms, at export)", 1.0))
    for axis, (column, label, scale) in zip(axes[0], panels):
        for index, ((model, eps), group) in enumerate(table.groupby(["model", "eps"], sort=True)):
            group = group.dropna(subset=[column]).sort_values(column)
            colour = f"C{index % 10}"
            x = group[column] * scale
            attack = group["robust_attack"].iloc[0] if len(group) else ""
            axis.plot(x, 100 * group["robust_acc"], "o-", color=colour, label=f"{model} eps {eps:.4g}: {attack}")
            axis.plot(x, 100 * group["clean_acc"], "s--", color=colour, alpha=0.6, label=f"{model}: clean")
            for xi, yi, k in zip(x, 100 * group["robust_acc"], group["subnet"]):
                axis.annotate(f"k={k}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0][0].set_title("AST sub-nets: accuracy against density")
    if has_latency:
        axes[0][1].set_title("... and against measured latency")
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    path = out / "ast_tradeoff.png"
    save_figure(figure, path, dpi=120)
    plt.close(figure)
    return path


def report_lines(frame: pd.DataFrame, out: Path, headline: Headline,
                 latency: pd.DataFrame | None = None) -> tuple[list[str], list[Path]]:
    """The report's AST section (nothing when no row is a sub-net's); ``latency`` as :func:`tradeoff_table`'s."""
    table = tradeoff_table(frame, headline, latency)
    if table.empty:
        return [], []
    lines = ["", "## AST sub-nets: accuracy against density and latency", "",
             "One trained weight tensor, one row per sub-net (0 = the densest). Latency: the sub-net's sparse-"
             "inference model at batch 1, measured on the exporting machine (export.json of `report --exports`); "
             "empty where no export was given.", ""]
    header = ["model", "sub-net", "eps", "n", "density", "clean", "robust", "attack", "latency (ms)", "dense (ms)"]
    rows = [[r["model"], r["subnet"], f"{r['eps']:.4g}", r["n_examples"], f"{100 * r['density']:.2f}%",
             f"{100 * r['clean_acc']:.2f}", f"{100 * r['robust_acc']:.2f}", r["robust_attack"],
             "" if pd.isna(r["latency_ms"]) else f"{r['latency_ms']:.3f}",
             "" if pd.isna(r["dense_latency_ms"]) else f"{r['dense_latency_ms']:.3f}"] for _, r in table.iterrows()]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    image = plot_tradeoff(table, out)
    lines += ["", f"![AST accuracy against density and latency]({image.name})"]
    return lines, [image]
