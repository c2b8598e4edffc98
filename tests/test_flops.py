"""FLOPs accounting (robust_sparse.flops): hand-computed layers, FlopCounterMode's dense counts, the per-step
convention (a PGD-k step is (k+1) forward + (k+1) input-gradient backward units + one weight-gradient unit), and
what a run writes."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robust_sparse.files.checkpoint import load_checkpoint
from robust_sparse.config import load_config
from robust_sparse.flops import FlopsCounter, dense_profile, evaluation_passes
from robust_sparse.models import build_model
from robust_sparse.objectives import build_objective
from robust_sparse.train import fit


def hand_counts(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """2 x weights x output positions for every conv/linear weight, from the output shapes of one forward."""
    counts, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def record(module, args, output, name=name):
                positions = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
                counts[f"{name}.weight"] = 2.0 * module.weight.numel() * positions
            handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for handle in handles:
        handle.remove()
    return counts


def test_a_two_layer_mlp_dense_and_at_a_mask():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    profile = dense_profile(model, (4,))
    assert profile.layers == {"1.weight": 2 * 4 * 3, "3.weight": 2 * 3 * 2}  # multiply-adds, biases not counted
    assert profile.other == 0 and profile.total == 36
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, :2] = True  # half of the first layer
    assert profile.forward({"1.weight": 0.5}) == 12 + 12
    config = load_config(None, ["objective=natural", "device=cpu"])
    counter = FlopsCounter(profile, config, None)
    assert counter.inference({"1.weight": mask}) == 24
    counter.in_use = counter.forward_per_example({"1.weight": mask})
    counter.training_step(5)  # natural: one forward, one backward (input + weight gradient) of 5 examples
    assert float(counter.forward.sum()) == 5 * 24
    assert float(counter.backward.sum()) == 5 * (24 + 24)


def test_one_conv_layer_dense_and_at_a_mask():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False))
    profile = dense_profile(model, (2, 5, 5))
    assert profile.layers == {"0.weight": 2 * (2 * 3 * 3) * 4 * (5 * 5)}  # 3600
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask.view(-1)[:18] = True  # 18 of 72 weights
    counter = FlopsCounter(profile, load_config(None, ["device=cpu"]), None)
    assert counter.inference({"0.weight": mask}) == 900


def test_dense_counts_of_small_cnn_equal_flop_counter_mode():
    model = build_model("small_cnn", 10, 3, (0.5,) * 3, (0.25,) * 3)
    profile = dense_profile(model, (3, 32, 32))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(4, 3, 32, 32))
    assert profile.total * 4 == counter.get_total_flops()
    assert profile.layers == hand_counts(model, (3, 32, 32))  # every conv/linear attributed to its own weight
    assert profile.other == 0


@pytest.mark.parametrize("fused", [True, False])
def test_a_vits_attention_matmuls_are_counted_dense_beside_its_layers(fused):
    """A one-block ViT by hand: N = 4 x 4 patches + the class token, width D, MLP 4D. Each Linear costs 2 x its
    weights per token (the head: the class token only), and the attention's two matmuls, q @ k^T and attn @ v,
    2 N^2 (D / heads) each per head: 4 N^2 D, the weightless 'other', whether timm runs
    F.scaled_dot_product_attention (fused) or the matmuls themselves."""
    pytest.importorskip("timm")
    width, classes, patches = 16, 10, 16
    model = build_model("timm:vit_tiny_patch16_224", classes, 3, (0.5,) * 3, (0.25,) * 3,
                        {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": width, "num_heads": 2})
    model.network.blocks[0].attn.fused_attn = fused
    tokens = patches + 1
    profile = dense_profile(model, (3, 32, 32))
    block = {"qkv": 2 * tokens * width * 3 * width, "proj": 2 * tokens * width * width,
             "fc1": 2 * tokens * width * 4 * width, "fc2": 2 * tokens * 4 * width * width}
    assert profile.layers == {"network.patch_embed.proj.weight": 2 * (3 * 8 * 8) * width * patches,
                              **{f"network.blocks.0.{'attn' if layer in ('qkv', 'proj') else 'mlp'}.{layer}.weight":
                                 flops for layer, flops in block.items()},
                              "network.head.weight": 2 * width * classes}
    assert profile.other == 4 * tokens ** 2 * width
    # the masks cover the block's layers (the ViT default); the embedding, the head and the attention stay dense
    masks = {}
    for name in profile.layers:
        if ".blocks." in name:
            numel = profile.numels[name]
            masks[name] = (torch.arange(numel) % 2 == 0).view(model.get_parameter(name).shape)  # half of each
    counter = FlopsCounter(profile, load_config(None, ["device=cpu", "objective=natural"]), None)
    dense_part = profile.total - sum(block.values())
    assert counter.inference(masks) == pytest.approx(dense_part + sum(block.values()) / 2, rel=1e-12)
    # a backward through q @ k^T or attn @ v needs both operands' gradients (both depend on the input), twice the
    # forward, where a layer's input gradient costs one forward: a dense PGD-k step is (k+1) forwards, k attack
    # backwards and one training backward (input and weight gradients)
    layers, attention = sum(profile.layers.values()), profile.other
    for objective, k in (("natural", 0), ("pgd_at", 2)):
        config = load_config(None, ["device=cpu", f"objective={objective}", f"attack.steps={max(k, 1)}"])
        counter = FlopsCounter(profile, config, None)
        counter.training_step(1)
        expected = (k + 1) * (layers + attention) + (k + 1) * layers + layers + (k + 1) * 2 * attention
        assert counter.train_flops == pytest.approx(expected, rel=1e-12)
        assert counter.dense_train == pytest.approx(expected, rel=1e-12)
    # PGD-4 evaluation of 10 examples, 5 attacked: 10 + 5 x 5 forwards, 5 x 4 backwards
    evaluation = counter.evaluation({}, examples=10, clean_accuracy=0.5, steps=4, restarts=1, eps=8 / 255)
    assert evaluation == pytest.approx(35 * (layers + attention) + 20 * (layers + 2 * attention), rel=1e-12)


@pytest.mark.parametrize("objective,branches,attack_forwards", [("pgd_at", 1, 0), ("trades", 2, 1)])
def test_an_attack_step_costs_k_plus_1_forward_and_backward_units(objective, branches, attack_forwards):
    """PGD-k: k attack forwards and input-gradient backwards, then the training forward and backward (input +
    weight gradient). TRADES: one more attack forward (the clean probabilities) and two training branches."""
    k, batch = 3, 8
    model = build_model("tiny_cnn", 10, 1, (0.5,), (0.25,))
    profile = dense_profile(model, (1, 28, 28))
    config = load_config(None, [f"objective={objective}", f"attack.steps={k}", "device=cpu"])
    counter = FlopsCounter(profile, config, None)
    counter.training_step(batch)
    unit = batch * profile.total
    assert float(counter.forward.sum()) == pytest.approx((k + attack_forwards + branches) * unit, rel=1e-12)
    # backward: k input-gradient units, then per branch an input-gradient and a weight-gradient unit
    assert float(counter.backward.sum()) == pytest.approx((k + 2 * branches) * unit, rel=1e-12)
    if objective == "pgd_at":
        assert float((counter.forward + counter.backward).sum()) == pytest.approx((2 * k + 3) * unit, rel=1e-12)
    assert counter.dense_train == pytest.approx(float((counter.forward + counter.backward).sum()), rel=1e-12)
    # The same step measured: autograd skips only the first layer's input gradient in the training backward(s)
    objective_ = build_objective(config, model)
    images, labels = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as measured:
        adversarial = objective_.perturb(images, labels)
        model.train()
        objective_.loss(model, images, labels, adversarial)[0].backward()
    first = next(iter(profile.layers.values()))
    assert measured.get_total_flops() == pytest.approx(
        float((counter.forward + counter.backward).sum()) - branches * batch * first, rel=1e-9)


def test_evaluation_passes_count_the_attacked_examples_only():
    assert evaluation_passes(10, 4, steps=5, restarts=1, eps=8 / 255) == 10 + 4 * (2 * 5 + 1)
    assert evaluation_passes(10, 4, steps=5, restarts=3, eps=8 / 255) == 10 + 4 * (3 * 2 * 5 + 3 + 1)
    assert evaluation_passes(10, 4, steps=5, restarts=3, eps=0) == 10


def test_a_rigl_run_reports_the_flops_weighted_density_of_its_final_masks(tiny_config):
    result = fit(tiny_config("sparsity.method=rigl", "sparsity.density=0.2", "sparsity.update_every=2",
                             "optim.epochs=3"))
    run = result.run_dir
    evaluation = json.loads((run / "eval.json").read_text())
    masks = load_checkpoint(run / "best.pt")["sparsity"]["masks"]
    dense = hand_counts(build_model("tiny_cnn", 10, 1, (0.5,), (0.25,)), (1, 28, 28))
    weighted = sum(dense[name] * int(mask.sum()) / mask.numel() for name, mask in masks.items()) / sum(dense.values())
    assert evaluation["inference_flops_vs_dense"] == pytest.approx(weighted, rel=1e-9)
    assert evaluation["inference_flops"] == pytest.approx(weighted * sum(dense.values()), rel=1e-9)
    # sparse training costs less than dense, and more than its final density alone (RigL's dense gradients)
    assert weighted < evaluation["train_flops_vs_dense"] < 1
    assert evaluation["eval_flops"] > 0 and evaluation["val_flops"] > 0
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["train_flops"].is_monotonic_increasing and metrics["train_flops"].iloc[0] > 0
    assert metrics["train_flops"].iloc[-1] == pytest.approx(evaluation["train_flops"], rel=1e-12)
    assert metrics["val_flops"].is_monotonic_increasing
    layers = pd.read_csv(run / "layer_flops.csv")
    assert (layers["train_forward_flops"] + layers["train_backward_flops"]).sum() == pytest.approx(
        evaluation["train_flops"], rel=1e-9)


def test_agent_passes_appear_and_vanish_with_agent_enabled(tiny_config, tmp_path):
    common = ["attack.steps=2", "optim.epochs=2", "agent.gamma=0.5", "agent.estimator=fixed", "agent.fixed_c=1",
              "agent.full_grad_batches=2"]
    plain = fit(tiny_config(*common, "agent.enabled=false", f"out_dir={tmp_path / 'plain'}")).evaluation
    assert plain["train_flops"] == pytest.approx(plain["dense_train_flops"], rel=1e-12)
    agent = fit(tiny_config(*common, "agent.enabled=true", f"out_dir={tmp_path / 'agent'}")).evaluation
    assert agent["dense_train_flops"] == plain["dense_train_flops"]
    # g_old every step: the loss and its gradient (3 of PGD-2's 7 units); g_tilde every epoch: 2 clean batches of
    # 64, a forward and a training backward (3 units each)
    forward = agent["dense_inference_flops"]
    expected = plain["dense_train_flops"] * (1 + 3 / 7) + 2 * 2 * 64 * 3 * forward
    assert agent["train_flops"] == pytest.approx(expected, rel=1e-9)


def _fake_run(sweep_dir, grid: dict, accuracy: float, train_ratio: float, inference_ratio: float) -> dict:
    """A finished run directory as train writes it (config, metrics.csv, eval.json with the FLOPs fields)."""
    from robust_sparse.config import save_config

    items = [f"{key}={value}" for key, value in grid.items()]
    run_id = "__".join(items)
    run_dir = sweep_dir / "runs" / run_id
    run_dir.mkdir(parents=True)
    save_config(load_config(None, ["data.dataset=mnist5k", "optim.epochs=2", *items]), run_dir / "config.yaml")
    pd.DataFrame([{"epoch": e, "lr": 0.1, "train_loss": 1.0, "train_accuracy": 0.5, "val_clean_accuracy": 0.8,
                   "val_pgd_accuracy": accuracy, "train_seconds": 1.0, "images_per_second": 1.0, "best": True,
                   "train_flops": e * 1e9 * train_ratio, "train_flops_vs_dense": train_ratio}
                  for e in (1, 2)]).to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "eval.json").write_text(json.dumps({
        "checkpoint": str(run_dir / "best.pt"), "epoch": 2, "dataset": "mnist5k", "model": "small_cnn",
        "n_examples": 100, "norm": "linf", "eps": 0.3, "pgd_steps": 20, "restarts": 1, "clean_accuracy": 0.9,
        "pgd_accuracy": accuracy, "seconds": 1.0, "device": "cpu", "train_flops": 2e9 * train_ratio,
        "train_flops_vs_dense": train_ratio, "inference_flops": 1e6 * inference_ratio,
        "inference_flops_vs_dense": inference_ratio}))
    return {"run_id": run_id, "overrides": " ".join(items), "status": "done"}


def test_a_sweep_report_shows_the_cost_beside_accuracy_and_plots_accuracy_against_training_flops(tmp_path):
    import yaml

    from robust_sparse.studies import plots
    from robust_sparse.studies.report import collect, grid_keys, write_report

    sweep_dir = tmp_path / "sweep"
    settings = [({"sparsity.method": method, "sparsity.density": density, "seed": seed},
                 0.3 + density + seed / 100, density * (2 if method == "rigl" else 1) + seed / 1000, density)
                for method in ("rigl", "set") for density in (0.1, 0.01) for seed in (0, 1)]
    index = [_fake_run(sweep_dir, *setting) for setting in settings]
    pd.DataFrame(index).to_csv(sweep_dir / "runs.csv", index=False)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({"grid": {}, "overrides": [], "out_dir": str(sweep_dir)}))
    report_path = write_report(sweep_dir)
    report = report_path.read_text()
    header = next(line for line in report.splitlines() if "test_pgd_accuracy mean" in line)
    assert "train_flops_vs_dense mean" in header and "inference_flops_vs_dense mean" in header
    assert "robust_vs_train_flops.png" in report and (report_path.parent / "robust_vs_train_flops.png").is_file()
    runs, curves = collect(sweep_dir)
    assert "train_flops_vs_dense" not in grid_keys(runs)  # a cost, not a setting
    keys = [k for k in grid_keys(runs) if k != "seed"]
    figure = plots.flops_figure(runs, curves, keys, plots.metric_labels((sweep_dir / "runs").iterdir()))
    axis = figure.axes[0]  # test clean accuracy, then PGD: the PGD panel plots each setting's mean cost
    pgd = figure.axes[1]
    assert axis.get_xscale() == "log"
    points = {(round(x, 6), round(y, 6)) for container in pgd.containers  # each setting's line through its densities
              for x, y in zip(*container.lines[0].get_data())}
    # accuracies in %, as every accuracy plot (the leaderboard's unit); costs stay ratios
    expected = {(round(density * (2 if method == "rigl" else 1) + 0.0005, 6), round(100 * (0.3 + density + 0.005), 6))
                for method in ("rigl", "set") for density in (0.1, 0.01)}
    assert points == expected


def test_eval_stores_the_cost_and_report_shows_it_beside_accuracy(tiny_config):
    from robust_sparse.cli import main

    run = fit(tiny_config("sparsity.method=static", "sparsity.density=0.3", "eval.n_examples=0")).run_dir
    best = load_checkpoint(run / "best.pt")
    trained = next(row for row in best["history"] if row["epoch"] == best["epoch"])
    assert main(["eval", str(run / "best.pt"), "--n-examples", "20", "--attacks", "fgsm", "--no-probe",
                 "--device", "cpu", "--no-progress"]) == 0
    (row,) = json.loads((run / "eval" / "results.json").read_text())
    assert row["train_flops"] == trained["train_flops"]
    assert row["train_flops_vs_dense"] == trained["train_flops_vs_dense"]
    # from the weights' zero pattern, which the masks set: the masked run's FLOPs-weighted density
    assert row["inference_flops_vs_dense"] == pytest.approx(trained["inference_flops_vs_dense"], rel=1e-9)
    assert 0 < row["inference_flops_vs_dense"] < 1
    assert main(["report", str(run / "eval"), "--out", str(run / "report")]) == 0
    table = (run / "report" / "report.md").read_text().split("## Results")[1].split("## ")[0]
    header, _, first = table.strip().splitlines()[:3]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    cells = [cell.strip() for cell in first.strip("|").split("|")]
    assert cells[columns.index("train FLOPs")] == f"{trained['train_flops_vs_dense']:.3g}x"
    assert cells[columns.index("inference FLOPs")] == f"{row['inference_flops_vs_dense']:.3g}x"


def test_gse_pays_its_score_batch_and_candidate_gradients_on_update_steps(mnist):
    import torch.nn.functional as F

    from robust_sparse.sparse import build_sparsity
    from robust_sparse.sparse.gse import balanced_batch

    train, _ = mnist
    config = load_config(None, ["model.name=tiny_cnn", "data.dataset=mnist5k", "objective=natural", "device=cpu",
                                "sparsity.method=gse", "sparsity.density=0.1", "sparsity.update_every=2"])
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 1, (0.5,), (0.25,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", optimizer, total_steps=100, seed=0,
                            batch_source=lambda step: balanced_batch(train, 4, torch.device("cpu"), seed=step))
    profile = dense_profile(model, (1, 28, 28))
    counter = FlopsCounter(profile, config, masker)
    densities = {name: int(mask.sum()) / mask.numel() for name, mask in masker.masks.items()}
    forward = profile.forward(densities)  # one example at the initial masks
    images, labels = train.images[:64].float() / 255, train.labels[:64]
    totals = []
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(images[32 * step: 32 * (step + 1)]), labels[32 * step: 32 * (step + 1)]).backward()
        optimizer.step()
        counter.training_step(32)
        totals.append(float((counter.forward + counter.backward).sum()))
    assert totals[0] == pytest.approx(3 * 32 * forward, rel=1e-12)  # natural training, no update at step 1
    # step 2 updates: a forward and an input-gradient backward on the 40-image score batch, then each candidate's
    # gradient (one weight's share of its layer's dense forward) on it
    candidates = sum(update["candidates"].numel() * profile.layers[name] / profile.numels[name]
                     for name, update in masker.engine.last_update.items())
    assert candidates > 0
    assert totals[1] - totals[0] == pytest.approx(3 * 32 * forward + 40 * (2 * forward + candidates), rel=1e-12)


def test_rigl_pays_a_dense_weight_gradient_on_its_update_steps_only(mnist):
    import torch.nn.functional as F

    from robust_sparse.sparse import build_sparsity

    train, _ = mnist
    config = load_config(None, ["model.name=tiny_cnn", "data.dataset=mnist5k", "objective=natural", "device=cpu",
                                "sparsity.method=rigl", "sparsity.density=0.1", "sparsity.update_every=2"])
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 1, (0.5,), (0.25,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masker = build_sparsity(config.sparsity, model, "tiny_cnn", optimizer, total_steps=100, seed=0)
    profile = dense_profile(model, (1, 28, 28))
    counter = FlopsCounter(profile, config, masker)
    forward = profile.forward({name: int(mask.sum()) / mask.numel() for name, mask in masker.masks.items()})
    images, labels = train.images[:64].float() / 255, train.labels[:64]
    totals = []
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(images[32 * step: 32 * (step + 1)]), labels[32 * step: 32 * (step + 1)]).backward()
        optimizer.step()
        counter.training_step(32)
        totals.append(float((counter.forward + counter.backward).sum()))
    assert totals[0] == pytest.approx(3 * 32 * forward, rel=1e-12)  # step 1: sparse forward, input and weight grads
    # step 2 grows by the dense gradient: its weight gradient costs the dense forward (counts per layer unchanged)
    assert totals[1] - totals[0] == pytest.approx(32 * (2 * forward + profile.total), rel=1e-12)
