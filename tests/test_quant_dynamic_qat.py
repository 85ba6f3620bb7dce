"""Dynamic int8 inference and LSQ quantization-aware training: accuracy bounds and the zeros-stay-zero invariants."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.errors import SparseforgeError
from sparseforge.quant.dynamic import dynamic_int8_available, quantize_dynamic_int8
from sparseforge.quant.qat import QATConv2d, QATLinear, lsq_fake_quantize, lsq_init_step, qat_convert, qat_prepare
from sparseforge.quant.rtn import quantization_of, quantize_, quantize_weight
from sparseforge.zoo.models import build_model

needs_kernels = pytest.mark.skipif(not dynamic_int8_available(), reason="this torch has no quantized CPU kernels")


def _dynamic_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "_packed_params")]


# -- dynamic int8 --------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_dynamic_int8_output_close_to_fp32(batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    q = quantize_dynamic_int8(model)
    assert len(_dynamic_layers(q)) == 2 and isinstance(model[0], nn.Linear)  # the input model is left as it was
    x = torch.randn(batch, 256)
    with torch.no_grad():
        ref, y = model(x), q(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # int8 weights and activations: a few percent relative error (measured ~2%), not more.
    assert float((y - ref).norm() / ref.norm()) < 0.05


@needs_kernels
def test_dynamic_int8_keeps_zeros_and_uses_the_rtn_codes() -> None:
    torch.manual_seed(1)
    model = build_model("lenet300")
    sf.prune(model, sparsity=0.9)
    with torch.no_grad():
        model.fc3.weight[3].zero_()  # an all-zero channel
    q = quantize_dynamic_int8(model)
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(model, name).weight.detach()
        qw = getattr(q, name).weight()
        codes = qw.int_repr()
        assert torch.equal(codes == 0, w == 0), name  # zeros stay zero, kept weights stay nonzero
        assert torch.equal(codes, quantize_weight(w, bits=8).q)  # the RTN rule, per channel
        assert torch.all(qw.q_per_channel_zero_points() == 0)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert float((q(x) - model(x)).norm() / model(x).norm()) < 0.05


@needs_kernels
def test_dynamic_int8_reuses_recorded_int8_codes_and_bare_linear() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(32, 8)
    quantize_(lin, "int8")
    recorded = quantization_of(lin).q.clone()
    q = quantize_dynamic_int8(lin)
    assert torch.equal(q.weight().int_repr(), recorded)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert float((q(x) - lin(x)).norm() / lin(x).norm()) < 0.05


def test_dynamic_int8_without_kernels_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.ao.nn.quantized.dynamic", None)  # as if torch had dropped it
    assert not dynamic_int8_available()
    with pytest.raises(SparseforgeError, match=r"pip install .*torchao"):
        quantize_dynamic_int8(nn.Sequential(nn.Linear(4, 4)))


# -- LSQ fake quantization -----------------------------------------------------------------------


def test_lsq_gradients_match_the_formula_by_hand() -> None:
    # bits 4: qmax 7; one step s = 0.5 for six weights.
    w = torch.tensor([[0.3, -0.9, 5.0, 0.0, 0.05, -4.0]], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    wq = lsq_fake_quantize(w, s, bits=4)
    # w/s = 0.6, -1.8, 10 -> clamp 7, 0, 0.1 -> 0, -8 -> clamp -7
    assert wq.tolist() == [[0.5, -1.0, 3.5, 0.0, 0.0, -3.5]]
    (wq * c).sum().backward()
    # dwq/ds = q - w/s inside the range, +-qmax outside: 0.4, -0.2, 7, 0, -0.1, -7
    # sum c * dwq/ds = 0.4 - 0.4 + 21 + 0 - 0.5 - 42 = -21.5; LSQ scale g = 1/sqrt(6 * 7)
    assert s.grad.item() == pytest.approx(-21.5 / math.sqrt(42), rel=1e-6)
    # straight-through for w: c inside the clamp range, 0 outside
    assert w.grad.tolist() == [[1.0, 2.0, 0.0, 4.0, 5.0, 0.0]]


def test_lsq_init_over_kept_weights() -> None:
    w = torch.tensor([[0.0, 0.0, 1.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    step = lsq_init_step(w, bits=8, per_channel=True)
    assert step[0].item() == pytest.approx(2 * 2.0 / math.sqrt(127))  # mean |w| over the two kept weights
    assert step[1].item() == 1.0
    assert lsq_init_step(w, bits=4, per_channel=False).item() == pytest.approx(2 * 2.0 / math.sqrt(7))


def _distinct_per_channel_ok(wq: torch.Tensor, qmax: int, per_channel: bool) -> bool:
    rows = wq.reshape(wq.shape[0], -1) if per_channel else wq.reshape(1, -1)
    return all(int(torch.unique(r).numel()) <= 2 * qmax + 1 for r in rows)


@pytest.mark.parametrize("order", ["qat_first", "sparsifier_first"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_sparsifier_and_qat_keep_exact_zeros_for_50_sgd_momentum_steps(order: str, per_channel: bool) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    bits, qmax = 4, 7
    # Masks change during training (GMP every 5 steps up to 75%), so new zeros must stay zero too.
    method = sf.methods.GMP(sparsity=0.75, frequency=5, end=30)
    if order == "qat_first":
        qat_prepare(model, bits=bits, per_channel=per_channel)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sp = sf.Sparsifier(model, method, total_steps=50, optimizer=opt)
    else:
        # Built first, without an optimizer: it masks gradients by hooks and re-masks after each step.
        sp = sf.Sparsifier(model, method, total_steps=50)
        qat_prepare(model, bits=bits, per_channel=per_channel)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps0 = [m.weight_step.detach().clone() for m in (model[0], model[2])]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(32, 64, generator=gen)
        y = torch.randint(0, 8, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sp.step()
        for layer, mask in zip((model[0], model[2]), sp.masks.values()):
            assert torch.all(layer.weight[~mask] == 0)  # latent weight
            wq = layer.quantized_weight()
            assert torch.all(wq[~mask] == 0)  # fake-quantized weight
    assert sp.sparsity() == pytest.approx(0.75, abs=0.01)
    for layer, s0 in zip((model[0], model[2]), steps0):
        assert isinstance(layer, QATLinear)
        assert not torch.equal(layer.weight_step.detach(), s0)  # the steps were learned
        assert _distinct_per_channel_ok(layer.quantized_weight().detach(), qmax, per_channel)
    # The bound is not trivially true: the latent weights take far more values per channel.
    assert not _distinct_per_channel_ok(model[0].weight.detach(), qmax, True)
    fake = [layer.quantized_weight().detach().clone() for layer in (model[0], model[2])]
    sp.finalize()
    qat_convert(model)
    for layer, wq in zip((model[0], model[2]), fake):
        qt = quantization_of(layer)
        assert type(layer) is nn.Linear and torch.equal(layer.weight.detach(), wq)
        assert qt is not None and qt.bits == bits and int(qt.q.abs().max()) <= qmax
        assert torch.equal(qt.q == 0, wq == 0) and tuple(qt.scale.shape) == (layer.weight.shape[0], 1)


def test_conv_qat_and_convert_records_exact_codes() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    sf.prune(model, sparsity=0.8)
    qat_prepare(model, bits=8)
    assert isinstance(model[0], QATConv2d) and tuple(model[0].weight_step.shape) == (8,)
    x = torch.randn(2, 3, 8, 8)
    fake = [model[0].quantized_weight().detach().clone(), model[3].quantized_weight().detach().clone()]
    y = model(x).detach()
    qat_convert(model)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert not any(k.endswith("weight_step") for k in model.state_dict())
    for layer, wq in zip((model[0], model[3]), fake):
        assert torch.equal(layer.weight.detach(), wq)  # bit-identical to the training forward
        qt = quantization_of(layer)
        assert qt is not None and qt.bits == 8 and qt.group_size is None
        assert int(qt.q.abs().max()) <= 127 and torch.equal(qt.q == 0, wq == 0)
    assert torch.equal(model(x), y)


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_convert_save_load_round_trip_exact(tmp_path: Path, bits: int) -> None:
    torch.manual_seed(5)
    model = build_model("lenet300")
    sf.prune(model, sparsity=0.9)
    qat_prepare(model, bits=bits)
    keep = {m: m.weight != 0 for m in (model.fc1, model.fc2, model.fc3)}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,))).backward()
        opt.step()
        with torch.no_grad():  # keep the pruned weights pruned (no Sparsifier here)
            for m, k in keep.items():
                m.weight.mul_(k)
    qat_convert(model)
    codes = {n: quantization_of(getattr(model, n)).q.clone() for n in ("fc1", "fc2", "fc3")}
    path = sf.save(model, tmp_path / "m.sfz", values=f"int{bits}")
    loaded = sf.load(path, build_model("lenet300"))
    for n in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(loaded, n).weight, getattr(model, n).weight), n
        qt = quantization_of(getattr(loaded, n))
        assert qt is not None and qt.bits == bits and torch.equal(qt.q, codes[n])
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_qat_prepare_rejects_bad_input() -> None:
    with pytest.raises(SparseforgeError, match="bits"):
        qat_prepare(nn.Linear(4, 4), bits=3)

    class MyLinear(nn.Linear):
        pass

    with pytest.raises(SparseforgeError, match="subclass"):
        qat_prepare(nn.Sequential(MyLinear(4, 4)))
    model = qat_prepare(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(SparseforgeError, match="already prepared"):
        qat_prepare(model)


# -- bench -----------------------------------------------------------------------------------------


@needs_kernels
def test_quant_speed_bench_quick_writes_json(tmp_path: Path) -> None:
    from sparseforge.bench.__main__ import main as bench_main
    from sparseforge.zoo.data import DEFAULT_DATA_DIR

    if not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "q.json"
    args = ["quant-speed", "--quick", "--limit-train", "256", "--limit-test", "128", "--threads", "1",
            "--rounds", "1", "--linear-size", "64", "--candidates", "--json", str(out)]
    assert bench_main(args) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "quant-speed" and r["quick"] is True
    for part in ("lenet300", "linear"):
        d = r["dynamic_int8"][part]
        assert [t["batch_size"] for t in d["timing"]] == [1, 8, 64]
        assert all(t["fp32_ms"] > 0 and t["int8_ms"] > 0 and 0 <= t["rel_error"] < 0.1 for t in d["timing"])
        assert d["size_ratio"] > 2.0  # int8 weights: about a quarter of the fp32 bytes
    cand = r["dynamic_int8"]["candidates"]
    names = {c["candidate"] for c in cand}
    assert {"fp32", "torch.ao dynamic (chosen)", "hand: torch._int_mm", "hand: dequantize on the fly"} <= names
    assert all(c["ms"] > 0 and c["rel_error"] < 0.1 for c in cand)
    acc = r["qat_vs_rtn_int4"]["accuracy"]
    assert all(0.0 <= v <= 100.0 for v in acc.values())
    assert acc["qat_int4_fake_quant"] == acc["qat_int4_converted"]  # conversion does not change the model
    assert r["qat_vs_rtn_int4"]["qat_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert r["qat_vs_rtn_int4"]["qat_codes_recorded"] is True
