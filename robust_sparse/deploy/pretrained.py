"""The formats people load: a model record, safetensors, a Hugging Face Hub-style folder and ONNX.

Everything an exported network needs to be rebuilt is a :class:`ModelRecord`: the architecture's name (this
toolkit's, ``torchvision:NAME`` or ``timm:NAME``), its keyword arguments, the CIFAR stem switch, the number of
classes and channels and the input normalisation. It travels as JSON inside every export (``export.json``, the
safetensors metadata, the Hub folder's ``config.json``, the sparse-inference file), so each of them rebuilds
without the training run's config.

* ``model.safetensors``: the masked weights under this toolkit's parameter names (the normalisation buffers
  included: every model here takes [0, 1] images), the record in the metadata. :func:`load_pretrained` reads it
  back, from the file, an export folder or a Hub folder.
* a Hub folder (``export --hub``): ``config.json`` (the record, the protocol, density and FLOPs),
  ``model.safetensors`` and a model card ``README.md`` with the evaluation table. ``huggingface_hub`` reads it
  with :class:`RobustSparseModel`'s ``from_pretrained(folder)`` (a ``ModelHubMixin``), offline for a local folder.
* ``model.onnx`` (``export --onnx``): the dense masked model through ``torch.onnx``, checked against PyTorch
  with onnxruntime when it is installed (:func:`write_onnx`).

An outside (``torchvision:``/``timm:``) model is also written as its library's own ``state_dict``
(``model_network.pt``: no ``network.`` prefix, no normalisation buffers), which the library's constructor loads
with ``strict=True`` (after :func:`~robust_sparse.models.apply_cifar_stem` for a CIFAR-stem run). The
normalisation is recorded in ``export.json`` and applied by :class:`~robust_sparse.models.Normalized`, the thin
wrapper the toolkit trains: folding it into the first convolution would change the zero padding's meaning at the
borders (a zero in normalised space is the mean pixel, not black), so the folded network would differ there.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from robust_sparse.files.atomic import atomic_open, write_atomic
from robust_sparse.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

SAFETENSORS_FORMAT = "robust-sparse-safetensors/1"
SAFETENSORS_FILE = "model.safetensors"
NETWORK_FILE = "model_network.pt"
HUB_CONFIG = "config.json"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit difference an export accepts

# What a file's model record may ask a loader to build. A record is read from files people pass around, and
# build_model allocates what it says (10**12 classes is a petabyte), so each field has a bound a real model
# stays far below, and the model is first built on the meta device (no memory) to check its size and shapes.
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_IN_CHANNELS = 64
MAX_ELEMENTS = 2_000_000_000  # parameters and buffers of a loaded model: 8 GB of float32


@dataclass(frozen=True)
class ModelRecord:
    """What rebuilds an exported network: :func:`robust_sparse.models.build_model`'s arguments."""

    architecture: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    cifar_stem: bool = False

    def build(self) -> nn.Module:
        from robust_sparse.models import build_model

        return build_model(self.architecture, self.num_classes, self.in_channels, self.mean, self.std,
                           self.kwargs, cifar_stem=self.cifar_stem)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: Any, where: str, kwargs_key: str = "kwargs") -> "ModelRecord":
        """The record in a file's metadata, every field checked: one :class:`CheckpointError` line naming the
        file and the field otherwise (``kwargs_key``: the sparse-inference file calls it ``model_kwargs``)."""
        required = ("architecture", "num_classes", "in_channels", "mean", "std")
        if not isinstance(data, Mapping) or any(key not in data for key in required):
            raise CheckpointError(f"{where}: no model record (needs {', '.join(required)}); re-export the model")

        def bad(name: str, why: str) -> CheckpointError:
            return CheckpointError(f"{where}: the model record's {name} {why}; re-export the model")

        architecture = data["architecture"]
        if not isinstance(architecture, str) or not 0 < len(architecture) <= 200:
            raise bad("architecture", f"is {str(architecture)[:60]!r}, not a model name")
        counts = {}
        for name, bound in (("num_classes", MAX_CLASSES), ("in_channels", MAX_IN_CHANNELS)):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                raise bad(name, f"is {str(value)[:60]}, not a whole number in 1..{bound:,}")
            counts[name] = value
        statistics = {}
        for name in ("mean", "std"):
            values = data[name]
            if (not isinstance(values, (list, tuple)) or len(values) != counts["in_channels"]
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)
                    or (name == "std" and not all(v > 0 for v in values))):
                raise bad(name, f"is {str(values)[:60]}, not {counts['in_channels']} finite numbers (one per input "
                                f"channel{', each > 0' if name == 'std' else ''})")
            statistics[name] = tuple(float(v) for v in values)
        kwargs = data.get(kwargs_key) or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
            raise bad(kwargs_key, f"is {str(kwargs)[:60]}, not a mapping of keyword arguments")
        cifar_stem = data.get("cifar_stem", False)
        if not isinstance(cifar_stem, bool):
            raise bad("cifar_stem", f"is {str(cifar_stem)[:60]}, not true or false")
        return cls(architecture, counts["num_classes"], counts["in_channels"], statistics["mean"], statistics["std"],
                   dict(kwargs), cifar_stem)

    def build_checked(self, where: str, state: Mapping[str, Any], skip: Sequence[str] = ()) -> nn.Module:
        """:meth:`build` for a file's record and ``state``: first on the meta device, which allocates nothing, so
        that a record naming a model this toolkit cannot build, one of more than :data:`MAX_ELEMENTS` elements,
        or one whose tensors have other shapes than the file's (names in ``skip`` excepted) is one
        :class:`CheckpointError` line before any memory is spent; then for real."""
        for name, tensor in state.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{where}: the stored state holds {str(name)[:60]!r}, which is not a named "
                                      "tensor; re-export the model")
        built = None
        try:
            with torch.device("meta"):
                skeleton = self.build()
        except Exception as error:
            if "meta" not in str(error):
                raise self._unbuildable(where, error) from None
            # Some constructors read a value back while initialising (timm's ViT calls .item()), which the meta
            # device cannot answer: such a model is built for real, within the record's bounded class and
            # channel counts, and checked against the file the same way before it is returned.
            built = skeleton = self._build_or_refuse(where)
        expected = skeleton.state_dict()
        size = sum(tensor.numel() for tensor in expected.values())
        if size > MAX_ELEMENTS:
            raise CheckpointError(f"{where}: the recorded {self.architecture} with {self.num_classes:,} classes has "
                                  f"{size:,} parameters and buffers, more than the {MAX_ELEMENTS:,} a loader builds")
        for name, tensor in expected.items():
            stored = state.get(name)
            if name not in skip and stored is not None and tuple(stored.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{where}: {name} has shape {list(stored.shape)} in the file, and the recorded "
                                      f"{self.architecture} ({self.num_classes} classes, {self.in_channels} input "
                                      f"channels) needs {list(tensor.shape)}")
        return built if built is not None else self._build_or_refuse(where)

    def _build_or_refuse(self, where: str) -> nn.Module:
        try:
            return self.build()
        except Exception as error:
            raise self._unbuildable(where, error) from None

    def _unbuildable(self, where: str, error: Exception) -> CheckpointError:
        if isinstance(error, UserError):
            return CheckpointError(f"{where}: the recorded model cannot be built: {error}")
        # a library constructor refusing the recorded kwargs raises any exception type
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        return CheckpointError(f"{where}: the recorded model {self.architecture} cannot be built "
                               f"({type(error).__name__}: {reason})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelRecord":
        """The record of a run's saved config (its data root may be gone: only the dataset's shapes are read)."""
        from robust_sparse.config import config_from_dict
        from robust_sparse.datasets.splits import dataset_info

        run = config_from_dict({**config, "data": {**config.get("data", {}), "root": "."}})
        info = dataset_info(run.data)
        return cls(run.model.name, info.num_classes, info.in_channels, tuple(info.mean), tuple(info.std),
                   dict(run.model.kwargs), run.model.cifar_stem)

    @property
    def library(self) -> tuple[str, str] | None:
        """``("timm", "resnet18")`` for an outside model, None for this toolkit's own."""
        from robust_sparse.models import split_spec

        return split_spec(self.architecture)


# ---- the library's own state_dict of an outside model -------------------------------------------------------


def network_state(record: ModelRecord, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outside network's parameters under its library's names: ``network.`` cut, normalisation left out."""
    prefix = "network."
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def network_manifest(record: ModelRecord) -> dict[str, Any]:
    """How a user rebuilds the library network of ``model_network.pt`` without this toolkit (export.json)."""
    library, name = record.library or ("", "")
    options = {**record.kwargs, "num_classes": record.num_classes}
    if library == "timm":
        options.setdefault("in_chans", record.in_channels)
        build = f"timm.create_model({name!r}, **{options!r})"
    else:
        build = f"torchvision.models.get_model({name!r}, **{options!r})"
    if record.cifar_stem:
        build = f"robust_sparse.models.apply_cifar_stem({build})"
    return {"file": NETWORK_FILE, "library": library, "name": name, "kwargs": options,
            "cifar_stem": record.cifar_stem, "normalize": {"mean": list(record.mean), "std": list(record.std)},
            "load": f"network = {build}; network.load_state_dict(torch.load({NETWORK_FILE!r}, weights_only=True), "
                    "strict=True); model = robust_sparse.models.Normalized(robust_sparse.models.Normalize(mean, std),"
                    " network)  # on [0, 1] images"}


# ---- safetensors -----------------------------------------------------------------------------------------------


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError("safetensors is not installed: pip install safetensors (or robust-sparse[deploy])") from None
    return safetensors.torch


def write_safetensors(path: str | Path, state: Mapping[str, torch.Tensor], record: ModelRecord,
                      extra: Mapping[str, Any] | None = None) -> None:
    """``state`` (contiguous copies: safetensors refuses shared storage) with the record as metadata; atomic."""
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}
    metadata = {"format": SAFETENSORS_FORMAT, "model": json.dumps(record.to_json()),
                **{key: json.dumps(value) for key, value in (extra or {}).items()}}
    write_bytes(Path(path), _safetensors().save(tensors, metadata=metadata))


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically (safetensors and ONNX serialise to bytes in memory first)."""
    with atomic_open(path, "wb") as stream:
        stream.write(data)


def read_safetensors(path: str | Path, expected: str = SAFETENSORS_FORMAT,
                     what: str = "a robust-sparse export") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the decoded metadata of a file written by :func:`write_safetensors` (or another of the
    toolkit's safetensors files, whose metadata ``format`` is ``expected``); every failure one line."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # a truncated or foreign file: safetensors' own reason, in one line
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(error).__name__}: "
                              f"{_first_line(error)})") from None
    if metadata.get("format") != expected:
        raise CheckpointError(f"{path}: not {what} (metadata format {str(metadata.get('format'))[:60]!r}, "
                              f"expected {expected!r})")
    return tensors, decode_metadata(metadata, path)


def decode_metadata(metadata: Mapping[str, str], path: str | Path) -> dict[str, Any]:
    """safetensors metadata values (JSON text, ``format`` plain) decoded; a value that is not JSON is one line."""
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value) if key != "format" else value
        except ValueError:
            raise CheckpointError(f"{path}: metadata {str(key)[:60]!r} is not JSON; re-export the model") from None
    return decoded


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def load_pretrained(path: str | Path) -> nn.Module:
    """The exported model, in eval mode, on [0, 1] images: from ``model.safetensors``, an export folder or a Hub
    folder. Loads with ``strict=True``: a file that does not fit the recorded architecture is an error."""
    path = Path(path)
    file = path / SAFETENSORS_FILE if path.is_dir() else path
    state, metadata = read_safetensors(file)
    record = ModelRecord.from_json(metadata.get("model"), str(file))
    model = record.build_checked(str(file), state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{file}: the weights do not fit {record.architecture} "
                              f"({str(error).splitlines()[0]})") from None
    return model.eval()


# ---- a Hugging Face Hub-style folder -------------------------------------------------------------------------


def _card_table(evaluation: Sequence[Mapping[str, Any]]) -> list[str]:
    if not evaluation:
        return ["No evaluation was found beside the checkpoint (run `robust-sparse eval` on it, then export "
                "again)."]
    lines = ["| attack | threat model | eps | points | accuracy |", "|---|---|---|---|---|"]
    for row in evaluation:
        lines.append(f"| {row['attack']} | {row['threat_model']} | {row['eps']:.5g} | {row['n']} | "
                     f"{100 * row['accuracy']:.2f}% |")
    return lines


def model_card(name: str, config: Mapping[str, Any], summary: Mapping[str, Any],
               evaluation: Sequence[Mapping[str, Any]]) -> str:
    protocol = summary["protocol"]
    record = config["model"]
    lines = [
        "---", "library_name: robust-sparse", "tags:", "- adversarial-robustness", "- sparse",
        f"- {protocol['dataset']}", "---", "", f"# {name}", "",
        f"A {1 - summary['density']:.1%} sparse `{record['architecture']}` trained with robust-sparse "
        f"({protocol['objective']}, {protocol['norm']} eps {protocol['eps']:.5g}) on {protocol['dataset']}.", "",
        "## Evaluation", "",
        "Every evaluation of this checkpoint found at export: inputs in [0, 1], eps in pixel units, the first n test "
        "points in order (the RobustBench protocol). AutoAttack appears once `robust-sparse eval` has run it.", "",
        *_card_table(evaluation), "",
        "## Sparsity and cost", "",
        f"- density {summary['density']:.4f} over {summary['sparse_layers']} sparse layers; "
        f"{summary['nonzero_parameters']:,} non-zero parameters",
    ]
    if summary.get("inference_flops_vs_dense") is not None:
        lines.append(f"- inference FLOPs {summary['inference_flops_vs_dense']:.3f}x the dense model's")
    lines += [
        "", "## Loading", "", "```python", "import robust_sparse",
        "model = robust_sparse.load_pretrained('path/to/this/folder')  # eval mode, [0, 1] inputs", "```", "",
        "or, with huggingface_hub installed: `robust_sparse.deploy.pretrained.RobustSparseModel.from_pretrained(folder)`.", "",
    ]
    return "\n".join(lines)


def write_hub_folder(out: Path, state: Mapping[str, torch.Tensor], record: ModelRecord, summary: Mapping[str, Any],
                     evaluation: Sequence[Mapping[str, Any]]) -> Path:
    """``out`` gets ``config.json``, ``model.safetensors`` and a model card ``README.md``; every file atomic."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": record.to_json(), "protocol": summary["protocol"], "density": summary["density"],
              "layer_density": summary["layer_density"], "evaluation": list(evaluation),
              **{key: summary[key] for key in ("inference_flops", "inference_flops_vs_dense") if key in summary}}
    write_safetensors(out / SAFETENSORS_FILE, state, record, {"protocol": summary["protocol"]})
    write_atomic(out / HUB_CONFIG, json.dumps(config, indent=2))
    write_atomic(out / "README.md", model_card(out.name if out.name != "hub" else out.parent.name, config, summary,
                                               evaluation))
    return out


def _hub_mixin():
    try:
        from huggingface_hub import ModelHubMixin
    except ImportError:  # the class below then is a plain object with from_pretrained only
        return object
    return ModelHubMixin


class RobustSparseModel(_hub_mixin()):  # type: ignore[misc]
    """``huggingface_hub``'s entry point: ``RobustSparseModel.from_pretrained(folder_or_repo)`` returns the
    exported ``nn.Module`` (eval mode, [0, 1] inputs). A local folder is read offline; a repository id is
    downloaded by huggingface_hub first."""

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         **_model_kwargs: Any) -> nn.Module:
        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, local_files_only=local_files_only,
                                            token=token))
        return load_pretrained(folder)

    if _hub_mixin() is object:  # without huggingface_hub: the same call, on local folders
        @classmethod
        def from_pretrained(cls, folder: str | Path) -> nn.Module:  # type: ignore[no-redef]
            return load_pretrained(folder)


# ---- ONNX ------------------------------------------------------------------------------------------------------


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """``model`` (eval mode) as ONNX with a dynamic batch axis, written atomically; when onnxruntime is installed,
    its logits on ``example`` are compared with PyTorch's and an export further than :data:`ONNX_TOLERANCE`
    is refused. Returns the record for export.json."""
    import tempfile

    model = model.eval()
    # torch.export's exporter (it handles what the TorchScript one refuses, e.g. an adaptive pooling to a size
    # that does not divide the input); its file is written to a scratch folder, then moved in atomically
    with tempfile.TemporaryDirectory() as scratch:
        scratch_file = Path(scratch) / path.name
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        opset_version=ONNX_OPSET)
            program.save(str(scratch_file))
        except Exception as error:
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            raise UserError(f"export --onnx: torch.onnx could not export this model ({type(error).__name__}: "
                            f"{reason})") from None
        data = scratch_file.read_bytes()
    record: dict[str, Any] = {"file": path.name, "opset": ONNX_OPSET, "file_bytes": len(data), "inputs": "images [N, C, H, W]"
                              " in [0, 1]", "checked_with": None, "max_abs_difference": None}
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: %s is written unchecked (pip install onnxruntime)", path.name)
    else:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": example.numpy()})
        with torch.no_grad():
            expected = model(example)
        difference = float((torch.from_numpy(logits) - expected).abs().max())
        record.update(checked_with=f"onnxruntime {onnxruntime.__version__}", max_abs_difference=difference)
        if not difference <= ONNX_TOLERANCE:
            raise UserError(f"export --onnx: onnxruntime's logits differ from PyTorch's by {difference:.3g} "
                            f"(> {ONNX_TOLERANCE}); {path.name} not written")
    write_bytes(path, data)
    return record
