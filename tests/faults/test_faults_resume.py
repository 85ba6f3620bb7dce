"""Resuming every stateful method, in both construction orders, is bit-identical.

A run is stopped at step k (model, optimizer, Sparsifier and RNG state through
``torch.save``, as a real checkpoint), a new process is imitated (fresh model
with another initialisation, fresh method objects, fresh optimizer), and the
run resumes in one of two orders:

- ``sparsifier-first``: build the Sparsifier on the fresh model, then load
  the model, the optimizer and the Sparsifier state;
- ``state-first``: load the model and optimizer state, then build the
  Sparsifier on the loaded weights, then load its state. Building it runs the
  method's step-0 update on the checkpoint's weights (RigL/SET draw masks,
  ISS-P shrinks, GMP prunes), which the Sparsifier must undo.

Both must end on exactly the weights (and optimizer state) of the run that
was never interrupted.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.methods import GMP, ISSP, SET, SRSTE, GlobalMagnitude, GraNet, ProgressiveNM, RigL, StaticRandom

STEPS = 24

METHODS: dict[str, Callable[[], sf.methods.Method]] = {
    "gmp": lambda: GMP(0.8, start=0, end=16, frequency=4),
    "gmp-late-start": lambda: GMP(0.8, start=4, end=16, frequency=4),
    "rigl": lambda: RigL(0.8, frequency=4, end=16, allocation="erk", seed=3),
    "set": lambda: SET(0.8, frequency=4, end=16, seed=3),
    "granet": lambda: GraNet(0.8, initial_sparsity=0.5, frequency=4, end=16, seed=3),
    "static-random": lambda: StaticRandom(0.8, seed=3),
    "global-magnitude": lambda: GlobalMagnitude(0.8),
    "iss-p": lambda: ISSP(0.8, end=12),
    "sr-ste": lambda: SRSTE(2, 4, frequency=2),
    "progressive-nm": lambda: ProgressiveNM(2, 4, end=16, frequency=2),
}
#: Resume points: before any step, between updates, on an update step, after the schedule's end.
RESUME_AT = (0, 5, 8, 20)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer | None:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "rmsprop":  # not zero-preserving: the Sparsifier re-masks after its step
        return torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)
    return None  # the Sparsifier masks gradients through per-weight hooks and steps by hand


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def _roundtrip(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _train(method: str, opt_kind: str, resume_at: int | None = None, order: str = "") -> dict[str, torch.Tensor]:
    model = _model(0)
    opt = _optimizer(opt_kind, model)
    sp = sf.Sparsifier(model, METHODS[method](), total_steps=STEPS, optimizer=opt)
    for step in range(STEPS):
        if step == resume_at:
            ckpt = _roundtrip({"model": model.state_dict(), "opt": None if opt is None else opt.state_dict(),
                               "sp": sp.state_dict(), "rng": torch.get_rng_state()})
            model = _model(1)  # another initialisation: nothing may survive from it
            opt = _optimizer(opt_kind, model)
            if order == "sparsifier-first":
                sp = sf.Sparsifier(model, METHODS[method](), total_steps=STEPS, optimizer=opt)
                model.load_state_dict(ckpt["model"])
                if opt is not None:
                    opt.load_state_dict(ckpt["opt"])
            else:
                model.load_state_dict(ckpt["model"])
                if opt is not None:
                    opt.load_state_dict(ckpt["opt"])
                sp = sf.Sparsifier(model, METHODS[method](), total_steps=STEPS, optimizer=opt)
            sp.load_state_dict(ckpt["sp"])
            torch.set_rng_state(ckpt["rng"])
        x, y = _batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        if opt is None:
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        else:
            opt.step()
            opt.zero_grad()
        sp.step()
    final = {f"w.{k}": v.clone() for k, v in model.state_dict().items()}
    final |= {f"mask.{k}": v for k, v in sp.masks.items()}
    if opt is not None:
        for i, p in enumerate(model.parameters()):
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    final[f"opt.{i}.{key}"] = value.clone()
    return final


_REFERENCE: dict[tuple[str, str], dict[str, torch.Tensor]] = {}


def _reference(method: str, opt_kind: str) -> dict[str, torch.Tensor]:
    key = (method, opt_kind)
    if key not in _REFERENCE:
        _REFERENCE[key] = _train(method, opt_kind)
    return _REFERENCE[key]


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"differs from the uninterrupted run: {different[:6]}"


@pytest.mark.parametrize("order", ["sparsifier-first", "state-first"])
@pytest.mark.parametrize("resume_at", RESUME_AT)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_identical_in_both_orders(method: str, resume_at: int, order: str) -> None:
    _assert_identical(_train(method, "sgd", resume_at, order), _reference(method, "sgd"))


@pytest.mark.parametrize("order", ["sparsifier-first", "state-first"])
@pytest.mark.parametrize("opt_kind", ["adam", "rmsprop", "none"])
@pytest.mark.parametrize("method", ["rigl", "gmp", "iss-p"])
def test_resume_other_optimizers(method: str, opt_kind: str, order: str) -> None:
    _assert_identical(_train(method, opt_kind, 9, order), _reference(method, opt_kind))


def test_state_first_without_the_fix_would_lose_weights() -> None:
    """The damage the undo repairs is real: building RigL on a checkpoint's weights zeroes kept ones."""
    model = _model(0)
    opt = _optimizer("sgd", model)
    sp = sf.Sparsifier(model, METHODS["rigl"](), total_steps=STEPS, optimizer=opt)
    for step in range(9):
        x, y = _batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sp.step()
    state = _roundtrip(sp.state_dict())
    kept_nonzero = sum(int(p.count_nonzero()) for p in sp._weights)
    fresh = sf.Sparsifier(_roundtrip_model(model), METHODS["rigl"](), total_steps=STEPS)
    # The fresh masks differ from the run's, so construction zeroed weights the run keeps ...
    assert sum(int(w.count_nonzero()) for w in fresh._weights) < kept_nonzero
    fresh.load_state_dict(state)
    # ... and loading the state brings every one of them back.
    assert sum(int(w.count_nonzero()) for w in fresh._weights) == kept_nonzero
    for a, b in zip(fresh._weights, sp._weights):
        assert torch.equal(a, b)


def _roundtrip_model(model: nn.Module) -> nn.Module:
    copy = _model(5)
    copy.load_state_dict(model.state_dict())
    return copy


def test_replaced_weights_are_refused() -> None:
    """load_state_dict(assign=True) swaps the Parameter objects the Sparsifier masks: say so."""
    model = _model(0)
    sp = sf.Sparsifier(model, METHODS["gmp"](), total_steps=STEPS)
    state = sp.state_dict()
    model.load_state_dict({k: v.clone() for k, v in _model(2).state_dict().items()}, assign=True)
    with pytest.raises(sf.SparseforgeError, match="assign=True"):
        sp.load_state_dict(state)


@pytest.mark.parametrize("order", ["sparsifier-first", "state-first"])
def test_lottery_ticket_retraining_resumes_bit_identically(order: str) -> None:
    """IMP retrains a ticket under a FixedMask Sparsifier; resuming a round mid-way in either order
    ends where the uninterrupted round does."""
    from sparseforge.methods import IMP

    base = _model(0)
    imp = IMP(rate=0.5, allocation="global")
    imp.start(base)
    imp.prune_round(base)
    ticket = _roundtrip(imp.ticket().state_dict())

    def retrain(resume_at: int | None) -> dict[str, torch.Tensor]:
        t = sf.methods.Ticket.from_state_dict(ticket)
        model = t.apply(_model(3))
        opt = _optimizer("sgd", model)
        sp = t.sparsifier(model, optimizer=opt)
        for step in range(12):
            if step == resume_at:
                ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
                model = _model(4)
                opt = _optimizer("sgd", model)
                # Resuming: the ticket's method, not ticket.sparsifier(), which rewinds (starts a round).
                method = sf.methods.Ticket.from_state_dict(ticket).method()
                if order == "sparsifier-first":
                    sp = sf.Sparsifier(model, method, optimizer=opt)
                    model.load_state_dict(ckpt["model"])
                    opt.load_state_dict(ckpt["opt"])
                else:
                    model.load_state_dict(ckpt["model"])
                    opt.load_state_dict(ckpt["opt"])
                    sp = sf.Sparsifier(model, method, optimizer=opt)
                sp.load_state_dict(ckpt["sp"])
            x, y = _batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sp.step()
        return {k: v.clone() for k, v in model.state_dict().items()}

    _assert_identical(retrain(5), retrain(None))


def test_maskllm_resumes_bit_identically() -> None:
    """MaskLLM's state holds the logits, tau, kappa and the Gumbel generator: a resumed run of
    Gumbel-softmax mask learning ends on the uninterrupted run's logits and masks."""
    from sparseforge.oneshot import MaskLLM

    def run(resume_at: int | None) -> dict[str, torch.Tensor]:
        model = _model(0)
        masks = MaskLLM(model, "2:4", seed=7)
        opt = torch.optim.Adam(masks.parameters(), lr=0.05)
        for step in range(10):
            if step == resume_at:
                ckpt = _roundtrip({"masks": masks.state_dict(), "opt": opt.state_dict()})
                masks = MaskLLM(model, "2:4", seed=0)  # another seed: the state must carry the generator
                opt = torch.optim.Adam(masks.parameters(), lr=0.05)
                masks.load_state_dict(ckpt["masks"])
                opt.load_state_dict(ckpt["opt"])
            masks.set_temperature(4.0 - 0.3 * step, 100.0 + 10 * step)
            with masks:
                x, y = _batch(step)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        return {k: v.clone() for k, v in masks.state_dict()["logits"].items()}

    _assert_identical(run(4), run(None))


def test_maskllm_state_of_another_model_is_refused() -> None:
    from sparseforge.oneshot import MaskLLM

    state = MaskLLM(_model(0), "2:4").state_dict()
    other = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(sf.SparseforgeError, match="another model|shape"):
        MaskLLM(other, "2:4").load_state_dict(state)
