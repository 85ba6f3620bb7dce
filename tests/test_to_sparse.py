"""to_sparse and SparseLinear: same outputs as the dense masked model, the per-layer rule, saving, errors.

No speed assertions here: the speed targets live in ``python -m sparseforge.bench speed``.
"""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.bench import speed
from sparseforge.kernels.sparse_linear import (
    SemiStructuredLinear,
    SparseLinear,
    detect_blocksize,
    is_2to4,
    load_sparse_state_dict,
)

# The candidates are timed, so the choice itself is machine-dependent; these settings make
# it deterministic: every format qualifies (min_speedup tiny, no large-batch check) or none does.
ALWAYS = {"min_speedup": 1e-9, "check_batch_sizes": (), "rounds": 1}
NEVER = {"min_speedup": 1e9, "check_batch_sizes": (), "rounds": 1}


def pruned_linear(out_f: int, in_f: int, bias: bool = True, pattern: str = "unstructured",
                  sparsity: float | None = 0.8, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    sf.prune(nn.Sequential(layer), "magnitude", sparsity=sparsity, pattern=pattern)
    return layer


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))


@pytest.mark.parametrize("shape", [(16, 32), (24, 40), (64, 64), (7, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (5,), (33,), (2, 5), (3, 1, 4)])
def test_csr_equals_dense(shape, bias, lead):
    layer = pruned_linear(*shape, bias=bias)
    sparse = SparseLinear.from_dense(layer, "csr")
    assert sparse.crow_indices.dtype == torch.int32 and sparse.col_indices.dtype == torch.int32
    assert sparse.nnz == int(torch.count_nonzero(layer.weight))
    x = torch.randn(*lead, shape[1])
    with torch.no_grad():
        ref, out = layer(x), sparse(x)
    assert out.shape == ref.shape == (*lead, shape[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (9,), (2, 3)])
def test_bsr_equals_dense(block, bias, lead):
    layer = pruned_linear(32, 64, bias=bias, pattern=f"block:{block}", sparsity=0.75)
    assert detect_blocksize(layer.weight) == block
    sparse = SparseLinear.from_dense(layer, "bsr")
    assert sparse.layout == "bsr" and sparse.blocksize == block
    assert sparse.values.shape[1:] == (block, block)
    x = torch.randn(*lead, 64)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-5)


def test_float64_and_to_dense_round_trip():
    layer = pruned_linear(12, 20).double()
    sparse = SparseLinear.from_dense(layer)
    x = torch.randn(4, 20, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x))
        back = sparse.to_dense()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float64
    assert torch.equal(back.weight, layer.weight) and torch.equal(back.bias, layer.bias)


def test_detect_blocksize_and_2to4():
    assert detect_blocksize(pruned_linear(64, 64, sparsity=0.9).weight) is None
    assert detect_blocksize(pruned_linear(64, 64, pattern="block:16", sparsity=0.5).weight) == 16
    assert is_2to4(pruned_linear(8, 16, pattern="2:4", sparsity=None).weight)
    assert not is_2to4(pruned_linear(8, 16, sparsity=0.5).weight)


def test_to_sparse_outputs_equal_dense_model():
    dense = mlp()
    sf.prune(dense, "magnitude", sparsity=0.85)
    model = mlp()
    model.load_state_dict(dense.state_dict())
    report = sf.to_sparse(model, formats=("csr", "bsr"), **ALWAYS)
    assert report.converted == ["0", "2", "4"]
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    for x in (torch.randn(1, 32), torch.randn(17, 32), torch.randn(3, 5, 32)):
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    layer = report.layers[0]
    assert layer.shape == (64, 32) and layer.density == pytest.approx(0.15, abs=0.01)
    assert set(layer.times_ms[1]) == {"dense", "csr"}   # bsr: unstructured zeros have no blocks
    assert "no block structure" not in layer.reason and layer.speedup is not None
    json.dumps(report.to_dict())
    assert "0" in str(report)


def test_to_sparse_keeps_dense_where_asked():
    model = mlp()
    sf.prune(model, "magnitude", sparsity=0.9, target=["0", "2"])    # layer "4" keeps every weight
    report = sf.to_sparse(model, **NEVER)
    assert report.converted == [] and all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    assert all("needs 1e+09" in c.reason for c in report.layers[:2])
    report = sf.to_sparse(model, **ALWAYS)
    assert report.converted == ["0", "2"] and type(model[4]) is nn.Linear
    assert report.layers[2].format == "dense" and report.layers[2].reason == "no zeros"
    assert report.layers[2].times_ms == {}


def test_to_sparse_layers_and_formats():
    model = mlp()
    sf.prune(model, "magnitude", sparsity=0.9)
    report = sf.to_sparse(model, layers=["2"], **ALWAYS)
    assert report.converted == ["2"] and [c.name for c in report.layers] == ["2"]
    model = mlp()
    sf.prune(model, "magnitude", sparsity=0.9)
    report = sf.to_sparse(model, formats=("bsr",), **ALWAYS)         # unstructured: no blocks
    assert report.converted == [] and "no block structure" in report.layers[0].reason
    model = mlp()
    sf.prune(model, "magnitude", sparsity=0.5, pattern="block:8", target=["0", "2"])
    report = sf.to_sparse(model, formats=("bsr",), layers=["0", "2"], **ALWAYS)
    assert report.converted == ["0", "2"] and model[0].layout == "bsr" and model[0].blocksize == 8


def test_state_dict_round_trip_any_nnz():
    a = SparseLinear.from_dense(pruned_linear(16, 32, sparsity=0.9))
    b = SparseLinear.from_dense(nn.Linear(32, 16))                   # fully dense
    assert b.nnz != a.nnz
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    blocky = SparseLinear.from_dense(pruned_linear(16, 32, pattern="block:4", sparsity=0.5), "bsr")
    b.load_state_dict(blocky.state_dict())                           # csr module takes a bsr state
    assert b.layout == "bsr" and b.blocksize == 4
    with torch.no_grad():
        assert torch.equal(b(x), blocky(x))
    nobias = SparseLinear.from_dense(pruned_linear(16, 32, bias=False))
    b.load_state_dict(nobias.state_dict())
    assert b.bias is None
    with pytest.raises(sf.SparseforgeError, match="cannot load a 16x32"):
        SparseLinear.from_dense(nn.Linear(8, 8)).load_state_dict(a.state_dict())


def test_model_state_dict_saves_and_loads():
    model = mlp()
    sf.prune(model, "magnitude", sparsity=0.9)
    sf.to_sparse(model, layers=["0", "4"], **ALWAYS)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    state = model.state_dict()
    assert state["0.crow_indices"].dtype == torch.int32 and "0.weight" not in state and "2.weight" in state
    buf.seek(0)
    fresh = load_sparse_state_dict(mlp(seed=1), torch.load(buf, weights_only=False))
    assert isinstance(fresh[0], SparseLinear) and isinstance(fresh[2], nn.Linear)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bad_input_errors():
    with pytest.raises(sf.SparseforgeError, match="nn.Module"):
        sf.to_sparse("model")
    with pytest.raises(sf.SparseforgeError, match="for a lone nn.Linear use PackedLinear.from_dense"):
        sf.to_sparse(nn.Linear(4, 4))
    with pytest.raises(sf.SparseforgeError, match="unknown sparse format"):
        sf.to_sparse(mlp(), formats=("coo",))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(sf.SparseforgeError, match=r"matches no nn.Linear \(it matches 0, not nn.Linear\)"):
        sf.to_sparse(conv, layers=["0"])
    with pytest.raises(sf.SparseforgeError, match="batch_size must be a positive integer"):
        sf.to_sparse(mlp(), batch_size=0)
    with pytest.raises(sf.SparseforgeError, match="check_batch_sizes entries must be a positive integer"):
        sf.to_sparse(mlp(), check_batch_sizes=(64, 0))
    assert sf.to_sparse(mlp(), check_batch_sizes=64, **{k: v for k, v in NEVER.items() if k != "check_batch_sizes"}
                        ).check_batch_sizes == (64,)
    with pytest.raises(sf.SparseforgeError, match="min_speedup"):
        sf.to_sparse(mlp(), min_speedup=-1)
    with pytest.raises(sf.SparseforgeError, match="takes an nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(1, 4, 3))
    with pytest.raises(sf.SparseforgeError, match="no block structure"):
        SparseLinear.from_dense(pruned_linear(16, 32, sparsity=0.9), "bsr")
    with pytest.raises(sf.SparseforgeError, match="block size dividing"):
        SparseLinear.from_dense(nn.Linear(30, 16), "bsr", blocksize=4)
    with pytest.raises(sf.SparseforgeError, match="layout must be"):
        SparseLinear(4, 4, layout="coo")


def test_2to4_on_cpu_is_skipped_by_to_sparse():
    model = mlp()
    sf.prune(model, "magnitude", pattern="2:4")
    report = sf.to_sparse(model, formats=("2:4",), **ALWAYS)
    assert report.converted == []          # no 2:4 kernel on CPU: not a candidate


def _semi_structured_ok() -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
            and hasattr(torch.sparse, "to_sparse_semi_structured"))


@pytest.mark.skipif(not _semi_structured_ok(),
                    reason="needs a CUDA GPU with semi-structured (2:4) sparsity support (compute capability 8.0+)")
def test_2to4_cuda_equals_dense():
    torch.manual_seed(0)
    layer = nn.Linear(128, 128).cuda().half()
    sf.prune(nn.Sequential(layer), "magnitude", pattern="2:4")
    sparse = SemiStructuredLinear.from_dense(layer)
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), layer(x), rtol=1e-2, atol=1e-2)
    model = nn.Sequential(layer)
    report = sf.to_sparse(model, formats=("2:4",), **ALWAYS)
    assert report.converted == ["0"] and isinstance(model[0], SemiStructuredLinear)


def test_speed_bench_quick_writes_json(tmp_path):
    threads = torch.get_num_threads()
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args(["--threads", "1", "--hidden", "64", "--batch-sizes", "1", "4"])
    args.quick, args.json = True, None
    try:
        result = speed.run(args)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(result))
    data = json.loads(path.read_text())
    assert data["benchmark"] == "speed" and data["quick"] is True and data["threads"] == 1
    assert [r["model"] for r in data["results"]] == ["mlp64", "lenet300", "mlp64-block8"]
    for r in data["results"]:
        assert [b["batch_size"] for b in r["batches"]] == [1, 4]
        for b in r["batches"]:
            assert b["dense_ms"] > 0 and b["sparse_ms"] > 0 and b["max_abs_diff"] < 1e-4
            assert b["speedup"] == pytest.approx(b["dense_ms"] / b["sparse_ms"], rel=1e-2)
        assert len(r["to_sparse"]["layers"]) == 3
    assert "holds" in data["results"][1]


def test_cached_weight_follows_edits_copies_and_conversions():
    import copy

    layer = pruned_linear(8, 12)
    sparse = SparseLinear.from_dense(layer)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x[0]), layer(x[0]))        # 1-D input
        twin = copy.deepcopy(sparse)
        sparse.values.mul_(2)                                        # in place: shows through the cache
        layer.weight.mul_(2)
        torch.testing.assert_close(sparse(x), layer(x))
        assert not torch.allclose(twin(x), layer(x))                 # the copy has its own values
        sparse.double()
        assert sparse(x.double()).dtype == torch.float64
        torch.testing.assert_close(sparse(x.double()), layer.double()(x.double()))
