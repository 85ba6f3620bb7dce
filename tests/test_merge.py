"""Tests of sparseforge.merge: averaging, soups, task arithmetic/TIES/DARE, Fisher, RegMean, TALL.

Each test checks a property the method must have (an identity, a hand
computation, an optimality condition), on tiny tensors or tiny models.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.merge import (
    TaskArithmetic,
    check_compatible,
    consensus_masks,
    consensus_merge,
    dare,
    fisher_diagonal,
    fisher_merge,
    gram_matrices,
    greedy_soup,
    merge_task_arithmetic,
    merge_tensors,
    merged_task_vector,
    preset,
    reconstruct,
    regmean,
    storage_report,
    tall_masks,
    task_arithmetic,
    task_vector,
    ties,
    uniform_soup,
    weighted_average,
)
from sparseforge.zoo.data import TensorLoader


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
    with pytest.raises(SparseforgeError, match=r"b does not match a: it lacks 1 key\(s\) 'lin.bias'.*extra.*'extra.weight'"):
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
    with pytest.raises(SparseforgeError,
                       match=r"unknown merge method 'slerp' \(known: task_arithmetic, ties, dare, dare_ties\)"):
        preset("slerp")
    with pytest.raises(SparseforgeError, match="bad options"):
        preset("ties", seed=1)
    base = _state(0)
    with pytest.raises(SparseforgeError, match="2 weights for 1 task"):
        task_arithmetic(base, [_finetuned(base, 1)], weights=[1, 1])
    with pytest.raises(SparseforgeError, match="does not match the base model"):
        task_arithmetic(base, [_state(1) | {"lin.weight": torch.zeros(2)}])


# ---------------------------------------------------------------- Fisher


def _classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


def _classification_data(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_fisher_diagonal_matches_per_example_autograd_loop():
    model = _classifier(0)
    model(torch.randn(16, 6))  # move the BN running stats away from their init
    model.train()
    x, y = _classification_data(1)
    fisher = fisher_diagonal(model, TensorLoader(x, y, batch_size=16))
    assert model.training  # mode restored
    model.eval()
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad.square() / len(x)
    assert set(fisher) == set(expected) == {k for k, _ in model.named_parameters()}
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-7)
    assert fisher_diagonal(model, TensorLoader(x, y, batch_size=16), max_batches=1)["4.bias"].ne(fisher["4.bias"]).any()


def test_fisher_sampled_approximates_the_expected_fisher():
    model = _classifier(2).eval()
    x0 = torch.randn(1, 6)
    probs = torch.softmax(model(x0), -1)[0].detach()
    exact = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for c in range(3):  # E_{y ~ p(.|x)} [g_y^2], summed over the classes exactly
        model.zero_grad()
        torch.log_softmax(model(x0), -1)[0, c].backward()
        for k, p in model.named_parameters():
            exact[k] += probs[c] * p.grad.square()
    x = x0.expand(3000, 6)
    y = torch.zeros(3000, dtype=torch.long)  # ignored by "sampled"
    sampled = fisher_diagonal(model, [(x, y)], loss="sampled", seed=0)
    empirical = fisher_diagonal(model, [(x, y)], loss="empirical")
    for k in exact:
        # 3000 samples of a 3-way categorical: each class frequency within ~3% absolute
        torch.testing.assert_close(sampled[k], exact[k], rtol=0.1, atol=1e-6)
    assert not torch.allclose(empirical["4.weight"], exact["4.weight"], rtol=0.1)
    again = fisher_diagonal(model, [(x, y)], loss="sampled", seed=0)
    assert all(torch.equal(again[k], sampled[k]) for k in sampled)


def test_fisher_diagonal_is_fast_on_lenet():
    from sparseforge.zoo.models import build_model

    model = build_model("lenet300")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
    start = time.perf_counter()
    fisher = fisher_diagonal(model, TensorLoader(x, y, batch_size=128))
    assert time.perf_counter() - start < 10  # ~1 s on 2 cores; generous for a shared machine
    assert fisher["fc1.weight"].shape == (300, 784) and (fisher["fc3.bias"] > 0).all()


def test_fisher_diagonal_rejects_bad_input():
    model = _classifier(0)
    with pytest.raises(SparseforgeError, match="empirical, sampled"):
        fisher_diagonal(model, [], loss="true")
    with pytest.raises(SparseforgeError, match="batches was empty"):
        fisher_diagonal(model, [])
    with pytest.raises(SparseforgeError, match="1-D integer"):
        fisher_diagonal(model, [(torch.randn(4, 6), torch.randn(4))])


def _model_states(n: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in _classifier(i).state_dict().items()} for i in range(n)]


def test_fisher_merge_with_equal_fishers_is_the_weighted_average():
    states = _model_states(3)
    shared = {k: torch.rand(v.shape) for k, v in states[0].items() if k.endswith(("weight", "bias"))}
    out = fisher_merge(states, [shared] * 3, weights=[1, 2, 3])
    avg = weighted_average(states, [1, 2, 3])
    for k in avg:
        torch.testing.assert_close(out[k], avg[k])
    # identical models come back bit for bit whatever the Fishers
    same = [states[0]] * 2
    assert all(torch.equal(v, states[0][k]) for k, v in fisher_merge(same, [shared, {k: 2 * v for k, v in shared.items()}]).items())


def test_fisher_merge_lets_a_confident_model_dominate_an_entry():
    states = _model_states(2)
    fishers = [{k: torch.ones_like(v) for k, v in states[0].items() if k.endswith(("weight", "bias"))} for _ in range(2)]
    fishers[1]["0.weight"][2, 3] = 1e6
    out = fisher_merge(states, fishers)
    torch.testing.assert_close(out["0.weight"][2, 3], states[1]["0.weight"][2, 3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["0.weight"][0, 0], (states[0]["0.weight"][0, 0] + states[1]["0.weight"][0, 0]) / 2)
    # running stats have no Fisher: plain average; the counter comes from the first model
    torch.testing.assert_close(out["1.running_mean"], (states[0]["1.running_mean"] + states[1]["1.running_mean"]) / 2)
    assert torch.equal(out["1.num_batches_tracked"], states[0]["1.num_batches_tracked"])
    # all-zero Fishers fall back to the plain average (eps), also with eps=0
    zeros = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    for eps in (1e-8, 0.0):
        torch.testing.assert_close(fisher_merge(states, zeros, eps=eps)["4.weight"], weighted_average(states)["4.weight"])
    with pytest.raises(SparseforgeError, match="negative"):
        fisher_merge(states, [fishers[0], {k: -v for k, v in fishers[1].items()}])
    with pytest.raises(SparseforgeError, match="different parameters"):
        fisher_merge(states, [fishers[0], {"0.weight": fishers[1]["0.weight"]}])


# ---------------------------------------------------------------- RegMean


def _regression_setup():
    g = torch.Generator().manual_seed(0)
    models, inputs = [], []
    for i in range(2):
        lin = nn.Linear(5, 3)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(3, 5, generator=g))
            lin.bias.zero_()
        models.append(nn.Sequential(lin))
        # different input distributions: task i mostly uses a different subspace
        scale = torch.tensor([3.0, 3.0, 0.3, 0.3, 1.0]) if i == 0 else torch.tensor([0.3, 0.3, 3.0, 3.0, 1.0])
        inputs.append(torch.randn(30, 5, generator=g) * scale)
    return models, inputs


def test_regmean_alpha1_is_the_least_squares_merge_and_beats_averaging():
    models, inputs = _regression_setup()
    grams = [gram_matrices(m, [(x, torch.zeros(len(x)))]) for m, x in zip(models, inputs)]
    assert grams[0].counts == {"0": 30}
    torch.testing.assert_close(grams[0]["0"], inputs[0].double().T @ inputs[0].double())
    states = [m.state_dict() for m in models]
    merged = regmean(states, grams, alpha=1.0)
    X = torch.cat(inputs).double()
    Y = torch.cat([x.double() @ m[0].weight.double().T for m, x in zip(models, inputs)])
    lstsq = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(merged["0.weight"].double(), lstsq, rtol=1e-5, atol=1e-5)

    def error(w):
        return sum(((x @ w.T - x @ m[0].weight.T) ** 2).sum() for m, x in zip(models, inputs)).item()

    avg = weighted_average(states)
    shrunk = regmean(states, grams)  # the paper's alpha = 0.9
    assert error(merged["0.weight"]) < error(shrunk["0.weight"]) < error(avg["0.weight"])
    torch.testing.assert_close(merged["0.bias"], avg["0.bias"])


def test_regmean_with_identical_grams_is_the_average():
    states = _model_states(3)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(20, 8, generator=g), torch.randn(20, 6, generator=g)
    gram = {"0": b.T @ b, "4": a.T @ a}
    for alpha in (0.0, 0.9, 1.0):
        out = regmean(states, [gram] * 3, alpha=alpha)
        avg = weighted_average(states)
        for k in avg:
            torch.testing.assert_close(out[k], avg[k])


def test_gram_matrices_flatten_leading_dims_and_unseen_inputs_are_averaged():
    lin = nn.Linear(4, 2)
    x = torch.randn(3, 5, 4)
    x[..., 1] = 0.0  # feature 1 never seen
    g = gram_matrices(nn.Sequential(lin), [x])
    flat = x.reshape(-1, 4).double()
    torch.testing.assert_close(g["0"], flat.T @ flat)
    assert g.counts["0"] == 15
    other = nn.Linear(4, 2)
    x2 = torch.randn(7, 4)
    x2[:, 1] = 0.0
    g2 = gram_matrices(nn.Sequential(other), [x2])
    out = regmean([{"w.weight": lin.weight.detach()}, {"w.weight": other.weight.detach()}], [{"w": g["0"]}, {"w": g2["0"]}], alpha=1.0)
    torch.testing.assert_close(out["w.weight"][:, 1], (lin.weight[:, 1] + other.weight[:, 1]).detach() / 2)
    with pytest.raises(SparseforgeError, match="not nn.Linear"):
        gram_matrices(_classifier(0), [x], names=["1"])
    with pytest.raises(SparseforgeError, match="no module named"):
        gram_matrices(_classifier(0), [x], names=["fc9"])
    with pytest.raises(SparseforgeError, match="expected \\[4, 4\\]"):
        regmean([{"w.weight": lin.weight.detach()}] * 2, [{"w": torch.eye(3)}] * 2)
    with pytest.raises(SparseforgeError, match="alpha"):
        regmean([{"w.weight": lin.weight.detach()}] * 2, [{"w": torch.eye(4)}] * 2, alpha=1.5)


# ---------------------------------------------------------------- TALL and consensus


def _tasks(n: int) -> tuple[dict, list[dict]]:
    base = _state(0)
    return base, [_finetuned(base, i, scale=0.2) for i in range(n)]


def test_tall_masks_match_a_direct_computation():
    base, fts = _tasks(3)
    masks = tall_masks(base, fts, lambdas=[0.2, 0.4, 0.6])
    taus = [{k: (f[k] - base[k]) for k in base if base[k].is_floating_point()} for f in fts]
    for t, (tau, lam) in enumerate(zip(taus, [0.2, 0.4, 0.6])):
        assert set(masks[t]) == set(tau)
        for k in tau:
            mtl = sum(x[k] for x in taus)
            expected = tau[k].abs() >= lam * (mtl - tau[k]).abs()
            assert masks[t][k].dtype == torch.bool
            assert (masks[t][k] != expected).sum() <= 1, k  # float32 vs float64 rounding at the threshold only
    density = [float(sum(m.sum() for m in mask.values())) for mask in masks]
    assert density[0] > density[1] > density[2]  # a higher lambda keeps fewer entries
    ties_vec = merged_task_vector(base, fts, preset("ties", density=0.5))
    with_ties = tall_masks(base, fts, merged_vector=ties_vec)
    assert any(not torch.equal(with_ties[0][k], tall_masks(base, fts)[0][k]) for k in ties_vec)


def test_tall_single_task_keeps_everything_and_reconstructs_the_finetuned_model():
    base, fts = _tasks(1)
    (mask,) = tall_masks(base, fts)
    assert all(m.all() for m in mask.values())
    vec = merged_task_vector(base, fts, TaskArithmetic())
    rebuilt = reconstruct(base, vec, mask)
    for k in base:
        torch.testing.assert_close(rebuilt[k], fts[0][k] if base[k].is_floating_point() else base[k], rtol=0, atol=1e-6)


def test_consensus_masks_union_intersection_and_merge_outside_mask_is_base():
    base, fts = _tasks(3)
    masks = tall_masks(base, fts)
    union, inter = consensus_masks(masks, k=1), consensus_masks(masks, k=3)
    for k in union:
        assert torch.equal(union[k], masks[0][k] | masks[1][k] | masks[2][k])
        assert torch.equal(inter[k], masks[0][k] & masks[1][k] & masks[2][k])
    merged, report = consensus_merge(base, fts, k=2, lam=0.5)
    cons = consensus_masks(masks, k=2)
    vec = merged_task_vector(base, fts, TaskArithmetic())
    for k, m in cons.items():
        assert 0 < m.sum() < m.numel()
        assert torch.equal(merged[k][~m], base[k][~m])
        torch.testing.assert_close(merged[k][m], (base[k] + 0.5 * vec[k])[m])
    assert torch.equal(merged["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    assert report["num_tasks"] == 3 and len(report["task_mask_density"]) == 3
    total = sum(m.numel() for m in cons.values())
    assert report["consensus_density"] == pytest.approx(sum(int(m.sum()) for m in cons.values()) / total)
    with pytest.raises(SparseforgeError, match=r"k must be an integer in \[1, 3\]"):
        consensus_masks(masks, k=4)
    with pytest.raises(SparseforgeError, match="inner.lam"):
        consensus_merge(base, fts, inner=TaskArithmetic(lam=0.3))


def test_storage_report_counts_bits():
    base, fts = _tasks(4)
    masks = tall_masks(base, fts)
    r = storage_report(base, masks)
    params = 6 * 5 + 6 + 6
    assert r["params"] == params
    assert r["finetuned_bytes"] == 4 * 32 * params // 8
    assert r["tall_bytes"] == -(-(2 * 32 * params + 4 * params) // 8)
    assert r["saved_bytes"] == r["finetuned_bytes"] - r["tall_bytes"] and 0 < r["ratio"] < 1
