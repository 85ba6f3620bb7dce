"""Tests for the Allocation part: budgets add up, formulas match hand computations,
global selection equals a brute-force sort, and the per-layer floor holds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import ERK, LAMP, Explicit, Global, SparseforgeError, Uniform, Unstructured
from sparseforge.allocation import _lowest_k_counts, as_allocation

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = settings(max_examples=30, deadline=None)


def pruned_counts(shapes, sparsities) -> list[int]:
    """Elements an unstructured mask prunes per layer for the allocated sparsities."""
    return [int((~Unstructured().mask(torch.rand(s), sp)).sum()) for s, sp in zip(shapes, sparsities)]


def brute_force_counts(scores: list[torch.Tensor], k: int) -> list[int]:
    """Per-layer share of the k lowest scores of all layers, by a full stable sort.

    The stable sort breaks ties by position, i.e. earlier layers first, which is
    the documented tie rule of the global selection.
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    layer_of = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    lowest = torch.sort(flat, stable=True).indices[:k]
    return torch.bincount(layer_of[lowest], minlength=len(scores)).tolist()


def random_scores(shapes, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=gen, dtype=dtype) for s in shapes]


SHAPES = [(32, 16), (8, 4, 3, 3), (10, 32), (64, 64)]
NAMES = ["fc1", "conv", "head", "fc2"]


# --------------------------------------------------------------------------- budgets


@FAST
@given(sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 2**31 - 1), lamp=st.booleans())
def test_global_and_lamp_budget_is_exact(sparsity: float, seed: int, lamp: bool) -> None:
    scores = random_scores(SHAPES, seed)
    alloc = LAMP() if lamp else Global()
    per_layer = alloc.allocate(NAMES, [torch.Size(s) for s in SHAPES], sparsity, scores)
    total = sum(math.prod(s) for s in SHAPES)
    counts = pruned_counts(SHAPES, per_layer)
    assert sum(counts) == round(sparsity * total)
    assert all(c < math.prod(s) for c, s in zip(counts, SHAPES))


@FAST
@given(sparsity=st.floats(0.0, 0.999))
def test_uniform_budget_per_layer(sparsity: float) -> None:
    per_layer = Uniform().allocate(NAMES, SHAPES, sparsity)
    for s, shape in zip(per_layer, SHAPES):
        n = math.prod(shape)
        assert s == pytest.approx(min(sparsity, 1 - 1 / n))
    counts = pruned_counts(SHAPES, per_layer)
    assert counts == [min(round(sparsity * math.prod(s)), math.prod(s) - 1) for s in SHAPES]


@FAST
@given(
    shapes=st.lists(
        st.one_of(
            st.tuples(st.integers(8, 80), st.integers(8, 80)),
            st.tuples(st.integers(4, 24), st.integers(4, 24), st.sampled_from([1, 3]), st.sampled_from([1, 3])),
        ),
        min_size=1,
        max_size=5,
    ),
    sparsity=st.floats(0.0, 0.95),
    kernel=st.booleans(),
)
def test_erk_budget_adds_up(shapes: list[tuple[int, ...]], sparsity: float, kernel: bool) -> None:
    per_layer = ERK(kernel=kernel).allocate([f"l{i}" for i in range(len(shapes))], shapes, sparsity)
    assert all(0.0 <= s < 1.0 for s in per_layer)
    total = sum(math.prod(s) for s in shapes)
    kept = sum(math.prod(s) - c for s, c in zip(shapes, pruned_counts(shapes, per_layer)))
    # Each layer rounds its own count: at most half an element each, plus float noise.
    assert abs(kept - (1 - sparsity) * total) <= 0.5 * len(shapes) + 1e-6


# --------------------------------------------------------------------------- ERK / ER formulas


def test_erk_hand_computed_without_redistribution() -> None:
    # shapes (10,20), (30,40) at 0.8: raw = 30/200 = 0.15 and 70/1200; kept budget
    # 0.2 * 1400 = 280 = eps * (0.15*200 + 70/1200*1200) = eps * 100 -> eps = 2.8.
    out = ERK().allocate(["a", "b"], [(10, 20), (30, 40)], 0.8)
    assert out == pytest.approx([1 - 2.8 * 0.15, 1 - 2.8 * 70 / 1200])
    assert out == pytest.approx([0.58, 1 - 196 / 1200])


def test_erk_hand_computed_with_dense_redistribution() -> None:
    # (10,20) and (30,40,3,3) at 0.8: eps = 2200 / (0.15*200 + 76/10800*10800) = 2200/106,
    # so the Linear's density would be 0.15 * 20.75 > 1: it becomes dense and the conv
    # takes the rest: 2200 - 200 = 2000 kept of 10800.
    out = ERK().allocate(["fc", "conv"], [(10, 20), (30, 40, 3, 3)], 0.8)
    assert out == pytest.approx([0.0, 1 - 2000 / 10800])
    # ER ignores the kernel: raw = 70/1200 for the conv, eps = 2200 / (30 + 630) = 10/3.
    er = ERK(kernel=False).allocate(["fc", "conv"], [(10, 20), (30, 40, 3, 3)], 0.8)
    assert er == pytest.approx([1 - 0.15 * 10 / 3, 1 - 70 / 1200 * 10 / 3])
    assert er == pytest.approx([0.5, 1 - 2100 / 10800])
    assert as_allocation("er") == ERK(kernel=False)


def test_erk_tiny_layer_dense_others_absorb_budget() -> None:
    shapes = [(2, 2), (100, 100), (50, 100)]
    out = ERK().allocate(["tiny", "big", "mid"], shapes, 0.5)
    assert out[0] == 0.0
    total = sum(math.prod(s) for s in shapes)
    kept = sum(math.prod(s) * (1 - sp) for s, sp in zip(shapes, out))
    assert kept == pytest.approx(0.5 * total)
    # The others absorb what the dense layer keeps: 7502 - 4 = 7498 kept over
    # raw densities 200/10000 and 150/5000, so eps = 7498 / (200 + 150).
    eps = 7498 / 350
    assert out == pytest.approx([0.0, 1 - eps * 0.02, 1 - eps * 0.03])


def test_erk_power_scales_raw() -> None:
    out = ERK(power=0.5).allocate(["a", "b"], [(10, 20), (30, 40)], 0.8)
    r1, r2 = math.sqrt(0.15), math.sqrt(70 / 1200)
    eps = 280 / (r1 * 200 + r2 * 1200)
    assert out == pytest.approx([1 - eps * r1, 1 - eps * r2])


# --------------------------------------------------------------------------- global = brute-force sort


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sparsity", [0.0001, 0.01, 0.3, 0.5, 0.8])
def test_global_matches_brute_force_sort(seed: int, sparsity: float) -> None:
    shapes = [(7, 9), (33, 20), (5, 4, 3, 3), (250,), (64, 48)]
    scores = random_scores(shapes, seed)
    total = sum(s.numel() for s in scores)
    k = round(sparsity * total)
    expected = brute_force_counts(scores, k)
    assert all(e < s.numel() for e, s in zip(expected, scores)), "test case should not hit the floor"
    per_layer = Global().allocate([str(i) for i in range(len(shapes))], [s.shape for s in scores], sparsity, scores)
    assert [round(p * s.numel()) for p, s in zip(per_layer, scores)] == expected
    # And the masks prune exactly the brute-force set (distinct scores: no ties).
    flat = torch.cat([s.reshape(-1) for s in scores])
    lowest = torch.zeros_like(flat, dtype=torch.bool)
    lowest[torch.sort(flat).indices[:k]] = True
    masks = [Unstructured().mask(s, p) for s, p in zip(scores, per_layer)]
    assert torch.equal(torch.cat([~m.reshape(-1) for m in masks]), lowest)


@pytest.mark.parametrize("sparsity", [1e-6, 0.0003, 0.25, 0.7, 0.99, 0.999999])
def test_global_large_sampled_bracket(sparsity: float) -> None:
    # ~2M scores: more than the 65536-value sample, so the bracket path is used.
    shapes = [(1024, 1024), (512, 1024), (300, 700), (4000,)]
    scores = random_scores(shapes, seed=7)
    scores[1] = scores[1] * 0.5  # layers on different scales
    total = sum(s.numel() for s in scores)
    k = round(sparsity * total)
    expected = brute_force_counts(scores, k)
    assert _lowest_k_counts(scores, k) == expected
    if all(e < s.numel() for e, s in zip(expected, scores)):
        per_layer = Global().allocate(list("abcd"), [s.shape for s in scores], sparsity, scores)
        assert [round(p * s.numel()) for p, s in zip(per_layer, scores)] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(8))
def test_lowest_k_counts_extreme_k(dtype: torch.dtype, seed: int) -> None:
    # Small and large k miss the sample's bracket and take the full-selection path;
    # the result must stay exact whatever the dtype (LAMP hands over float64 scores).
    scores = random_scores([(3000,), (40, 50), (7, 7, 3)], seed, dtype=dtype)
    n = sum(s.numel() for s in scores)
    for k in [0, 1, 2, 3, 17, n // 2, n - 17, n - 1, n]:
        assert _lowest_k_counts(scores, k) == brute_force_counts(scores, k), k


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.8])
def test_global_ties_total_exact(seed: int, sparsity: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (20, 8, 3, 3), (500,)]
    scores = [torch.randint(0, 4, s, generator=gen).float() for s in shapes]  # heavy ties
    total = sum(s.numel() for s in scores)
    k = round(sparsity * total)
    per_layer = Global().allocate(["a", "b", "c"], [torch.Size(s) for s in shapes], sparsity, scores)
    counts = [round(p * s.numel()) for p, s in zip(per_layer, scores)]
    assert sum(counts) == k
    assert counts == brute_force_counts(scores, k)  # ties split in layer order
    # Whatever the split, only scores <= the k-th value are pruned.
    masks = [Unstructured().mask(s, p) for s, p in zip(scores, per_layer)]
    pruned = torch.cat([s[~m] for s, m in zip(scores, masks)])
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    assert pruned.max() <= kept.min()


def test_global_large_ties_sampled_bracket() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randint(0, 5, (700, 1000), generator=gen).float() for _ in range(2)]
    for k in [1, 123_457, 700_000, 1_399_999]:
        assert _lowest_k_counts(scores, k) == brute_force_counts(scores, k)


def test_global_needs_scores() -> None:
    with pytest.raises(SparseforgeError, match="needs the layers' scores"):
        Global().allocate(["a"], [torch.Size([4, 4])], 0.5)


# --------------------------------------------------------------------------- floor (min_keep)


@pytest.mark.parametrize("alloc_cls", [Global, LAMP])
def test_global_floor_keeps_min_and_gives_budget_away(alloc_cls) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(20, 10), (30, 30), (40, 25)]
    scores = [torch.rand(s, generator=gen) + 1.0 for s in shapes]
    scores[0] = torch.rand(shapes[0], generator=gen) * 1e-6  # all tiny: globally first to go
    total = sum(math.prod(s) for s in shapes)
    for min_keep in [1, 5, 37]:
        sparsity = 0.5
        per_layer = alloc_cls(min_keep=min_keep).allocate(["a", "b", "c"], shapes, sparsity, scores)
        counts = pruned_counts(shapes, per_layer)
        kept = [math.prod(s) - c for s, c in zip(shapes, counts)]
        assert all(k >= min_keep for k in kept), kept
        assert sum(counts) == round(sparsity * total)  # the floor's budget went to the others
        if alloc_cls is Global:
            assert kept[0] == min_keep  # tiny layer pruned down to the floor, no further


def test_global_floor_with_minus_inf_scores() -> None:
    # Weights already pruned (-inf) count towards the budget; the floor still holds.
    scores = [torch.full((10, 10), -math.inf), torch.rand(10, 10)]
    per_layer = Global(min_keep=3).allocate(["a", "b"], [torch.Size([10, 10])] * 2, 0.6, scores)
    counts = pruned_counts([(10, 10)] * 2, per_layer)
    assert counts == [97, 23]


@pytest.mark.parametrize("min_keep", [1, 4, 12])
def test_uniform_and_erk_floor_at_high_sparsity(min_keep: int) -> None:
    shapes = [(10, 10), (3, 3), (200, 50)]
    for alloc in (Uniform(min_keep=min_keep), ERK(min_keep=min_keep), Explicit({"*": 0.999}, min_keep=min_keep)):
        per_layer = alloc.allocate(["a", "b", "c"], shapes, 0.999)
        kept = [math.prod(s) - c for s, c in zip(shapes, pruned_counts(shapes, per_layer))]
        assert all(k >= min(min_keep, math.prod(s)) for k, s in zip(kept, shapes)), (type(alloc), kept)
    # Uniform at 0.999 keeps exactly the floor where 0.999 would keep fewer.
    kept = [math.prod(s) - c for s, c in zip(shapes, pruned_counts(shapes, Uniform(min_keep=min_keep).allocate(["a", "b", "c"], shapes, 0.999)))]
    assert kept[0] == min_keep and kept[1] == min(min_keep, 9)


def test_min_keep_must_be_non_negative() -> None:
    with pytest.raises(SparseforgeError, match="min_keep"):
        Uniform(min_keep=-1)


# --------------------------------------------------------------------------- LAMP


def test_lamp_formula_hand_computed() -> None:
    # sorted squares 1, 4, 9: suffix sums 14, 13, 9 -> LAMP 1/14, 4/13, 1.
    lamp = LAMP().transform(torch.tensor([3.0, 1.0, 2.0]))
    assert lamp.tolist() == pytest.approx([1.0, 1 / 14, 4 / 13])
    lamp2 = LAMP().transform(torch.tensor([[0.5, 0.1], [0.2, 0.4]]))
    # squares .25 .01 .04 .16: sorted .01 .04 .16 .25, suffixes .46 .45 .41 .25
    assert lamp2.reshape(-1).tolist() == pytest.approx([1.0, 0.01 / 0.46, 0.04 / 0.45, 0.16 / 0.41])


def test_lamp_ignores_already_pruned_weights() -> None:
    # An already-pruned weight (-inf) is a zero weight: it adds nothing to the
    # suffix sums, and the kept weights' LAMP scores are as without it.
    with_pruned = LAMP().transform(torch.tensor([-math.inf, 1.0, 3.0, 2.0, -math.inf]))
    alone = LAMP().transform(torch.tensor([1.0, 3.0, 2.0]))
    assert math.isinf(with_pruned[0]) and with_pruned[0] < 0 and with_pruned[4] < 0
    assert with_pruned[1:4].tolist() == pytest.approx(alone.tolist())


def reference_lamp(t: torch.Tensor) -> torch.Tensor:
    """LAMP scores by the definition, pairwise: s_u^2 / sum of s_v^2 over v with s_v^2 >= s_u^2
    (distinct values); -inf (already pruned) counts as a zero weight and stays -inf."""
    flat = t.reshape(-1).double()
    pruned = torch.isneginf(flat)
    sq = torch.where(pruned, torch.zeros_like(flat), flat * flat)
    denom = ((sq[None, :] >= sq[:, None]) * sq[None, :]).sum(dim=1)
    return torch.where(pruned, torch.full_like(flat, -math.inf), sq / denom)


@pytest.mark.parametrize("sparsity", [0.3, 0.8, 0.95])
def test_lamp_matches_reference_with_pruned_weights(sparsity: float) -> None:
    # GMP-style monotone updates hand LAMP layers with -inf (pruned) entries; the
    # allocation must be the global LAMP selection of the kept weights, not collapse
    # the layers that already have pruned weights.
    gen = torch.Generator().manual_seed(2)
    shapes = [(20, 20), (30, 40), (10, 10)]
    scores = [torch.rand(s, generator=gen) for s in shapes]
    scores[0] = scores[0].masked_fill(torch.rand(shapes[0], generator=gen) < 0.25, -math.inf)
    scores[1] = scores[1].masked_fill(torch.rand(shapes[1], generator=gen) < 0.25, -math.inf)
    total = sum(math.prod(s) for s in shapes)
    k = round(sparsity * total)
    expected = brute_force_counts([reference_lamp(s) for s in scores], k)
    assert all(e < math.prod(s) for e, s in zip(expected, shapes))
    per_layer = LAMP().allocate(["a", "b", "c"], shapes, sparsity, scores)
    assert [round(p * math.prod(s)) for p, s in zip(per_layer, shapes)] == expected


@pytest.mark.parametrize("sparsity", [0.9, 0.99, 0.999])
def test_lamp_never_empties_a_layer(sparsity: float) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(20, 20), (50, 40), (10, 10)]
    scores = [torch.rand(s, generator=gen) for s in shapes]
    scores[2] = scores[2] * 1e-4  # a layer of tiny weights
    # Half of layer 1 already pruned (monotone update): LAMP must still rank the rest.
    scores[1] = scores[1].masked_fill(torch.rand(shapes[1], generator=gen) < 0.5, -math.inf)
    per_layer = LAMP(min_keep=0).allocate(["a", "b", "c"], shapes, sparsity, scores)
    masks = [Unstructured().mask(s, p) for s, p in zip(scores, per_layer)]
    for s, m in zip(scores, masks):
        assert bool(m.reshape(-1)[s.reshape(-1).argmax()])  # each layer's largest survives
    total = sum(math.prod(s) for s in shapes)
    # Exact, except where one weight per layer is more than the budget allows.
    assert sum(int((~m).sum()) for m in masks) == min(round(sparsity * total), total - len(shapes))


# --------------------------------------------------------------------------- explicit


def test_explicit_per_layer_by_glob() -> None:
    names = ["encoder.fc1", "encoder.fc2", "decoder.fc1", "head"]
    shapes = [(10, 10)] * 4
    alloc = Explicit({"encoder.*": 0.3, "*.fc1": 0.7})
    # First matching glob in dict order wins; unmatched layers get the model-level value.
    assert alloc.allocate(names, shapes, 0.5) == [0.3, 0.3, 0.7, 0.5]
    assert Explicit({"head": 0.9}, default=0.1).allocate(names, shapes, 0.5) == [0.1, 0.1, 0.1, 0.9]
    assert as_allocation({"head": 0.2}).allocate(names, shapes, 0.0) == [0.0, 0.0, 0.0, 0.2]


def test_explicit_unknown_glob_names_it() -> None:
    with pytest.raises(SparseforgeError, match="'encodr.*'.*matches no targeted layer"):
        Explicit({"encodr.*": 0.5}).allocate(["encoder.fc1"], [(4, 4)], 0.5)


def test_explicit_bad_value_names_glob() -> None:
    with pytest.raises(SparseforgeError, match="'head'"):
        Explicit({"head": 1.0}).allocate(["head"], [(4, 4)], 0.5)


# --------------------------------------------------------------------------- parsing


def test_as_allocation_parses_and_rejects() -> None:
    assert isinstance(as_allocation(None), Uniform)
    assert isinstance(as_allocation("Global"), Global) and not isinstance(as_allocation("global"), LAMP)
    assert isinstance(as_allocation("lamp"), LAMP)
    assert as_allocation("erk") == ERK()
    with pytest.raises(SparseforgeError, match="unknown allocation 'owl-ish'"):
        as_allocation("owl-ish")


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
@pytest.mark.parametrize("alloc", [Uniform(), ERK(), Global(), LAMP(), Explicit()])
def test_allocations_reject_bad_sparsity(alloc, bad: float) -> None:
    with pytest.raises(SparseforgeError):
        alloc.allocate(["a"], [torch.Size([4, 4])], bad, [torch.rand(4, 4)])
