"""Tests for one-shot prune() with every score, pattern and allocation, and for report()."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_mlp, random_loader
from torch import nn

from sparseforge import Random, SparseforgeError, prune, report
from sparseforge.zoo import LeNet300100, ResNet20

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = ["0", "2", "5"]  # the Linear layers of build_mlp


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: getattr(model, name).weight.detach() for name in LAYERS}


def reference_mean_grads(model: nn.Module, batches, loss_fn=None) -> dict[str, torch.Tensor]:
    """Mean gradient over batches with plain backward() calls: the reference for gradient scores."""
    model = copy.deepcopy(model)
    sums = {name: torch.zeros_like(getattr(model, name).weight) for name in LAYERS}
    count = 0
    for batch in batches:
        model.zero_grad()
        loss = loss_fn(model, batch) if loss_fn else F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        for name in LAYERS:
            sums[name] += getattr(model, name).weight.grad
        count += 1
    return {name: s / count for name, s in sums.items()}


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the k lowest scores, by a full sort."""
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[torch.argsort(score.reshape(-1))[:k]] = False
    return keep.reshape(score.shape)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("score", ["magnitude", "gradient", "snip", "taylor"])
def test_prune_with_each_score_prunes_the_lowest(score: str) -> None:
    model = build_mlp(seed=0)
    loader = random_loader((16,), n=48, batch_size=16, seed=5)
    original = {n: w.clone() for n, w in weights(model).items()}
    grads = reference_mean_grads(model, loader)
    r = prune(model, score, sparsity=0.6, calibration=loader if score != "magnitude" else None)
    for name, w0 in original.items():
        g = grads[name]
        ref = {"magnitude": w0.abs(), "gradient": g.abs(), "snip": (w0 * g).abs(), "taylor": (w0 * g) ** 2}[score]
        k = round(0.6 * w0.numel())
        expected = lowest_k_mask(ref, k)
        w = getattr(model, name).weight.detach()
        assert torch.equal(w != 0, expected), name
        assert torch.equal(w[expected], w0[expected])  # kept weights untouched
    assert [layer.name for layer in r.layers] == LAYERS
    assert r.layer_nonzeros == sum(w.numel() - round(0.6 * w.numel()) for w in original.values())


def test_gradient_scores_restore_grads_and_respect_max_batches() -> None:
    model = build_mlp(seed=1)
    marker = {p: torch.full_like(p, 7.0) for p in model.parameters()}
    for p in model.parameters():
        p.grad = marker[p].clone()
    loader = random_loader((16,), n=64, batch_size=16, seed=2)
    first = [next(iter(loader))]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    prune(a, "snip", sparsity=0.5, calibration=loader, max_batches=1)
    prune(b, "snip", sparsity=0.5, calibration=first)
    for name in LAYERS:
        assert torch.equal(getattr(a, name).weight, getattr(b, name).weight)
    for p in model.parameters():
        p.grad = marker[p].clone()
    prune(model, "gradient", sparsity=0.5, calibration=loader)
    for p in model.parameters():
        assert torch.equal(p.grad, marker[p])  # calibration left the user's gradients alone


def test_custom_loss_fn_is_used() -> None:
    model = build_mlp(seed=2)
    loader = random_loader((16,), n=32, batch_size=16, seed=3)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return m(batch[0]).pow(2).mean()

    grads = reference_mean_grads(model, loader, loss_fn)
    original = {n: w.clone() for n, w in weights(model).items()}
    prune(model, "gradient", sparsity=0.5, calibration=loader, loss_fn=loss_fn)
    for name, w0 in original.items():
        expected = lowest_k_mask(grads[name].abs(), round(0.5 * w0.numel()))
        assert torch.equal(getattr(model, name).weight != 0, expected)


@pytest.mark.parametrize("score", ["gradient", "snip", "taylor"])
def test_gradient_scores_need_calibration(score: str) -> None:
    model = build_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(SparseforgeError, match="needs gradients.*calibration"):
        prune(model, score, sparsity=0.5)
    with pytest.raises(SparseforgeError, match="no batch"):
        prune(model, score, sparsity=0.5, calibration=[])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # nothing pruned on error


def test_random_score_seeded_and_reproducible() -> None:
    rng = torch.get_rng_state()
    masks = []
    for score in ["random", Random(seed=0), Random(seed=1)]:
        model = build_mlp(seed=0)
        prune(model, score, sparsity=0.5)
        masks.append({n: w != 0 for n, w in weights(model).items()})
    assert torch.equal(torch.get_rng_state(), rng)  # own generator, global RNG untouched
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in LAYERS)
    assert any(not torch.equal(masks[0][n], masks[2][n]) for n in LAYERS)
    magnitude = build_mlp(seed=0)
    prune(magnitude, "magnitude", sparsity=0.5)
    assert any(not torch.equal(masks[0][n], getattr(magnitude, n).weight != 0) for n in LAYERS)


# --------------------------------------------------------------------------- patterns


def test_prune_each_pattern() -> None:
    model = build_mlp(seed=0)
    r = prune(model, pattern="2:4")  # N:M fixes the sparsity
    assert r.sparsity == 0.5
    for name in LAYERS:
        w = getattr(model, name).weight
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all())

    model = build_mlp(seed=0)
    prune(model, sparsity=0.5, pattern="block:4")
    for name in LAYERS:
        nz = (getattr(model, name).weight != 0).reshape(-1, 4, getattr(model, name).weight.shape[1] // 4, 4)
        per_block = nz.sum(dim=(1, 3))
        assert bool(((per_block == 0) | (per_block == 16)).all())
        assert int((per_block == 0).sum()) == round(0.5 * per_block.numel())

    model = build_mlp(seed=0)
    r = prune(model, sparsity=0.5, pattern="channel")
    for name in LAYERS:
        w = getattr(model, name).weight
        zero_rows = (w == 0).all(dim=1)
        assert bool(((w != 0).all(dim=1) | zero_rows).all())
        assert int(zero_rows.sum()) == w.shape[0] // 2
    assert r.sparsity == pytest.approx(0.5)

    model = build_mlp(seed=0)
    r = prune(model, sparsity=0.3, pattern="unstructured")
    assert r.layer_nonzeros == sum(n - round(0.3 * n) for n in (512, 1024, 128))


def test_prune_nm_errors() -> None:
    with pytest.raises(SparseforgeError, match="fixes the sparsity"):
        prune(build_mlp(), sparsity=0.3, pattern="2:4")
    with pytest.raises(SparseforgeError, match="uniform"):
        prune(build_mlp(), pattern="2:4", allocation="global")
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(SparseforgeError, match=r"divisible by 4, but 0 has shape \(8, 6\)"):
        prune(model, pattern="2:4")
    assert bool((model[0].weight != 0).all())
    with pytest.raises(SparseforgeError, match="give a sparsity"):
        prune(build_mlp(), pattern="unstructured")


# --------------------------------------------------------------------------- allocations


@pytest.mark.parametrize("allocation", ["uniform", "global", "lamp", "erk", "er", "dict"])
@pytest.mark.parametrize("pattern", ["unstructured", "block:4", "channel"])
def test_prune_each_allocation(allocation: str, pattern: str) -> None:
    model = build_mlp(seed=4)
    numels = [512, 1024, 128]
    total = sum(numels)
    spec = {"0": 0.25, "2": 0.75} if allocation == "dict" else allocation
    r = prune(model, sparsity=0.6, pattern=pattern, allocation=spec)
    pruned = [n - layer.nonzeros for n, layer in zip(numels, r.layers)]
    if pattern == "unstructured":
        if allocation in ("global", "lamp"):
            assert sum(pruned) == round(0.6 * total)
        elif allocation == "dict":
            assert pruned == [128, 768, round(0.6 * 128)]
        elif allocation == "uniform":
            assert pruned == [round(0.6 * n) for n in numels]
        else:  # ERK/ER: each layer rounds its own count
            assert abs(sum(pruned) - 0.6 * total) <= len(numels)
    else:
        # Whole groups: within a group (a block of 16 or a row of up to 32) per layer.
        if allocation != "dict":
            assert abs(sum(pruned) - 0.6 * total) <= 32 * len(numels)
        for name in LAYERS:
            w = getattr(model, name).weight
            if pattern == "channel":
                assert bool(((w != 0).all(dim=1) | (w == 0).all(dim=1)).all())
            else:
                nz = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1] // 4, 4).sum(dim=(1, 3))
                assert bool(((nz == 0) | (nz == 16)).all())
    assert all(layer.nonzeros > 0 for layer in r.layers)


def test_prune_returns_the_report_of_the_model_and_of_the_pruning() -> None:
    model = build_mlp(seed=5)
    r = prune(model, sparsity=0.5, allocation="global", example_input=torch.zeros(1, 16))
    again = report(model, torch.zeros(1, 16))
    both = r.to_dict()
    assert {k: both[k] for k in again.to_dict()} == again.to_dict()  # the model's numbers, as sf.report gives them
    pruning = both["pruning"]
    assert (pruning["method"], pruning["pattern"], pruning["allocation"], pruning["sparsity"]) == \
        ("magnitude", "unstructured", "global", 0.5)
    assert sorted(pruning["layers"]) == LAYERS and pruning["achieved"] == r.achieved
    # the pruned layers' zeros add up to the model report's zeros over the same weights
    zeros = sum(v["zeros"] for v in r.pruned.values())
    assert zeros == sum(layer.params - layer.nonzeros for layer in r.layers) == round(0.5 * r.layer_params)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


# --------------------------------------------------------------------------- report


def hand_built() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 4, 0, 5]]))
        model[0].bias.copy_(torch.tensor([0.0, 1, 2]))
        model[2].bias.zero_()
        model[3].weight.copy_(torch.tensor([[0.0, 1, 0], [1, 1, 0]]))
    return model


@pytest.mark.parametrize("example", [None, torch.zeros(5, 4)])
def test_report_totals_hand_built(example) -> None:
    r = report(hand_built(), example)
    # params: 12 + 3 (Linear) + 3 + 3 (LayerNorm) + 6 (Linear, no bias)
    assert r.total_params == 27
    # nonzeros: 5 weights + 2 biases + 3 LayerNorm scales + 0 LayerNorm shifts + 3 weights
    assert r.total_nonzeros == 13
    assert r.total_sparsity == pytest.approx(1 - 13 / 27)
    assert [(x.name, x.kind, x.shape, x.params, x.nonzeros) for x in r.layers] == [
        ("0", "Linear", (3, 4), 12, 5),
        ("3", "Linear", (2, 3), 6, 3),
    ]
    assert (r.layer_params, r.layer_nonzeros) == (18, 8)
    assert r.sparsity == pytest.approx(1 - 8 / 18)
    assert r.layers[0].sparsity == pytest.approx(7 / 12)
    # Linear: 2 * in * out per sample, whatever the batch; sparse counts nonzeros only.
    assert [(x.dense_flops, x.sparse_flops) for x in r.layers] == [(24, 10), (12, 6)]
    assert (r.dense_flops, r.sparse_flops) == (36, 16)


def test_report_conv_flops() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 16x16 -> 8x8
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),  # 8x8
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
    no_input = report(model)
    assert no_input.layers[0].dense_flops is None and no_input.dense_flops is None
    assert no_input.layers[2].dense_flops == 2 * 256 * 10  # Linear: per sample without an input
    r = report(model, torch.zeros(2, 3, 16, 16))
    assert [x.dense_flops for x in r.layers] == [2 * (8 * 3 * 3 * 3) * 64, 2 * (4 * 8) * 64, 2 * 256 * 10]
    with torch.no_grad():
        model[0].weight[:4] = 0  # half the filters
    r = report(model, torch.zeros(2, 3, 16, 16))
    assert r.layers[0].sparse_flops == 2 * (4 * 27) * 64 == r.layers[0].dense_flops // 2


def test_report_conv1d_and_token_linear() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3))  # length 10 -> 8
    assert report(model, torch.zeros(1, 2, 10)).layers[0].dense_flops == 2 * 24 * 8
    tokens = nn.Linear(6, 5)  # (batch, 7 tokens, 6): applied 7 times per sample
    assert report(tokens, torch.zeros(3, 7, 6)).layers[0].dense_flops == 2 * 30 * 7


def test_report_uses_declared_input_shape() -> None:
    r = report(LeNet300100())
    assert r.dense_flops == 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert [x.name for x in r.layers] == ["fc1", "fc2", "fc3"]


def test_sparse_flops_scale_with_nonzeros() -> None:
    model = ResNet20(width=4)
    prune(model, sparsity=0.7, allocation="global")
    r = report(model)
    assert r.dense_flops is not None and r.sparse_flops is not None
    for x in r.layers:
        assert x.sparse_flops * x.params == x.dense_flops * x.nonzeros, x.name
    assert r.sparse_flops < 0.5 * r.dense_flops
    # Pruning more lowers the sparse count further; the dense count does not move.
    prune(model, sparsity=0.9, allocation="global")
    r2 = report(model)
    assert r2.dense_flops == r.dense_flops and r2.sparse_flops < r.sparse_flops


def test_report_leaves_mode_and_running_stats() -> None:
    model = ResNet20(width=4)
    model.train()
    stats = model.bn1.running_mean.clone()
    report(model, torch.randn(2, 1, 28, 28) * 5 + 3)
    assert model.training and torch.equal(model.bn1.running_mean, stats)
    model.eval()
    report(model)
    assert not model.training


def test_report_json_and_table() -> None:
    model = ResNet20(width=4)
    prune(model, sparsity=0.5)
    r = report(model)
    d = r.to_dict()
    again = json.loads(json.dumps(d))
    assert again["total_params"] == r.total_params == sum(p.numel() for p in model.parameters())
    assert again["total_nonzeros"] == r.total_nonzeros
    assert again["sparsity"] == pytest.approx(r.sparsity)
    assert again["layers"][0]["shape"] == list(r.layers[0].shape)
    assert again["layers"][0]["sparsity"] == pytest.approx(r.layers[0].sparsity)
    assert again["dense_flops"] == r.dense_flops
    text = str(r)
    for x in r.layers:
        assert x.name in text
    assert "layer3.2.conv2" in text and "weight layers" in text and "all parameters" in text
    assert math.isclose(r.sparsity, 0.5, abs_tol=0.01)
