"""Invariants of sparse training from scratch: static random masks, SET, RigL, GraNet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.allocation import ERK
from sparseforge.updates import cosine_drop_fraction


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def train(model, method, steps, frequency_hook=None, optimizer="sgd"):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd" else None
    plain = torch.optim.SGD(model.parameters(), lr=0.1) if opt is None else None
    sp = sf.Sparsifier(model, method, total_steps=steps, optimizer=opt)
    for i, (x, y) in enumerate(batches(steps)):
        o = opt or plain
        o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        dense_grads = {name: l.weight.grad.clone() for name, l in zip(sp.masks, sp.layers)}
        before = {k: v.clone() for k, v in sp.masks.items()}
        o.step()
        # what the update sees: the weights after the optimizer step
        weights_before = {name: l.weight.detach().clone() for name, l in zip(sp.masks, sp.layers)}
        sp.step()
        if frequency_hook is not None:
            frequency_hook(sp, i + 1, before, dense_grads, weights_before)
    return sp


def test_static_random_mask_is_fixed_and_follows_erk():
    model = mlp()
    method = sf.methods.StaticRandom(0.9, allocation="erk", seed=3)
    seen = []
    sp = train(model, method, 12, lambda sp, t, before, g, w: seen.append(all(
        torch.equal(before[k], v) for k, v in sp.masks.items())))
    assert all(seen)
    shapes = [l.shape for l in sp.layers]
    expected = ERK().allocate([l.name for l in sp.layers], shapes, 0.9)
    for layer, s in zip(sp.layers, expected):
        kept = int(sp.masks[layer.name].sum())
        assert abs(kept - round((1 - s) * layer.numel)) <= 1


def test_static_random_is_seeded():
    a = sf.Sparsifier(mlp(), sf.methods.StaticRandom(0.8, seed=1)).masks
    b = sf.Sparsifier(mlp(), sf.methods.StaticRandom(0.8, seed=1)).masks
    c = sf.Sparsifier(mlp(), sf.methods.StaticRandom(0.8, seed=2)).masks
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_set_and_rigl_start_from_the_static_random_mask_of_the_same_seed():
    # Paired runs: the same seed gives SET, RigL and the static control the same initial mask.
    static = sf.Sparsifier(mlp(), sf.methods.StaticRandom(0.9, allocation="erk", seed=2)).masks
    for method in (sf.methods.SET(0.9, seed=2), sf.methods.RigL(0.9, seed=2)):
        masks = sf.Sparsifier(mlp(), method, total_steps=10).masks
        assert all(torch.equal(static[k], masks[k]) for k in static)


def test_set_does_not_grow_untrained_zeros_at_the_runs_last_step():
    # frequency divides the run, so an update falls on the last step: weights grown there
    # would get no training and stay zero. That update must leave the masks alone.
    changed = {}
    train(mlp(), sf.methods.SET(0.9, frequency=4, seed=1), 12, lambda sp, t, before, g, w: changed.__setitem__(
        t, any(not torch.equal(before[k], v) for k, v in sp.masks.items())))
    assert changed[4] and changed[8]
    assert not changed[12]


def test_random_growth_of_one_seed_does_not_replay_the_next_seeds_initial_mask():
    set0 = sf.methods.SET(0.9, seed=0).update
    init1 = sf.methods.SET(0.9, seed=1).update.init
    w = torch.zeros(64, 64)
    assert not torch.equal(set0.grow(w), init1(w))


@pytest.mark.parametrize("optimizer", ["sgd", None])
def test_set_balances_drop_and_grow_and_grown_weights_start_at_zero(optimizer):
    steps, freq = 20, 5
    model = mlp()
    method = sf.methods.SET(0.8, frequency=freq, drop_fraction=0.3, seed=0)
    checked = []

    def check(sp, t, before, grads, weights_before):
        for layer in sp.layers:
            new, old = sp.masks[layer.name], before[layer.name]
            assert int(new.sum()) == int(old.sum())  # constant per-layer sparsity
            if t % freq == 0:
                n_active = int(old.sum())
                grown = new & ~old
                dropped = old & ~new
                # dropped-and-regrown-at-once weights show in neither set
                assert int(grown.sum()) == int(dropped.sum()) <= math.floor(0.3 * n_active)
                # grown weights are exactly zero right after the update
                assert bool((layer.weight.detach()[grown] == 0).all())
                checked.append(int(grown.sum()))
            else:
                assert torch.equal(new, old)

    train(model, method, steps, check, optimizer=optimizer)
    assert sum(checked) > 0


def test_rigl_grows_highest_dense_gradient_and_anneals_drop_fraction():
    steps, freq = 24, 4
    model = mlp()
    method = sf.methods.RigL(0.8, frequency=freq, drop_fraction=0.3, end=0.75, seed=0)
    events = []

    def check(sp, t, before, grads, weights_before):
        for layer in sp.layers:
            new, old = sp.masks[layer.name], before[layer.name]
            assert int(new.sum()) == int(old.sum())
            if not sp.schedule.should_update(t):
                assert torch.equal(new, old)
                continue
            f = cosine_drop_fraction(0.3, sp.schedule.progress(t))
            k = int(f * int(old.sum()))
            if k == 0:
                assert torch.equal(new, old)
                continue
            # drop: the k active weights of smallest magnitude after the optimizer step
            w_post = weights_before[layer.name].abs().masked_fill(~old, math.inf)
            after_drop = old.clone().flatten()
            after_drop[torch.topk(w_post.flatten(), k, largest=False).indices] = False
            # grow: the k largest dense-gradient magnitudes among the rest
            g = grads[layer.name].abs().flatten().masked_fill(after_drop, -math.inf)
            expected = after_drop.clone()
            expected[torch.topk(g, k).indices] = True
            assert torch.equal(expected.reshape(new.shape), new)
            grown = new & ~old
            assert bool((layer.weight.detach()[grown] == 0).all())
            events.append((t, k))

    sp = train(model, method, steps, check)
    update_steps = sorted({t for t, _ in events})
    assert update_steps and max(update_steps) <= 18  # no updates after T_end = 0.75 * 24
    ks = {}
    for t, k in events:
        ks.setdefault(t, 0)
        ks[t] += k
    assert list(ks.values()) == sorted(ks.values(), reverse=True)  # cosine annealing shrinks the swaps
    assert abs(sp.sparsity() - 0.8) < 0.01


@pytest.mark.parametrize("initial", [0.0, 0.5])
def test_granet_follows_the_cubic_schedule(initial):
    steps, freq = 30, 3
    model = mlp()
    method = sf.methods.GraNet(0.9, initial_sparsity=initial, frequency=freq, end=0.6, seed=0)
    seen = []

    def check(sp, t, before, grads, weights_before):
        if sp.schedule.should_update(t):
            total = sum(l.numel for l in sp.layers)
            assert abs(sp.sparsity() - sp.schedule.sparsity(t)) <= len(sp.layers) / total + 1e-9
            seen.append(sp.sparsity())

    sp = train(model, method, steps, check)
    assert seen == sorted(seen)
    assert abs(sp.sparsity() - 0.9) < 1e-3


def test_prune_regrow_rejects_nm_patterns():
    method = sf.Method(schedule=sf.Constant(final=0.5, frequency=2, end=10), pattern="2:4",
                       update=sf.updates.PruneRegrow())
    model = mlp()
    with pytest.raises(sf.SparseforgeError, match="prune-and-regrow"):
        sf.Sparsifier(model, method, total_steps=10)


def test_rigl_state_resume_is_bit_identical():
    def run(split: int | None):
        model = mlp(5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = sf.Sparsifier(model, sf.methods.SET(0.85, frequency=3, seed=4), total_steps=24, optimizer=opt)
        data = batches(24, seed=9)
        for i, (x, y) in enumerate(data):
            if split is not None and i == split:
                state = (model.state_dict(), opt.state_dict(), sp.state_dict())
                model = mlp(123)
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                sp = sf.Sparsifier(model, sf.methods.SET(0.85, frequency=3, seed=4), total_steps=24, optimizer=opt)
                model.load_state_dict(state[0])
                opt.load_state_dict(state[1])
                sp.load_state_dict(state[2])
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sp.step()
        return model

    a, b = run(None), run(11)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, v2), k
