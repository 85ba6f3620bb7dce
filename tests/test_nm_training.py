"""N:M sparse training: SR-STE and progressive gradient flow (MDGF, SDGF).

Invariants: the module weight is exactly N:M after every step while the dense
shadow keeps training at pruned positions; SR-STE's step equals its formula;
MDGF's forward mask follows its decay; SDGF's pattern follows its frames;
finalize leaves exact N:M zeros and a plain model; resume is bit-identical.
"""

from __future__ import annotations

import contextlib

import copy
import json
import math

import pytest
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.methods import SRSTE, ProgressiveNM
from sparseforge.methods.nm_training import structure_frames
from sparseforge.patterns import NM
from sparseforge.sparsifier import Sparsifier
from sparseforge.targets import Target
from sparseforge.updates import MaskDecay, SparseRefinedSTE, StructureDecay
from sparseforge.zoo.data import DEFAULT_DATA_DIR, FASHION_MNIST_FILES

# The convnet's first conv has 3 input channels, which no M here divides.
CONV_TARGET = Target(exclude=["0"])


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second thread only adds synchronisation, which is slow on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_mlp(seed: int = 0) -> nn.Sequential:
    """A 16-32-32-4 MLP (Linear layers "0", "2", "5"), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 4))


def build_convnet(seed: int = 0) -> nn.Sequential:
    """A small conv net for [B, 3, 8, 8] inputs (Conv2d "0", "2"; Linear "5"), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 4))


def nm_counts(w: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros in every group of M consecutive inputs (input dim = dim 1, as the NM pattern groups)."""
    moved = w.detach().movedim(1, -1)
    return (moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m) != 0).sum(-1)


def targeted(model: nn.Module, sp: Sparsifier) -> dict[str, torch.Tensor]:
    return {layer.name: layer.weight for layer in sp.layers}


def train(model: nn.Module, sp: Sparsifier | None, opt: torch.optim.Optimizer, batches, check=None) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sp is not None:
            sp.step()
        if check is not None:
            check()


def batches(shape: tuple[int, ...], n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n random batches of 16 inputs with 4 classes."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *shape, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(n)]


CASES = [
    pytest.param(build_mlp, (16,), None, id="linear"),
    pytest.param(build_convnet, (3, 8, 8), CONV_TARGET, id="conv"),
]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8)])
@pytest.mark.parametrize("build,shape,target", CASES)
def test_srste_weight_is_nm_after_every_step_while_dense_shadow_trains(build, shape, target, n, m):
    model = build(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sp = Sparsifier(model, SRSTE(n, m, target=target), total_steps=6, optimizer=opt)
    for w in targeted(model, sp).values():
        assert bool((nm_counts(w, m) == n).all())
    moved_at_pruned = []

    def check() -> None:
        state = sp.state_dict()
        for name, w in targeted(model, sp).items():
            assert bool((nm_counts(w, m) == n).all()), name
            # The module weight is the dense shadow through the current mask, exactly.
            assert torch.equal(w.detach(), state["dense"][name] * state["masks"][name])
        if check.previous is not None:
            for name, dense in state["dense"].items():
                pruned = ~check.previous["masks"][name]
                moved_at_pruned.append(bool((dense[pruned] != check.previous["dense"][name][pruned]).any()))
        check.previous = state

    check.previous = None
    train(model, sp, opt, batches(shape, 6), check)
    assert moved_at_pruned and all(moved_at_pruned)


def test_srste_step_equals_formula_with_plain_sgd():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    w0 = layer.weight.detach().clone()
    lr, lam = 0.1, 0.05  # a large lambda so that the sparse-refined term is visible
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    sp = Sparsifier(layer, SRSTE(2, 4, decay=lam), total_steps=2, optimizer=opt)
    e0 = NM(2, 4).mask(w0.abs()).float()
    x, y = torch.randn(5, 8), torch.randn(5, 3)
    # By hand: the gradient of the loss with respect to the masked weight W~ = W * E.
    w_tilde = (w0 * e0).requires_grad_(True)
    loss = ((nn.functional.linear(x, w_tilde, layer.bias.detach()) - y) ** 2).mean()
    (g,) = torch.autograd.grad(loss, w_tilde)
    expected = w0 - lr * (g + lam * (1 - e0) * w0)

    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    opt.step()
    sp.step()
    dense = sp.state_dict()["dense"][""]
    torch.testing.assert_close(dense, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(dense * (1 - e0), w0 * (1 - e0))  # pruned weights moved (straight-through)
    e1 = NM(2, 4).mask(expected.abs()).float()
    torch.testing.assert_close(layer.weight.detach(), expected * e1, rtol=1e-6, atol=1e-7)


def test_srste_decay_zero_is_plain_ste_and_bad_decay_is_an_error():
    assert str(SparseRefinedSTE(decay=0)) == "ste"
    grad = torch.ones(4)
    SparseRefinedSTE(decay=0).adjust_grad(torch.full((4,), 3.0), torch.tensor([1.0, 0, 1, 0]), grad, 0.5)
    assert grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    SparseRefinedSTE(decay=0.5).adjust_grad(torch.full((4,), 3.0), torch.tensor([1.0, 0, 1, 0]), grad, 0.5)
    assert grad.tolist() == [1.0, 2.5, 1.0, 2.5]
    with pytest.raises(SparseforgeError, match="decay"):
        SRSTE(decay=-1.0)


@pytest.mark.parametrize("curve,rate,beta", [
    ("exponential", 3.0, lambda p: math.exp(-3.0 * p)),
    ("linear", 2.0, lambda p: max(0.0, 1.0 - 2.0 * p)),
])
def test_mdgf_forward_mask_follows_its_decay(curve, rate, beta):
    update = MaskDecay(curve, rate=rate)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    for p in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        expected = mask + beta(p) * (1 - mask)
        assert torch.equal(update.forward_mask(mask, p), expected), p
        assert update.beta(p) == pytest.approx(beta(p))
    # fine_tune: a binary mask for the last part of the schedule.
    tuned = MaskDecay(curve, rate=rate, fine_tune=0.2)
    assert tuned.beta(0.79) == pytest.approx(beta(0.79)) and tuned.beta(0.8) == 0.0
    assert torch.equal(tuned.forward_mask(mask, 0.9), mask)


@pytest.mark.parametrize("frequency", [1, 3])
def test_mdgf_module_weight_is_dense_through_decayed_mask_at_every_step(frequency):
    total = 9
    model = build_mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = ProgressiveNM(1, 8, "mdgf-exponential", rate=2.0, frequency=frequency)
    sp = Sparsifier(model, method, total_steps=total, optimizer=opt)
    update = method.update
    seen = []

    def check() -> None:
        state = sp.state_dict()
        b = update.beta(state["step"] / total)  # the schedule runs from step 0 to total_steps
        seen.append(b)
        for name, w in targeted(model, sp).items():
            e = state["masks"][name].float()
            torch.testing.assert_close(w.detach(), state["dense"][name] * (e + b * (1 - e)), rtol=0, atol=0)

    train(model, sp, opt, batches((16,), total), check)
    assert seen[0] > seen[-1] > 0.0
    sp.finalize()
    for name, w in {"0": model[0].weight, "2": model[2].weight, "5": model[5].weight}.items():
        assert bool((nm_counts(w, 8) == 1).all()), name


def test_mdgf_scaled_gradient_multiplies_by_the_forward_mask():
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    grad = torch.ones(4)
    MaskDecay("linear", rate=1.0, scale_grad=True).adjust_grad(torch.ones(4), mask, grad, 0.25)
    assert grad.tolist() == [1.0, 0.75, 1.0, 0.75]
    grad = torch.ones(4)
    MaskDecay("linear", rate=1.0).adjust_grad(torch.ones(4), mask, grad, 0.25)
    assert grad.tolist() == [1.0, 1.0, 1.0, 1.0]  # the reference code: straight through


def test_sdgf_frames_and_pattern_follow_progress():
    assert structure_frames(1, 8, "sdgf-stepwise") == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert structure_frames(2, 8, "sdgf-stepwise") == [(7, 8), (4, 8), (2, 8)]
    assert structure_frames(3, 8, "sdgf-stepwise") == [(7, 8), (4, 8), (3, 8)]
    assert structure_frames(2, 4, "sdgf-stepwise") == [(3, 4), (2, 4)]
    assert structure_frames(1, 8, "sdgf-geometric") == [(8, 64), (4, 32), (2, 16), (1, 8)]
    total = 8
    model = build_convnet(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = ProgressiveNM(1, 8, "sdgf-stepwise", target=CONV_TARGET)
    sp = Sparsifier(model, method, total_steps=total, optimizer=opt)
    frames = method.update.frames
    seen = []

    def check() -> None:
        k = min(int(sp.current_step / total * len(frames)), len(frames) - 1)
        n, m = frames[k]
        seen.append((n, m))
        for name, w in targeted(model, sp).items():
            assert bool((nm_counts(w, m) == n).all()), (name, sp.current_step)

    train(model, sp, opt, batches((3, 8, 8), total), check)
    assert seen[0] == (7, 8) and seen[-1] == (1, 8) and set(seen) == set(frames)
    assert sp.sparsity() == pytest.approx(0.875)


def test_sdgf_geometric_checks_every_frame_against_the_layers():
    model = build_mlp()  # input dims 16 and 32: the 8:64 frame does not fit
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SparseforgeError, match="divisible by 64"):
        Sparsifier(model, ProgressiveNM(1, 8, "sdgf-geometric"), total_steps=4, optimizer=opt)
    with pytest.raises(SparseforgeError, match="last frame"):
        ProgressiveNM(1, 8, "sdgf-stepwise", frames=[(4, 8), (2, 8)])
    with pytest.raises(SparseforgeError, match="unknown progressive scheme"):
        ProgressiveNM(1, 8, "mdgf-cosine")
    with pytest.raises(SparseforgeError, match="at least one"):
        StructureDecay(frames=[])


@pytest.mark.parametrize("method", [
    SRSTE(2, 4, target=CONV_TARGET),
    ProgressiveNM(1, 8, "mdgf-linear", rate=1.0, target=CONV_TARGET),  # beta > 0 at the end
    ProgressiveNM(1, 8, "sdgf-stepwise", target=CONV_TARGET),
], ids=["srste", "mdgf", "sdgf"])
def test_finalize_leaves_exact_nm_zeros_and_a_plain_model(method):
    model = build_convnet(seed=3)
    fresh_keys = set(build_convnet().state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches((3, 8, 8), 5)
    sp = Sparsifier(model, method, total_steps=10, optimizer=opt)  # stopped mid-run: beta > 0
    train(model, sp, opt, data[:4])
    layers = targeted(model, sp)
    if isinstance(method.update, MaskDecay):  # beta > 0: the pruned weights still pass
        assert all(bool((w != 0).all()) for w in layers.values())
    n, m = method.pattern.n, method.pattern.m
    if isinstance(method.update, StructureDecay):  # mid-run: the frame in force (4:8 at step 4 of 10)
        n, m = method.update.frames[method.update.frame(sp.current_step / 10)]
        assert (n, m) == (4, 8)
    # SDGF stopped mid-run holds 4:8, not its 1:8 target: finalize says so.
    with (pytest.warns(UserWarning, match="before the schedule's end") if isinstance(method.update, StructureDecay)
          else contextlib.nullcontext()):
        out = sp.finalize()
    assert out is model
    for name, w in layers.items():
        assert bool((nm_counts(w, m) == n).all()), name
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert set(model.state_dict()) == fresh_keys
    # No hook is left: a further optimizer step moves the zeros.
    zeros = {name: w.detach() == 0 for name, w in layers.items()}
    train(model, None, opt, data[4:])
    assert all(bool((w.detach()[zeros[name]] != 0).any()) for name, w in layers.items())
    with pytest.raises(SparseforgeError, match="finalized"):
        sp.step()


@pytest.mark.parametrize("make", [
    lambda: SRSTE(2, 4, target=CONV_TARGET),
    lambda: ProgressiveNM(1, 8, "mdgf-exponential", rate=3.0, frequency=2, target=CONV_TARGET),
    lambda: ProgressiveNM(1, 8, "sdgf-stepwise", target=CONV_TARGET),
], ids=["srste", "mdgf", "sdgf"])
def test_resume_equals_uninterrupted_run_bit_for_bit(make):
    total, cut = 10, 4
    data = batches((3, 8, 8), total, seed=5)

    def fresh(seed: int):
        model = build_convnet(seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        return model, opt, Sparsifier(model, make(), total_steps=total, optimizer=opt)

    model, opt, sp = fresh(0)
    train(model, sp, opt, data)
    reference = (copy.deepcopy(model.state_dict()), sp.state_dict())

    model, opt, sp = fresh(0)
    train(model, sp, opt, data[:cut])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    model, opt, sp = fresh(7)  # a different initialisation: everything must come from the checkpoint
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sp.load_state_dict(saved[2])
    train(model, sp, opt, data[cut:])

    for key, value in reference[0].items():
        assert torch.equal(model.state_dict()[key], value), key
    final = sp.state_dict()
    for name, dense in reference[1]["dense"].items():
        assert torch.equal(final["dense"][name], dense), name
        assert torch.equal(final["masks"][name], reference[1]["masks"][name]), name


def test_straight_through_without_optimizer_is_a_clear_error():
    model = build_mlp()
    with pytest.raises(SparseforgeError, match="needs the optimizer"):
        Sparsifier(model, SRSTE(2, 4), total_steps=4)
    # The failed construction left the model as it was: a corrected call works.
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Sparsifier(model, SRSTE(2, 4), total_steps=4, optimizer=opt).finalize()


def test_target_with_indivisible_input_dim_names_the_layer():
    model = build_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SparseforgeError, match="exclude this layer"):
        Sparsifier(model, SRSTE(2, 4), total_steps=4, optimizer=opt)


needs_data = pytest.mark.skipif(
    not all((DEFAULT_DATA_DIR / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair),
    reason=f"Fashion-MNIST not installed in {DEFAULT_DATA_DIR}",
)


@needs_data
def test_bench_quick_writes_well_formed_json(tmp_path, monkeypatch):
    from sparseforge.bench.__main__ import main

    monkeypatch.delenv("SPARSEFORGE_DATA", raising=False)
    out = tmp_path / "nm.json"
    # The smallest data that still runs every configuration: one step each.
    assert main(["nm", "--quick", "--limit-train", "128", "--limit-test", "128", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "nm" and result["quick"] is True
    configs = result["settings"]["configs"]
    assert configs == ["dense", "sr-ste-2:4", "sr-ste-1:8", "mdgf-exp-1:8"]
    assert result["settings"]["dense_layers"] == ["conv1"]
    assert set(result["accuracy"]) == set(configs)
    for stats in result["accuracy"].values():
        assert {"mean", "std", "min", "max", "n"} <= set(stats) and 0.0 <= stats["mean"] <= 100.0
    assert len(result["runs"]) == len(configs) * result["settings"]["seeds"]
    sparsity = {r["config"]: r["sparsity"] for r in result["runs"]}
    assert sparsity["dense"] == 0.0 and 0.4 < sparsity["sr-ste-2:4"] < 0.5 < sparsity["sr-ste-1:8"] < 0.875
    for claim in result["claims"].values():
        assert isinstance(claim["holds"], bool)
    assert (tmp_path / "nm.png").is_file()
