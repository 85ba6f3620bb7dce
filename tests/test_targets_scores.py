"""Tests for the Target part (which tensors) and the Score part (how important)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparseforge import SNIP, GradientMagnitude, Magnitude, Random, SparseforgeError, Target, Taylor
from sparseforge.scores import as_score, mean_gradients
from sparseforge.targets import as_target

pytestmark = pytest.mark.usefixtures("single_thread")


class Zoo(nn.Module):
    """One of every module kind a target must choose among."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv1d = nn.Conv1d(8, 8, 3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8, bias=False))
        self.head = nn.Linear(8, 2)


def names(layers) -> list[str]:
    return [layer.name for layer in layers]


# --------------------------------------------------------------------------- targets


def test_default_target_selects_linear_and_conv_weights_only() -> None:
    model = Zoo()
    layers = Target().select(model)
    assert names(layers) == ["conv1d", "conv", "block.0", "block.2", "head"]
    for layer in layers:
        assert isinstance(layer.module, (nn.Linear, nn.Conv1d, nn.Conv2d))
        assert layer.weight is layer.module.weight  # the weight, never the bias
        assert layer.param_name == "weight" and layer.mask_name == "weight_mask"
        assert layer.shape == layer.module.weight.shape and layer.numel == layer.module.weight.numel()
    selected = {id(layer.weight) for layer in layers}
    for module in (model.embed, model.bn, model.block[1]):
        assert all(id(p) not in selected for p in module.parameters())


def test_include_exclude_globs() -> None:
    model = Zoo()
    assert names(Target(include=["block.*"]).select(model)) == ["block.0", "block.2"]
    assert names(Target(include="head").select(model)) == ["head"]
    assert names(Target(include=["head", "conv*"]).select(model)) == ["conv1d", "conv", "head"]
    assert names(Target(exclude=["conv*", "*.2"]).select(model)) == ["block.0", "head"]
    # A glob that matches only a non-target type (bn, a LayerNorm) is not a match.
    with pytest.raises(SparseforgeError, match="'bn'") as info:
        Target(include=["bn"]).select(model)
    assert "available: conv1d, conv, block.0, block.2, head" in str(info.value)


def test_include_glob_matching_nothing_names_it() -> None:
    with pytest.raises(SparseforgeError, match="target pattern 'encoder.\\*' matches no"):
        Target(include=["head", "encoder.*"]).select(Zoo())


def test_excluding_everything_is_an_error() -> None:
    with pytest.raises(SparseforgeError, match="selects no tensor"):
        Target(exclude=["*"]).select(Zoo())


def test_types_by_name_and_class() -> None:
    model = Zoo()
    assert names(Target(types=["embedding"]).select(model)) == ["embed"]
    assert names(Target(types=["Linear", nn.Conv2d]).select(model)) == ["conv", "block.0", "block.2", "head"]
    assert names(Target(types=("conv3d",)).select(model)) == ["conv3d"]
    assert names(Target(types=[nn.LayerNorm]).select(model)) == ["block.1"]


def test_unknown_type_name() -> None:
    with pytest.raises(SparseforgeError, match="unknown module type 'lstm'.*conv2d"):
        Target(types=["lstm"]).select(Zoo())


def test_param_name_bias_skips_modules_without_one() -> None:
    layers = Target(include=["block.*", "head"], param_name="bias").select(Zoo())
    assert names(layers) == ["block.0", "head"]  # block.2 has bias=False
    assert all(layer.weight is layer.module.bias and layer.mask_name == "bias_mask" for layer in layers)


def test_as_target() -> None:
    assert as_target(None) == Target()
    assert as_target("head") == Target(include=("head",))
    assert as_target(["a*", "b"]) == Target(include=("a*", "b"))
    t = Target(exclude=["x"])
    assert as_target(t) is t


# --------------------------------------------------------------------------- scores


def test_magnitude() -> None:
    w = torch.tensor([[-2.0, 0.5], [0.0, 3.0]], requires_grad=True)
    s = Magnitude()(w)
    assert torch.equal(s, torch.tensor([[2.0, 0.5], [0.0, 3.0]]))
    assert not s.requires_grad
    assert not Magnitude.needs_grad


def test_gradient_scores_formulas() -> None:
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g = torch.tensor([-0.5, 0.25, 0.0, 4.0])
    assert torch.equal(GradientMagnitude()(w, g), torch.tensor([0.5, 0.25, 0.0, 4.0]))
    assert torch.equal(SNIP()(w, g), torch.tensor([0.5, 0.5, 0.0, 2.0]))
    assert torch.equal(Taylor()(w, g), torch.tensor([0.25, 0.25, 0.0, 4.0]))
    for score in (GradientMagnitude(), SNIP(), Taylor()):
        assert score.needs_grad
        with pytest.raises(SparseforgeError, match="needs gradients"):
            score(w, None)


def test_random_score_seeded_independent_and_checkpointable() -> None:
    w = torch.zeros(5, 7)
    global_state = torch.get_rng_state()
    a, b, c = Random(seed=4), Random(seed=4), Random(seed=5)
    first = a(w)
    assert first.shape == w.shape and bool(((first >= 0) & (first < 1)).all())
    assert torch.equal(first, b(w))
    assert not torch.equal(first, c(w))
    assert not torch.equal(first, a(w))  # a new draw each call
    assert torch.equal(torch.get_rng_state(), global_state)
    # The state dict restores the position in the sequence.
    state = a.state_dict()
    nxt = a(w)
    restored = Random(seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored(w), nxt)
    # Independent of the weights' values.
    assert torch.equal(Random(seed=1)(torch.randn(5, 7)), Random(seed=1)(w))


def test_as_score() -> None:
    assert isinstance(as_score(None), Magnitude)
    assert isinstance(as_score(" SNIP "), SNIP)
    assert isinstance(as_score("taylor"), Taylor)
    assert isinstance(as_score("gradient"), GradientMagnitude)
    assert isinstance(as_score("random"), Random)
    s = Random(seed=3)
    assert as_score(s) is s
    with pytest.raises(SparseforgeError, match="unknown score 'fisher'"):
        as_score("fisher")


def test_mean_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    unused = nn.Parameter(torch.ones(2))  # not touched by the loss: zero gradient
    model.register_parameter("unused", unused)
    batches = [(torch.randn(5, 4), torch.randint(0, 2, (5,))) for _ in range(3)]
    weights = [model[0].weight, model[2].weight, unused]
    model[0].weight.grad = torch.full_like(model[0].weight, 9.0)
    means = mean_gradients(model, weights, batches)
    expected = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights[:2])
        for e, g in zip(expected, grads):
            e += g
    assert torch.allclose(means[0], expected[0] / 3) and torch.allclose(means[1], expected[1] / 3)
    assert torch.equal(means[2], torch.zeros(2))
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 9.0))  # restored
    assert model[2].weight.grad is None
    # max_batches stops early.
    one = mean_gradients(model, weights[:1], batches, max_batches=1)
    g0 = torch.autograd.grad(F.cross_entropy(model(batches[0][0]), batches[0][1]), weights[0])[0]
    assert torch.allclose(one[0], g0)
    with pytest.raises(SparseforgeError, match="no batch"):
        mean_gradients(model, weights, iter([]))
