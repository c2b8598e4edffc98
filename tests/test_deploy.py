"""Train once, deploy many: AST's dynamic model, outside architectures to the end, safetensors, Hub folders, ONNX.

Runs are seconds long (tiny_cnn on 256 MNIST-5k images; a narrow timm ResNet-18 with the CIFAR stem), and every
check compares what the export loads back with the network the toolkit evaluates: same logits, same masks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.cli import main
from robust_sparse.config import load_config
from robust_sparse.deploy.pretrained import ModelRecord, RobustSparseModel, load_pretrained, read_safetensors
from robust_sparse.deploy.dynamic import load_dynamic, pack_masks, unpack_masks
from robust_sparse.errors import CheckpointError, UserError
from robust_sparse.eval.sources import from_checkpoint_subnets
from robust_sparse.models import apply_cifar_stem, build_model
from robust_sparse.train import fit

QUICK = ["data.train_limit=256", "data.val_size=64", "data.batch_size=64", "optim.epochs=2", "attack.steps=1",
         "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=64", "eval.pgd_steps=1", "device=cpu"]
AST = ["model.name=tiny_cnn", "sparsity.method=ast", "sparsity.ast.densities=[0.3, 0.1, 0.03]",
       "sparsity.update_every=1", "sparsity.ast.nested=true", "sparsity.ast.subnet_bn=true", "data.train_limit=512",
       "optim.epochs=3"]
# a narrow timm ResNet-18 (8..64 channels) with the CIFAR stem: the real architecture, seconds to train
TIMM = ["model.name=timm:resnet18", "model.kwargs.channels=[8, 16, 32, 64]", "model.cifar_stem=true",
        "sparsity.method=rigl", "sparsity.density=0.2", "optim.epochs=1"]


@pytest.fixture(scope="module")
def ast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ast") / "run"
    fit(load_config(None, [*QUICK, *AST, f"out_dir={out}"]))
    return out / "best.pt"


@pytest.fixture(scope="module")
def ast_export(ast_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ast_export") / "export"
    assert main(["export", str(ast_run), "--out", str(out), "--serving-batch", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("timm") / "run"
    fit(load_config(None, [*QUICK, *TIMM, f"out_dir={out}"]))
    return out / "best.pt"


@pytest.fixture(scope="module")
def timm_export(timm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("timm_export") / "export"
    assert main(["export", str(timm_run), "--out", str(out), "--hub", "--onnx"]) == 0
    return out


def _images(channels: int = 1, size: int = 28, n: int = 6) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


# ---- AST: one artifact, every sub-net ----------------------------------------------------------------------------


def test_the_dynamic_model_is_every_subnet_the_evaluation_loads(ast_run, ast_export):
    dynamic = load_dynamic(ast_export)
    reference = from_checkpoint_subnets(ast_run)  # what `robust-sparse eval` evaluates, one model per sub-net
    assert len(dynamic) == len(reference) == 3
    images = _images()
    storage = [p.data_ptr() for p in dynamic.model.parameters()]
    for k in (2, 0, 1):  # out of order: a switch depends on nothing but k
        dynamic.use(k)
        with torch.no_grad():
            expected = reference[k].model(images)
            assert torch.allclose(dynamic(images), expected, atol=1e-5)  # the sub-net's sparse-inference file
        attacked = images.clone().requires_grad_(True)
        assert torch.equal(dynamic(attacked), reference[k].model(attacked))  # the gradient path: dense masked
        for name, mask in dynamic._masks[k].items():
            weight = dict(dynamic.model.named_parameters())[name]
            assert torch.count_nonzero(weight[~mask]) == 0
    assert [p.data_ptr() for p in dynamic.model.parameters()] == storage  # switched in place, never copied
    assert dynamic.densities == sorted(dynamic.densities, reverse=True)
    assert dynamic.densities == pytest.approx([0.3, 0.1, 0.03], abs=2e-3)


def test_at_density_picks_the_densest_subnet_within_the_budget_and_refuses_less(ast_export):
    dynamic = load_dynamic(ast_export, sparse_inference=False)
    assert dynamic.at_density(0.2).active == 1
    assert dynamic.at_density(1.0).active == 0
    assert dynamic.at_density(dynamic.densities[2]).active == 2  # exactly a sub-net's density fits
    with pytest.raises(UserError, match="sparsest sub-net keeps"):
        dynamic.at_density(0.001)
    with pytest.raises(UserError, match="sub-nets 0..2"):
        dynamic.use(3)
    with pytest.raises(RuntimeError, match="eval mode only"):
        dynamic.train()
    assert not dynamic.training


def test_the_export_records_each_subnets_latency_and_stores_nested_masks_compactly(ast_export):
    summary = json.loads((ast_export / "export.json").read_text())
    assert summary["kind"] == "ast-dynamic"
    rows = summary["subnets"]
    assert [row["subnet"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert row["serving_batch"] == 4
        assert all(row[key] > 0 and math.isfinite(row[key]) for key in
                   ("batch1_dense_ms", "batch1_sparse_ms", "serving_dense_ms", "serving_sparse_ms"))
        assert (ast_export / row["sparse_inference_file"]).is_file()
    dynamic = summary["dynamic"]
    assert dynamic["masks_within_previous"] == [False, True, True]  # sparsity.ast.nested: each within its parent
    d = dynamic["densities"]
    # one bit per weight for sub-net 0, then one per position of the parent: N (1 + d0 + d1) bits, padded to bytes
    assert dynamic["mask_bits_per_weight"] == pytest.approx(1 + d[0] + d[1], abs=0.02)
    frame = load_dynamic(ast_export, sparse_inference=False).subnets()
    assert list(frame["subnet"]) == [0, 1, 2] and "batch1_sparse_ms" in frame


def test_packed_masks_round_trip_nested_or_not():
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 3, 3, 3), "b": (7, 11)}
    parent = {name: torch.rand(shape, generator=generator) < 0.5 for name, shape in shapes.items()}
    child = {name: mask & (torch.rand(mask.shape, generator=generator) < 0.3) for name, mask in parent.items()}
    stray = {name: torch.rand(shape, generator=generator) < 0.2 for name, shape in shapes.items()}  # not nested
    for masks, within in (([parent, child], [False, True]), ([parent, stray], [False, False])):
        packed, found = pack_masks(masks)
        assert found == within
        back = unpack_masks(packed, list(shapes), shapes, found)
        assert all(torch.equal(back[k][n], masks[k][n]) for k in range(2) for n in shapes)
    packed, _ = pack_masks([parent, child])
    assert packed["mask.1.b"].numel() == math.ceil(int(parent["b"].sum()) / 8)  # bits over the parent only


@pytest.fixture(scope="module")
def ast_store(ast_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("ast_store") / "store"
    assert main(["eval", str(ast_run), "--attacks", "fgsm", "--n-examples", "32", "--device", "cpu", "--no-probe",
                 "--no-progress", "--results-dir", str(store)]) == 0
    return store


def test_eval_of_the_ast_checkpoint_gives_one_row_per_subnet(ast_run, ast_store):
    import pandas as pd

    from robust_sparse.eval.store import evaluation_rows

    store = pd.read_csv(ast_store / "results.csv")
    assert sorted(store["model"].str.rsplit("/", n=1).str[-1]) == ["subnet0", "subnet1", "subnet2"]
    # a model card of sub-net 1 shows that sub-net's stored rows: clean and each attack, on the 32 points
    row = store[store["model"].str.endswith("/subnet1")].iloc[0]
    assert evaluation_rows(ast_run, 1, ast_store) == [
        {"attack": "clean", "threat_model": "Linf", "eps": 0.0, "n": 32, "accuracy": pytest.approx(row["clean_acc"])},
        {"attack": "FGSM", "threat_model": "Linf", "eps": pytest.approx(row["eps"]), "n": 32,
         "accuracy": pytest.approx(row["worst_acc"])}]


def test_the_report_draws_accuracy_against_density_and_exported_latency(ast_store, ast_export, timm_export,
                                                                         tmp_path, capsys):
    import pandas as pd

    from robust_sparse.eval.report import collect, headline
    from robust_sparse.eval.tradeoff import exported_latency, tradeoff_table

    assert main(["report", str(ast_store), "--out", str(tmp_path / "report"), "--exports", str(ast_export)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## AST sub-nets" in text and "ast_tradeoff.png" in text and (tmp_path / "report" / "ast_tradeoff.png").is_file()
    table = tradeoff_table(collect([ast_store]), headline, exported_latency([ast_export]))
    latency = json.loads((ast_export / "export.json").read_text())["subnets"]
    assert list(table["subnet"]) == [0, 1, 2]
    assert list(table["latency_ms"]) == pytest.approx([row["batch1_sparse_ms"] for row in latency])
    store = pd.read_csv(ast_store / "results.csv").sort_values("model")
    assert list(table["clean_acc"]) == pytest.approx(list(store["clean_acc"]))
    assert list(table["density"]) == pytest.approx(list(1 - store["sparsity"]))
    # an export of one network has no sub-nets' latency: one line, and no report folder left behind
    assert main(["report", str(ast_store), "--out", str(tmp_path / "r2"), "--exports", str(timm_export)]) == 2
    assert "not a dynamic AST export" in capsys.readouterr().err and not (tmp_path / "r2").exists()


def test_hub_and_onnx_of_an_ast_checkpoint_need_one_subnet(ast_run, tmp_path, capsys):
    assert main(["export", str(ast_run), "--out", str(tmp_path / "e"), "--hub"]) == 2
    assert "pass --subnet K" in capsys.readouterr().err
    assert main(["export", str(ast_run), "--out", str(tmp_path / "e"), "--subnet", "2", "--onnx"]) == 0
    summary = json.loads((tmp_path / "e" / "export.json").read_text())
    assert summary["subnet"] == 2 and summary["onnx"]["max_abs_difference"] <= 1e-4


# ---- an outside architecture, first-class to the end ------------------------------------------------------------


def test_the_cifar_stem_replaces_the_imagenet_one():
    timm = pytest.importorskip("timm")
    for spec in ("torchvision:resnet18", "timm:resnet18"):
        model = build_model(spec, 10, 3, (0.5,) * 3, (0.25,) * 3, cifar_stem=True)
        conv = model.network.conv1
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
        assert isinstance(model.network.maxpool, torch.nn.Identity)
        seen = {}
        model.network.layer1.register_forward_hook(lambda _m, _i, out: seen.update(shape=out.shape))
        model.eval()(torch.rand(1, 3, 32, 32))
        assert seen["shape"][-2:] == (32, 32)  # the ImageNet stem leaves 8x8 here
    with pytest.raises(UserError, match="model.cifar_stem: 'tiny_cnn' is this toolkit's own model"):
        build_model("tiny_cnn", 10, 1, (0.5,), (0.25,), cifar_stem=True)
    with pytest.raises(UserError, match="no ResNet stem"):
        apply_cifar_stem(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10))


def test_cifar_stem_on_an_own_model_is_refused_before_training(tmp_path, capsys):
    code = main(["train", "--set", "model.cifar_stem=true", "--set", f"out_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.cifar_stem" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_an_outside_model_exports_every_format_and_each_loads_back_the_same_logits(timm_run, timm_export):
    timm = pytest.importorskip("timm")
    reference = from_checkpoint_subnets(timm_run)[0].model.eval()
    images = _images()
    with torch.no_grad():
        expected = reference(images)
    summary = json.loads((timm_export / "export.json").read_text())

    # (a) the library's own state_dict, strict, behind the recorded normalisation
    manifest = summary["network"]
    network = apply_cifar_stem(timm.create_model(manifest["name"], **manifest["kwargs"]))
    network.load_state_dict(torch.load(timm_export / manifest["file"], weights_only=True), strict=True)
    from robust_sparse.models import Normalize, Normalized

    wrapped = Normalized(Normalize(manifest["normalize"]["mean"], manifest["normalize"]["std"]), network).eval()
    # (b) sparse inference rebuilt from the recorded name and kwargs; (c) safetensors; (d) the Hub folder, twice
    from robust_sparse.deploy.inference import load_sparse_inference

    assert summary["sparse_inference"]["file"] is not None
    loaded = [wrapped, load_sparse_inference(timm_export / summary["sparse_inference"]["file"]),
              load_pretrained(timm_export / "model.safetensors"), load_pretrained(timm_export / "hub"),
              RobustSparseModel.from_pretrained(str(timm_export / "hub"))]
    with torch.no_grad():
        for model in loaded:
            assert torch.allclose(model(images), expected, atol=1e-5), type(model).__name__
    # (e) ONNX within 1e-4, checked by the export and here again
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(timm_export / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})  # another batch size than the export's check
    assert float((torch.from_numpy(logits) - expected).abs().max()) <= 1e-4
    assert summary["onnx"]["max_abs_difference"] <= 1e-4


def test_the_hub_folder_has_a_card_a_config_and_weights_that_say_the_same(timm_run, timm_export):
    hub = timm_export / "hub"
    config = json.loads((hub / "config.json").read_text())
    record = ModelRecord.from_json(config["model"], "config.json")
    assert record.architecture == "timm:resnet18" and record.cifar_stem and record.kwargs["channels"] == [8, 16, 32, 64]
    tensors, metadata = read_safetensors(hub / "model.safetensors")
    assert ModelRecord.from_json(metadata["model"], "metadata") == record
    masks = load_checkpoint(timm_run)["sparsity"]["masks"]
    for name, mask in masks.items():  # the masks are applied: nothing outside them is stored non-zero
        assert torch.count_nonzero(tensors[name][~mask.bool()]) == 0
    card = (hub / "README.md").read_text()
    assert "timm:resnet18" in card and f"density {config['density']:.4f}" in card
    assert "| clean | Linf |" in card  # the run's own test evaluation, found beside the checkpoint


def test_loading_refuses_foreign_or_mismatched_files(timm_export, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a robust-sparse export"):
        load_pretrained(tmp_path / "foreign.safetensors")
    tensors, metadata = read_safetensors(timm_export / "model.safetensors")
    record = ModelRecord.from_json(metadata["model"], "metadata")
    from robust_sparse.deploy.pretrained import write_safetensors

    wrong = ModelRecord("tiny_cnn", record.num_classes, record.in_channels, record.mean, record.std)
    write_safetensors(tmp_path / "wrong.safetensors", tensors, wrong)
    with pytest.raises(CheckpointError, match="do not fit tiny_cnn"):
        load_pretrained(tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="no dynamic AST model"):
        load_dynamic(timm_export)


def test_a_sparse_vit_exports_every_format_and_each_loads_back_the_same_logits(tmp_path):
    timm = pytest.importorskip("timm")
    toy = {"img_size": 28, "patch_size": 7, "depth": 1, "embed_dim": 32, "num_heads": 2}
    out = tmp_path / "run"
    fit(load_config(None, [*QUICK, "model.name=timm:vit_tiny_patch16_224", "optim.epochs=1",
                           "model.kwargs={img_size: 28, patch_size: 7, depth: 1, embed_dim: 32, num_heads: 2}",
                           "sparsity.method=set", "sparsity.density=0.1", f"out_dir={out}"]))
    assert main(["export", str(out / "best.pt"), "--out", str(tmp_path / "e"), "--hub", "--onnx"]) == 0
    export = tmp_path / "e"
    summary = json.loads((export / "export.json").read_text())
    assert {name.rsplit(".", 2)[-2] for name in summary["layer_density"]} == {"qkv", "proj", "fc1", "fc2"}
    reference = from_checkpoint_subnets(out / "best.pt")[0].model.eval()
    network = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **toy)
    network.load_state_dict(torch.load(export / "model_network.pt", weights_only=True), strict=True)
    from robust_sparse.deploy.inference import load_sparse_inference
    from robust_sparse.models import Normalize, Normalized

    manifest = summary["network"]
    images = _images()
    with torch.no_grad():
        expected = reference(images)
        for model in (Normalized(Normalize(manifest["normalize"]["mean"], manifest["normalize"]["std"]), network),
                      load_sparse_inference(export / "model_sparse_inference.pt"), load_pretrained(export / "hub")):
            assert torch.allclose(model.eval()(images), expected, atol=1e-5), type(model).__name__
    assert summary["onnx"]["max_abs_difference"] <= 1e-4
