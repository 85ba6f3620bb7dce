"""Invariants of IMP with rewinding (lottery tickets), its controls, fixed masks and global magnitude pruning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.allocation import Global
from sparseforge.errors import SparseforgeError
# From the modules, not the package's re-exports: the tests do not depend on methods/__init__.py.
from sparseforge.methods.fixed import FixedMask
from sparseforge.methods.global_magnitude import GlobalMagnitude
from sparseforge.methods.imp import IMP, Ticket
from sparseforge.zoo.data import DEFAULT_DATA_DIR

NAMES = ["0", "2", "4"]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))


def train_fn(model, method=None, start_step=0, on_step=None, *, steps=12, seed=0):
    """A TrainFn: SGD with momentum on seeded random data; the data of step i depends only on (seed, i)."""
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = sf.Sparsifier(model, method, total_steps=steps - start_step, optimizer=opt) if method else None
    loss = torch.tensor(0.0)
    for i in range(start_step, steps):
        x, y = data[i]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if sp is not None:
            sp.step()
        if on_step is not None:
            on_step(i + 1, model)
    if sp is not None:
        sp.finalize()
    return {"loss": float(loss.detach())}


def kept(masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


def started(rewind_step: int = 0, **kwargs) -> tuple[IMP, nn.Module, dict]:
    """An IMP after the dense run, with the state the dense run had at the rewind step."""
    model = mlp()
    imp = IMP(rewind_step=rewind_step, **kwargs)
    imp.start(model)
    saved = {}

    def on_step(step, m):
        imp.observe(step, m)
        if step == rewind_step:
            saved.update({k: v.clone() for k, v in m.state_dict().items()})

    if rewind_step == 0:
        saved.update({k: v.clone() for k, v in model.state_dict().items()})
    train_fn(model, None, 0, on_step)
    return imp, model, saved


# -- the rounds ------------------------------------------------------------------------------


def test_kept_fraction_is_one_minus_p_to_the_r_and_masks_nest():
    imp, model, _ = started()
    total = sum(m.numel() for m in imp.masks.values())
    previous = imp.masks
    for r in range(1, 7):
        masks = imp.prune_round(model)
        assert imp.round == r
        # global allocation: exact to the element
        assert kept(masks) == total - round((1 - 0.8**r) * total)
        assert abs(kept(masks) - 0.8**r * total) <= len(masks)
        for name in masks:
            assert not bool((masks[name] & ~previous[name]).any()), f"round {r} revived weights of {name}"
        previous = masks
        imp.ticket().apply(model)
        train_fn(model, imp.ticket().method(), 0, None, seed=r)


def test_layerwise_rates_prune_each_layer_at_its_own_rate():
    # The LTH paper's LeNet setting: every layer at 20%, the output layer at 10%.
    imp, model, _ = started(allocation="uniform", layer_rates={"4": 0.1})
    for r in range(1, 5):
        masks = imp.prune_round(model)
        for name, m in masks.items():
            p = 0.1 if name == "4" else 0.2
            assert int(m.sum()) == m.numel() - round((1 - (1 - p) ** r) * m.numel())
        imp.ticket().apply(model)
        train_fn(model, imp.ticket().method(), 0, None, seed=r)


def test_min_keep_floor_holds_under_global_pruning():
    imp, model, _ = started(allocation=Global(min_keep=50))
    with torch.no_grad():
        model[4].weight.mul_(1e-4)  # the output layer would be emptied first
    for _ in range(10):
        masks = imp.prune_round(model)
    assert int(masks["4"].sum()) == 50
    total = sum(m.numel() for m in masks.values())
    assert kept(masks) == total - round((1 - 0.8**10) * total)


def test_rewind_restores_the_step_k_values_at_kept_positions_and_zeros_elsewhere():
    for k in (0, 5):
        imp, model, saved = started(rewind_step=k)
        trained = {n: v.clone() for n, v in model.state_dict().items()}
        masks = imp.prune_round(model)
        assert imp.rewind(model) is model
        state = model.state_dict()
        for name, mask in masks.items():
            w = state[f"{name}.weight"]
            assert torch.equal(w[mask], saved[f"{name}.weight"][mask])
            assert bool((w[~mask] == 0).all())
            assert torch.equal(state[f"{name}.bias"], saved[f"{name}.bias"])  # biases rewind too
            assert not torch.equal(w, trained[f"{name}.weight"])


def test_ticket_needs_the_rewind_point():
    model = mlp()
    imp = IMP(rewind_step=50)
    imp.start(model)
    train_fn(model, None, 0, imp.observe)  # 12 steps: never reaches step 50
    imp.prune_round(model)
    with pytest.raises(SparseforgeError, match="rewind point"):
        imp.ticket()
    with pytest.raises(SparseforgeError, match="rewind step 50"):
        IMP(rewind_step=50).run(mlp, train_fn)


# -- the controls ----------------------------------------------------------------------------


def test_reinit_control_keeps_the_mask_with_fresh_values():
    imp, model, _ = started()
    imp.prune_round(model)
    ticket = imp.ticket()
    control = ticket.reinit(mlp(seed=123))
    assert control.kind == "reinit"
    assert all(torch.equal(control.masks[n], ticket.masks[n]) for n in NAMES)
    a, b = ticket.apply(mlp()), control.apply(mlp())
    for name in NAMES:
        m = ticket.masks[name]
        wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
        assert torch.equal(wa != 0, m) and torch.equal(wb != 0, m)
        assert not torch.equal(wa, wb)


def test_random_mask_control_keeps_per_layer_counts_and_the_same_init():
    imp, model, _ = started()
    for _ in range(3):
        imp.prune_round(model)
    ticket = imp.ticket()
    control = ticket.random_mask(seed=7)
    assert control.kind == "random"
    assert control.counts == ticket.counts
    for name in NAMES:
        assert not torch.equal(control.masks[name], ticket.masks[name])
    # same initialisation (the rewind state) where both keep a weight
    a, b = ticket.apply(mlp()), control.apply(mlp())
    for name in NAMES:
        both = ticket.masks[name] & control.masks[name]
        assert torch.equal(a.get_submodule(name).weight[both], b.get_submodule(name).weight[both])
    # seeded: the same seed gives the same mask, another seed another one
    assert all(torch.equal(ticket.random_mask(seed=7).masks[n], control.masks[n]) for n in NAMES)
    assert not torch.equal(ticket.random_mask(seed=8).masks["0"], control.masks["0"])
    # a fresh initialisation on request
    fresh = ticket.random_mask(seed=7, model=mlp(seed=5))
    assert not torch.equal(fresh.state["0.weight"], ticket.state["0.weight"])


# -- tickets, fixed masks, soups ---------------------------------------------------------------


def test_retraining_a_ticket_is_seeded_and_keeps_its_mask():
    imp, model, _ = started(rewind_step=3)
    for _ in range(2):
        imp.prune_round(model)
        imp.rewind(model)
        train_fn(model, imp.ticket().method(), 3, None)
    ticket = imp.ticket()

    def retrain(seed):
        m = ticket.apply(mlp(seed=99))  # the architecture's own init is overwritten by the rewind state
        train_fn(m, ticket.method(), ticket.rewind_step, None, seed=seed)
        return m

    a, b, c = retrain(1), retrain(1), retrain(2)
    for name in NAMES:
        wa, wb, wc = (x.get_submodule(name).weight for x in (a, b, c))
        assert torch.equal(wa, wb), "same seed must be bit-identical"
        assert not torch.equal(wa, wc), "another seed must train differently"
        assert bool((wa[~ticket.masks[name]] == 0).all()) and bool((wc[~ticket.masks[name]] == 0).all())
    # the soup of the two keeps the ticket's sparsity: they share the mask
    soup = {k: (a.state_dict()[k] + c.state_dict()[k]) / 2 for k in a.state_dict()}
    for name in NAMES:
        assert bool((soup[f"{name}.weight"][~ticket.masks[name]] == 0).all())


def test_ticket_sparsifier_and_state_dict_round_trip(tmp_path):
    imp, model, _ = started()
    imp.prune_round(model)
    ticket = imp.ticket()
    m = mlp(seed=4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sp = ticket.sparsifier(m, optimizer=opt, total_steps=5)
    assert sp.sparsity() == pytest.approx(ticket.sparsity)
    assert all(torch.equal(sp.masks[n], ticket.masks[n]) for n in NAMES)
    sp.finalize()
    torch.save(ticket.state_dict(), tmp_path / "ticket.pt")
    back = Ticket.from_state_dict(torch.load(tmp_path / "ticket.pt"))
    assert back.round == 1 and back.counts == ticket.counts
    assert all(torch.equal(back.state[k], ticket.state[k]) for k in ticket.state)


def test_fixed_mask_errors_name_the_mismatch():
    model = mlp()
    masks = {n: torch.ones_like(model.get_submodule(n).weight, dtype=torch.bool) for n in NAMES}
    with pytest.raises(SparseforgeError, match="no mask for \\['4'\\]"):
        sf.Sparsifier(model, FixedMask({n: masks[n] for n in NAMES[:2]}))
    with pytest.raises(SparseforgeError, match="shape"):
        sf.Sparsifier(mlp(), FixedMask(masks | {"4": torch.ones(2, 2, dtype=torch.bool)}))
    with pytest.raises(SparseforgeError, match="prune every weight"):
        FixedMask({n: torch.zeros_like(m) for n, m in masks.items()})


# -- the driver and errors ---------------------------------------------------------------------


def test_run_finds_tickets_and_trains_the_controls():
    imp = IMP(rate=0.5, rounds=2, rewind_step=4)
    seen = []

    def recording_train_fn(model, method, start_step, on_step):
        seen.append((None if method is None else method.name, start_step))
        return train_fn(model, method, start_step, on_step)

    result = imp.run(mlp, recording_train_fn, seed=3, controls=("reinit", "random"))
    assert seen[0] == (None, 0)
    assert seen[1:] == [(f"{kind}-round{r}", 4) for r in (1, 2) for kind in ("imp", "reinit", "random")]
    assert [r.round for r in result.rounds] == [1, 2]
    assert [r.density for r in result.rounds] == pytest.approx([0.5, 0.25], abs=1e-3)
    for r in result.rounds:
        assert set(r.controls) == {"reinit", "random"}
        assert r.control_tickets["random"].counts == r.ticket.counts
        assert r.ticket.rewind_step == 4
    json.dumps(result.to_dict())  # plain numbers only
    # reproducible
    again = IMP(rate=0.5, rounds=2, rewind_step=4).run(mlp, train_fn, seed=3, controls=("reinit",))
    assert again.rounds[1].metrics == result.rounds[1].metrics
    assert again.rounds[1].controls["reinit"] == result.rounds[1].controls["reinit"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0.0}, "rate must be in"),
        ({"rate": 1.0}, "rate must be in"),
        ({"rate": "x"}, "rate must be a number"),
        ({"rounds": 0}, "rounds must be"),
        ({"rewind_step": -1}, "rewind_step"),
        ({"layer_rates": {"4": 1.5}}, "layer_rates"),
        ({"allocation": {"0": 0.5}}, "layer_rates"),
        ({"allocation": "bogus"}, "unknown allocation"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(SparseforgeError, match=match):
        IMP(**kwargs)


def test_misuse_is_a_clear_error():
    with pytest.raises(SparseforgeError, match="start"):
        IMP().prune_round(mlp())
    with pytest.raises(SparseforgeError, match="matches no targeted layer"):
        IMP(layer_rates={"fc9": 0.1}).start(mlp())
    imp, model, _ = started()
    with pytest.raises(SparseforgeError, match="unknown IMP control"):
        imp.run_round(model, train_fn, model_factory=mlp, controls=("shuffle",))
    with pytest.raises(SparseforgeError, match="model_factory"):
        imp.run_round(model, train_fn, controls=("reinit",))
    other = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(SparseforgeError, match="do not match|has shape"):
        imp.ticket().apply(other)


# -- global magnitude pruning with a minimum threshold -------------------------------------------


def test_global_magnitude_one_shot_equals_prune_with_global_allocation():
    a, b = mlp(), mlp()
    sf.Sparsifier(a, GlobalMagnitude(0.9, min_keep=40)).finalize()
    sf.prune(b, "magnitude", 0.9, allocation=Global(min_keep=40))
    for name in NAMES:
        assert torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight)
    total = sum(a.get_submodule(n).weight.numel() for n in NAMES)
    assert sum(int((a.get_submodule(n).weight != 0).sum()) for n in NAMES) == total - round(0.9 * total)
    assert min(int((a.get_submodule(n).weight != 0).sum()) for n in NAMES) >= 40


def test_global_magnitude_min_keep_follows_the_minimum_threshold_rule():
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-4)  # the smallest weights of the model: plain Global MP empties the layer
    before = model[4].weight.detach().abs().clone()
    plain = mlp()
    plain.load_state_dict(model.state_dict())
    sf.Sparsifier(plain, GlobalMagnitude(0.8)).finalize()
    assert int((plain[4].weight != 0).sum()) == 1  # Global keeps one weight at least
    sf.Sparsifier(model, GlobalMagnitude(0.8, min_keep=64)).finalize()
    # the floor binds: exactly MT weights kept, the layer's largest
    expected = torch.zeros(before.numel(), dtype=torch.bool)
    expected[torch.topk(before.flatten(), 64).indices] = True
    assert torch.equal((model[4].weight != 0).flatten(), expected)
    # the budget it frees is pruned elsewhere: the model-level count is still exact
    total = sum(model.get_submodule(n).weight.numel() for n in NAMES)
    assert sum(int((model.get_submodule(n).weight != 0).sum()) for n in NAMES) == total - round(0.8 * total)
    # a layer no larger than MT is not pruned at all (the output layer has 128 weights)
    tiny = mlp()
    sf.Sparsifier(tiny, GlobalMagnitude(0.5, min_keep=128)).finalize()
    assert int((tiny[4].weight != 0).sum()) == 128


def test_global_magnitude_gradual_schedule_reaches_the_sparsity():
    model = mlp()
    method = GlobalMagnitude(0.75, schedule="cubic", start=0, end=6, frequency=2)
    assert type(method.schedule).__name__ == "Cubic"
    sp = sf.Sparsifier(model, method, total_steps=8)
    for _ in range(8):
        sp.step()
    assert sp.sparsity() == pytest.approx(0.75, abs=1e-3)
    with pytest.raises(SparseforgeError, match="schedule"):
        GlobalMagnitude(0.5, schedule="weekly")


# -- the reproduction benchmark, quick mode ----------------------------------------------------------


@pytest.mark.skipif(not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_lottery_bench_quick_writes_well_formed_json(tmp_path):
    from sparseforge.bench.__main__ import main as bench_main

    out = tmp_path / "lottery.json"
    assert bench_main(["lottery", "--quick", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "lottery" and result["quick"] is True
    assert result["settings"]["rounds"] == 2 and result["settings"]["seeds"] == 1
    assert Path(result["plot"]).exists()
    assert len(result["by_rewind"]) == 2
    for block in result["by_rewind"]:
        assert [r["round"] for r in block["rounds"]] == [1, 2]
        assert [r["density"] for r in block["rounds"]] == pytest.approx([0.8, 0.64], abs=1e-4)
        for r in block["rounds"]:
            for kind in ("imp", "reinit", "random"):
                assert 0.0 <= r[kind]["mean"] <= 100.0 and not math.isnan(r[kind]["mean"])
    assert 0.0 < result["dense"]["mean"] <= 100.0
    # two rounds never reach 20% of the weights: the claim is not checked in quick mode
    assert result["holds"] is None
