"""Tests for the Sparsifier lifecycle: exact zeros under every optimizer path, GMP's
schedule and monotone masks, checkpoint/resume identity, finalize, and bad input."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import build_convnet, build_mlp
from torch import nn

import sparseforge as sf
from sparseforge import GMP, Cubic, HardPrune, Method, OneShot, Random, SparseforgeError, Sparsifier
from sparseforge.scores import GradientMagnitude
from sparseforge.sparsifier import ZERO_PRESERVING_OPTIMIZERS
from sparseforge.updates import select_masks
from sparseforge.zoo import LeNet300100

pytestmark = pytest.mark.usefixtures("single_thread")


class NoisySGD(torch.optim.SGD):
    """An SGD subclass whose step also nudges every weight: not zero preserving, so the
    Sparsifier must re-mask after its step (and must not trust subclasses of SGD)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=1e-3),
    "noisy-sgd-subclass": lambda p: NoisySGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
}

MODELS = {"mlp": (build_mlp, (16,)), "convnet": (build_convnet, (3, 8, 8))}


def assert_pruned_zero(sp: Sparsifier, when: str) -> None:
    for layer in sp.layers:
        mask = sp.masks[layer.name]
        assert bool((layer.weight[~mask] == 0).all()), f"{layer.name}: pruned weight nonzero {when}"


def train_and_check(
    model_name: str, opt_name: str, pass_optimizer: bool, steps: int = 200
) -> tuple[nn.Module, torch.optim.Optimizer, Sparsifier, list[torch.Tensor]]:
    build, input_shape = MODELS[model_name]
    model = build(seed=0)
    opt = OPTIMIZERS[opt_name](model.parameters())
    # Masks change at 0, 20, ..., 100: optimizer state built up on now-pruned weights
    # must not revive them.
    method = GMP(sparsity=0.7, frequency=20, end=0.5)
    sp = Sparsifier(model, method, total_steps=steps, optimizer=opt if pass_optimizer else None)
    initial = [layer.weight.detach().clone() for layer in sp.layers]
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(16, *input_shape, generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        masks = sp.masks
        if not pass_optimizer:
            # The gradient hooks zero the gradients of pruned weights during backward.
            for layer in sp.layers:
                assert bool((layer.weight.grad[~masks[layer.name]] == 0).all()), f"grad of {layer.name} at {t}"
        opt.step()
        if pass_optimizer:
            # Inside the optimizer's step already: zero-preserving maths or the post-step hook.
            for layer in sp.layers:
                assert bool((layer.weight[~masks[layer.name]] == 0).all()), f"{layer.name} after opt.step {t}"
        sp.step()
        assert_pruned_zero(sp, f"after step {t + 1}")
    return model, opt, sp, initial


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_pruned_weights_stay_zero_with_optimizer(model_name: str, opt_name: str) -> None:
    model, opt, sp, initial = train_and_check(model_name, opt_name, pass_optimizer=True)
    assert sp.sparsity() == pytest.approx(0.7, abs=0.01)
    # Training really happened: kept weights moved.
    for layer, w0 in zip(sp.layers, initial):
        kept = sp.masks[layer.name]
        assert not torch.equal(layer.weight[kept], w0[kept])
    # Optimizer state (momentum, Adam moments) is zero where weights are pruned.
    checked = 0
    for layer in sp.layers:
        pruned = ~sp.masks[layer.name]
        for key, value in opt.state[layer.weight].items():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                assert bool((value[pruned] == 0).all()), f"{opt_name} state {key!r} of {layer.name}"
                checked += 1
    assert checked >= len(sp.layers)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("opt_name", ["sgd-momentum-wd", "adamw", "noisy-sgd-subclass"])
def test_pruned_weights_stay_zero_with_gradient_hooks(model_name: str, opt_name: str) -> None:
    model, opt, sp, initial = train_and_check(model_name, opt_name, pass_optimizer=False)
    assert sp.sparsity() == pytest.approx(0.7, abs=0.01)
    assert any(len(layer.weight._post_accumulate_grad_hooks or {}) for layer in sp.layers)


def test_zero_preserving_list_is_exact_types() -> None:
    # The post-step hook is installed exactly for optimizers outside the list (subclasses too).
    model = build_mlp()
    for opt, expect_post in [
        (torch.optim.SGD(model.parameters(), lr=0.1), False),
        (torch.optim.Adam(model.parameters()), False),
        (NoisySGD(model.parameters(), lr=0.1), True),
        (torch.optim.RMSprop(model.parameters()), True),
    ]:
        sp = Sparsifier(model, GMP(0.5, end=2, frequency=1), total_steps=4, optimizer=opt)
        assert bool(opt._optimizer_step_post_hooks) == expect_post, type(opt).__name__
        assert (type(opt) in ZERO_PRESERVING_OPTIMIZERS) != expect_post
        with pytest.warns(UserWarning, match="before the schedule's end"):  # finalized at step 0: still dense
            sp.finalize()


# --------------------------------------------------------------------------- GMP


@pytest.mark.parametrize("pass_optimizer", [True, False])
def test_gmp_follows_cubic_schedule_with_monotone_masks(pass_optimizer: bool) -> None:
    model = build_mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    total = 100
    sp = Sparsifier(model, GMP(sparsity=0.8, frequency=5, start=0.1, end=0.6), total_steps=total,
                    optimizer=opt if pass_optimizer else None)
    numels = {layer.name: layer.numel for layer in sp.layers}
    gen = torch.Generator().manual_seed(0)
    previous = sp.masks
    updates = 0
    for t in range(1, total + 1):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        masks = sp.masks
        for name in masks:
            assert not bool((masks[name] & ~previous[name]).any()), f"a pruned weight of {name} came back at {t}"
        if 10 <= t <= 60 and (t - 10) % 5 == 0:
            updates += 1
            s_t = 0.8 + (0.0 - 0.8) * (1 - (t - 10) / 50) ** 3  # Zhu and Gupta
            for name, m in masks.items():
                assert int((~m).sum()) == round(s_t * numels[name]), (t, name)
            assert sp.sparsity() == pytest.approx(s_t, abs=len(masks) / sum(numels.values()))
        else:
            assert all(torch.equal(masks[n], previous[n]) for n in masks), f"masks changed off-schedule at {t}"
        previous = masks
    assert updates == 11
    assert sp.sparsity() == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("allocation", ["global", "lamp"])
def test_gmp_global_allocations_exact_and_no_collapse(allocation: str) -> None:
    model = build_mlp(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = Sparsifier(model, GMP(sparsity=0.8, frequency=4, end=40, allocation=allocation), total_steps=60, optimizer=opt)
    total = sum(layer.numel for layer in sp.layers)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 61):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        if sp.schedule.should_update(t):
            pruned = sum(int((~m).sum()) for m in sp.masks.values())
            assert pruned == round(sp.schedule.sparsity(t) * total), t
        assert_pruned_zero(sp, f"at {t}")
    # Repeated updates with already-pruned (-inf) weights must not collapse a layer.
    for layer in sp.layers:
        assert int(sp.masks[layer.name].sum()) >= 0.05 * layer.numel, layer.name


def test_gradient_score_uses_dense_gradients() -> None:
    # A non-monotone gradient-score method: at an update, pruned weights must be scored
    # by their dense gradient (the masked one is 0 there), in both gradient paths. The
    # masks pruned at step 5 are what the update at step 10 must see through.
    for pass_optimizer in (True, False):
        model = build_mlp(seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        method = Method(schedule=sf.Linear(final=0.6, start=0, end=10, frequency=5), score=GradientMagnitude(),
                        update=HardPrune(monotone=False))
        # The update at construction (step 0, sparsity 0) scores too: give it a gradient.
        x0, y0 = torch.randn(8, 16), torch.randint(0, 4, (8,))
        F.cross_entropy(model(x0), y0).backward()
        sp = Sparsifier(model, method, total_steps=10, optimizer=opt if pass_optimizer else None)
        gen = torch.Generator().manual_seed(0)
        for t in range(1, 11):
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            dense = torch.autograd.grad(loss, [layer.weight for layer in sp.layers], retain_graph=True)
            loss.backward()
            opt.step()
            sp.step()
            if t in (5, 10):
                expected = select_masks(sp.layers, [g.abs() for g in dense], sp.method.pattern,
                                        sp.method.allocation, sp.schedule.sparsity(t))
                for layer, m in zip(sp.layers, expected):
                    assert torch.equal(sp.masks[layer.name], m), (pass_optimizer, t, layer.name)
        sp.finalize()


# --------------------------------------------------------------------------- state dict and resume


def test_state_dict_round_trip() -> None:
    model = build_mlp(seed=0)
    sp = Sparsifier(model, GMP(sparsity=0.6, frequency=2, end=6), total_steps=10)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        sp.step()
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)

    fresh_model = build_mlp(seed=9)
    fresh = Sparsifier(fresh_model, GMP(sparsity=0.6, frequency=2, end=6), total_steps=10)
    assert fresh.current_step == 0
    fresh.load_state_dict(state)
    assert fresh.current_step == sp.current_step == 5
    assert fresh.masks.keys() == sp.masks.keys()
    for name, m in sp.masks.items():
        assert torch.equal(fresh.masks[name], m)
    assert fresh.sparsity() == sp.sparsity() > 0.3
    assert_pruned_zero(fresh, "after load_state_dict")  # the loaded masks are applied


METHODS: dict[str, Callable[[], Method]] = {
    "gmp": lambda: GMP(sparsity=0.75, frequency=6, end=30),
    "random-gmp": lambda: Method(schedule=Cubic(final=0.6, end=30, frequency=6), score=Random(seed=3),
                                 name="random-gmp"),
}
N_STEPS, CHECKPOINT = 40, 20  # updates at 0, 6, ..., 30: before and after the checkpoint


def _build(method_name: str, model_seed: int, pass_optimizer: bool):
    model = build_mlp(seed=model_seed, dropout=0.2)  # dropout draws from the global RNG
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sp = Sparsifier(model, METHODS[method_name](), total_steps=N_STEPS, optimizer=opt if pass_optimizer else None)
    return model, opt, sp


def _train(model: nn.Module, opt: torch.optim.Optimizer, sp: Sparsifier, start: int, stop: int) -> None:
    model.train()
    for _ in range(start, stop):
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))  # global RNG: its state is checkpointed
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()


def _checkpoint(model, opt, sp) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsifier": sp.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    return buf.getvalue()


def _resume(blob: bytes, method_name: str, pass_optimizer: bool):
    state = torch.load(io.BytesIO(blob), weights_only=False)
    model, opt, sp = _build(method_name, model_seed=12345, pass_optimizer=pass_optimizer)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sp.load_state_dict(state["sparsifier"])
    torch.set_rng_state(state["rng"])
    return model, opt, sp


@pytest.mark.parametrize("pass_optimizer", [True, False])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_resume_in_the_middle_is_bit_identical(method_name: str, pass_optimizer: bool) -> None:
    model, opt, sp = _build(method_name, model_seed=0, pass_optimizer=pass_optimizer)
    torch.manual_seed(123)
    _train(model, opt, sp, 0, N_STEPS)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    reference_masks = sp.masks

    model, opt, sp = _build(method_name, model_seed=0, pass_optimizer=pass_optimizer)
    torch.manual_seed(123)
    _train(model, opt, sp, 0, CHECKPOINT)
    blob = _checkpoint(model, opt, sp)
    del model, opt, sp
    model, opt, sp = _resume(blob, method_name, pass_optimizer)
    assert sp.current_step == CHECKPOINT
    _train(model, opt, sp, CHECKPOINT, N_STEPS)

    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    for name, m in sp.masks.items():
        assert torch.equal(m, reference_masks[name]), name


def test_resume_needs_the_score_rng_state() -> None:
    # Control for the test above: the random score's generator state is what makes the
    # resumed random-score run identical; restarting the generator changes the masks.
    model, opt, sp = _build("random-gmp", model_seed=0, pass_optimizer=True)
    torch.manual_seed(123)
    _train(model, opt, sp, 0, N_STEPS)
    reference_masks = sp.masks

    model, opt, sp = _build("random-gmp", model_seed=0, pass_optimizer=True)
    torch.manual_seed(123)
    _train(model, opt, sp, 0, CHECKPOINT)
    blob = _checkpoint(model, opt, sp)
    model, opt, sp = _resume(blob, "random-gmp", True)
    sp.method.score.load_state_dict({"generator": torch.Generator().manual_seed(3).get_state()})
    _train(model, opt, sp, CHECKPOINT, N_STEPS)
    assert any(not torch.equal(m, reference_masks[n]) for n, m in sp.masks.items())


# --------------------------------------------------------------------------- finalize


@pytest.mark.parametrize("pass_optimizer", [True, False])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_finalize_leaves_a_plain_model(model_name: str, pass_optimizer: bool) -> None:
    build, input_shape = MODELS[model_name]
    model = build(seed=0)
    opt = NoisySGD(model.parameters(), lr=0.05, momentum=0.9)  # pre and post hooks when passed
    sp = Sparsifier(model, GMP(sparsity=0.5, frequency=2, end=4), total_steps=6,
                    optimizer=opt if pass_optimizer else None)
    x = torch.randn(4, *input_shape)
    for _ in range(6):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        sp.step()
    masks = sp.masks
    assert sp.finalize() is model

    for layer in sp.layers:
        assert not hasattr(layer.module, "weight_mask")
        assert "weight_mask" not in dict(layer.module.named_buffers())
        assert not layer.weight._post_accumulate_grad_hooks  # None or empty
        assert bool((layer.weight[~masks[layer.name]] == 0).all())
        assert int((layer.weight == 0).sum()) >= int((~masks[layer.name]).sum())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks

    fresh = build(seed=42)
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))

    with pytest.raises(SparseforgeError, match="finalized"):
        sp.step()
    with pytest.raises(SparseforgeError, match="finalized"):
        sp.apply_masks()

    # Nothing masks any more: a training step moves pruned weights again.
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert any(bool((layer.weight[~masks[layer.name]] != 0).any()) for layer in sp.layers)
    # And a new Sparsifier can be attached.
    with pytest.warns(UserWarning, match="before the schedule's end"):
        Sparsifier(model, GMP(0.5, end=2, frequency=1), total_steps=4).finalize()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity(bad: float) -> None:
    with pytest.raises(SparseforgeError, match="sparsity"):
        GMP(sparsity=bad)
    with pytest.raises(SparseforgeError, match="sparsity"):
        sf.prune(build_mlp(), sparsity=bad)


def test_nm_on_non_divisible_layer_names_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    method = Method(schedule=OneShot(final=0.5), pattern="2:4")
    with pytest.raises(SparseforgeError) as info:
        Sparsifier(model, method, total_steps=10)
    msg = str(info.value)
    assert "'4'" not in msg and "4" in msg and "(4, 6)" in msg and "divisible by 4" in msg
    # The failed attempt must not leave masks behind: excluding the layer then works.
    sp = Sparsifier(model, Method(schedule=OneShot(final=0.5), pattern="2:4", target=sf.Target(exclude=["4"])),
                    total_steps=10)
    assert sp.sparsity() == 0.5


def test_nm_needs_uniform_allocation() -> None:
    with pytest.raises(SparseforgeError, match="uniform"):
        Sparsifier(build_mlp(), Method(schedule=OneShot(final=0.5), pattern="2:4", allocation="global"))


@pytest.mark.parametrize("schedule", [Cubic(final=0.5), OneShot(final=0.75)])
def test_nm_with_a_schedule_it_cannot_follow_fails_before_training(schedule) -> None:
    # N:M allows one sparsity; a ramp or another final value must fail at construction,
    # not at the first intermediate mask update in the middle of a run.
    with pytest.raises(SparseforgeError, match="fixes the sparsity at 0.5"):
        Method(schedule=schedule, pattern="2:4")


def test_target_glob_matching_nothing_names_it() -> None:
    with pytest.raises(SparseforgeError, match="'encoder.*'"):
        Sparsifier(build_mlp(), GMP(0.5, target="encoder.*"), total_steps=10)


@pytest.mark.parametrize("not_a_method", ["gmp", GMP, OneShot(final=0.5), None])
def test_non_method_rejected(not_a_method: object) -> None:
    model = build_mlp()
    with pytest.raises(SparseforgeError, match="Method"):
        Sparsifier(model, not_a_method, total_steps=10)  # type: ignore[arg-type]
    assert not hasattr(model[0], "weight_mask")


def test_state_from_a_different_model() -> None:
    sp_mlp = Sparsifier(build_mlp(), GMP(0.5, end=2, frequency=1), total_steps=4)
    sp_lenet = Sparsifier(LeNet300100(), GMP(0.5, end=2, frequency=1), total_steps=4)
    with pytest.raises(SparseforgeError, match=r"does not match the model: missing \['fc1', 'fc2', 'fc3'\]"):
        sp_lenet.load_state_dict(sp_mlp.state_dict())
    # The conv net has the MLP's layer names ("0", "2", "5") but other shapes.
    sp_conv = Sparsifier(build_convnet(), GMP(0.5, end=2, frequency=1), total_steps=4)
    with pytest.raises(SparseforgeError, match=r"mask of 0 has shape \(32, 16\)"):
        sp_conv.load_state_dict(sp_mlp.state_dict())
    # Same layer names, different shapes.
    wide = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 4))
    sp_wide = Sparsifier(wide, GMP(0.5, end=2, frequency=1), total_steps=4)
    with pytest.raises(SparseforgeError, match="shape"):
        sp_wide.load_state_dict(sp_mlp.state_dict())
    # Another version of the state format.
    state = sp_mlp.state_dict() | {"version": 999}
    with pytest.raises(SparseforgeError, match="version"):
        sp_mlp.load_state_dict(state)


def test_other_construction_errors_leave_model_clean() -> None:
    model = build_mlp()
    other = torch.optim.SGD(build_mlp().parameters(), lr=0.1)
    with pytest.raises(SparseforgeError, match="optimizer does not hold"):
        Sparsifier(model, GMP(0.5), total_steps=10, optimizer=other)
    with pytest.raises(SparseforgeError, match="total_steps"):
        Sparsifier(model, GMP(0.5), total_steps=0)
    with pytest.raises(SparseforgeError, match="total_steps"):
        Sparsifier(model, GMP(0.5))  # the default end is a fraction of the run
    # None of the failures above may leave masks or hooks on the model.
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, GMP(0.5), total_steps=10, optimizer=opt)
    with pytest.raises(SparseforgeError, match="another Sparsifier"):
        Sparsifier(model, GMP(0.5), total_steps=10)
    with pytest.warns(UserWarning, match="before the schedule's end"):
        sp.finalize()


def test_gradient_score_at_step_zero_fails_cleanly() -> None:
    model = build_mlp()
    with pytest.raises(SparseforgeError, match="needs gradients"):
        Sparsifier(model, Method(schedule=OneShot(final=0.5), score="snip"), total_steps=10)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert not any(layer.weight._post_accumulate_grad_hooks for layer in sf.Target().select(model))
