"""Inputs from the wide world (issue 32): plugin modules, the Python API's loaders and the warnings of the
libraries imported on the way to a refusal. Each bad input is one line naming the module or file, never a
traceback, and nothing outside the output is changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line_error, snapshot
from robust_sparse import plugins

# ----------------------------------------------------------------------------------------------------------
# $ROBUST_SPARSE_PLUGINS


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    """A folder on sys.path for plugin modules, with the once-per-process import flag reset."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "_imported", False)
    yield folder
    for path in folder.glob("*.py"):
        sys.modules.pop(path.stem, None)


PLUGINS = {
    "exits_zero": ("import sys\nsys.exit(0)\n", "sys.exit(0)"),
    "exits_text": ("raise SystemExit('bye')\n", "sys.exit('bye')"),
    "raises": ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    "broken_syntax": ("def f(:\n    pass\n", "SyntaxError"),
    "imports_missing": ("import no_such_dependency_xyz\n", "no_such_dependency_xyz"),
}


@pytest.mark.parametrize("module", sorted(PLUGINS))
def test_a_plugin_that_fails_or_exits_is_one_line_naming_it_and_nothing_trains(module, plugin_folder, tmp_path,
                                                                              monkeypatch, capsys):
    source, reason = PLUGINS[module]
    (plugin_folder / f"{module}.py").write_text(source)
    monkeypatch.setenv(plugins.VARIABLE, module)
    run = tmp_path / "run"
    line = one_line_error(["train", "--set", "model.name=tiny_cnn", "--set", "sparsity.method=plugin-method",
                           "--set", "device=cpu", "--out", str(run)], capsys)
    assert plugins.VARIABLE in line and repr(module) in line and reason in line, line
    assert not run.exists()


@pytest.mark.parametrize("name", [".relative", "a..b", "my plugin", "my-plugin", "1st"])
def test_a_plugin_name_that_is_no_module_name_is_refused_naming_it(name, plugin_folder, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv(plugins.VARIABLE, f"os,{name}")
    run = tmp_path / "run"
    line = one_line_error(["train", "--set", "model.name=no_such_model", "--set", "device=cpu", "--out", str(run)],
                          capsys)
    assert plugins.VARIABLE in line and repr(name) in line and "not a module name" in line, line
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------------
# the first line of a refusal is the toolkit's, not a dependency's import-time warning


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: timm and robustbench warn only when first imported, which this test process may
    # have done already. Default warning filters, as a user's shell has them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "robust_sparse.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def weights(tmp_path):
    import torch

    path = tmp_path / "weights.pt"
    torch.save({}, path)
    return path


@pytest.mark.parametrize("argv,named", [
    (["--arch", "timm:NO_SUCH", "--dataset", "cifar10"], "NO_SUCH"),
    (["--model", "timm:NO_SUCH", "--dataset", "cifar10"], "NO_SUCH"),
    (["--arch", "resnet18", "--dataset", "cifar10", "--threat-model", "corruptions", "--corruptions", "nosuch"],
     "--corruptions"),
])
def test_a_refusal_after_importing_timm_or_robustbench_is_exactly_one_line(argv, named, weights, tmp_path):
    before = snapshot(tmp_path)
    result = _cli(tmp_path, "eval", "--weights", str(weights), *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("robust-sparse: error: ") and named in lines[0], result.stderr
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------
# the Python API's loaders: one CheckpointError line naming the file, and no allocation a file can inflate


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def sparse_inference_file(tmp_path_factory):
    """A tiny_cnn (MNIST shapes) at 10% density as a sparse-inference file, every layer on the sparse kernel."""
    import torch

    from conftest import make_tiny_model
    from robust_sparse.datasets import DATASETS
    from robust_sparse.deploy.inference import save_sparse_inference, sparse_inference

    model = make_tiny_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.mul_(torch.rand_like(module.weight) < 0.1)
    fast = sparse_inference(model.eval(), torch.rand(2, 1, 28, 28), measure=lambda name, d, s: (1.0, 0.5))
    info = DATASETS.get("mnist5k")
    path = tmp_path_factory.mktemp("sparse_inference") / "model_sparse_inference.pt"
    save_sparse_inference(fast, path, "tiny_cnn", info.num_classes, info.in_channels, info.mean, info.std)
    return path


def _tampered(source: Path, target: Path, **changes) -> Path:
    import torch

    payload = torch.load(source, weights_only=True)
    for key, value in changes.items():
        if callable(value):
            value(payload)
        else:
            payload[key] = value
    torch.save(payload, target)
    return target


def test_load_sparse_inference_of_a_truncated_file_is_one_checkpoint_error(sparse_inference_file, tmp_path):
    from robust_sparse.errors import CheckpointError
    from robust_sparse.deploy.inference import load_sparse_inference

    data = sparse_inference_file.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_sparse_inference(truncated)
    assert str(truncated) in _one_line(error) and "truncated" in _one_line(error)
    assert load_sparse_inference(sparse_inference_file) is not None  # the intact file still loads


@pytest.mark.parametrize("field,value,named", [
    ("num_classes", 10**12, "num_classes is 1000000000000, not a whole number in 1..100,000"),
    ("num_classes", 11, "has shape [10] in the file"),  # within bounds, but not the stored classifier's size
    ("num_classes", "10", "num_classes is 10, not a whole number"),
    ("in_channels", 10**6, "in_channels is 1000000, not a whole number in 1..64"),
    ("mean", [float("nan")], "mean is [nan], not 1 finite numbers"),
    ("architecture", "no_such_arch", "the recorded model cannot be built"),
    ("sparse_layers", "conv1", "sparse_layers is not a list"),
])
def test_load_sparse_inference_refuses_a_record_it_would_build_wrongly_or_hugely(sparse_inference_file, tmp_path,
                                                                                 field, value, named):
    from robust_sparse.errors import CheckpointError
    from robust_sparse.deploy.inference import load_sparse_inference

    path = _tampered(sparse_inference_file, tmp_path / "tampered.pt", **{field: value})
    with pytest.raises(CheckpointError) as error:
        load_sparse_inference(path)
    assert str(path) in _one_line(error) and named in _one_line(error), _one_line(error)


def test_load_sparse_inference_refuses_positions_outside_their_weight(sparse_inference_file, tmp_path):
    import torch

    from robust_sparse.errors import CheckpointError
    from robust_sparse.deploy.inference import load_sparse_inference

    payload = torch.load(sparse_inference_file, weights_only=True)
    layer = payload["sparse_layers"][0]

    def far(data):
        data["state"][f"{layer}.indices"] = data["state"][f"{layer}.indices"] + 10**9

    path = _tampered(sparse_inference_file, tmp_path / "far.pt", state=far)
    with pytest.raises(CheckpointError) as error:
        load_sparse_inference(path)
    assert str(path) in _one_line(error) and f"sparse layer {layer}'s indices" in _one_line(error)


def test_load_pretrained_refuses_a_record_of_a_petabyte_model(tmp_path):
    from conftest import make_tiny_model
    from robust_sparse.deploy.pretrained import ModelRecord, load_pretrained, write_safetensors
    from robust_sparse.errors import CheckpointError

    state = make_tiny_model().state_dict()
    for classes, named in ((10**12, "num_classes is 1000000000000"), (11, "has shape")):
        path = tmp_path / f"model{classes}.safetensors"
        write_safetensors(path, state, ModelRecord("tiny_cnn", classes, 1, (0.1,), (0.3,)))
        with pytest.raises(CheckpointError) as error:
            load_pretrained(path)
        assert str(path) in _one_line(error) and named in _one_line(error), _one_line(error)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "model11.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError) as error:
        load_pretrained(truncated)
    assert str(truncated) in _one_line(error)


def test_load_dynamic_refuses_mask_shapes_the_model_does_not_have(tmp_path):
    import json

    import safetensors.torch
    import torch

    from conftest import make_tiny_model
    from robust_sparse.deploy.pretrained import ModelRecord
    from robust_sparse.deploy.dynamic import load_dynamic, save_dynamic
    from robust_sparse.errors import CheckpointError

    model = make_tiny_model()
    state = model.state_dict()
    name = next(key for key in state if key.endswith("weight") and state[key].dim() > 1)
    masks = [{name: torch.ones_like(state[name], dtype=torch.bool)},
             {name: torch.rand(state[name].shape) < 0.5}]
    path = tmp_path / "model_dynamic.safetensors"
    save_dynamic(path, ModelRecord("tiny_cnn", 10, 1, (0.1,), (0.3,)), state, masks, [1.0, 0.5])
    assert len(load_dynamic(path, sparse_inference=False)) == 2  # the file as written loads
    tensors = safetensors.torch.load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    for key, value, named in (("shapes", {name: [10**6, 10**6]}, "shapes differ"),
                              ("mask_names", ["no.such.weight"], "mask_names"),
                              ("within_previous", [False] * 5000, "within_previous"),
                              ("model", {"architecture": "tiny_cnn", "num_classes": 10**12, "in_channels": 1,
                                         "mean": [0.1], "std": [0.3]}, "num_classes")):
        tampered = tmp_path / f"{key}.safetensors"
        tampered.write_bytes(safetensors.torch.save(tensors, metadata={**metadata, key: json.dumps(value)}))
        with pytest.raises(CheckpointError) as error:
            load_dynamic(tampered, sparse_inference=False)
        assert str(tampered) in _one_line(error) and named in _one_line(error), _one_line(error)


def test_load_compact_refuses_an_entry_that_would_decode_to_a_huge_tensor(tmp_path):
    import torch

    from robust_sparse.files.checkpoint import save_checkpoint
    from robust_sparse.errors import CheckpointError
    from robust_sparse.sparse.export import COMPACT_FORMAT, load_compact

    values, positions = torch.ones(3), torch.tensor([0, 5, 9], dtype=torch.int32)
    cases = {
        "huge": ({"shape": [10**6, 10**6], "values": values, "positions": positions}, "more than 2,000,000,000"),
        "outside": ({"shape": [4], "values": values, "positions": positions}, "entry 'w'"),
        "bitmask": ({"shape": [10**6], "values": values, "bitmask": torch.zeros(2, dtype=torch.uint8)}, "entry 'w'"),
    }
    for label, (entry, named) in cases.items():
        path = tmp_path / f"{label}.pt"
        save_checkpoint({"kind": COMPACT_FORMAT, "config": {}, "epoch": 1, "order": ["w"], "dense": {},
                         "sparse": {"w": entry}}, path)
        with pytest.raises(CheckpointError) as error:
            load_compact(path)
        assert str(path) in _one_line(error) and named in _one_line(error), _one_line(error)


# ----------------------------------------------------------------------------------------------------------
# torch.save's zip writer on a full disk: the same ENOSPC line as every other write


def test_torch_saves_disk_full_runtime_error_is_the_one_enospc_line(tmp_path, monkeypatch):
    """torch's zip writer turns the stream's OSError into ``RuntimeError: [enforce fail at inline_container.cc]``
    when a tensor larger than the write buffer goes straight to the disk; it is the same full disk."""
    import errno

    import torch

    from robust_sparse.files import atomic
    from robust_sparse.errors import OutputError

    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    real = os.fdopen

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            if len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.stream.write(data)

    monkeypatch.setattr(atomic.os, "fdopen", lambda *args: FullDisk(real(*args)))
    with pytest.raises(OutputError, match=rf"^cannot write {path}: No space left on device \(ENOSPC\)$"):
        with atomic.atomic_open(path, "wb") as stream:
            torch.save({"w": torch.zeros(100_000)}, stream)
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_export_of_a_cifar_run_onto_a_full_disk_is_the_one_enospc_line(tmp_path, capsys):
    """On a real full file system (a small tmpfs, where one can be mounted): the export's first large tensor."""
    import torch

    from conftest import one_line_error
    from robust_sparse.files.checkpoint import save_checkpoint
    from robust_sparse.config import load_config, to_dict
    from robust_sparse.models import build_model
    from test_os_errors import _fill, _mount

    import shutil

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    point = tmp_path / "fs"
    point.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        config = load_config(None, ["model.name=resnet18", "data.dataset=cifar10", "device=cpu"])
        checkpoint = tmp_path / "run" / "best.pt"
        model = build_model("resnet18", 10, 3, (0.5,) * 3, (0.25,) * 3)
        save_checkpoint({"config": to_dict(config), "model": model.state_dict(), "epoch": 1}, checkpoint)
        filler = _fill(point, leave=256 * 1024)
        out = point / "export"
        line = one_line_error(["export", str(checkpoint), "--out", str(out)], capsys)
        assert line.startswith(f"robust-sparse: error: cannot write {out}/") and line.endswith(
            "No space left on device (ENOSPC)"), line
        assert not list(out.glob(".*.tmp"))
        filler.unlink()
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
