"""RobustBench both ways: a model trained here into RobustBench's zoo, and RobustBench's own ``benchmark()`` on
test points already on disk.

Into the zoo
    :func:`export_to_zoo` (``robust-sparse export CHECKPOINT --out DIR --robustbench NAME``) writes
    ``DIR/<dataset>/<Linf|L2>/NAME.pt`` (a plain state_dict, no ``module.`` prefix: what
    ``robustbench.utils.load_model`` reads), ``NAME.json`` beside it and ``NAME.md``. The JSON is robustbench's
    own ``robustbench.utils.ModelInfo`` written as robustbench writes its ``model_info`` files
    (``dataclasses.asdict``), filled from the run's results store, plus a ``robust_sparse`` key (how to rebuild
    the architecture, sparsity, training method, the commands). ``NAME.md`` is the loading recipe.

    robustbench has no plugin hook (no entry point; ``load_model`` looks names up in its own model dictionary),
    so ``load_model(NAME)`` raises ``KeyError: 'NAME'`` until :func:`register` has added NAME to that dictionary
    in the same process: ``register(NAME, DIR, dataset, threat_model)``, then ``load_model`` returns the model.

benchmark() on local data
    ``robustbench.eval.benchmark`` reads its clean test set through torchvision with ``download=True``, which
    fails offline on anything but the exact download. Inside :func:`local_points` it reads the given points
    instead (and AutoAttack gets a fixed seed; benchmark() leaves it to the clock), so RobustBench's own code
    evaluates exactly the points ``robust-sparse eval`` did. :func:`benchmark_on_points` wraps the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import math
import re
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from robust_sparse.files.atomic import atomic_open, write_atomic
from robust_sparse.errors import UserError

log = logging.getLogger(__name__)

ZOO_DATASETS = ("cifar10", "cifar100")  # RobustBench's BenchmarkDataset values this toolkit trains on
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# robustbench.utils.load_model cuts len(s) characters off every key that contains s anywhere
_CUT_SUBSTRINGS = ("module.", "model.")
LOCAL_GDRIVE_ID = "robust-sparse:local"  # load_model needs an id; the file is always there (register checks)


def _robustbench():
    from robust_sparse.environment.compat import import_robustbench

    import_robustbench()
    import robustbench  # the real package: absolute import, never this module

    return robustbench


def robustbench_version() -> str:
    try:
        return importlib.metadata.version("robustbench")
    except importlib.metadata.PackageNotFoundError:  # importable but not installed as a distribution
        return "(version unknown)"


def _changed(what: str) -> UserError:
    """The one line for a robustbench whose internals moved: which version, what is gone, the version that works."""
    return UserError(f"robustbench {robustbench_version()}: {what}; robust_sparse.eval.zoo is written against "
                     "robustbench 1.1.1 (robust-sparse doctor checks the installed copy)")


def zoo_paths(directory: str | Path, name: str, dataset: str, threat_model: str) -> tuple[Path, Path]:
    """``(DIR/<dataset>/<threat_model>/NAME.pt, ... NAME.json)``."""
    folder = Path(directory) / dataset / threat_model
    return folder / f"{name}.pt", folder / f"{name}.json"


def eps_text(eps: float | None) -> str | None:
    """``8/255`` for a multiple of 1/255 (RobustBench's spelling), else the number."""
    if eps is None:
        return None
    fraction = Fraction(eps).limit_denominator(255)
    if math.isclose(float(fraction), eps, rel_tol=1e-6) and 255 % fraction.denominator == 0:
        return f"{fraction.numerator * 255 // fraction.denominator}/255"
    return f"{eps:g}"


def _pct(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return f"{100 * float(value):.2f}"


def export_to_zoo(checkpoint: str | Path, out_dir: str | Path, name: str, *, subnet: int | None = None,
                  results_dir: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write a robust-sparse checkpoint into RobustBench's zoo layout under ``out_dir``; returns the model info.

    Clean and robust accuracy come from the run's results store (``<run dir>/eval``, or ``results_dir``): the
    rows of this very model (same weights fingerprint) and threat model; AutoAttack (the leaderboard's number)
    on the most points, and a corruptions row when there is one. Without such rows the fields are null.

    Files at the target are replaced only when this toolkit wrote them (:func:`check_zoo_target`), and a name of
    RobustBench's own zoo is refused; ``force`` (``export --force``) replaces either deliberately.
    """
    from robust_sparse.config import config_from_dict
    from robust_sparse.files.checkpoint import load_checkpoint
    from robust_sparse.eval.sources import from_checkpoint, model_fingerprint, sparsity_stats

    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"--robustbench {name!r}: a zoo name is letters, digits, '_', '-' and '.', e.g. "
                        "MyLab2026Sparse_R18")
    checkpoint = Path(checkpoint)
    loaded = from_checkpoint(checkpoint, subnet=subnet)
    dataset = loaded.dataset
    if dataset not in ZOO_DATASETS:
        raise UserError(f"--robustbench: RobustBench's zoo has {' and '.join(ZOO_DATASETS)} models, and this "
                        f"checkpoint was trained on {dataset}")
    threat = {"linf": "Linf", "l2": "L2"}[loaded.norm or "linf"]
    weights_path, info_path = zoo_paths(out_dir, name, dataset, threat)
    if not force:  # before the statistics and the results store are read, and before anything is written
        check_zoo_target(name, weights_path, info_path, dataset, threat)
    state_dict = {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}
    cut = [k for k in state_dict if any(s in k for s in _CUT_SUBSTRINGS)]
    if cut:
        raise UserError(f"--robustbench: robustbench.utils.load_model would rename the parameters {', '.join(cut[:3])} "
                        "(it cuts 'module.'/'model.' wherever they appear); this architecture cannot go into the zoo")
    fingerprint = model_fingerprint(loaded.model)
    stats = sparsity_stats(loaded.model)
    config = config_from_dict(load_checkpoint(checkpoint)["config"])
    store = Path(results_dir) if results_dir is not None else checkpoint.parent / "eval"
    robust_row, corruption_row = _evaluation_rows(store, fingerprint, dataset, threat)
    method = str(getattr(config.sparsity.method, "value", config.sparsity.method))
    objective = str(getattr(config.objective, "value", config.objective))
    eps = robust_row["eps"] if robust_row is not None else loaded.eps
    training = f"{objective} with {method} sparse training" if method != "none" else f"{objective}, dense"
    corruptions_acc = None
    if corruption_row is not None:
        from robust_sparse.eval.corruptions import mean_of

        corruptions_acc = _pct(mean_of(corruption_row)[1])
    # Strings where RobustBench's own files have them ("8/255", "91.08"), whatever ModelInfo's annotations say.
    # venue "N/A" is how its files mark a model without a paper (Standard.json); its bibtex export skips those.
    info = _model_info(
        link=None, name=name, authors=None,
        additional_data=False,  # robust-sparse trains on the dataset's own training split only
        number_forward_passes=1, dataset=dataset, venue="N/A", architecture=loaded.architecture,
        eps=eps_text(eps), clean_acc=_pct((robust_row or corruption_row or {}).get("clean_acc")), reported=None,
        autoattack_acc=_pct(robust_row.get("autoattack_acc")) if robust_row is not None else None,
        corruptions_acc=corruptions_acc,
        footnote=f"{stats['sparsity']:.1%} sparse ({stats['nonzero_params']:,} non-zero parameters); {training}")
    commands = [f"robust-sparse train {checkpoint.parent / 'config.yaml'}"]
    for row in (robust_row, corruption_row):
        if row is not None:
            commands.append(_eval_command(checkpoint, row))
    commands.append(f"robust-sparse export {checkpoint} --out {out_dir} --robustbench {name}"
                    + (f" --subnet {subnet}" if subnet is not None else ""))
    # Our fields go under one extra key of the same file, not a file beside it: RobustBench's leaderboard
    # generator reads every *.json of the folder as a model, and its update_json (benchmark(to_disk=True))
    # updates ModelInfo's fields in place and keeps any other key.
    info["robust_sparse"] = {
        "architecture": config.model.name, "num_classes": int(_num_classes(loaded.model, state_dict)),
        "dataset": dataset, "threat_model": threat, "eps": eps, "sparsity": stats["sparsity"],
        "nonzero_params": stats["nonzero_params"], "params": stats["params"],
        "training_method": method, "objective": objective, "checkpoint": str(checkpoint), "subnet": subnet,
        "model_fingerprint": fingerprint, "weights_sha256": None,
        "evaluation": {key: _summary(row) for key, row in (("robust", robust_row), ("corruptions", corruption_row))},
        "commands": commands,
    }
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(weights_path, "wb") as stream:
        torch.save(state_dict, stream)
    # the record that makes the file ours: a later export replaces NAME.pt only while it still has these bytes
    info["robust_sparse"]["weights_sha256"] = file_sha256(weights_path)
    write_atomic(info_path, json.dumps(info, indent=2) + "\n")
    recipe_path = info_path.with_suffix(".md")
    write_atomic(recipe_path, loading_recipe(name, out_dir, dataset, threat, info["footnote"]))
    if robust_row is None:
        log.warning("no evaluation of this model at %s in %s: clean_acc and autoattack_acc are null (run "
                    "robust-sparse eval %s first)", threat, store, checkpoint)
    return {"weights": weights_path, "model_info": info_path, "recipe": recipe_path, "info": info}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_zoo_target(name: str, weights_path: Path, info_path: Path, dataset: str, threat: str) -> None:
    """Refuse, in one line naming the file, to replace what this toolkit did not write at the zoo target.

    ``NAME.pt`` is ours when ``NAME.json`` beside it is a model-info file of ``robust-sparse export`` whose
    ``robust_sparse.weights_sha256`` is the file's checksum now: a model of RobustBench's zoo downloaded there,
    or our file edited since, is someone else's. ``NAME.json`` and ``NAME.md`` go with it. A name of
    RobustBench's own model dictionary is refused too: ``register`` could never load it under that name, and
    the folder is where ``load_model`` downloads RobustBench's model of that name."""
    how = "pass --force to replace it, or export under another --robustbench NAME or --out"
    zoo = _zoo_dictionary(dataset, threat)
    if name in zoo and zoo[name].get("gdrive_id") != LOCAL_GDRIVE_ID:
        raise UserError(f"--robustbench {name}: a model of RobustBench's own zoo ({dataset}, {threat}) has this name; "
                        "export under another name (or pass --force to write it anyway)")
    recipe_path = info_path.with_suffix(".md")
    existing = [path for path in (weights_path, info_path, recipe_path) if path.exists() or path.is_symlink()]
    if not existing:
        return
    for path in existing:
        if path.is_symlink() or not path.is_file():
            raise UserError(f"--robustbench {name}: {path} exists and is not a regular file; {how}")
    record = _our_record(info_path)
    if record is None:
        raise UserError(f"--robustbench {name}: {existing[0]} was not written by robust-sparse export ("
                        f"{info_path.name} {'is not its model-info file' if info_path.exists() else 'is missing'}); "
                        f"{how}")
    if weights_path.exists():
        recorded = record.get("weights_sha256")
        if not isinstance(recorded, str) or file_sha256(weights_path) != recorded:
            raise UserError(f"--robustbench {name}: {weights_path} is not the file robust-sparse export wrote (its "
                            f"SHA-256 differs from the one {info_path.name} records); {how}")


def _our_record(info_path: Path) -> dict[str, Any] | None:
    """The ``robust_sparse`` key of a model-info file :func:`export_to_zoo` wrote; None for anything else."""
    try:
        record = json.loads(info_path.read_text(encoding="utf-8"))["robust_sparse"]
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable, not JSON, not ours
        return None
    return record if isinstance(record, dict) and isinstance(record.get("model_fingerprint"), str) else None


def _model_info(**fields: Any) -> dict[str, Any]:
    """``robustbench.utils.ModelInfo(**fields)`` as a dict, the way robustbench writes its model-info files."""
    _robustbench()
    try:
        from robustbench.utils import ModelInfo

        return dataclasses.asdict(ModelInfo(**fields))
    except (ImportError, TypeError) as error:
        raise _changed(f"robustbench.utils.ModelInfo, its model-info dataclass, changed ({error})") from None


def loading_recipe(name: str, model_dir: str | Path, dataset: str, threat_model: str, description: str) -> str:
    """``NAME.md``: why ``robustbench.utils.load_model(NAME)`` raises KeyError on its own, and the lines that load
    NAME (the test runs them in a fresh interpreter)."""
    return f"""# {name}

A robust-sparse model: {description}.

- `{name}.pt`: a plain state_dict
- `{name}.json`: RobustBench's `ModelInfo`, plus a `robust_sparse` section (architecture, sparsity, the commands)

`robustbench.utils.load_model` knows only the names in robustbench's own model dictionary: on its own it raises
`KeyError: '{name}'`. robust-sparse (`pip install robust-sparse`) builds the architecture and adds the name, in
the Python process that loads the model (`model_dir` is the folder `robust-sparse export --out` was given):

```python
from robust_sparse.eval.zoo import register
register({name!r}, {str(model_dir)!r}, {dataset!r}, {threat_model!r})
from robustbench.utils import load_model
model = load_model({name!r}, model_dir={str(model_dir)!r}, dataset={dataset!r}, threat_model={threat_model!r})
```
"""


def _num_classes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else int(list(state_dict.values())[-1].shape[0])


def _evaluation_rows(store: Path, fingerprint: str, dataset: str, threat: str):
    from robust_sparse.eval.store import RESULTS_JSON, load_results

    if not (store / RESULTS_JSON).is_file():
        return None, None
    frame = load_results(store)
    frame = frame[(frame["model_fingerprint"] == fingerprint) & (frame["dataset"] == dataset)]

    def best(rows):
        if rows.empty:
            return None
        return rows.sort_values(["n_examples", "timestamp"]).iloc[-1].to_dict()

    attacked = frame[frame["threat_model"] == threat]
    with_aa = attacked[attacked["autoattack_acc"].notna()]
    robust = best(with_aa) if not with_aa.empty else best(attacked)
    return robust, best(frame[frame["threat_model"] == "corruptions"])


def _summary(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row.get(k) for k in ("n_examples", "attacks", "seed", "clean_acc", "autoattack_acc", "pgd_acc",
                                    "worst_acc", "eps", "timestamp")}


def _eval_command(checkpoint: Path, row: dict[str, Any]) -> str:
    if row["threat_model"] == "corruptions":
        corruptions, _, severities = str(row["attacks"]).partition("@")
        return (f"robust-sparse eval {checkpoint} --threat-model corruptions --corruptions {corruptions} "
                f"--severities {severities} --n-examples {row['n_examples']}")
    return (f"robust-sparse eval {checkpoint} --threat-model {row['threat_model']} --eps {row['eps']:.10g} "
            f"--n-examples {row['n_examples']} --attacks {row['attacks']} --seed {row['seed']} "
            f"--batch-size {row['batch_size']}" + (" --chained" if row.get("mode") == "chained" else ""))


def register(name: str, model_dir: str | Path, dataset: str = "cifar10", threat_model: str = "Linf") -> Callable[[], nn.Module]:
    """Make ``robustbench.utils.load_model(name, model_dir=model_dir, dataset=dataset, threat_model=threat_model)``
    return a model written by :func:`export_to_zoo` (``robust-sparse export --robustbench NAME``).

    Reads ``<model_dir>/<dataset>/<threat_model>/<name>.json`` for the architecture and adds ``name`` to
    robustbench's model dictionary of that dataset and threat model, in this process. Returns the constructor
    robustbench calls (an untrained model of the architecture). A name of RobustBench's own zoo is refused.
    """
    from robust_sparse.models import build_model

    zoo = _zoo_dictionary(dataset, threat_model)
    weights_path, info_path = zoo_paths(model_dir, name, dataset, threat_model)
    for path in (weights_path, info_path):
        if not path.is_file():
            raise UserError(f"register: {path} not found (write it with robust-sparse export CHECKPOINT --out "
                            f"{model_dir} --robustbench {name})")
    try:
        spec = json.loads(info_path.read_text(encoding="utf-8"))["robust_sparse"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"register: {info_path} has no robust_sparse section (not written by robust-sparse export)") from None
    existing = zoo.get(name)
    if existing is not None and existing.get("gdrive_id") != LOCAL_GDRIVE_ID:
        raise UserError(f"register: {name!r} is a model of RobustBench's own zoo; export under another name")
    info = _checked_spec(spec, info_path)
    constructor = functools.partial(build_model, spec["architecture"], spec["num_classes"], info.in_channels,
                                    info.mean, info.std)
    zoo[name] = {"model": constructor, "gdrive_id": LOCAL_GDRIVE_ID}
    return constructor


def _checked_spec(spec: Any, info_path: Path):
    """The dataset of a model-info file's ``robust_sparse`` section, after checking what ``load_model`` will
    build from it: the file may come from anyone, and ``num_classes`` decides the classifier's allocation."""
    from robust_sparse.datasets import DATASETS
    from robust_sparse.deploy.pretrained import MAX_CLASSES

    def bad(field: str, why: str) -> UserError:
        return UserError(f"register: {info_path}: robust_sparse.{field} {why}; export the model again")

    if not isinstance(spec, dict):
        raise bad("", "is not a section")
    dataset = spec.get("dataset")
    if dataset not in ZOO_DATASETS:
        raise bad("dataset", f"is {str(dataset)[:60]!r}, not one of {', '.join(ZOO_DATASETS)}")
    if not isinstance(spec.get("architecture"), str) or not spec["architecture"]:
        raise bad("architecture", "is not a model name")
    classes = spec.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= MAX_CLASSES:
        raise bad("num_classes", f"is {str(classes)[:60]}, not a whole number in 1..{MAX_CLASSES:,}")
    return DATASETS.get(dataset)


def _zoo_dictionary(dataset: str, threat_model: str) -> dict[str, dict[str, Any]]:
    """robustbench's model dictionary of one dataset and threat model, the one that ``load_model`` looks names up
    in. robustbench has no registration function, so :func:`register` adds its entry to this dictionary; it is
    reached through the public ``robustbench.model_zoo.model_dicts``, not through any private name."""
    _robustbench()
    import robustbench.model_zoo as rb_zoo
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    dictionaries = getattr(rb_zoo, "model_dicts", None)
    if not isinstance(dictionaries, dict):
        raise _changed("robustbench.model_zoo.model_dicts, the model dictionary load_model reads, is gone")
    try:
        return dictionaries[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (ValueError, KeyError):
        raise UserError(f"register: dataset {dataset!r} / threat model {threat_model!r}; use one of "
                        f"{', '.join(ZOO_DATASETS)} and Linf, L2 or corruptions") from None


# ----------------------------------------------------------------------------------------------------------
# robustbench.eval.benchmark on points already on disk


# The names of robustbench.eval that benchmark() calls and local_points replaces. benchmark() takes neither test
# points nor an AutoAttack seed and robustbench has no hook for either, so the only way in is to rebind these two
# module globals (both public names, no private one) for the duration; _rebind_benchmark_globals is the one place.
BENCHMARK_GLOBALS = ("load_clean_dataset", "AutoAttack")


@contextlib.contextmanager
def _rebind_benchmark_globals(**wrappers: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Inside the block, ``robustbench.eval.<name>`` is ``wrappers[name](original)``, for names of
    :data:`BENCHMARK_GLOBALS`; one :class:`UserError` line, naming robustbench's version, when one is gone."""
    _robustbench()
    import robustbench.eval as rb_eval

    gone = [name for name in wrappers if not callable(getattr(rb_eval, name, None))]
    if gone:
        raise _changed(f"robustbench.eval has no {' or '.join(gone)} any more, the name benchmark() called that "
                       "local_points replaces")
    originals = {name: getattr(rb_eval, name) for name in wrappers}
    for name, wrap in wrappers.items():
        setattr(rb_eval, name, wrap(originals[name]))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(rb_eval, name, original)


@contextlib.contextmanager
def local_points(images: torch.Tensor, labels: torch.Tensor, dataset: str = "cifar10",
                 seed: int | None = 0) -> Iterator[SimpleNamespace]:
    """Inside the block, ``robustbench.eval.benchmark(..., dataset=dataset)`` evaluates ``images``/``labels``
    (float [0,1], the first ``n_examples`` of them) instead of downloading the test set; with ``seed`` not
    None, its AutoAttack uses that seed (robust-sparse eval's ``--seed``; benchmark() seeds from the clock).

    Yields a record, ``points_read`` and ``attacks_built``: how often benchmark() went through the replacements
    (:func:`benchmark_on_points` checks both, so a robustbench that stopped calling them fails instead of
    silently evaluating its own test set or an unseeded attack)."""
    _robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset

    wanted = BenchmarkDataset(dataset)
    record = SimpleNamespace(points_read=0, attacks_built=0)

    def points(original):
        def load_clean_dataset(dataset_, n_examples, data_dir, prepr):  # the signature of the original
            if dataset_ != wanted:
                return original(dataset_, n_examples, data_dir, prepr)
            if n_examples is not None and n_examples > len(labels):
                raise UserError(f"benchmark: n_examples={n_examples} but only {len(labels)} local points were given")
            record.points_read += 1
            return images[:n_examples].clone(), labels[:n_examples].clone()

        return load_clean_dataset

    def seeded(original):
        def auto_attack(*args, **options):
            record.attacks_built += 1
            return original(*args, **({**options, "seed": seed} if seed is not None else options))

        return auto_attack

    with _rebind_benchmark_globals(load_clean_dataset=points, AutoAttack=seeded):
        yield record


def benchmark_on_points(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, dataset: str = "cifar10",
                        threat_model: str = "Linf", eps: float = 8 / 255, batch_size: int = 500, seed: int = 0,
                        device: torch.device | str = "cpu") -> tuple[float, float]:
    """``robustbench.eval.benchmark`` itself on these points: (clean accuracy, AutoAttack accuracy).

    ``batch_size`` is AutoAttack's ``bs``; robust-sparse eval's ``--batch-size`` with the same value and
    ``--seed`` gives the same points the same random starts.
    """
    _robustbench()
    from robustbench.eval import benchmark

    printed = io.StringIO()
    with local_points(images, labels, dataset, seed) as record, contextlib.redirect_stdout(printed):
        result = benchmark(model.eval(), n_examples=len(labels), dataset=dataset, threat_model=threat_model,
                           eps=eps, batch_size=batch_size, device=torch.device(device))
    for line in printed.getvalue().splitlines():
        log.info("robustbench: %s", line)
    if not record.points_read or (threat_model in ("Linf", "L2") and not record.attacks_built):
        missed = "robustbench.eval.load_clean_dataset" if not record.points_read else "robustbench.eval.AutoAttack"
        raise _changed(f"benchmark() ran without calling {missed}, so it did not evaluate the given points "
                       "with the given seed")
    return result


def load_zoo_model(name: str, model_dir: str | Path, dataset: str = "cifar10",
                   threat_model: str = "Linf") -> nn.Module:
    """:func:`register`, then ``robustbench.utils.load_model`` (its printed lines go to the log)."""
    register(name, model_dir, dataset, threat_model)
    from robustbench.utils import load_model

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    for line in printed.getvalue().splitlines():
        log.info("robustbench: %s", line)
    return model


__all__: Sequence[str] = ("export_to_zoo", "register", "load_zoo_model", "local_points", "benchmark_on_points",
                          "zoo_paths", "loading_recipe", "robustbench_version")
