"""The common-corruptions track: accuracy on CIFAR-10-C / CIFAR-100-C, per corruption and severity.

The files are read from ``--data-root`` in the layout robustbench's own loader (``robustbench.data.
load_corruptions_cifar``) reads: ``<root>/CIFAR-10-C/<corruption>.npy`` (uint8 ``[5 * 10000, 32, 32, 3]``,
severity ``s`` in rows ``(s - 1) * 10000`` onwards) and ``<root>/CIFAR-10-C/labels.npy``; the first ``n`` rows of
a severity are its first ``n`` points, with the first ``n`` labels (as robustbench takes them). We read the
arrays memory-mapped instead of calling that loader, which loads each whole file once per severity and
downloads the data set when the folder is absent; the layout, the slicing and the scaling (``/ 255``) are its.

The defaults are RobustBench's leaderboard: its 15 corruptions (``robustbench.data.CORRUPTIONS``) at severities
1-5, and its aggregate, the mean of the 75 accuracies.

The aggregate's interval. Every cell holds the same ``n`` images (row ``i`` of every corruption and severity is
test image ``i``), so the aggregate is the mean over those images of each image's score, the fraction of cells
it is classified correctly in. The images are the sample; the cells are the benchmark's fixed definition. Its 95%
interval is therefore the t interval over the ``n`` per-image scores (:func:`aggregate_interval`), kept in the
results row as ``corruptions_interval``. A Wilson interval on ``n`` would treat the mean of 75 cells as one
binomial accuracy on ``n`` points, which it is not (only a cell is).

ImageNet-C is read as robustbench's ``load_imagenetc`` reads it: ``<root>/ImageNet-C/<corruption>/<severity>/``
through robustbench's ``CustomImageFolder``, which takes the images of RobustBench's 5000-image test list
(``imagenet_test_image_ids.txt``, ``<wnid>/<file>`` per line) in the list's order, its first ``n`` for ``n``
points, preprocessed by 'Res224' (``robustbench.eval`` uses only resizing to 224x224 for the corruptions
tracks). The labels are RobustBench's class map, which for the complete 1000-folder tree is the sorted-folder
index ``CustomImageFolder`` assigns. We read the first ``n`` listed files in batches (robust_sparse.datasets.folders)
rather than all of a folder at once.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from robust_sparse.datasets import DATASETS, CorruptionLayout, CorruptionSet
from robust_sparse.errors import UserError

log = logging.getLogger(__name__)

THREAT = "corruptions"  # robustbench's ThreatModel.corruptions value, the results' threat_model
ROWS_PER_SEVERITY = 10000  # robustbench's n_total_cifar
SEVERITIES = (1, 2, 3, 4, 5)
# Each data set's corruption set (its folder under the data root, robustbench.data.CORRUPTIONS_DIR_NAMES, its
# layout and where it is published) is its record's ``corruptions`` (robust_sparse/datasets/).
IMAGE_TREE_DATASET = "imagenet"  # the image-tree layout is read with RobustBench's ImageNet test list and classes
AGGREGATE = "corruptions"  # the per_attack label of the mean over every corruption and severity


def default_corruptions() -> tuple[str, ...]:
    """RobustBench's corruption list, read from the installed robustbench."""
    from robust_sparse.environment.compat import import_robustbench

    import_robustbench()
    from robustbench.data import CORRUPTIONS

    return tuple(CORRUPTIONS)


def parse_corruptions(text: str | None) -> tuple[str, ...]:
    """``"fog,snow"`` -> ``("fog", "snow")``; None: RobustBench's 15. Names must be RobustBench's."""
    known = default_corruptions()
    if text is None:
        return known
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise UserError("--corruptions: give at least one corruption, e.g. gaussian_noise,fog")
    for name in names:
        if name not in known:
            raise UserError(f"--corruptions: unknown corruption {name!r}; choose from: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise UserError("--corruptions: a corruption is listed twice")
    return names


def parse_severities(text: str | None) -> tuple[int, ...]:
    """``"1,5"`` -> ``(1, 5)``; None: 1-5."""
    if text is None:
        return SEVERITIES
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--severities {text!r}: comma-separated integers from 1 to 5, e.g. 1,3,5") from None
    if not values or any(v not in SEVERITIES for v in values) or len(set(values)) != len(values):
        raise UserError(f"--severities {text!r}: distinct integers from 1 to 5, e.g. 1,3,5")
    return values


def corruption_set(dataset: str) -> CorruptionSet:
    """The dataset's corruption set (its record's), or one line naming the datasets that have one."""
    record = DATASETS.get(dataset)
    if record.corruptions is None:
        having = [(name, entry.corruptions.folder) for name, entry in DATASETS.entries() if entry.corruptions]
        raise UserError(f"--threat-model corruptions: supported for {', '.join(name for name, _ in having)} "
                        f"({', '.join(folder for _, folder in having)}), not {dataset}")
    return record.corruptions


def _image_tree(dataset: str) -> bool:
    return corruption_set(dataset).layout is CorruptionLayout.IMAGE_TREE


def corruption_folder(root: str | Path, dataset: str) -> Path:
    return Path(root) / corruption_set(dataset).folder


def check_files(root: str | Path, dataset: str, corruptions: Sequence[str], severities: Sequence[int],
                n: int | None) -> int:
    """Every file there and long enough for ``n`` points at every severity (one line naming the path
    otherwise); returns ``n`` (None: ``ROWS_PER_SEVERITY``). Reads only the .npy headers."""
    if _image_tree(dataset):
        return _check_imagenet(root, corruptions, severities, n)
    folder = corruption_folder(root, dataset)
    n = ROWS_PER_SEVERITY if n is None else n
    if not 1 <= n <= ROWS_PER_SEVERITY:
        raise UserError(f"--n-examples {n}: the corruptions track has {ROWS_PER_SEVERITY} points per severity")
    for name in ("labels", *corruptions):
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise UserError(f"corruption data not found: {path} (expected {corruption_set(dataset).folder}/<corruption>.npy "
                            f"and labels.npy under --data-root; the data is published at "
                            f"{corruption_set(dataset).source})")
        if name == "labels":
            _checked_labels(path, dataset, n)
            continue
        rows = len(_checked_images(path, dataset))
        needed = (max(severities) - 1) * ROWS_PER_SEVERITY + n
        if rows < needed:
            raise UserError(f"{path}: {rows} rows, {needed} needed for {n} points at severity {max(severities)} "
                            f"({ROWS_PER_SEVERITY} rows per severity, as robustbench reads it)")
    return n


def _imagenet_list() -> list[str]:
    """RobustBench's ImageNet test list, ``<wnid>/<file>`` per line, in order."""
    from robust_sparse.datasets import folders

    return [line.strip() for line in folders.robustbench_test_list().read_text().splitlines() if line.strip()]


def _check_imagenet(root: str | Path, corruptions: Sequence[str], severities: Sequence[int], n: int | None) -> int:
    """Every corruption x severity folder there with the first ``n`` listed images (one line otherwise)."""
    listed = _imagenet_list()
    n = len(listed) if n is None else n
    if not 1 <= n <= len(listed):
        raise UserError(f"--n-examples {n}: the ImageNet-C track has {len(listed)} points per severity "
                        "(RobustBench's test list)")
    for corruption in corruptions:
        for severity in severities:
            folder = corruption_folder(root, IMAGE_TREE_DATASET) / corruption / str(severity)
            if not folder.is_dir():
                raise UserError(f"corruption data not found: {folder} (expected ImageNet-C/<corruption>/<severity>/"
                                f"<wnid>/<file>.JPEG under --data-root; the data is published at "
                                f"{corruption_set(IMAGE_TREE_DATASET).source})")
            missing = [line for line in listed[:n] if not os.path.isfile(folder / line)]
            if missing:
                raise UserError(f"{folder}: {len(missing)} of the first {n} images of RobustBench's test list are "
                                f"missing, e.g. {folder / missing[0]}")
    # every image's header (a truncated JPEG is decoded to tell), before any model is loaded: a bad file is one
    # line naming it now, not an error an hour into the evaluation
    from robust_sparse.datasets.folders import check_header

    if n * len(corruptions) * len(severities) > 10_000:
        log.info("reading the headers of %d ImageNet-C images", n * len(corruptions) * len(severities))
    for corruption in corruptions:
        for severity in severities:
            folder = corruption_folder(root, IMAGE_TREE_DATASET) / corruption / str(severity)
            for line in listed[:n]:
                check_header(str(folder / line))
    return n


def _imagenet_cell(root: str | Path, corruption: str, severity: int, n: int):
    """The first ``n`` listed images of one ImageNet-C cell, as a FolderSet (file names and labels)."""
    from robust_sparse.datasets.folders import FolderSet, imagenet_classes

    classes = imagenet_classes()
    folder = corruption_folder(root, IMAGE_TREE_DATASET) / corruption / str(severity)
    lines = _imagenet_list()[:n]
    return FolderSet([str(folder / line) for line in lines], [classes[line.split("/")[0]] for line in lines], 224)


def _open_array(path: Path) -> np.ndarray:
    """``path`` memory-mapped: only its header is read. A pickled object array is refused (allow_pickle is off:
    unpickling a downloaded file could run its code), as is an .npz archive under a .npy name."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a readable .npy file ({reason})") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path}: not a readable .npy file (an .npz archive, not one array)")
    return array


def _checked_images(path: Path, dataset: str) -> np.ndarray:
    """A corruption's images as the protocol has them, or one line naming ``path``: uint8 ``[N, H, W, 3]`` at the
    data set's image size. A float array would be divided by 255 a second time, and another shape would reach
    the model as the wrong image."""
    array = _open_array(path)
    size = DATASETS.get(dataset).image_size
    if array.dtype != np.uint8:
        raise UserError(f"{path}: dtype {array.dtype}, expected uint8 images (0-255, as {corruption_set(dataset).folder} "
                        "ships them; they are divided by 255 here)")
    if array.ndim != 4 or array.shape[1:] != (size, size, 3):
        raise UserError(f"{path}: shape {list(array.shape)}, expected [N, {size}, {size}, 3] ({dataset}'s "
                        f"{size}x{size} RGB images, channels last, as {corruption_set(dataset).folder} ships them)")
    return array


def _checked_labels(path: Path, dataset: str, n: int) -> np.ndarray:
    """The first ``n`` labels as the protocol has them, or one line naming ``path``: a 1-D integer array of at
    least ``n`` class indices, each below the data set's class count (a label array [N, 1] would broadcast
    against the predictions, and a label past the classes would be silently wrong)."""
    array = _open_array(path)
    classes = DATASETS.get(dataset).num_classes
    if array.dtype.kind not in "iu":
        raise UserError(f"{path}: dtype {array.dtype}, expected integer class labels (0..{classes - 1})")
    if array.ndim != 1:
        raise UserError(f"{path}: shape {list(array.shape)}, expected 1-D labels [N]")
    if len(array) < n:
        raise UserError(f"{path}: {len(array)} labels, {n} needed for {n} points (the first n labels, as "
                        "robustbench reads them)")
    labels = np.array(array[:n], dtype=np.int64)
    outside = np.flatnonzero((labels < 0) | (labels >= classes))
    if len(outside):
        raise UserError(f"{path}: label {labels[outside[0]]} at row {outside[0]} is outside 0..{classes - 1} "
                        f"({dataset} has {classes} classes)")
    return labels


def load_corruption(root: str | Path, dataset: str, corruption: str, severity: int,
                    n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` points of one corruption at one severity: float [0,1] images [n, 3, H, W], int64 labels."""
    if _image_tree(dataset):
        return _read_imagenet(_imagenet_cell(root, corruption, severity, n))
    folder = corruption_folder(root, dataset)
    path = folder / f"{corruption}.npy"
    images = _checked_images(path, dataset)
    labels = _checked_labels(folder / "labels.npy", dataset, n)
    start = (severity - 1) * ROWS_PER_SEVERITY
    if len(images) < start + n:
        raise UserError(f"{path}: {len(images)} rows, {start + n} needed for {n} points at severity {severity} "
                        f"({ROWS_PER_SEVERITY} rows per severity, as robustbench reads it)")
    chunk = np.ascontiguousarray(images[start:start + n])
    tensor = torch.from_numpy(chunk.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    return tensor, torch.from_numpy(labels)


def _read_imagenet(files) -> tuple[torch.Tensor, torch.Tensor]:
    from robust_sparse.datasets.folders import corruptions_transform, in_memory

    data = in_memory(files, transform=corruptions_transform())
    return data.images.float().div_(255), data.labels


def _cell_batches(root: str | Path, dataset: str, corruption: str, severity: int, n: int, batch_size: int):
    """One cell in batches of (float [0,1] images, labels); ImageNet-C's files are decoded a batch at a time."""
    if _image_tree(dataset):
        files = _imagenet_cell(root, corruption, severity, n)
        for start in range(0, n, batch_size):
            yield _read_imagenet(files.take(slice(start, start + batch_size)))
        return
    images, labels = load_corruption(root, dataset, corruption, severity, n)
    for start in range(0, n, batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def evaluate_corruptions(model: nn.Module, root: str | Path, dataset: str, *,
                         corruptions: Sequence[str] | None = None, severities: Sequence[int] = SEVERITIES,
                         n_examples: int | None = None, batch_size: int = 500,
                         device: torch.device | str = "cpu") -> pd.DataFrame:
    """Accuracy of ``model`` (on [0,1] images) on every corruption and severity.

    Returns a DataFrame with columns corruption, severity, n, accuracy (one row each, in order); RobustBench's
    aggregate is ``frame["accuracy"].mean()`` (:func:`aggregate`). ``frame.attrs["correct"]`` holds the per-point
    flags, bool ``[cells, n]`` in the rows' order, for the aggregate's interval (:func:`aggregate_interval`).
    """
    corruptions = tuple(corruptions) if corruptions is not None else default_corruptions()
    n = check_files(root, dataset, corruptions, severities, n_examples)
    return _evaluate_checked(model, root, dataset, corruptions, severities, n, batch_size, device)


def _evaluate_checked(model: nn.Module, root: str | Path, dataset: str, corruptions: Sequence[str],
                      severities: Sequence[int], n: int, batch_size: int, device: torch.device | str) -> pd.DataFrame:
    """:func:`evaluate_corruptions` on files :func:`check_files` has passed (the job checks them once, before any
    model: ImageNet-C's 375,000 headers are not read again for every model)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    rows, flags = [], []
    try:
        for corruption in corruptions:
            for severity in severities:
                with torch.no_grad():
                    hits = torch.cat([(model(x.to(device)).argmax(1) == y.to(device)).cpu()
                                      for x, y in _cell_batches(root, dataset, corruption, severity, n, batch_size)])
                correct = int(hits.sum())
                flags.append(hits.numpy())
                rows.append({"corruption": corruption, "severity": int(severity), "n": n, "accuracy": correct / n})
                log.info("%s severity %d: accuracy %.4f on %d points", corruption, severity, correct / n, n)
    finally:
        model.train(was_training)
    frame = pd.DataFrame(rows, columns=["corruption", "severity", "n", "accuracy"])
    frame.attrs["correct"] = np.stack(flags) if flags else np.zeros((0, n), dtype=bool)
    return frame


def aggregate(frame: pd.DataFrame) -> float:
    """RobustBench's corruptions accuracy: the mean over every (corruption, severity) accuracy."""
    return float(frame["accuracy"].mean())


def aggregate_interval(correct: np.ndarray) -> tuple[float, float]:
    """The 95% interval of the aggregate from the per-point flags ``correct`` (bool ``[cells, n]``, one column per
    image): the t interval over the images of each image's fraction of cells classified correctly, whose mean is
    the aggregate (see the module docstring); clipped to [0, 1]; NaN for fewer than two images."""
    from robust_sparse.eval.intervals import mean_interval

    _, low, high = mean_interval(np.asarray(correct, dtype=float).mean(axis=0).tolist())
    return (max(0.0, low), min(1.0, high)) if low == low else (low, high)


def interval_of(row: dict[str, Any] | pd.Series) -> tuple[float, float] | None:
    """The aggregate's stored interval in a results row; None in a row written before it was recorded."""
    stored = row.get("corruptions_interval")
    if isinstance(stored, (list, tuple)) and len(stored) == 2 and all(v is not None for v in stored):
        return float(stored[0]), float(stored[1])
    return None


def aggregate_label(corruptions: Sequence[str], severities: Sequence[int]) -> str:
    """``corruptions`` for RobustBench's full set (the leaderboard's number), else a label naming the subset, so
    that a mean over fewer corruptions or severities is never compared with a leaderboard row."""
    full = default_corruptions()
    if set(corruptions) == set(full) and set(severities) == set(SEVERITIES):
        return AGGREGATE
    return (f"{AGGREGATE} ({len(corruptions)} of {len(full)}, severities "
            f"{','.join(str(s) for s in sorted(severities))})")


def per_attack(frame: pd.DataFrame) -> dict[str, float]:
    """The results store's per_attack field: the aggregate (under :func:`aggregate_label`), then
    ``corruption/severity`` for each cell (the ``/`` marks a part, which comparisons and monotonicity checks
    skip)."""
    cells = {f"{r.corruption}/{int(r.severity)}": float(r.accuracy) for r in frame.itertuples()}
    label = aggregate_label(list(dict.fromkeys(frame["corruption"])), sorted(set(frame["severity"])))
    return {label: aggregate(frame), **cells}


def mean_of(row: dict[str, Any] | pd.Series) -> tuple[str, float]:
    """The aggregate's label and value in a stored row."""
    label = next(k for k in row["per_attack"] if "/" not in k)
    return label, float(row["per_attack"][label])


# ----------------------------------------------------------------------------------------------------------
# one model's row (``robust-sparse eval --threat-model corruptions``: robust_sparse.eval.job)


def evaluate_model(loaded, images, labels, root, dataset, corruptions, severities, n, batch_size, device,
                   results_dir) -> dict[str, Any]:
    """Clean accuracy on the test points, then every corruption and severity: the model's row, appended to the
    results store in ``results_dir``."""
    from robust_sparse.distributed import device_name
    from robust_sparse.eval.points import data_fingerprint
    from robust_sparse.eval.sources import model_fingerprint, sparsity_stats
    from robust_sparse.eval.store import append_result
    from robust_sparse.accuracy import predict

    started = time.monotonic()
    model = loaded.model.to(device).eval()
    clean = float((predict(model, images.to(device), batch_size).cpu() == labels).float().mean())
    frame = _evaluate_checked(model, root, dataset, corruptions, severities, n, batch_size, device)
    stats = sparsity_stats(model)
    mean = aggregate(frame)
    low, high = aggregate_interval(frame.attrs["correct"])
    row = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.name, "source": loaded.source, "path": loaded.path, "architecture": loaded.architecture,
        "dataset": dataset, "threat_model": THREAT, "eps": 0.0, "n_examples": n,
        "train_images": loaded.train_images, "epochs": loaded.epochs, "epoch": loaded.epoch,
        "selection": loaded.selection, "estimator": loaded.estimator, "seed": None, "batch_size": batch_size,
        "mode": "standalone", "attacks": f"{','.join(corruptions)}@{','.join(map(str, severities))}", "clean_acc": clean, "pgd_attack": None, "pgd_acc": None,
        "autoattack_acc": None, "worst_acc": mean, "per_attack": per_attack(frame),
        "sparsity": stats["sparsity"], "params": stats["params"], "nonzero_params": stats["nonzero_params"],
        "wall_seconds": round(time.monotonic() - started, 3), "device": device_name(device),
        "autoattack_backend": None, "large_eps": None, "large_eps_acc": None, "warnings": [],
        "model_fingerprint": model_fingerprint(model), "data_fingerprint": data_fingerprint(images, labels),
        "flags_file": None, "torch_version": torch.__version__,
        "corruptions": list(corruptions), "severities": list(severities), "corruptions_root": str(Path(root)),
        # the aggregate's 95% t interval over the images (none for one image: no spread to measure)
        "corruptions_interval": [low, high] if low == low else None,
    }
    append_result(results_dir, row)
    return row


def format_row(row: dict[str, Any]) -> str:
    """What ``robust-sparse eval --threat-model corruptions`` prints for one row."""
    cells = {k: v for k, v in row["per_attack"].items() if "/" in k}
    frame = pd.DataFrame([(*k.split("/"), v) for k, v in cells.items()], columns=["corruption", "severity", "acc"])
    table = frame.pivot(index="corruption", columns="severity", values="acc").loc[list(dict.fromkeys(frame["corruption"]))]
    lines = [f"{row['model']} on {row['dataset']}-C ({row['n_examples']} points per corruption and severity, "
             f"{row['wall_seconds']:.1f} s on {row['device']}): clean accuracy {row['clean_acc']:.4f}, "
             f"corruptions accuracy (mean over {len(cells)}) {mean_of(row)[1]:.4f}"
             + (" [{:.4f}, {:.4f}] (95% t interval over the images)".format(*interval_of(row)) if interval_of(row)
                else "")]
    lines += ["  " + line for line in table.to_string(float_format=lambda v: f"{v:.4f}").splitlines()]
    lines.append(f"  sparsity {row['sparsity']:.4f}, {row['nonzero_params']:,} non-zero of {row['params']:,} parameters")
    return "\n".join(lines)


def report_lines(frame: pd.DataFrame) -> list[str]:
    """The report's corruptions section: per model, the mean accuracy of each corruption over its severities
    and of each severity over the corruptions (empty when no row is of the corruptions track)."""
    rows = frame[frame["threat_model"] == THREAT]
    if rows.empty:
        return []
    lines = ["", "## Common corruptions", "",
             "Accuracy in % on the corrupted test sets (CIFAR-10-C / CIFAR-100-C / ImageNet-C layout); *mean* is "
             "RobustBench's corruptions accuracy, the mean over every corruption and severity evaluated. Its 95% "
             "interval is a t interval over the images of each image's fraction of cells classified correctly "
             "(every cell holds the same images; the cells are fixed, the images are the sample); a cell's "
             "accuracy on n images has a Wilson interval. A row written before the interval was recorded shows "
             "none: its per-image results were not kept.", ""]
    for _, r in rows.iterrows():
        cells = [(k.split("/")[0], int(k.split("/")[1]), float(v)) for k, v in r["per_attack"].items() if "/" in k]
        table = pd.DataFrame(cells, columns=["corruption", "severity", "accuracy"])
        by_corruption = table.groupby("corruption", sort=False)["accuracy"].mean()
        by_severity = table.groupby("severity")["accuracy"].mean()
        interval = interval_of(r)
        shown = f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else ""
        lines += [f"**{r['model']}** ({r['dataset']}, {r['n_examples']} points each): clean "
                  f"{100 * float(r['clean_acc']):.2f}, mean {100 * mean_of(r)[1]:.2f}{shown} ({mean_of(r)[0]}); by "
                  "severity " + ", ".join(f"{s}: {100 * v:.2f}" for s, v in by_severity.items()), ""]
        lines += ["| corruption | " + " | ".join(f"severity {s}" for s in by_severity.index) + " | mean |",
                  "|---|" + "---|" * (len(by_severity) + 1)]
        for name, mean in by_corruption.items():
            values = table[table["corruption"] == name].set_index("severity")["accuracy"]
            lines.append(f"| {name} | " + " | ".join(f"{100 * values[s]:.2f}" if s in values.index else ""
                                                    for s in by_severity.index) + f" | {100 * mean:.2f} |")
        lines.append("")
    return lines
