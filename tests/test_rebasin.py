"""Weight matching (Git Re-Basin): permutations keep the function, a permuted copy is recovered exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.compact.dependency import analyze
from sparseforge.merge.rebasin import (
    apply_permutation,
    interpolate,
    interpolation_path,
    loss_barrier,
    random_permutation,
    reset_bn_stats,
    weight_matching,
)
from sparseforge.zoo.data import TensorLoader
from sparseforge.zoo.models import build_model

MODELS = ["lenet300", "conv4", "resnet20"]


def model_with_stats(name: str, seed: int = 0) -> nn.Module:
    """A zoo model in eval mode whose BatchNorms have non-trivial affine parameters and running stats,
    so that forgetting to permute any of them changes the outputs."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_permuted_model_computes_the_same_function(name):
    a = model_with_stats(name)
    graph = analyze(a)
    perms = random_permutation(graph, seed=1)
    # Every unblocked group is permuted, the logits are not.
    assert sorted(perms) == sorted(g.id for g in graph.groups if not g.blocked)
    state = apply_permutation(a, graph, perms)
    b = build_model(name)
    b.load_state_dict(state)
    b.eval()
    changed = [k for k, v in a.state_dict().items() if not torch.equal(v, state[k])]
    assert changed, "the permutation moved nothing"
    if name == "resnet20":
        assert any("running_var" in k for k in changed) and any("shortcut" in k for k in changed)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_weight_matching_recovers_a_permuted_copy_exactly(name):
    a = model_with_stats(name)
    graph = analyze(a)
    b_state = apply_permutation(a, graph, random_permutation(graph, seed=7))
    perms = weight_matching(a, b_state, seed=3)
    back = apply_permutation(b_state, graph, perms)
    state_a = a.state_dict()
    assert back.keys() == state_a.keys()
    for k, v in state_a.items():
        assert torch.equal(back[k], v), k


def inner(a: dict, b: dict) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a if a[k].is_floating_point())


def test_weight_matching_increases_the_alignment_of_independent_models():
    torch.manual_seed(0)
    a = build_model("lenet300")
    torch.manual_seed(1)
    b = build_model("lenet300")
    graph = analyze(a)
    perms = weight_matching(a, b)
    aligned = apply_permutation(b, graph, perms)
    # The objective of weight matching: sum of inner products with A, larger than before.
    assert inner(a.state_dict(), aligned) > inner(a.state_dict(), b.state_dict())
    # Still a pure permutation of B: the same function.
    c = build_model("lenet300")
    c.load_state_dict(aligned)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(b(x), c(x), atol=1e-5)


def test_bad_permutations_are_refused():
    model = build_model("lenet300")
    graph = analyze(model)
    logits = next(g for g in graph.groups if g.blocked)
    with pytest.raises(SparseforgeError, match="cannot be permuted"):
        apply_permutation(model, graph, {logits.id: torch.arange(logits.size)})
    with pytest.raises(SparseforgeError, match="permutation of 0..299"):
        apply_permutation(model, graph, {0: torch.zeros(300, dtype=torch.long)})
    with pytest.raises(SparseforgeError, match="no channel group"):
        apply_permutation(model, graph, {99: torch.arange(3)})
    other = build_model("conv4")
    with pytest.raises(SparseforgeError, match="same architecture"):
        weight_matching(model, {k: v[:1] for k, v in model.state_dict().items()})
    with pytest.raises(SparseforgeError, match="model B has no conv1.weight"):
        weight_matching(other, model)


def test_interpolate_ends_and_midpoint():
    a, b = build_model("resnet20").state_dict(), build_model("resnet20").state_dict()
    b = {k: (v + 1 if v.is_floating_point() else v + 5) for k, v in b.items()}
    for k, v in interpolate(a, b, 0.0).items():
        assert torch.equal(v, a[k]), k
    mid = interpolate(a, b, 0.5)
    assert torch.allclose(mid["fc.weight"], (a["fc.weight"] + b["fc.weight"]) / 2)
    # Counters are not interpolated: they come from A.
    assert torch.equal(mid["bn1.num_batches_tracked"], a["bn1.num_batches_tracked"])
    with pytest.raises(SparseforgeError, match=r"\[0, 1\]"):
        interpolate(a, b, 1.5)


def test_reset_bn_stats_is_the_cumulative_average_and_restores_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3)).eval()
    batches = [torch.randn(6, 1, 5, 5) * (i + 1) for i in range(3)]
    reset_bn_stats(model, [(x, torch.zeros(6)) for x in batches])
    with torch.no_grad():
        outs = [model[0](x) for x in batches]
    # Equal-sized batches: the cumulative average of the batch means is the overall mean,
    # and of the (unbiased) batch variances their plain average.
    expected_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    expected_var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, rtol=1e-4)
    assert model[1].momentum == 0.3 and not model.training
    with pytest.raises(SparseforgeError, match="at least one batch"):
        reset_bn_stats(model, [])


def test_interpolation_path_ends_match_the_models_and_barrier():
    torch.manual_seed(0)
    a, b = build_model("lenet300"), build_model("lenet300")
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    loader = TensorLoader(x, y, batch_size=32)
    path = interpolation_path(a, a.state_dict(), b.state_dict(), loader, [0.0, 0.5, 1.0])
    with torch.no_grad():
        la = nn.functional.cross_entropy(a(x), y).item()
        lb = nn.functional.cross_entropy(b(x), y).item()
    assert path[0]["loss"] == pytest.approx(la, rel=1e-5) and path[-1]["loss"] == pytest.approx(lb, rel=1e-5)
    losses = [p["loss"] for p in path]
    assert loss_barrier([0.0, 0.5, 1.0], losses) == pytest.approx(losses[1] - (la + lb) / 2, rel=1e-5)
    assert loss_barrier([0, 0.25, 1], [1.0, 0.0, 1.0]) == 0.0  # the ends themselves count: never below 0
    with pytest.raises(SparseforgeError, match="from 0 to 1"):
        loss_barrier([0.1, 1.0], [1.0, 1.0])
