"""Property tests for the Pattern part: exact counts, group structure, and keeping the top scores.

Every pattern is checked against an independent reference written with
explicit loops or a plain sort, never against the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import Block, Channel, NM, SparseforgeError, Unstructured
from sparseforge.patterns import as_pattern, check_sparsity

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = settings(max_examples=40, deadline=None)

sparsities = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def distinct_scores(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random permutation of 0..numel-1: distinct scores, so the top-k is unique."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(math.prod(shape), generator=gen).to(torch.float32).reshape(shape)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(output units, everything else), 1-D tensors as one row: the patterns' matrix view."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


# --------------------------------------------------------------------------- unstructured


@FAST
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple),
    sparsity=sparsities,
    seed=seeds,
)
def test_unstructured_exact_count_and_keeps_top(shape: tuple[int, ...], sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=gen)
    keep = Unstructured().mask(scores, sparsity)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    numel = scores.numel()
    expected = round(sparsity * numel)
    if expected >= numel:  # at least one weight is always kept
        expected = numel - 1
    assert int((~keep).sum()) == expected
    if 0 < expected:
        assert scores[~keep].max() <= scores[keep].min()


def test_unstructured_prunes_minus_inf_first() -> None:
    # -inf marks weights already pruned (monotone updates): they must be the first to go.
    scores = torch.tensor([5.0, -math.inf, 1.0, -math.inf, 3.0, 2.0])
    keep = Unstructured().mask(scores, 0.5)
    assert keep.tolist() == [True, False, False, False, True, True]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "half"])
def test_mask_rejects_bad_sparsity(bad: object) -> None:
    with pytest.raises(SparseforgeError, match="sparsity"):
        Unstructured().mask(torch.rand(4, 4), bad)  # type: ignore[arg-type]
    with pytest.raises(SparseforgeError):
        check_sparsity(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- N:M


def reference_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask from explicit loops: for each output, kernel position and group of m
    consecutive input channels, keep the indices of the n largest scores."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    out_dim, in_dim = scores.shape[:2]
    kernel_positions = list(itertools.product(*[range(k) for k in scores.shape[2:]]))
    for o in range(out_dim):
        for pos in kernel_positions:
            for g in range(in_dim // m):
                cols = list(range(g * m, (g + 1) * m))
                values = [float(scores[(o, c, *pos)]) for c in cols]
                best = sorted(range(m), key=lambda j: values[j], reverse=True)[:n]
                for j in best:
                    keep[(o, cols[j], *pos)] = True
    return keep


nm_pairs = st.one_of(
    st.sampled_from([(2, 4), (4, 8), (1, 8)]),
    st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))),
)


@FAST
@given(
    nm=nm_pairs,
    out_dim=st.integers(1, 5),
    groups=st.integers(1, 3),
    kernel=st.one_of(st.just(()), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    seed=seeds,
)
def test_nm_keeps_top_n_of_every_group(
    nm: tuple[int, int], out_dim: int, groups: int, kernel: tuple[int, ...], seed: int
) -> None:
    n, m = nm
    shape = (out_dim, groups * m, *kernel)
    scores = distinct_scores(shape, seed)
    pattern = NM(n, m)
    keep = pattern.mask(scores, 1 - n / m)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    # Exactly n kept in every group of m consecutive inputs along dim 1.
    per_group = keep.movedim(1, -1).reshape(-1, groups, m).sum(dim=-1)
    assert bool((per_group == n).all())
    assert torch.equal(keep, reference_nm(scores, n, m))
    # The default sparsity (None) is N:M's own.
    assert torch.equal(pattern.mask(scores), keep)


def test_nm_group_runs_along_input_dim_not_kernel() -> None:
    # 2:4 on (1, 4, 1, 2): groups are the 4 input channels at each kernel position.
    scores = torch.zeros(1, 4, 1, 2)
    scores[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    scores[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keep = NM(2, 4).mask(scores)
    assert keep[0, :, 0, 0].tolist() == [True, True, False, False]
    assert keep[0, :, 0, 1].tolist() == [False, False, True, True]


@pytest.mark.parametrize("shape", [(8, 6), (4, 10, 3, 3), (3, 2)])
def test_nm_non_divisible_input_dim_names_shape_and_m(shape: tuple[int, ...]) -> None:
    pattern = NM(2, 4)
    with pytest.raises(SparseforgeError) as info:
        pattern.check(torch.Size(shape), "encoder.fc1")
    msg = str(info.value)
    assert "encoder.fc1" in msg and str(shape) in msg and "divisible by 4" in msg
    with pytest.raises(SparseforgeError) as info:
        pattern.mask(torch.rand(shape))
    assert str(shape) in str(info.value) and "4" in str(info.value)


def test_nm_rejects_other_sparsities_and_bad_n_m() -> None:
    scores = torch.rand(4, 8)
    with pytest.raises(SparseforgeError, match="fixes the sparsity at 0.5"):
        NM(2, 4).mask(scores, 0.3)
    # Sparsity 0 (a schedule that has not started) keeps everything.
    assert bool(NM(2, 4).mask(scores, 0.0).all())
    with pytest.raises(SparseforgeError, match="2-D"):
        NM(2, 4).check(torch.Size([8]), "bias")
    for n, m in [(0, 4), (4, 4), (5, 4), (-1, 2)]:
        with pytest.raises(SparseforgeError, match="0 < N < M"):
            NM(n, m)


# --------------------------------------------------------------------------- block


def block_view(t: torch.Tensor, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(row slice, col slice) index pairs of every b x b block of the matrix view, ragged edges included."""
    rows, cols = as_rows(t).shape
    return [
        (torch.arange(r, min(r + b, rows)), torch.arange(c, min(c + b, cols)))
        for r in range(0, rows, b)
        for c in range(0, cols, b)
    ]


@FAST
@given(
    b=st.integers(1, 5),
    shape=st.one_of(
        st.tuples(st.integers(1, 13), st.integers(1, 13)),
        st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    ),
    sparsity=sparsities,
    seed=seeds,
)
def test_block_whole_blocks_and_count(b: int, shape: tuple[int, ...], sparsity: float, seed: int) -> None:
    scores = distinct_scores(shape, seed)
    keep = Block(b).mask(scores, sparsity)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    km, sm = as_rows(keep), as_rows(scores)
    kept_means, pruned_means, kept_blocks = [], [], 0
    for r, c in block_view(scores, b):
        block = km[r][:, c]
        assert bool((block == block.flatten()[0]).all()), f"block at rows {r.tolist()} is mixed"
        mean = float(sm[r][:, c].mean())
        if bool(block.flatten()[0]):
            kept_means.append(mean)
            kept_blocks += 1
        else:
            pruned_means.append(mean)
    assert kept_blocks >= 1
    # Pattern keeps the highest (mean) scores.
    if pruned_means:
        assert max(pruned_means) <= min(kept_means)
    # Count: the nearest achievable to the target, so within half a full block of it,
    # except when every block but one is pruned (a layer never collapses).
    target = round(sparsity * scores.numel())
    pruned = int((~keep).sum())
    if not (kept_blocks == 1 and pruned < target):
        assert abs(pruned - target) <= b * b / 2, (pruned, target)
    assert abs(pruned - target) <= b * b or kept_blocks == 1


def test_block_ragged_edge_small_target_is_not_overshot() -> None:
    # 5x5 with b=4: blocks of 16, 4, 4 and 1 elements. A target of 1 element must
    # prune the 1-element block or nothing, never a 16-element block because it
    # happens to score lowest.
    scores = torch.ones(5, 5)
    scores[:4, :4] = 0.0
    keep = Block(4).mask(scores, 0.04)  # round(0.04 * 25) == 1
    assert int((~keep).sum()) <= 1


def test_block_ragged_scores_use_real_elements_only() -> None:
    # A ragged 1x1 corner block with a high score must beat a full block with a
    # lower mean even though its zero padding would drag a padded mean down.
    scores = torch.full((5, 5), 1.0)
    scores[4, 4] = 3.0
    scores[:4, :4] = 2.0
    keep = Block(4).mask(scores, 0.3)  # prunes 8 elements: the two 4-element blocks
    assert bool(keep[4, 4]) and bool(keep[:4, :4].all())
    assert not bool(keep[:4, 4].any()) and not bool(keep[4, :4].any())


def test_block_rejects_bad_size() -> None:
    with pytest.raises(SparseforgeError, match="block size"):
        Block(0)


# --------------------------------------------------------------------------- channel


@FAST
@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 12), st.integers(1, 9)),
        st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    ),
    sparsity=sparsities,
    seed=seeds,
)
def test_channel_whole_rows_exact_count(shape: tuple[int, ...], sparsity: float, seed: int) -> None:
    scores = distinct_scores(shape, seed)
    keep = Channel().mask(scores, sparsity)
    rows = shape[0]
    km = as_rows(keep)
    row_kept = km.all(dim=1)
    assert bool((row_kept | ~km.any(dim=1)).all()), "a row is partly pruned"
    expected = min(round(sparsity * rows), rows - 1)
    assert int((~row_kept).sum()) == expected
    means = as_rows(scores).mean(dim=1)
    if expected:
        assert means[~row_kept].max() <= means[row_kept].min()


def test_channel_counts_rows_not_elements() -> None:
    # 6 rows of 2: 0.42 * 6 = 2.52 rows, so 3 rows (5.04 elements -> 6 is nearer than 4).
    keep = Channel().mask(torch.arange(12.0).reshape(6, 2), 0.42)
    assert keep.all(dim=1).tolist() == [False, False, False, True, True, True]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, Unstructured()),
        ("unstructured", Unstructured()),
        (" Dense ", Unstructured()),
        ("channel", Channel()),
        ("filter", Channel()),
        ("2:4", NM(2, 4)),
        (" 4 : 8 ", NM(4, 8)),
        ("1:8", NM(1, 8)),
        ("block:4", Block(4)),
        ("Block=8", Block(8)),
        ("block2", Block(2)),
        (NM(1, 2), NM(1, 2)),
    ],
)
def test_as_pattern_parses(spec: object, expected: object) -> None:
    assert as_pattern(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["", "garbage", "2-4", "2:", ":4", "block:", "block:x", "4:2", "3:3", "0:4", "block:0"])
def test_as_pattern_rejects_garbage(spec: str) -> None:
    with pytest.raises(SparseforgeError):
        as_pattern(spec)


def test_as_pattern_error_lists_the_choices() -> None:
    with pytest.raises(SparseforgeError, match="unknown pattern 'diagonal'.*block:B.*N:M"):
        as_pattern("diagonal")
