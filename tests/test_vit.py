"""A vision transformer trains with every sparse engine and with AGENT, as a CNN does.

timm's ViT through the ``timm:`` model spec, shrunk to a CIFAR-shaped toy (32 px, 8-px patches, 2 blocks of
width 32) so that every method runs in well under a second. What is checked is what makes a transformer a
first-class citizen rather than a model that merely runs: the masks cover the attention and MLP layers only
(``sparsity.include_first/include_last`` left out keep the patch embedding and the head dense), the sparse
invariants hold after every corrected step, every method ends at its density, and ERK allocates over the
Linear layers as Erdős–Rényi does for fully connected layers.
"""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch
from torch import nn

from robust_sparse.agent import AGENT
from robust_sparse.files.checkpoint import save_checkpoint
from robust_sparse.config import load_config
from robust_sparse.errors import ConfigError
from robust_sparse.models import MODELS, REGISTERED_MODELS, build_model
from robust_sparse.objectives import build_objective
from robust_sparse.optim import SGDW
from robust_sparse.run_record import resume_state
from robust_sparse.sparse import METHODS, build_sparsity, density as allocation
from robust_sparse.sparse.masker import has_attention, sparsifiable
from robust_sparse.train import fit

pytest.importorskip("timm")

VIT = "timm:vit_tiny_patch16_224"
TOY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
BLOCK_LAYER = re.compile(r"network\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight")
# the shared settings of tests/test_sparse.py's variant: SET with SNFS's momentum growth
VARIANTS = {"snfs-momentum": ("set", ["sparsity.growth=momentum"])}
STEPS = 12  # rewiring every 2 steps: every engine updates its topology several times, AST prunes to its targets


def toy_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(VIT, 10, 3, MEAN, STD, TOY)


def block_weights(model: nn.Module) -> set[str]:
    """The Linear weights of the transformer blocks, found by module type, not by the masker's rule."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".blocks." in f".{name}"}


@pytest.fixture(scope="module")
def batches():
    generator = torch.Generator().manual_seed(0)  # CIFAR-shaped images in [0, 1]: the invariants need no real data
    return torch.rand(64, 3, 32, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    save_checkpoint({"model": toy_vit(seed=3).state_dict()}, path)
    return path


# ---- which layers are sparse -------------------------------------------------------------------------------


def test_a_vit_masks_its_blocks_linear_layers_and_keeps_embedding_and_head_dense():
    model = toy_vit()
    config = load_config(None, [f"model.name={VIT}", "sparsity.method=static"])
    assert config.sparsity.include_first is None and config.sparsity.include_last is None  # decided by the model
    masked = set(sparsifiable(model, config.sparsity.include_first, config.sparsity.include_last))
    assert masked == block_weights(model) and all(BLOCK_LAYER.fullmatch(name) for name in masked)
    assert len(masked) == 4 * TOY["depth"]
    everything = set(sparsifiable(model))  # asked for: the patch embedding (a conv) and the head join them
    assert everything - masked == {"network.patch_embed.proj.weight", "network.head.weight"}
    assert set(sparsifiable(model, True, None)) == masked | {"network.patch_embed.proj.weight"}
    assert set(sparsifiable(model, None, True)) == masked | {"network.head.weight"}


def test_a_cnn_keeps_its_first_conv_and_classifier_sparse_and_its_saved_config_as_before():
    config = load_config(None, ["model.name=resnet18", "sparsity.method=static"])
    assert config.sparsity.include_first is True and config.sparsity.include_last is True  # as saved before
    model = build_model("resnet18", 10, 3, MEAN, STD)
    assert not has_attention(model)
    assert set(sparsifiable(model, None, None)) == set(sparsifiable(model))  # every conv and linear weight
    # a library CNN is decided by its structure alike
    library = build_model("timm:resnet18", 10, 3, MEAN, STD)
    assert set(sparsifiable(library, None, None)) == set(sparsifiable(library))


def test_the_toolkits_own_architectures_are_cnns():
    """Reading a config resolves the layer rule to True for the toolkit's own models (parsing.py); that is right
    only while none of them holds attention. A built-in transformer must be taken out of that rule."""
    own = [name for name in MODELS.names() if name not in REGISTERED_MODELS]
    assert own
    with torch.device("meta"):  # the structure alone: no memory for WRN-70-16
        for name in own:
            assert not has_attention(build_model(name, 10, 3, MEAN, STD)), name


def test_an_include_setting_that_is_not_a_boolean_names_the_field():
    with pytest.raises(ConfigError, match=r"sparsity\.include_first: expected true or false"):
        load_config(None, [f"model.name={VIT}", "sparsity.include_first=maybe"])


# ---- every engine, with AGENT -------------------------------------------------------------------------------


def _setup(name: str, dense_checkpoint, batches):
    method, extra = VARIANTS.get(name, (name, []))
    budget = [] if METHODS.get(method).ignores_density is not None else ["sparsity.density=0.2"]  # AST: its own
    dense = [f"sparsity.magnitude_prune.dense_checkpoint={dense_checkpoint}"] if method == "magnitude_prune" else []
    config = load_config(None, [f"model.name={VIT}", f"sparsity.method={method}", *budget, *extra, *dense,
                                "sparsity.update_every=2", "objective=pgd_at", "attack.steps=1",
                                "agent.enabled=true", "agent.gamma=0.5", "agent.estimator=fixed", "agent.fixed_c=1.0"])
    model = toy_vit()
    base = (SGDW(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) if method == "bsrnet"
            else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    images, labels = batches
    masker = build_sparsity(config.sparsity, model, VIT, base, total_steps=STEPS, seed=0,
                            batch_source=lambda step: (images[:20], labels[:20]))  # GSE's scoring batch
    return config, model, base, masker


def _assert_sparse(masker, base) -> None:
    for name, param in masker.params.items():
        pruned = ~masker.masks[name]
        assert torch.all(param[pruned] == 0), f"{name}: a pruned weight is not zero"
        momentum = base.state.get(param, {}).get("momentum_buffer")
        assert momentum is None or torch.all(momentum[pruned] == 0), f"{name}: pruned momentum is not zero"


@pytest.mark.parametrize("name", [*METHODS.names(), *VARIANTS])
def test_every_method_trains_a_sparse_vit_with_agent(name, dense_checkpoint, batches):
    config, model, base, masker = _setup(name, dense_checkpoint, batches)
    named = dict(model.named_parameters())
    assert set(masker.params) == block_weights(model)
    assert all(masker.params[n] is named[n] for n in masker.params)
    agent = AGENT(base, model, config.agent, masker=masker)
    objective = build_objective(config, model)
    images, labels = batches
    chunks = [(images[i:i + 32], labels[i:i + 32]) for i in (0, 32)]
    for epoch in range(STEPS // len(chunks)):
        agent.refresh([(x, y, x) for x, y in chunks], lambda m, x, y, inputs: objective.loss(m, x, y, inputs)[0])
        for x, y in chunks:
            adversarial = objective.perturb(x, y)
            loss, _ = objective.loss(model, x, y, adversarial)
            assert torch.isfinite(loss)
            agent.zero_grad()
            loss.backward()
            for param_name, param in masker.params.items():  # the hooks mask the gradient AGENT corrects
                assert torch.all(param.grad[~masker.masks[param_name]] == 0)
            agent.snapshot_backward(lambda snapshot: objective.loss(snapshot, x, y, adversarial)[0])
            agent.step()
            _assert_sparse(masker, base)
            assert all(torch.isfinite(p).all() for p in model.parameters())
    assert masker.step == STEPS
    # the layers outside the masks stay dense (nothing zeroes a position of the embedding or the head)
    assert bool((named["network.patch_embed.proj.weight"] != 0).all() and (named["network.head.weight"] != 0).all())
    # each network at its density: the budget, or each AST sub-net's own once it has pruned down to it
    assert masker.at_target_density()
    section = config.sparsity.section("ast") if config.sparsity.method == "ast" else None
    targets = section.densities if section is not None else [config.sparsity.density]
    total = sum(mask.numel() for mask in masker.masks.values())
    for view, target in zip(masker.views(), targets, strict=True):
        assert view.density() == pytest.approx(target, abs=len(view.masks) / total)  # rounding, one per layer


# ---- ERK over Linear layers ---------------------------------------------------------------------------------


def test_erk_allocates_linear_layers_as_erdos_renyi():
    """RigL's ERK gives a fully connected layer of n_out x n_in the density eps * (n_in + n_out) / (n_in * n_out)
    (Erdős–Rényi); by hand for two layers at density 1/4: 96 weights, a budget of 24 active,
    eps = 24 / ((4 + 8) + (8 + 8)) = 6/7, so densities 6/7 * 12/32 = 9/28 and 6/7 * 16/64 = 3/14."""
    densities = allocation.erk({"qkv": (4, 8), "fc": (8, 8)}, 0.25)
    assert densities["qkv"] == pytest.approx(9 / 28) and densities["fc"] == pytest.approx(3 / 14)
    # on the toy ViT's layers: the budget met, the wider-than-tall MLP layers sparser than the square proj
    model = toy_vit()
    shapes = {name: tuple(p.shape) for name, p in sparsifiable(model, None, None).items()}
    densities = allocation.erk(shapes, 0.1)
    assert sum(densities[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.1 * sum(
        math.prod(s) for s in shapes.values()))
    fc1, proj = densities["network.blocks.0.mlp.fc1.weight"], densities["network.blocks.0.attn.proj.weight"]
    assert fc1 / proj == pytest.approx((128 + 32) / (128 * 32) / ((32 + 32) / (32 * 32)))


# ---- a whole run -------------------------------------------------------------------------------------------


def test_a_sparse_vit_run_trains_counts_its_attention_and_resumes(tmp_path):
    """fit() end to end on MNIST-5k (28 px, 7-px patches), its masked Linear layers on the CPU sparse kernels
    (token batches, 3-D inputs): the run's masks are the blocks' layers, the attention matmuls are in its FLOPs,
    and its saved config (the layer rule left to the model) matches the one it was started with, so that
    ``--resume`` accepts it."""
    config = load_config(None, [
        f"model.name={VIT}", "model.kwargs={img_size: 28, patch_size: 7, depth: 1, embed_dim: 32, num_heads: 2}",
        "sparsity.method=rigl", "sparsity.density=0.1", "sparsity.update_every=2", "agent.enabled=true",
        "agent.gamma=0.5", "data.train_limit=256", "data.val_size=64", "data.batch_size=64", "optim.epochs=2",
        "attack.steps=1", "val.pgd_steps=1", "val.max_examples=64", "eval.n_examples=64", "eval.pgd_steps=1",
        "train.sparse_kernels=on", f"out_dir={tmp_path / 'run'}", "device=cpu"])
    result = fit(config)
    assert set(result.masker.params) == block_weights(result.model)
    assert result.metrics["density"].tolist() == pytest.approx([0.1, 0.1], abs=1e-3)
    assert all(math.isfinite(loss) for loss in result.metrics["train_loss"])
    table = pd.read_csv(tmp_path / "run" / "layer_flops.csv").set_index("layer")
    assert table.loc["other", "dense_forward_flops"] > 0  # q @ k^T and attn @ v, dense
    assert table.loc["network.head.weight", "train_forward_flops"] > 0
    state = resume_state(config, torch.device("cpu"))  # raises if the saved config differs from this one
    assert state is not None and state["config"]["sparsity"]["include_first"] is None
