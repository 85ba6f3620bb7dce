"""ISS-P (soft shrinkage of the lowest-magnitude percentage): the rule by hand on tiny tensors,
no zeros while shrinking, a changing shrunk set, an exact hard mask at the end, bit-identical
resume; the super-resolution zoo; and the benchmark's quick mode."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from torch import nn

from conftest import build_mlp, random_loader
from sparseforge.errors import SparseforgeError
from sparseforge.methods.issp import ISSP
from sparseforge.schedules import Constant
from sparseforge.sparsifier import Sparsifier
from sparseforge.updates import SoftShrink, UpdateContext
from sparseforge.zoo.data import DEFAULT_DATA_DIR, FASHION_MNIST_FILES

SHRINK = 0.9


def _tiny(values: list[float]) -> nn.Linear:
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return layer


def _shrunk(values: torch.Tensor, idx: list[int], times: int = 1) -> torch.Tensor:
    """``values`` with the entries ``idx`` multiplied ``times`` times by SHRINK, in float32 as the update does."""
    out = values.clone()
    for _ in range(times):
        out[..., idx] = out[..., idx] * torch.tensor(SHRINK, dtype=out.dtype)
    return out


def _train(model: nn.Module, opt: torch.optim.Optimizer, sp: Sparsifier, steps: int, seed: int = 0) -> None:
    loader = random_loader((16,), n=64, batch_size=16, seed=seed)
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sp.step()
            done += 1
            if done == steps:
                return


# ---------------------------------------------------------------------------- the rule by hand


def test_lowest_fraction_is_multiplied_by_exactly_the_factor_per_update() -> None:
    w0 = torch.tensor([[0.5, -3.0, 0.25, 2.0, -0.125, 4.0, 1.0, -0.75]])
    layer = _tiny(w0.tolist()[0])
    # Half of 8 weights: the four smallest |w| are 0.125, 0.25, 0.5, 0.75 at indices 4, 2, 0, 7.
    low = [0, 2, 4, 7]
    sp = Sparsifier(layer, ISSP(sparsity=0.5, shrink=SHRINK, end=10), total_steps=10)
    assert torch.equal(layer.weight.detach(), _shrunk(w0, low, 1))  # the update at step 0
    for k in range(2, 5):  # no optimizer: only the updates change the weights
        sp.step()
        assert torch.equal(layer.weight.detach(), _shrunk(w0, low, k)), f"after update {k}"
    assert bool(sp.masks[""].all())


def test_frequency_sets_how_often_weights_shrink() -> None:
    w0 = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    layer = _tiny(w0.tolist()[0])
    sp = Sparsifier(layer, ISSP(sparsity=0.5, shrink=SHRINK, frequency=3, end=9), total_steps=9)
    for _ in range(5):
        sp.step()
    # Updates at steps 0 and 3 so far.
    assert torch.equal(layer.weight.detach(), _shrunk(w0, [0, 1], 2))


def test_a_weight_that_grows_back_leaves_the_shrunk_set() -> None:
    layer = _tiny([0.1, 0.2, 3.0, 4.0])
    sp = Sparsifier(layer, ISSP(sparsity=0.5, shrink=SHRINK, end=10), total_steps=10)
    after0 = layer.weight.detach().clone()
    assert torch.equal(after0, _shrunk(torch.tensor([[0.1, 0.2, 3.0, 4.0]]), [0, 1]))
    with torch.no_grad():  # as a large gradient step would
        layer.weight[0, 0] = 5.0
    sp.step()
    # Now the two smallest are 0.2 * 0.9 (index 1) and 3.0 (index 2); 5.0 is kept untouched.
    expected = torch.tensor([[5.0, float(after0[0, 1]), 3.0, 4.0]])
    assert torch.equal(layer.weight.detach(), _shrunk(expected, [1, 2]))
    assert bool(sp.masks[""].all())


def test_the_shrunk_set_changes_during_training() -> None:
    model = build_mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sp = Sparsifier(model, ISSP(sparsity=0.75, shrink=0.95, end=40), total_steps=40, optimizer=opt)
    first = model[0].weight.detach().abs()
    low0 = first <= first.flatten().kthvalue(int(0.75 * first.numel())).values
    _train(model, opt, sp, 30)
    now = model[0].weight.detach().abs()
    low30 = now <= now.flatten().kthvalue(int(0.75 * now.numel())).values
    assert bool((low0 != low30).any()), "the lowest-magnitude set never changed"


def test_shrink_zero_is_iterative_hard_thresholding() -> None:
    layer = _tiny([0.1, -0.2, 3.0, 4.0])
    sp = Sparsifier(layer, ISSP(sparsity=0.5, shrink=0.0, end=5), total_steps=5)
    assert layer.weight.detach().tolist() == [[0.0, 0.0, 3.0, 4.0]]
    assert bool(sp.masks[""].all())  # zeroed but not masked: they may grow back
    assert sp.method.name == "iht"


# ---------------------------------------------------------------------------- during and after training


def test_nothing_is_zeroed_by_the_mask_while_shrinking() -> None:
    model = build_mlp(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, ISSP(sparsity=0.9, shrink=0.95, end=20), total_steps=30, optimizer=opt)
    _train(model, opt, sp, 19)
    assert sp.sparsity() == 0.0
    for name, m in sp.masks.items():
        assert bool(m.all()), name
    for layer in sp.layers:
        assert int((layer.weight == 0).sum()) == 0, layer.name
    assert sp.method.update.shrink == 0.95
    # Stopping here leaves a dense model; finalize must say so rather than pass it off as pruned.
    with pytest.warns(UserWarning, match=r"step 19, before the schedule's end at step 20.*sparsity is 0, not the target 0.9"):
        sp.finalize()
    assert all(int((layer.weight == 0).sum()) == 0 for layer in sp.layers)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "none"])
def test_final_model_has_exact_target_sparsity_and_no_hooks(optimizer: str) -> None:
    model = build_mlp(2)
    reference_keys = set(build_mlp(2).state_dict())
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    sp = Sparsifier(model, ISSP(sparsity=0.9, end=0.5), total_steps=24,
                    optimizer=None if optimizer == "none" else opt)
    _train(model, opt, sp, 24)  # 12 steps of shrinking, then 12 of fine-tuning with the hard mask
    expected = {layer.name: round(0.9 * layer.numel) for layer in sp.layers}  # uniform: 90% of every layer
    assert sp.sparsity() == sum(expected.values()) / sum(layer.numel for layer in sp.layers)
    out = sp.finalize()
    assert out is model
    for layer in sp.layers:
        w = getattr(layer.module, "weight")
        assert int((w == 0).sum()) == expected[layer.name], layer.name
        assert not hasattr(layer.module, "weight_mask")
        assert not layer.module._forward_hooks and not layer.module._forward_pre_hooks
        assert not w._post_accumulate_grad_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert set(model.state_dict()) == reference_keys
    fresh = build_mlp(3)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_the_hard_mask_is_the_lowest_magnitude_at_the_end() -> None:
    layer = _tiny([0.1, -5.0, 0.3, 4.0, -0.2, 1.0])
    sp = Sparsifier(layer, ISSP(sparsity=0.5, shrink=SHRINK, end=2), total_steps=2)
    sp.step()
    sp.step()  # the last update: hard mask, no shrinking
    assert sp.masks[""].tolist() == [[False, True, False, True, False, True]]
    w = layer.weight.detach()
    assert w[0, [0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(w[0, [1, 3, 5]], torch.tensor([-5.0, 4.0, 1.0]))  # kept ones never shrunk


# ---------------------------------------------------------------------------- resume

N_STEPS, END = 16, 8


def _build(seed: int):
    model = build_mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, ISSP(sparsity=0.8, shrink=0.9, end=END), total_steps=N_STEPS, optimizer=opt)
    return model, opt, sp


@pytest.mark.parametrize("checkpoint", [5, 8, 11])
def test_resume_from_state_dict_equals_an_uninterrupted_run(checkpoint: int) -> None:
    model, opt, sp = _build(0)
    _train(model, opt, sp, N_STEPS)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sp = _build(0)
    _train(model, opt, sp, checkpoint)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)

    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    model, opt, sp = _build(12345)  # a different init: everything must come from the checkpoint
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sp.load_state_dict(state["sp"])
    assert sp.current_step == checkpoint
    # The loader restarts its epochs: replay the same batches by skipping what was done.
    loader = random_loader((16,), n=64, batch_size=16, seed=0)
    batches = [b for _ in range(math.ceil(N_STEPS / len(loader))) for b in loader][:N_STEPS]
    for x, y in batches[checkpoint:]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k


# ---------------------------------------------------------------------------- errors and context


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, "x"])
def test_bad_shrink_factor_says_what_to_do(bad) -> None:
    with pytest.raises(SparseforgeError, match="shrink must"):
        SoftShrink(shrink=bad)
    with pytest.raises(SparseforgeError, match="shrink must"):
        ISSP(shrink=bad)


def test_context_knows_the_last_update() -> None:
    schedule = Constant(final=0.5, start=0, end=4).resolve(10)
    ctx = UpdateContext(layers=[], masks=[], grads=[], score=None, pattern=None, allocation=None,  # type: ignore[arg-type]
                        sparsity=0.5, step=3, schedule=schedule)
    assert not ctx.is_last
    ctx.step = 4
    assert ctx.is_last
    ctx.schedule = None
    assert ctx.is_last


# ---------------------------------------------------------------------------- super-resolution zoo


def test_superres_data_is_split_by_image_and_psnr_is_sane() -> None:
    pytest.importorskip("skimage")
    from sparseforge.zoo.superres import ESPCN, TEST_IMAGES, TRAIN_IMAGES, bicubic_psnr, psnr, superres_data

    assert not set(TRAIN_IMAGES) & set(TEST_IMAGES)
    with pytest.raises(SparseforgeError, match="must differ"):
        superres_data(train_images=["camera"], test_images=["camera"])
    data = superres_data(scale=2, patch_size=16, batch_size=4, seed=0, train_images=["moon"],
                         test_images=["camera"])
    lr, hr = data.sampler.sample()
    assert lr.shape == (4, 1, 8, 8) and hr.shape == (4, 1, 16, 16)
    assert 0.0 <= float(hr.min()) and float(hr.max()) <= 1.0
    data.sampler.reseed(0)
    again, _ = data.sampler.sample()
    data.sampler.reseed(0)
    assert torch.equal(data.sampler.sample()[0], again)
    name, lr, hr = data.test[0]
    assert name == "camera" and hr.shape[-1] == 2 * lr.shape[-1]
    assert 25.0 < bicubic_psnr(data.test, 2)["psnr"] < 40.0
    assert psnr(hr, hr) == math.inf
    assert ESPCN(2)(lr).shape == hr.shape


# ---------------------------------------------------------------------------- benchmark quick mode

needs_data = pytest.mark.skipif(
    not all((DEFAULT_DATA_DIR / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_data
def test_issp_bench_quick_writes_well_formed_json(tmp_path) -> None:
    pytest.importorskip("skimage")
    from sparseforge.bench.__main__ import main as bench_main

    out = tmp_path / "issp.json"
    assert bench_main(["issp", "--quick", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "issp" and result["quick"] is True
    for task, metric in (("superres", "psnr"), ("fashion_mnist", "test_accuracy")):
        section = result[task]
        assert set(section["summary"]) == {"dense", "gmp", "iht", "iss-p"}
        for stats in section["summary"].values():
            assert stats["n"] == 1 and math.isfinite(stats["mean"])
        assert isinstance(section["claim"]["holds"], bool)
        for r in section["runs"]:
            assert math.isfinite(r[metric])
            assert r["sparsity"] == pytest.approx(0.0 if r["config"] == "dense" else 0.9, abs=1e-3)
    assert result["superres"]["bicubic"]["psnr"] > 20.0
