"""Sparse model soups: the average keeps exactly the shared mask; the SMS loop keeps exact sparsity per cycle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.errors import SparseforgeError
from sparseforge.merge.core import weighted_average
from sparseforge.merge.sparse_soups import check_shared_mask, sparse_model_soup, sparse_soup

KEYS = ["0.weight", "2.weight", "4.weight"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 3))


def sparse_states(n: int, density: float = 0.4) -> tuple[list[dict], dict]:
    """``n`` random states of the mlp sharing one random mask on its weights (biases dense)."""
    base = mlp().state_dict()
    g = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(base[k].shape, generator=g) < density for k in KEYS}
    states = []
    for i in range(n):
        s = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
        for k, m in masks.items():
            s[k] = s[k] * m
        states.append(s)
    return states, masks


def test_sparse_soup_keeps_the_mask_exactly_even_when_ingredients_cancel():
    states, masks = sparse_states(3)
    # Crafted cancellation: at three kept positions of "2.weight" the ingredients average to exactly 0.
    kept = masks["2.weight"].nonzero()[:3]
    for r, c in kept.tolist():
        states[0]["2.weight"][r, c], states[1]["2.weight"][r, c], states[2]["2.weight"][r, c] = 1.0, 1.0, -1.0
    weights = [1, 1, 2]  # 0.25, 0.25, 0.5: exact in binary, so the average is exactly 0 however it is summed
    plain = weighted_average(states, weights)["2.weight"]
    assert all(float(plain[r, c]) == 0.0 for r, c in kept.tolist())  # the case under test does arise
    assert torch.equal(check_shared_mask(states)["2.weight"], masks["2.weight"])
    soup = sparse_soup(states, weights)
    for k, m in masks.items():
        assert torch.equal(soup[k] != 0, m), k  # the soup's nonzero pattern is the mask, cancellation included
        assert torch.equal(soup[k][~m], torch.zeros(int((~m).sum()))), k
        mean = (states[0][k] + states[1][k] + 2 * states[2][k]) / 4
        ok = m.clone()
        if k == "2.weight":
            ok[kept[:, 0], kept[:, 1]] = False
        assert torch.allclose(soup[k][ok], mean[ok], atol=1e-6), k
    for r, c in kept.tolist():
        assert 0 < abs(float(soup["2.weight"][r, c])) < 1e-30
    # Dense tensors (biases) are averaged as they are.
    assert torch.allclose(soup["0.bias"], (states[0]["0.bias"] + states[1]["0.bias"] + 2 * states[2]["0.bias"]) / 4)
    # Uniform soup: the plain mean at kept positions, still exactly the mask.
    uniform = sparse_soup(states)
    assert all(torch.equal(uniform[k] != 0, m) for k, m in masks.items())
    assert torch.allclose(uniform["0.weight"], sum(s["0.weight"] for s in states) / 3, atol=1e-6)


def test_differing_masks_are_refused_naming_the_tensor():
    states, masks = sparse_states(3)
    r, c = (~masks["4.weight"]).nonzero()[0].tolist()
    states[2]["4.weight"][r, c] = 0.7  # model 2 has one extra nonzero in the last layer
    with pytest.raises(SparseforgeError, match=r"'4.weight' of model 2 differs from model 0 at 1 position"):
        sparse_soup(states)
    with pytest.raises(SparseforgeError, match="'4.weight'"):
        sparse_soup(states, masks=masks)
    # Checking only the other tensors passes.
    assert sorted(check_shared_mask(states, names=["0.weight", "2.weight"])) == ["0.weight", "2.weight"]
    with pytest.raises(SparseforgeError, match="no tensor"):
        check_shared_mask(states, names=["fc9.weight"])


def test_given_masks_allow_a_kept_weight_that_is_exactly_zero():
    states, masks = sparse_states(2)
    r, c = masks["0.weight"].nonzero()[0].tolist()
    states[1]["0.weight"][r, c] = 0.0  # kept by the mask, exactly zero after "training"
    with pytest.raises(SparseforgeError, match="zero patterns differ"):
        sparse_soup(states)
    soup = sparse_soup(states, masks=masks)
    assert all(torch.equal(soup[k] != 0, m) for k, m in masks.items())
    assert float(soup["0.weight"][r, c]) == pytest.approx(float(states[0]["0.weight"][r, c]) / 2)


def make_train_fn(record: list, steps: int = 15):
    def train_fn(model: nn.Module, method, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = sf.Sparsifier(model, method, total_steps=steps, optimizer=opt)
        for _ in range(steps):
            x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sp.step()
        sp.finalize()
        record.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"seed": seed}

    return train_fn


def test_sms_loop_keeps_exact_sparsity_and_every_ingredient_shares_the_soups_mask():
    model = mlp()
    record: list = []
    evaluated = []
    cycles = sparse_model_soup(model, make_train_fn(record), [0.5, 0.8, 0.9], ingredients=3, seed=4,
                               evaluate=lambda m: evaluated.append(m[0].weight.clone()) or {"n": len(evaluated)})
    total = sum(model.state_dict()[k].numel() for k in KEYS)
    assert len(cycles) == 3 and len(record) == 9
    previous = None
    for i, cycle in enumerate(cycles):
        ingredients = record[3 * i: 3 * i + 3]
        soup = cycle.soup
        zeros = sum(int((soup[k] == 0).sum()) for k in KEYS)
        assert zeros == round(cycle.sparsity * total)  # exact: total - round(s * total) kept
        assert cycle.mask_sparsity == pytest.approx(zeros / total)
        for key, name in zip(KEYS, ["0", "2", "4"]):
            m = cycle.masks[name]
            assert torch.equal(soup[key] != 0, m)
            for state in ingredients:
                assert torch.equal(state[key] != 0, m)
            if previous is not None:
                assert not bool((m & ~previous.masks[name]).any())  # nested: pruned stays pruned
            mean = sum(s[key] for s in ingredients) / 3
            assert torch.allclose(soup[key], mean, atol=1e-6)
        # The ingredients differ (their own seeds), and the soup is what the next cycle starts from.
        assert any(not torch.equal(ingredients[0][k], ingredients[1][k]) for k in ingredients[0])
        assert len(set(cycle.seeds)) == 3 and cycle.metrics == {"n": i + 1}
        assert [m["seed"] for m in cycle.ingredients] == cycle.seeds
        assert torch.equal(evaluated[i], soup["0.weight"])
        previous = cycle
    assert torch.equal(model.state_dict()["2.weight"], cycles[-1].soup["2.weight"])


def test_one_ingredient_is_imp_from_one_model():
    record: list = []
    cycles = sparse_model_soup(mlp(), make_train_fn(record), [0.6], ingredients=1, seed=4)
    assert all(torch.equal(cycles[0].soup[k], v) for k, v in record[0].items())
    # The m = 1 run retrains with the soup's first ingredient's seed.
    soup_record: list = []
    soups = sparse_model_soup(mlp(), make_train_fn(soup_record), [0.6], ingredients=3, seed=4)
    assert soups[0].seeds[0] == cycles[0].seeds[0]
    assert torch.equal(soup_record[0]["0.weight"], record[0]["0.weight"])


def test_bad_arguments():
    with pytest.raises(SparseforgeError, match="strictly increasing"):
        sparse_model_soup(mlp(), make_train_fn([]), [0.8, 0.5])
    with pytest.raises(SparseforgeError, match="strictly increasing"):
        sparse_model_soup(mlp(), make_train_fn([]), [1.0])
    with pytest.raises(SparseforgeError, match="ingredients"):
        sparse_model_soup(mlp(), make_train_fn([]), [0.5], ingredients=0)
