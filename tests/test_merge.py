"""Tests of sparseforge.merge: averaging, soups, task arithmetic/TIES/DARE, Fisher, RegMean, TALL.

Each test checks a property the method must have (an identity, a hand
computation, an optimality condition), on tiny tensors or tiny models.
"""

from __future__ import annotations

import pytest
import torch

from sparseforge.errors import SparseforgeError
from sparseforge.merge import (
    TaskArithmetic,
    check_compatible,
    dare,
    greedy_soup,
    merge_task_arithmetic,
    merge_tensors,
    preset,
    task_arithmetic,
    task_vector,
    ties,
    uniform_soup,
    weighted_average,
)


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(6, 5, generator=g) * scale,
        "lin.bias": torch.randn(6, generator=g) * scale,
        "bn.running_mean": torch.randn(6, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed * 10),
    }


def _finetuned(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + seed
        for k, v in base.items()
    }


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- compatibility


def test_check_compatible_names_missing_extra_and_shape_problems():
    a = _state(0)
    b = dict(a)
    del b["lin.bias"]
    b["extra.weight"] = torch.zeros(1)
    with pytest.raises(SparseforgeError, match=r"b does not match a: .*missing 1 key\(s\) 'lin.bias'.*extra.*'extra.weight'"):
        check_compatible([a, b], names=["a", "b"])
    c = dict(a, **{"lin.weight": torch.zeros(5, 6)})
    with pytest.raises(SparseforgeError, match=r"model 1 .*shape differs for 'lin.weight' \(\[5, 6\] vs \[6, 5\]\)"):
        check_compatible([a, c])
    d = dict(a, **{"lin.bias": a["lin.bias"].double()})
    with pytest.raises(SparseforgeError, match="dtype differs for 'lin.bias'"):
        check_compatible([a, d])
    with pytest.raises(SparseforgeError, match="the base model"):
        check_compatible([a], base=c)
    with pytest.raises(SparseforgeError, match="at least one model"):
        check_compatible([])
    with pytest.raises(SparseforgeError, match="sequence of state dicts"):
        check_compatible(a)
    check_compatible([a, _finetuned(a, 1)], base=a)  # compatible: no error


# ---------------------------------------------------------------- averaging and soups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_average_of_identical_models_is_bit_identical(dtype):
    s = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _state(3, scale=7.3).items()}
    copies = [{k: v.clone() for k, v in s.items()} for _ in range(3)]
    _assert_same(weighted_average(copies), s)
    _assert_same(weighted_average(copies, [0.1, 0.7, 0.2]), s)


def test_weighted_average_matches_formula_and_copies_buffers_from_first():
    states = [_state(i) for i in range(3)]
    out = weighted_average(states, [1, 2, 1])
    for k in ("lin.weight", "lin.bias", "bn.running_mean"):
        expected = 0.25 * states[0][k] + 0.5 * states[1][k] + 0.25 * states[2][k]
        torch.testing.assert_close(out[k], expected)
    assert out["bn.num_batches_tracked"].item() == 0  # from the first model, not averaged (10 would be the mean)
    assert out["lin.weight"].data_ptr() != states[0]["lin.weight"].data_ptr()
    torch.testing.assert_close(uniform_soup(states)["lin.bias"], sum(s["lin.bias"] for s in states) / 3)


@pytest.mark.parametrize("weights", [[1, -1], [0, 0], [1, float("nan")], [1, 2, 3]])
def test_weighted_average_rejects_bad_weights(weights):
    with pytest.raises(SparseforgeError, match="weights"):
        weighted_average([_state(0), _state(1)], weights)


def test_greedy_soup_keeps_only_ingredients_that_do_not_hurt():
    target = torch.zeros(6, 5)
    base = _state(0)
    good = [dict(base, **{"lin.weight": target + d}) for d in (0.1, -0.1, 0.2)]
    bad = dict(base, **{"lin.weight": target + 5.0})
    states = [bad, good[2], good[0], good[1]]
    calls = []

    def evaluate(sd):
        calls.append(sd)
        return -float((sd["lin.weight"] - target).abs().mean())

    soup, chosen = greedy_soup(states, evaluate)
    # ranking by own score: good[0] (idx 2) and good[1] (idx 3) tie at 0.1 -> index order; then good[2]; bad last.
    # soup {2}: 0.1; +3 -> mean 0.0 (kept); +1 -> (0.1-0.1+0.2)/3 = 0.0667 worse (rejected); +0 bad (rejected).
    assert chosen == [2, 3]
    torch.testing.assert_close(soup["lin.weight"], target)
    assert len(calls) == 4 + 3
    soup2, chosen2 = greedy_soup(states, evaluate, order=[1, 0])
    assert chosen2 == [1]
    _assert_same(soup2, states[1])
    with pytest.raises(SparseforgeError, match="distinct"):
        greedy_soup(states, evaluate, order=[1, 1])


# ---------------------------------------------------------------- task arithmetic, TIES, DARE


def test_task_arithmetic_one_task_lam1_returns_finetuned_exactly():
    base = _state(0)
    ft = _finetuned(base, 1)
    out = task_arithmetic(base, [ft])
    assert torch.equal(out["lin.weight"], ft["lin.weight"])
    assert torch.equal(out["bn.running_mean"], ft["bn.running_mean"])
    assert torch.equal(out["bn.num_batches_tracked"], base["bn.num_batches_tracked"])  # buffers from the base


def test_task_arithmetic_sums_scaled_task_vectors():
    base = _state(0)
    fts = [_finetuned(base, i) for i in range(3)]
    out = task_arithmetic(base, fts, lam=0.4, weights=[1.0, 0.5, 2.0])
    taus = [task_vector(base, f) for f in fts]
    expected = base["lin.weight"] + 0.4 * (taus[0]["lin.weight"] + 0.5 * taus[1]["lin.weight"] + 2 * taus[2]["lin.weight"])
    torch.testing.assert_close(out["lin.weight"], expected)
    assert set(taus[0]) == {"lin.weight", "lin.bias", "bn.running_mean"}  # no integer buffers


def test_magnitude_trim_keeps_exact_count_with_deterministic_ties():
    base = torch.zeros(10)
    ft = torch.tensor([1.0, -3.0, 2.0, 2.0, 2.0, 0.5, -2.0, 0.1, 0.0, 4.0])
    spec = TaskArithmetic(sparsify="magnitude", density=0.4)  # keep round(0.4 * 10) = 4
    out = merge_tensors(base, [ft], spec, "w")
    # |ft| sorted: 4 (idx 9), 3 (idx 1), then four 2's at idx 2, 3, 4, 6: the lowest indices win
    assert torch.equal(out, torch.tensor([0.0, -3.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]))
    g = torch.Generator().manual_seed(0)
    for density in (0.05, 0.2, 0.5, 0.73, 1.0):
        taus = [torch.randn(7, 9, generator=g).round(decimals=1) for _ in range(3)]  # many exact ties
        for t in taus:
            kept = merge_tensors(torch.zeros(7, 9), [t], TaskArithmetic(sparsify="magnitude", density=density))
            assert int((kept != 0).sum()) == min(round(density * 63), int((t != 0).sum()))
            # everything kept is at least as large as everything dropped
            if (kept == 0).any() and (kept != 0).any():
                assert kept[kept != 0].abs().min() >= t[kept == 0].abs().max()


def test_ties_one_task_equals_trimmed_task_arithmetic():
    base = _state(0)
    ft = _finetuned(base, 2)
    trimmed = merge_task_arithmetic(base, [ft], TaskArithmetic(sparsify="magnitude", density=0.3, lam=0.7))
    _assert_same(ties(base, [ft], density=0.3, lam=0.7), trimmed)


def test_ties_sign_election_and_disjoint_mean_by_hand():
    base = torch.zeros(5)
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0])
    t2 = torch.tensor([2.0, 3.0, -1.0, 0.0, 1.0])
    t3 = torch.tensor([-4.0, 1.0, -1.0, 0.0, 0.0])
    out = merge_tensors(base, [t1, t2, t3], TaskArithmetic(consensus="ties"))
    # entry 0: sum -1 -> sign -, only t3 agrees: -4
    # entry 1: sum +2 -> sign +, t2 and t3 agree: (3 + 1) / 2 = 2
    # entry 2: sum +1 -> sign +, only t1: 3
    # entry 3: all zero -> 0
    # entry 4: sum 0 -> no sign elected -> 0
    assert torch.equal(out, torch.tensor([-4.0, 2.0, 3.0, 0.0, 0.0]))
    # weights scale before the election and weight the disjoint mean: entry 0 flips to + (1*1 + 2*2 - 4*0.5 = 3)
    w = merge_tensors(base, [t1, t2, t3], TaskArithmetic(consensus="ties", weights=(1.0, 2.0, 0.5)))
    assert torch.allclose(w[0], torch.tensor((1.0 + 4.0) / (1.0 + 2.0)))


def test_dare_density_one_is_task_arithmetic():
    base = _state(0)
    fts = [_finetuned(base, i) for i in range(2)]
    _assert_same(dare(base, fts, density=1.0, lam=0.5, seed=3), task_arithmetic(base, fts, lam=0.5))


def test_dare_preserves_expectation_and_is_deterministic_per_name():
    base = torch.zeros(400)
    tau = torch.linspace(-1, 1, 400)
    density = 0.25
    runs = torch.stack([
        merge_tensors(base, [tau], TaskArithmetic(sparsify="dare", density=density, seed=s), "w") for s in range(400)
    ])
    kept = runs != 0
    assert torch.allclose(runs[kept], (tau / density).expand_as(runs)[kept])  # kept entries rescaled by 1/density
    # fraction kept: 400*400 Bernoulli(0.25) draws, std ~0.0011
    assert abs(kept.double().mean().item() - density) < 0.01
    # mean over seeds is the undropped vector: per entry std = |tau| * sqrt((1-p)/p / 400) <= 0.087
    assert (runs.mean(0) - tau).abs().max() < 0.45  # 5 std
    assert (runs.mean(0) - tau).abs().mean() < 0.08
    spec = TaskArithmetic(sparsify="dare", density=density, seed=1)
    a = merge_tensors(base, [tau, tau], spec, "layer.weight")
    assert torch.equal(a, merge_tensors(base, [tau, tau], spec, "layer.weight"))
    assert not torch.equal(a, merge_tensors(base, [tau, tau], spec, "other.weight"))
    one, two = (merge_tensors(base, [tau], spec, "layer.weight") for _ in range(2))
    assert torch.equal(one, two)
    # the two tasks get different drops (task index enters the seed)
    both = merge_tensors(base, [tau, torch.zeros(400)], spec, "x") != 0
    other = merge_tensors(base, [torch.zeros(400), tau], spec, "x") != 0
    assert not torch.equal(both, other)


def test_dare_is_reproducible_across_processes():
    import subprocess
    import sys

    code = (
        "import torch; from sparseforge.merge import merge_tensors, TaskArithmetic;"
        "t = merge_tensors(torch.zeros(64), [torch.ones(64)], TaskArithmetic(sparsify='dare', density=0.5, seed=7), 'fc.w');"
        "print(''.join('1' if v else '0' for v in (t != 0).tolist()))"
    )
    here = merge_tensors(torch.zeros(64), [torch.ones(64)], TaskArithmetic(sparsify="dare", density=0.5, seed=7), "fc.w")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert there == "".join("1" if v else "0" for v in (here != 0).tolist())


def test_merge_keeps_dtype_and_integer_buffers():
    base = {"w": torch.randn(8).to(torch.bfloat16), "n": torch.tensor(5)}
    fts = [{"w": (base["w"].float() + 0.5).to(torch.bfloat16), "n": torch.tensor(9)}]
    out = merge_task_arithmetic(base, fts, preset("ties", density=0.5))
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["n"], torch.tensor(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"sparsify": "topk"}, "none, magnitude, dare"),
        ({"consensus": "vote"}, "none, ties"),
        ({"lam": float("inf")}, "lam"),
        ({"weights": (1.0, -1.0), "consensus": "ties"}, "non-negative"),
    ],
)
def test_task_arithmetic_spec_validation(kwargs, match):
    with pytest.raises(SparseforgeError, match=match):
        TaskArithmetic(**kwargs)


def test_presets_and_weight_count():
    assert preset("ties") == TaskArithmetic(sparsify="magnitude", density=0.2, consensus="ties")
    assert preset("dare", density=0.5, seed=2).sparsify == "dare"
    assert preset("dare_ties").consensus == "ties"
    assert preset("task_arithmetic", lam=0.3) == TaskArithmetic(lam=0.3)
    with pytest.raises(SparseforgeError, match="choose one of task_arithmetic, ties, dare, dare_ties"):
        preset("slerp")
    with pytest.raises(SparseforgeError, match="bad options"):
        preset("ties", seed=1)
    base = _state(0)
    with pytest.raises(SparseforgeError, match="2 weights for 1 task"):
        task_arithmetic(base, [_finetuned(base, 1)], weights=[1, 1])
    with pytest.raises(SparseforgeError, match="does not match the base model"):
        task_arithmetic(base, [_state(1) | {"lin.weight": torch.zeros(2)}])
