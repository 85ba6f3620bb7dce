"""The compressed checkpoint format (.sfz): exact round trips, preserved zeros, errors that name the tensor."""

from __future__ import annotations

import warnings

import copy
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparseforge as sf
from sparseforge.kernels.packed import PackedLinear
from sparseforge.cli import main as cli_main
from sparseforge.formats import seal_metadata
from sparseforge.io import sfz
from sparseforge.io.checkpoint import save_checkpoint
from sparseforge.io.sfz import FORMAT_VERSION, is_sfz, pattern_of, read_sfz
from sparseforge.quant import quantization_of, quantize_, quantize_weight
from sparseforge.zoo import build_model

from conftest import build_convnet


def _pruned(name: str = "lenet300", sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name)
    sf.prune(model, sparsity=sparsity)
    return model


def _equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def _tensor_data_span(path: Path, key: str) -> tuple[int, int]:
    """Byte range of a stored tensor's data in a safetensors file (from its header)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start, end = header[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


def _rewrite(path: Path, out: Path, drop: str | None = None, meta_edit=None) -> None:
    """A copy of an sfz file with a part dropped or its metadata edited, its header digest made to match
    (as a writer with a bug would: the file is consistent, its content is wrong)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    if meta_edit:
        meta_edit(meta)
    save_file(tensors, str(out), metadata=seal_metadata(meta, tensors))


def test_fp32_round_trip_is_bit_exact_and_rebuilds_the_zoo_model(tmp_path: Path) -> None:
    for name in ("lenet300", "conv4"):
        model = _pruned(name)
        path = sf.save(model, tmp_path / f"{name}.sfz", values="fp32")
        loaded = sf.load(path)                                    # no model passed: rebuilt from metadata
        assert type(loaded) is type(model) and _equal_states(model, loaded)
        x = torch.randn(8, 1, 28, 28)
        model.eval(), loaded.eval()
        assert torch.equal(model(x), loaded(x))
        info = read_sfz(path)[1]["tensors"]
        assert all(info[k]["encoding"] == "bitmask" for k in info if k.endswith("weight"))
        assert all(info[k]["encoding"] == "raw" for k in info if k.endswith("bias"))


def test_fp16_equals_half_and_int8_equals_dequantized(tmp_path: Path) -> None:
    model = build_convnet(0)
    sf.prune(model, sparsity=0.8)
    sd = model.state_dict()
    fp16 = sf.load(sf.save(model, tmp_path / "a.sfz", values="fp16"), build_convnet(1))
    int8 = sf.load(sf.save(model, tmp_path / "b.sfz", values="int8"), build_convnet(1))
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for k, v in fp16.state_dict().items():
        assert v.dtype == sd[k].dtype
        want = sd[k].half().float() if k in weights else sd[k]     # other tensors stored as they are
        assert torch.equal(v, want), k
        assert torch.equal(int8.state_dict()[k], quantize_weight(sd[k], 8).dequantize() if k in weights else sd[k]), k
        assert torch.equal(v != 0, sd[k] != 0), k                  # zeros exact, nonzero count exact
        assert torch.equal(int8.state_dict()[k] != 0, sd[k] != 0), k
    assert sf.report(int8).layer_nonzeros == sf.report(model).layer_nonzeros


@pytest.mark.parametrize("scheme,group", [("int4", None), ("int4", 4), ("int8", 2)])
def test_quantized_model_stored_exactly_and_resaved_identically(tmp_path: Path, scheme: str, group) -> None:
    model = _pruned("lenet300", 0.9)
    quantize_(model, scheme, group_size=group)
    p1 = sf.save(model, tmp_path / "q1.sfz", values="int8")
    loaded = sf.load(p1)
    assert _equal_states(model, loaded)                           # exactly the fake-quantized weights
    qt = quantization_of(loaded.fc1)
    assert qt is not None and qt.bits == int(scheme[3:]) and qt.group_size == group
    info = read_sfz(p1)[1]["tensors"]["fc1.weight"]
    assert info["values"] == scheme and info["quant"] == {"bits": qt.bits, "group_size": group, "scheme": "rtn-symmetric"}
    if scheme == "int4":                                          # packed two per byte
        with safe_open(str(p1), framework="pt") as f:
            assert f.get_tensor("fc1.weight#values").numel() == (info["nnz"] + 1) // 2
    p2 = sf.save(loaded, tmp_path / "q2.sfz", values="int8")
    # Same parts, byte for byte (per-part SHA-256), and same metadata; safetensors orders the
    # header's metadata keys differently from one write to the next, so the files are compared so.
    assert read_sfz(p1)[1]["tensors"] == read_sfz(p2)[1]["tensors"]


class _One(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.layer = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 40)),
                    st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))),
    density=st.floats(0.0, 1.0), values=st.sampled_from(["fp32", "fp16", "bf16", "int8", "int4"]),
    seed=st.integers(0, 999),
)
def test_random_shapes_and_densities_round_trip(tmp_path: Path, shape, density, values, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    model = _One(shape)
    with torch.no_grad():
        w = model.layer.weight
        w.copy_(torch.randn(w.shape, generator=g) * (torch.rand(w.shape, generator=g) < density))
    path = sf.save(model, tmp_path / "r.sfz", values=values)
    loaded = sf.load(path, _One(shape))
    got, want = loaded.layer.weight, model.layer.weight
    assert bool((got[want == 0] == 0).all())  # a pruned weight stays pruned
    if values == "fp32":
        assert torch.equal(got, want)
    elif values in ("fp16", "bf16"):
        assert torch.equal(got, want.to(torch.float16 if values == "fp16" else torch.bfloat16).float())
    else:
        assert torch.equal(got, quantize_weight(want, int(values[3:])).dequantize())
    assert torch.equal(loaded.layer.bias, model.layer.bias)
    # The bitmask is used exactly when it makes the tensor smaller.
    info = read_sfz(path)[1]["tensors"]["layer.weight"]
    vbits = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}[values]
    n, nnz = want.numel(), int(got.count_nonzero())  # quantizing may round small kept weights to 0
    assert info["nnz"] == nnz
    assert (info["encoding"] == "bitmask") == ((n + 7) // 8 + -(-nnz * vbits // 8) < -(-n * vbits // 8))
    # Loading packed: bitmask Linear weights run packed on the very same weight; the rest stay as they are.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "stay dense": checked in tests/test_packed_kernels.py
        packed = sf.load(path, _One(shape), packed=True)
    if info["encoding"] == "bitmask" and values != "int4" and len(shape) == 2:
        assert isinstance(packed.layer, PackedLinear) and torch.equal(packed.layer.weight, got)
    else:
        assert torch.equal(packed.layer.weight, got)


def test_sizes_and_patterns(tmp_path: Path) -> None:
    model = _pruned("lenet300", 0.9)
    dense = save_checkpoint(model, tmp_path / "d.safetensors").stat().st_size
    fp16 = sf.save(model, tmp_path / "m.sfz").stat().st_size       # default values: fp16
    assert fp16 < 0.1 * dense                                     # 1 bit + 10% x 16 bits per weight, vs 32 bits
    assert read_sfz(tmp_path / "m.sfz")[1]["tensors"]["fc1.weight"]["values"] == "fp16"
    dense_model = build_model("lenet300")
    info = read_sfz(sf.save(dense_model, tmp_path / "dense.sfz", values="fp32"))[1]["tensors"]["fc1.weight"]
    assert info["encoding"] == "dense" and info["pattern"] == "dense"
    nm = build_model("lenet300")
    sf.prune(nm, pattern="2:4")
    assert pattern_of(nm.fc1.weight) == "2:4" and pattern_of(model.fc1.weight) == "unstructured"
    ch = build_convnet(0)
    sf.prune(ch, sparsity=0.5, pattern="channel")
    assert pattern_of(ch[0].weight) == "channel"


def test_corrupted_byte_names_the_tensor(tmp_path: Path) -> None:
    path = sf.save(_pruned(), tmp_path / "m.sfz")
    start, end = _tensor_data_span(path, "fc2.weight#values")
    raw = bytearray(path.read_bytes())
    raw[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(sf.SparseforgeError, match=r"corrupted: tensor 'fc2.weight' \(part 'fc2.weight#values'\)"):
        sf.load(path)


def test_truncated_missing_newer_and_wrong_files(tmp_path: Path) -> None:
    path = sf.save(_pruned(), tmp_path / "m.sfz")
    data = path.read_bytes()
    cut = tmp_path / "cut.sfz"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(sf.SparseforgeError, match="not a readable sfz file"):
        sf.load(cut)
    missing = tmp_path / "missing.sfz"
    _rewrite(path, missing, drop="fc1.weight#mask")
    with pytest.raises(sf.SparseforgeError, match=r"missing part 'fc1.weight#mask' of tensor 'fc1.weight'"):
        sf.load(missing)
    newer = tmp_path / "newer.sfz"
    _rewrite(path, newer, meta_edit=lambda m: m.update(format_version=str(FORMAT_VERSION + 1)))
    with pytest.raises(sf.SparseforgeError, match=rf"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}: upgrade sparseforge"):
        sf.load(newer)
    assert is_sfz(newer) and not is_sfz(tmp_path / "nothing.sfz")
    plain = save_checkpoint(_pruned(), tmp_path / "plain.safetensors")
    assert not is_sfz(plain)
    # the sfz reader refuses a checkpoint; sf.load reads every format, and refuses it only when told it is sfz
    with pytest.raises(sf.SparseforgeError, match="not an sfz file: a plain sparseforge checkpoint"):
        sfz.load(plain)
    with pytest.raises(sf.SparseforgeError, match="is a plain sparseforge checkpoint .*, not an sfz file"):
        sf.load(plain, format="sfz")
    assert torch.equal(sf.load(plain).fc1.weight, _pruned().fc1.weight)
    text = tmp_path / "text.sfz"
    text.write_text("hello, not safetensors")
    with pytest.raises(sf.SparseforgeError, match="not a readable sfz file"):
        sf.load(text)
    with pytest.raises(sf.SparseforgeError, match="does not exist"):
        sf.load(tmp_path / "absent.sfz")
    with pytest.raises(sf.SparseforgeError, match="does not fit the model"):
        sf.load(path, build_model("conv4"))
    with pytest.raises(sf.SparseforgeError, match="values must be one of"):
        sf.save(_pruned(), tmp_path / "x.sfz", values="fp8")


def test_failed_save_leaves_the_old_file(tmp_path: Path) -> None:
    model = _pruned()
    path = sf.save(model, tmp_path / "m.sfz", values="int8")
    before = path.read_bytes()
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.fc2.weight[0, 0] = float("nan")
    with pytest.raises(sf.SparseforgeError, match="fc2.weight has NaN"):
        sf.save(bad, path, values="int8")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.sfz"]


def test_checksums_are_of_the_stored_bytes(tmp_path: Path) -> None:
    path = sf.save(_pruned(), tmp_path / "m.sfz")
    tensors = read_sfz(path)[1]["tensors"]
    raw = path.read_bytes()
    for name, info in tensors.items():
        for part, digest in info["sha256"].items():
            start, end = _tensor_data_span(path, part)
            assert hashlib.sha256(raw[start:end]).hexdigest() == digest, part


def test_cli_export_quantize_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save_checkpoint(_pruned("lenet300", 0.9), tmp_path / "p.safetensors")
    out = tmp_path / "m.sfz"
    assert cli_main(["export", str(src), "--out", str(out), "--values", "fp32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _equal_states(sf.load(out), sf.load_checkpoint(src)[0])
    back = tmp_path / "back.safetensors"
    assert cli_main(["export", str(out), "--out", str(back), "--format", "safetensors"]) == 0
    assert _equal_states(sf.load_checkpoint(back)[0], sf.load(out))
    capsys.readouterr()
    assert cli_main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["format"] == "sfz" and rep["layer_nonzeros"] == 26620 and rep["arch"] == "lenet300"
    assert rep["tensors"]["fc1.weight"]["encoding"] == "bitmask" and rep["file_bytes"] == out.stat().st_size
    # Detected by its metadata, whatever the name.
    renamed = tmp_path / "m.bin"
    renamed.write_bytes(out.read_bytes())
    assert cli_main(["inspect", str(renamed)]) == 0
    text = capsys.readouterr().out
    assert "bitmask" in text and "fc1.weight" in text and "90.00%" in text
    q = tmp_path / "q.sfz"
    assert cli_main(["quantize", str(src), "--out", str(q), "--scheme", "int4", "--group-size", "4"]) == 0
    capsys.readouterr()
    qm = sf.load(q)
    assert quantization_of(qm.fc2).bits == 4 and quantization_of(qm.fc2).group_size == 4
    assert sf.report(qm).layer_nonzeros == 26620
    # argparse names the valid schemes, in one line
    assert cli_main(["quantize", str(src), "--out", str(tmp_path / "g.sfz"), "--scheme", "gptq-int3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparseforge: error: ") and "invalid choice" in err
    assert cli_main(["quantize", str(src), "--out", str(tmp_path / "g.sfz"), "--scheme", "int4", "--group-size"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not divisible by group_size 128" in err
    assert cli_main(["inspect", str(tmp_path / "absent.sfz")]) == 2


def test_size_bench_quick_writes_json(tmp_path: Path) -> None:
    from sparseforge.bench.__main__ import main as bench_main

    out = tmp_path / "size.json"
    assert bench_main(["size", "--quick", "--size", "128", "--models", "lenet300", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "size" and [r["subject"] for r in data["results"]] == ["matrix128", "lenet300"]
    for r in data["results"]:
        b = r["bytes"]
        assert b["sfz_int8"] < b["sfz_fp16"] < b["sfz_fp32"] < b["dense_safetensors_fp32"]
        # No file beats the entropy bound, and the sfz files stay near it at 90% sparsity.
        assert all(ratio >= 1.0 for ratio in r["ratio_to_bound"].values())
        assert r["ratio_to_bound"]["sfz_fp32"] < 1.3
        assert abs(r["weight_density"] - 0.1) < 0.01
    assert set(data["results"][0]["targets"]) == {"sfz_fp16", "sfz_int8"}


def test_readme_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "quantize_(" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md[sfz]", "exec"), namespace)
    assert _equal_states(namespace["model"], namespace["loaded"])
    assert (tmp_path / "lenet300-int4.sfz").stat().st_size < 60_000   # "about 53 KB"


def test_compacted_model_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("conv4")
    sf.prune_channels(model, "l1", sparsity=0.5)
    sf.compact(model)
    sf.prune(model, sparsity=0.5)
    loaded = sf.load(sf.save(model, tmp_path / "c.sfz", values="fp32"))   # rebuilt at the compacted sizes
    assert _equal_states(model, loaded)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in build_model("conv4").parameters()) / 2


def test_the_export_alias_warns_and_names_the_same_objects() -> None:
    """sparseforge.export (split into io, compact, kernels) still imports, with a DeprecationWarning, and its
    names are the new modules' objects, not copies; plain `import sparseforge` does not import it."""
    import importlib
    import subprocess
    import sys

    sys.modules.pop("sparseforge.export", None)
    with pytest.warns(DeprecationWarning, match="sparseforge.export is deprecated"):
        export = importlib.import_module("sparseforge.export")
    assert export.save_checkpoint is sf.save_checkpoint and export.compact is sf.compact
    assert export.to_sparse is sf.to_sparse and export.load is sf.load
    assert sf.export is export
    code = "import sys, sparseforge; print('sparseforge.export' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
