"""Where the evaluated models come from, and what we measure about a model before attacking it.

Four model sources, each ending in a :class:`LoadedModel` whose ``nn.Module`` takes [0,1] images and returns logits:

* a robust-sparse checkpoint (``best.pt``/``last.pt``; :func:`from_checkpoint`, :func:`from_checkpoint_subnets`):
  architecture, dataset and threat model from its config;
* a plain ``state_dict`` file for an architecture of our registry (``--arch NAME --weights PATH``;
  :func:`from_weights`), an exported ``model_dense.pt`` bringing its run's protocol (:func:`exported_protocol`);
* any model from a factory, ``FILE.py:FACTORY``, ``package.module:FACTORY``, ``torchvision:NAME`` or ``timm:NAME``
  (``--model``; :func:`from_factory`), imported with the user's code kept from our ``sys.argv`` and exit code,
  its output shape checked (:func:`check_model_output`);
* a RobustBench zoo entry (:func:`from_robustbench`), through ``robustbench.utils.load_model`` from a local model
  directory laid out as the zoo's (``<model_dir>/<dataset>/<threat_model>/<name>.pt``), downloaded by robustbench
  when absent.

What a loaded model is: :func:`model_fingerprint` (its weights' hash) and :func:`sparsity_stats`.
The test points the models are evaluated on: robust_sparse.eval.points.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_sparse.files.checkpoint import load_checkpoint, safe_load
from robust_sparse.config import DataConfig
from robust_sparse.datasets import DATASETS
from robust_sparse.errors import CheckpointError, UserError
from robust_sparse.eval.store import ROBUSTBENCH_THREATS

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    name: str  # the results key
    source: str  # "checkpoint", "weights", "factory" or "robustbench"
    path: str
    architecture: str
    dataset: str  # a registered dataset's name
    # defaults a checkpoint carries (None elsewhere)
    norm: str | None = None
    eps: float | None = None
    n_examples: int | None = None
    pgd_steps: int | None = None
    restarts: int | None = None
    data_root: str | None = None
    epoch: int | None = None
    # the training recipe (checkpoints only): images trained on, epochs planned, which checkpoint (a
    # leaderboard.Selection value) and AGENT's estimator ("none" without AGENT), for the report's comparison
    train_images: int | None = None
    epochs: int | None = None
    suffix: str = ""  # one of several networks in a checkpoint (AST's sub-nets): "/subnet{k}", part of ``name``
    selection: str | None = None
    estimator: str | None = None
    # training FLOPs up to the checkpoint's epoch, and against dense training (robust_sparse.flops; None if unknown)
    train_flops: float | None = None
    train_flops_vs_dense: float | None = None
    data: DataConfig | None = None  # checkpoints: the run's data section (a streamed dataset's folders and list)


# ----------------------------------------------------------------------------------------------------------
# model sources


def from_checkpoint(path: str | Path, data_root: str | None = None, subnet: int | None = None) -> LoadedModel:
    """A robust-sparse checkpoint; its config gives the architecture, dataset, threat model and eval settings.

    AST checkpoints hold several sub-nets over one weight tensor: ``subnet`` picks one (required there).
    """
    return from_checkpoint_subnets(path, data_root, [subnet])[0]


def from_checkpoint_subnets(path: str | Path, data_root: str | None = None,
                            subnets: list[int | None] | None = None) -> list[LoadedModel]:
    """One model per requested sub-net of a checkpoint, read once; ``subnets=None``: every sub-net of an AST
    checkpoint, or the one network of any other."""
    from robust_sparse.config import config_from_dict
    from robust_sparse.datasets.splits import dataset_info
    from robust_sparse.eval.leaderboard import NO_AGENT, checkpoint_selection
    from robust_sparse.models import build_model
    from robust_sparse.sparse.methods import pick_view, saved_views

    path = Path(path)
    state = load_checkpoint(path)
    raw = state.get("config")
    if not isinstance(raw, dict) or "model" not in state:
        raise CheckpointError(f"{path} has no config/model: not written by robust-sparse train")
    config = config_from_dict(raw)
    info = dataset_info(config.data)
    views = saved_views(state)
    trained = (state.get("history") or [{}])[-1]  # metrics.csv's row of the checkpoint's epoch
    cost = {key: float(trained[key]) if trained.get(key) is not None and trained[key] == trained[key] else None
            for key in ("train_flops", "train_flops_vs_dense")}
    chosen = views if subnets is None else [pick_view(views, k, path) for k in subnets]
    loaded = []
    for view in chosen:
        weights, suffix = view.weights, "" if view.index is None else f"/subnet{view.index}"
        model = build_model(config.model.name, info.num_classes, info.in_channels, info.mean, info.std,
                            config.model.kwargs, cifar_stem=config.model.cifar_stem)
        _load_into(model, weights, path, config.model.name)
        eval_config = config.eval
        loaded.append(LoadedModel(
            model=model.eval(), name=(f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem) + suffix,
            source="checkpoint", path=str(path), architecture=config.model.name, dataset=config.data.dataset,
            norm=config.attack.norm.value, eps=eval_config.eps if eval_config.eps is not None else config.attack.eps,
            n_examples=eval_config.n_examples or None, pgd_steps=eval_config.pgd_steps, restarts=eval_config.restarts,
            data_root=data_root if data_root is not None else config.data.root, epoch=state.get("epoch"),
            train_images=(state.get("data_sizes") or {}).get("train"), epochs=config.optim.epochs,
            selection=getattr(checkpoint_selection(state), "value", None),
            estimator=config.agent.estimator.value if config.agent.enabled else NO_AGENT, suffix=suffix, **cost,
            data=replace(config.data, root=data_root if data_root is not None else config.data.root),
        ))
    return loaded


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a file: plain, under ``key`` when given, else under ``state_dict``/``model``
    (robust-sparse) when present; ``module.`` (DataParallel) stripped."""
    path = Path(path)
    payload = safe_load(path, "weights file")
    if key is not None:
        if not isinstance(payload, dict) or key not in payload:
            keys = ", ".join(map(str, list(payload)[:8])) if isinstance(payload, dict) else type(payload).__name__
            raise UserError(f"--weights-key {key!r}: {path} has no such key (it holds: {keys})")
        payload = payload[key]
    elif isinstance(payload, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(payload.get(wrapper), dict):
                payload = payload[wrapper]
                break
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in payload.items()}


def _load_into(model: nn.Module, state_dict: dict[str, Any], path: Path, architecture: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # torch's first line is only "Error(s) in loading state_dict for X:"
        expected = model.state_dict()

        def first(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        shapes = [f"{k} {list(v.shape)} in the file, {list(expected[k].shape)} in the model"
                  for k, v in state_dict.items()
                  if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
        parts = [f"{label} {len(names)} ({first(names)})" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if names]
        lines = [line.strip() for line in str(error).strip().splitlines()]
        detail = "; ".join(parts) or next((line for line in lines[1:] if line), lines[0] if lines else "")
        raise UserError(f"{path}: weights do not fit {architecture}: {detail}") from None


def exported_protocol(weights: str | Path) -> dict[str, Any] | None:
    """The protocol ``robust-sparse export`` wrote beside ``model_dense.pt`` (``export.json``), if any."""
    import json

    manifest = Path(weights).parent / "export.json"
    if Path(weights).name != "model_dense.pt" or not manifest.is_file():
        return None
    try:
        protocol = json.loads(manifest.read_text()).get("protocol")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{manifest}: unreadable export manifest (re-run robust-sparse export)") from None
    return protocol if isinstance(protocol, dict) else None


def from_weights(architecture: str, path: str | Path, dataset: str) -> LoadedModel:
    """A plain state_dict for an architecture of :data:`robust_sparse.models.MODELS` and a dataset's shapes.

    An exported ``model_dense.pt`` brings its run's threat model and eps (``export.json``) as the defaults.
    """
    from robust_sparse.models import build_model

    info = DATASETS.get(dataset)
    model = build_model(architecture, info.num_classes, info.in_channels, info.mean, info.std)
    path = Path(path)
    _load_into(model, read_state_dict(path), path, architecture)
    loaded = LoadedModel(model=model.eval(), name=f"{architecture}:{path.stem}", source="weights", path=str(path),
                         architecture=architecture, dataset=dataset)
    protocol = exported_protocol(path)
    if protocol is not None and protocol.get("dataset") == dataset:
        loaded.norm, loaded.eps = protocol.get("norm"), protocol.get("eps")
    return loaded


def parse_factory(spec: str) -> tuple[str, str]:
    """``FILE.py:FACTORY`` or ``package.module:FACTORY`` -> (module part, attribute); one-line error otherwise."""
    module, sep, attribute = spec.rpartition(":")
    if not sep or not module or not attribute.isidentifier():
        raise UserError(f"--model {spec!r}: expected FILE.py:FACTORY or package.module:FACTORY, e.g. factory.py:build")
    return module, attribute


@contextlib.contextmanager
def _factory_argv(spec: str, module: str):
    """The user's code runs with ``sys.argv = [its file]``: an argparse of its own then speaks under its own
    name, not ours, and never reads robust-sparse's flags."""
    import sys

    saved = sys.argv
    sys.argv = [module]
    try:
        yield
    finally:
        sys.argv = saved


def _exited(spec: str, what: str, error: SystemExit) -> UserError:
    """A factory that calls ``sys.exit`` (or argparse's error) must not decide robust-sparse's exit code."""
    return UserError(f"--model {spec}: {what} exited (SystemExit({error.code!r})); a factory must return a model, "
                     "not exit (one that parses command-line arguments gets none here)")


def _import_factory_module(module: str, spec: str):
    import importlib
    import importlib.util
    import sys

    if module.endswith(".py") or "/" in module or "\\" in module or Path(module).is_file():
        path = Path(module)
        if path.suffix != ".py":
            raise UserError(f"--model {spec}: {path} is not a Python file: expected FILE.py:FACTORY")
        if not path.is_file():
            raise UserError(f"--model {spec}: file not found: {path}")
        # a name of its own per file, so two factory files never share a module cache entry
        name = "robust_sparse_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = loaded  # dataclasses and pickling look modules up by name while they execute
        try:
            with _factory_argv(spec, module):
                module_spec.loader.exec_module(loaded)
        except SystemExit as error:
            sys.modules.pop(name, None)
            raise _exited(spec, f"importing {path}", error) from None
        except Exception as error:
            sys.modules.pop(name, None)
            raise UserError(f"--model {spec}: importing {path} failed: {_reason(error)}") from None
        return loaded
    try:
        with _factory_argv(spec, module):
            return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise UserError(f"--model {spec}: no module {error.name!r} (a FILE.py path, or an importable "
                        "package.module)") from None
    except SystemExit as error:
        raise _exited(spec, f"importing {module}", error) from None
    except Exception as error:
        raise UserError(f"--model {spec}: importing {module} failed: {_reason(error)}") from None


def check_model_output(model: nn.Module, dataset: str, what: str) -> None:
    """One forward pass on two blank images of the dataset's shape: the model must return [2, num_classes] logits.

    Run before any data or attack work, so a model for another dataset fails in one line, not mid-evaluation.
    """
    info = DATASETS.get(dataset)
    probe = torch.full((2, info.in_channels, info.image_size, info.image_size), 0.5)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(probe)
    except Exception as error:
        raise UserError(f"{what}: a forward pass on {dataset} images [2, {info.in_channels}, "
                        f"{info.image_size}, {info.image_size}] failed: {_reason(error)}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, info.num_classes):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(f"{what}: the model must return logits of shape [batch, {info.num_classes}] for "
                        f"{dataset}, got {shape} for a batch of 2")


def parse_kwargs(text: str, flag: str) -> dict[str, Any]:
    """``a=1,b=resnet18`` or a YAML mapping ``{a: 1, b: [2, 3]}`` -> a dict; values read as YAML scalars."""
    import yaml

    text = text.strip()
    try:
        if text.startswith("{"):
            parsed = yaml.safe_load(text)
        else:
            parsed = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = part.partition("=")
                if not sep or not key.strip().isidentifier():
                    raise UserError(f"{flag}: {part!r} is not NAME=VALUE (e.g. num_classes=10)")
                parsed[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as error:
        raise UserError(f"{flag}: not YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and k.isidentifier() for k in parsed):
        raise UserError(f"{flag}: expected NAME=VALUE,... or a mapping of names to values")
    return parsed


def from_factory(spec: str, dataset: str, weights: str | Path | None = None,
                 weights_key: str | None = None, kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """Any model: ``FACTORY(**kwargs)`` from ``FILE.py:FACTORY`` or ``package.module:FACTORY`` returns an
    ``nn.Module`` on [0,1] inputs; ``torchvision:NAME`` and ``timm:NAME`` (a model of that library) are built as
    training builds them, the dataset's Normalize layer in front. ``weights`` (a state_dict, or a dict holding one
    under ``weights_key``) is loaded strictly.

    Every failure (file, attribute, the factory raising, weights that do not fit, output shape) is a one-line
    :class:`UserError` before any data or attack work.
    """
    from robust_sparse.models import split_spec
    from robust_sparse.models.external import library_names

    module_name, attribute = parse_factory(spec)
    kwargs = kwargs or {}
    if weights is not None and not Path(weights).is_file():  # the cheap check before running user code
        raise UserError(f"--weights: file not found: {weights}")
    library = split_spec(spec)
    if library is not None and library[1] in library_names(library[0]):
        return _from_library(spec, dataset, weights, weights_key, kwargs)
    module = _import_factory_module(module_name, spec)
    factory = getattr(module, attribute, None)
    if factory is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attribute, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"--model {spec}: {module_name} has no attribute {attribute!r}{hint}")
    if not callable(factory):
        raise UserError(f"--model {spec}: {attribute} is a {type(factory).__name__}, not a callable factory")
    try:
        with _factory_argv(spec, module_name):
            model = factory(**kwargs)
    except SystemExit as error:
        raise _exited(spec, f"{attribute}()", error) from None
    except Exception as error:
        raise UserError(f"--model {spec}: {attribute}() raised {_reason(error)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: {attribute}() returned a {type(model).__name__}, not a torch.nn.Module")
    name = f"{Path(module_name).stem if module_name.endswith('.py') else module_name}:{attribute}"
    return _loaded_factory_model(model, spec, name, type(model).__name__, module_name, dataset, weights, weights_key)


def _from_library(spec: str, dataset: str, weights: str | Path | None, weights_key: str | None,
                  kwargs: dict[str, Any]) -> LoadedModel:
    """``torchvision:NAME``/``timm:NAME`` as ``model.name`` builds it for training (weights: its state_dict)."""
    from robust_sparse.models import build_model

    info = DATASETS.get(dataset)
    model = build_model(spec, info.num_classes, info.in_channels, info.mean, info.std, kwargs)
    return _loaded_factory_model(model, spec, spec, spec, spec, dataset, weights, weights_key)


def _loaded_factory_model(model: nn.Module, spec: str, name: str, architecture: str, source_path: str,
                          dataset: str, weights: str | Path | None, weights_key: str | None) -> LoadedModel:
    """A ``--model`` network with its ``--weights`` loaded, in eval mode on the CPU, its output shape checked."""
    if weights is not None:
        path = Path(weights)
        _load_into(model, read_state_dict(path, key=weights_key), path, architecture)
        name = f"{name}:{path.stem}"
    elif weights_key is not None:
        raise UserError("--weights-key needs --weights")
    model = model.cpu().eval()
    check_model_output(model, dataset, f"--model {spec}")
    return LoadedModel(model=model, name=name, source="factory", path=str(weights or source_path),
                       architecture=architecture, dataset=dataset)


def check_robustbench_name(name: str, dataset: str, norm: str) -> None:
    """The zoo has an entry ``name`` for this dataset and threat model (cheap: no weights are read)."""
    from robust_sparse.environment.compat import import_robustbench

    zoo_datasets = [name for name, record in DATASETS.entries() if record.robustbench is not None]
    if dataset not in zoo_datasets:
        raise UserError(f"--robustbench-model: the zoo is supported for {', '.join(zoo_datasets)}, not {dataset}")
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    threat = ROBUSTBENCH_THREATS[norm]
    zoo = model_dicts[BenchmarkDataset(DATASETS.get(dataset).robustbench)][ThreatModel(threat)]
    if name not in zoo:
        close = difflib.get_close_matches(name, list(zoo), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(zoo)} entries, e.g. Standard)"
        raise UserError(f"unknown RobustBench model {name!r} for {dataset}/{threat}{hint}")


def from_robustbench(name: str, dataset: str, norm: str, model_dir: str | Path) -> LoadedModel:
    """A RobustBench zoo model through ``robustbench.utils.load_model``.

    The weights are read from ``<model_dir>/<dataset>/<Linf|L2>/<name>.pt`` when present; otherwise robustbench
    downloads them, and without a network that fails with a one-line error naming the path to fill.
    """
    check_robustbench_name(name, dataset, norm)
    from robustbench.utils import load_model

    threat = ROBUSTBENCH_THREATS[norm]
    model_dir = Path(model_dir)
    path = model_dir / dataset / threat / f"{name}.pt"
    existed = path.is_file()
    if not existed:
        log.info("%s is not in %s: asking robustbench to download it", name, path.parent)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            model = load_model(model_name=name, model_dir=str(model_dir), dataset=DATASETS.get(dataset).robustbench, threat_model=threat)
    except Exception as error:  # requests/gdown/urllib connection errors, torch load errors, state_dict mismatch
        reason = _reason(error)
        if not existed:
            if path.is_file():  # a partial download must not pass for weights next time
                path.unlink()
            raise UserError(f"RobustBench model {name}: weights not found at {path} and the download failed "
                            f"({reason}); copy the checkpoint there or run with network access") from None
        raise UserError(f"RobustBench model {name}: cannot load {path} ({reason})") from None
    finally:
        for line in printed.getvalue().splitlines():
            log.info("robustbench: %s", line)
    architecture = type(model).__name__
    return LoadedModel(model=model.eval(), name=name, source="robustbench", path=str(path),
                       architecture=architecture, dataset=dataset)


def _reason(error: BaseException) -> str:
    """One short line for an exception: connection errors name the host they could not reach."""
    text = str(error).strip()
    host = re.search(r"host='([^']+)'", text)
    if host:
        return f"{type(error).__name__}: cannot reach {host.group(1)}"
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}{'...' if len(first) > 160 else ''}"


# ----------------------------------------------------------------------------------------------------------
# what a model is


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the state_dict: saved flags are only resumed for the very same weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]



def sparsity_stats(model: nn.Module) -> dict[str, float | int]:
    """Weight sparsity (exact zeros in conv/linear weights) and parameter counts, for any model."""
    prunable = zeros = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and isinstance(weight, torch.Tensor):
            prunable += weight.numel()
            zeros += int((weight == 0).sum())
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    nonzero = sum(int((p != 0).sum()) for p in parameters)
    return {"sparsity": zeros / prunable if prunable else 0.0, "params": total, "nonzero_params": nonzero,
            "prunable_params": prunable}

