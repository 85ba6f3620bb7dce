"""No optimizer in ``torch.optim`` revives a pruned weight.

The list of optimizers is read from ``torch.optim`` itself, so one added by a
future PyTorch is covered (or reported) without editing this file. Each runs
a few hundred steps under a Sparsifier whose masks change (RigL: prune and
regrow, which must also clear the optimizer's state of the dropped weights)
and under a fixed mask after the schedule's end; after every step every
pruned weight must be exactly zero.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.methods import GMP, RigL

STEPS = 150

#: Constructor arguments for optimizers whose defaults do not train (or need a learning rate).
KWARGS: dict[str, dict] = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    "Adam": {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-3},
    "AdamW": {"lr": 1e-2, "weight_decay": 1e-2},
    "RMSprop": {"lr": 1e-3, "momentum": 0.9, "centered": True, "weight_decay": 1e-3},
    "ASGD": {"lr": 1e-2, "weight_decay": 1e-3},
    "Adagrad": {"lr": 1e-2, "weight_decay": 1e-3},
    "LBFGS": {"lr": 0.1, "max_iter": 3, "history_size": 5},
    "Muon": {"lr": 1e-2},
}
#: Optimizers that cannot take part, with the reason (reported as skips, never silently dropped).
UNSUPPORTED = {
    "SparseAdam": "needs sparse gradients (nn.Embedding(sparse=True)); embeddings are not pruned by default",
}


def _optimizer_classes() -> list[str]:
    names = []
    for name, obj in vars(torch.optim).items():
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            names.append(name)
    return sorted(names)


def test_the_list_covers_the_usual_optimizers() -> None:
    names = set(_optimizer_classes())
    assert {"SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD",
            "Rprop", "LBFGS"} <= names


def _model(matrices_only: bool) -> nn.Module:
    torch.manual_seed(0)
    bias = not matrices_only
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 32, bias=bias), nn.ReLU(),
                         nn.Linear(32, 4, bias=bias))


@pytest.mark.parametrize("use_closure", [True, False], ids=["step(closure)", "step()"])
@pytest.mark.parametrize("method", ["rigl", "gmp"])
@pytest.mark.parametrize("name", _optimizer_classes())
def test_no_pruned_weight_comes_back(name: str, method: str, use_closure: bool) -> None:
    if name in UNSUPPORTED:
        pytest.skip(f"{name}: {UNSUPPORTED[name]}")
    if name == "LBFGS" and not use_closure:
        pytest.skip("LBFGS steps with a closure only")
    cls = getattr(torch.optim, name)
    model = _model(matrices_only=name == "Muon")  # Muon takes 2-D parameters only
    opt = cls(model.parameters(), **KWARGS.get(name, {}))
    parts = (RigL(0.8, frequency=10, end=100, seed=1) if method == "rigl"
             else GMP(0.8, start=0, end=100, frequency=10))
    sp = sf.Sparsifier(model, parts, total_steps=STEPS, optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for step in range(STEPS):
        x, y = torch.randn(16, 16, generator=gen), torch.randint(0, 4, (16,), generator=gen)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        before = [layer.weight.detach().clone() for layer in sp.layers]
        if use_closure:
            # The gradients appear inside step(), after the Sparsifier's pre-step hook.
            opt.step(closure)
        else:
            closure()
            opt.step()
        sp.step()
        for layer, old in zip(sp.layers, before):
            keep = getattr(layer.module, layer.mask_name).bool()
            revived = int((layer.weight[~keep] != 0).sum())
            assert revived == 0, f"{name}/{method}: {revived} pruned weights of {layer.name} nonzero at step {step + 1}"
            changed += int((layer.weight[keep] != old[keep]).any())
    assert abs(sp.sparsity() - 0.8) < 0.01
    # The optimizer really trained the kept weights (a no-op optimizer would pass the check above).
    assert changed > STEPS


def test_straight_through_refuses_a_closure_step() -> None:
    """SR-STE swaps dense weights in before the optimizer step; a closure would run its forward on them."""
    model = _model(matrices_only=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sf.Sparsifier(model, sf.methods.SRSTE(2, 4), total_steps=10, optimizer=opt)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.randn(4, 16)).square().mean()
        loss.backward()
        return loss

    with pytest.raises(sf.SparseforgeError, match="closure"):
        opt.step(closure)
