"""Round-to-nearest weight quantization: zeros stay zero, kept weights stay kept, the rule holds exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseforge as sf
from sparseforge.quant import dequantize, pack_int4, quantization_of, quantize_, quantize_weight, unpack_int4
from sparseforge.zoo import build_model

from conftest import build_convnet, build_mlp


def _sparse(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).mul(3).exp()  # spread of magnitudes
    return w * (torch.rand(shape, generator=g) < density)


def _reference(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule, one group at a time in plain Python (an independent implementation)."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1)
    g = rows.shape[1] if group is None else group
    q = torch.zeros_like(rows, dtype=torch.int8)
    scales = torch.zeros(rows.shape[0], rows.shape[1] // g)
    for r in range(rows.shape[0]):
        for j in range(rows.shape[1] // g):
            seg = rows[r, j * g:(j + 1) * g]
            kept = seg[seg != 0]
            s = kept.abs().max() / qmax if kept.numel() else torch.tensor(0.0)  # float32, as documented
            scales[r, j] = s
            for i, v in enumerate(seg):
                if v == 0:
                    continue
                q[r, j * g + i] = max(-qmax, min(qmax, int(torch.round(v / s))))
    return q.reshape(w.shape), scales


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([1, 2, 4, 8]),
    density=st.floats(0.0, 1.0), bits=st.sampled_from([4, 8]), per_channel=st.booleans(), seed=st.integers(0, 99),
)
def test_rule_zeros_stay_zero(rows, groups, group, density, bits, per_channel, seed) -> None:
    w = _sparse((rows, groups * group), density, seed)
    gs = None if per_channel else group
    qt = quantize_weight(w, bits=bits, group_size=gs)
    qmax = 2 ** (bits - 1) - 1
    assert qt.q.dtype == torch.int8 and tuple(qt.q.shape) == tuple(w.shape)
    assert bool((qt.q[w == 0] == 0).all())                     # a pruned weight is never revived
    assert int(qt.q.abs().max()) <= qmax
    deq = qt.dequantize()
    assert bool((deq[w == 0] == 0).all())
    assert bool((torch.sign(deq) * torch.sign(w) >= 0).all())  # no sign flips: 0 or the same sign
    ref_q, ref_s = _reference(w, bits, gs)
    assert torch.equal(qt.scale, ref_s)
    assert torch.equal(qt.q, ref_q)
    # RTN error bound: half a step everywhere (the group maximum is exact).
    step = qt.scale.repeat_interleave(w.shape[1] // qt.scale.shape[1], dim=1)
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all())


def test_group_scales_ignore_other_groups_and_all_zero_group() -> None:
    w = torch.tensor([[100.0, 0.0, 0.0, 0.0, 0.5, -0.25, 0.0, 0.0]])
    qt = quantize_weight(w, bits=8, group_size=4)
    assert qt.scale.tolist() == [[pytest.approx(100 / 127), pytest.approx(0.5 / 127)]]
    assert qt.q[0, 4:6].tolist() == [127, -64]                 # its own group's scale, not the 100's
    qt = quantize_weight(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), bits=4)
    assert qt.scale[0, 0] == 0 and torch.equal(qt.dequantize()[0], torch.zeros(2))


def test_group_size_must_divide_fan_in() -> None:
    with pytest.raises(sf.SparseforgeError, match=r"784 inputs.*group_size 128.*divides 784"):
        quantize_weight(torch.randn(3, 784), bits=4, group_size=128, name="fc1.weight")
    with pytest.raises(sf.SparseforgeError, match="bits must be 8 or 4"):
        quantize_weight(torch.randn(3, 4), bits=3)
    with pytest.raises(sf.SparseforgeError, match="positive integer"):
        quantize_weight(torch.randn(3, 4), group_size=0)


def test_conv_groups_run_over_flattened_fan_in() -> None:
    w = _sparse((4, 2, 3, 3), 0.5, 1)
    qt = quantize_weight(w, bits=8, group_size=6)
    assert tuple(qt.scale.shape) == (4, 3)
    assert torch.equal(qt.dequantize(), dequantize(qt.q, qt.scale, 6))
    ref_q, _ = _reference(w, 8, 6)
    assert torch.equal(qt.q, ref_q)


@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.integers(-8, 7), min_size=0, max_size=33))
def test_int4_packing_round_trips(codes) -> None:
    t = torch.tensor(codes, dtype=torch.int8)
    packed = pack_int4(t)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_int4(packed, len(codes)), t)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", None), ("int4", 4), ("int8", 8)])
def test_quantize_model_in_place(scheme: str, group: int | None) -> None:
    model = build_mlp(0)
    sf.prune(model, sparsity=0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, scheme, group_size=group)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w0 = before[f"{name}.weight"]
            assert torch.equal(m.weight != 0, w0 != 0)
            qt = quantization_of(m)
            assert qt is not None and qt.bits == int(scheme[3:]) and qt.group_size == group
            assert torch.equal(m.weight, quantize_weight(w0, qt.bits, group).dequantize())
            assert torch.equal(m.bias, before[f"{name}.bias"])   # biases untouched
    again = copy.deepcopy(model)
    quantize_(again, scheme, group_size=group)                 # idempotent: a quantized weight is a fixed point
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_quantize_conv_model_and_stale_record() -> None:
    model = build_convnet(0)
    sf.prune(model, sparsity=0.5)
    quantize_(model, "int4")
    conv = model[0]
    assert quantization_of(conv) is not None
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] += 0.123                        # trained further: the record no longer holds
    assert quantization_of(conv) is None


def test_quantize_model_checks_every_layer_before_changing_any() -> None:
    model = build_model("lenet300")                            # fc1 has 784 inputs, fc3 100
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sf.SparseforgeError, match="fc1.weight"):
        quantize_(model, "int4", group_size=128)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(sf.SparseforgeError, match="needs calibration data"):
        quantize_(model, "gptq-int4")
    with pytest.raises(sf.SparseforgeError, match="unknown quantization scheme"):
        quantize_(model, "int3")


def test_embedding_tables_quantize_per_row_and_round_trip_through_sfz(tmp_path) -> None:
    import sparseforge as sf

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[3].zero_()  # a padding row stays zero
    table = model[0].weight.detach().clone()
    quantize_(model, "int8", embeddings=True)
    qt = quantization_of(model[0])
    assert qt is not None and qt.scale.shape == (50, 1)  # one scale per token
    assert torch.equal(model[0].weight, qt.dequantize())
    assert bool((model[0].weight[3] == 0).all()) and bool((model[0].weight[table == 0] == 0).all())
    # Within half a step of the row's scale, except kept entries below half a step, which
    # take the smallest code (+-1) rather than 0: within a whole step.
    err = (model[0].weight - table).abs()
    bumped = (table != 0) & (table.abs() < qt.scale / 2)
    assert bool((err[~bumped] <= (qt.scale / 2).expand_as(err)[~bumped] + 1e-7).all())
    assert bool((err[bumped] <= qt.scale.expand_as(err)[bumped] + 1e-7).all())
    path = sf.save(model, tmp_path / "e.sfz", values="int8")
    loaded = sf.load(path, nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4)))
    assert torch.equal(loaded[0].weight, model[0].weight) and torch.equal(loaded[1].weight, model[1].weight)
    assert quantization_of(loaded[0]) is not None  # codes re-recorded: saving again stores the same codes
    # Without embeddings=True the table is left alone, and saved as it is.
    plain = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))
    before = plain[0].weight.detach().clone()
    quantize_(plain, "int8")
    assert torch.equal(plain[0].weight, before) and quantization_of(plain[0]) is None
