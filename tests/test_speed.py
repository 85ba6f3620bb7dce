"""sparseforge.speed and `sparseforge speed`: the paths of a model, their table and JSON (structure, not times)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sparseforge.errors import SparseforgeError

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'sparseforge[hf]')")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # the CLI picks threads from OMP_NUM_THREADS; one thread keeps a shared machine's timings from stalling
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparseforge.oneshot import prune
    from sparseforge.speed import linear_layers

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    prune(model, "magnitude", sparsity=0.5, target=linear_layers(model))
    return model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    out = tmp_path_factory.mktemp("speed") / "llama"
    _tiny_llama().save_pretrained(out)
    return out


@needs_transformers
def test_speed_cli_table_and_json(llama_dir: Path, tmp_path: Path, capsys) -> None:
    from sparseforge.cli import main
    from sparseforge.kernels.choose import DENSE_PATHS
    from sparseforge.speed import path_names

    out = tmp_path / "speed.json"
    assert main(["speed", str(llama_dir), "--tokens", "4", "--batch", "1,2", "--seq-len", "8", "--rounds", "1",
                 "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [r["path"] for r in result["paths"]]
    assert names == list(path_names("int8"))
    table = [ln.split()[0] for ln in printed.splitlines() if ln.split() and ln.split()[0] in names]
    assert names == [n for n in table if n in names][:len(names)]
    assert result["workload"]["tokens"] == 4 and result["workload"]["batch_sizes"] == [1, 2]
    assert set(result["best_dense"]) == {"decode", "1", "2"} and set(result["best_dense"].values()) <= set(DENSE_PATHS)
    rows = {r["path"]: r for r in result["paths"]}
    for r in rows.values():
        assert r["decode"]["tokens_per_s"] > 0 and r["decode"]["ms_per_token"] > 0
        assert set(r["forward"]) == {"1", "2"} and all(f["ms"] > 0 for f in r["forward"].values())
        assert r["memory"]["estimate_bytes"] == r["weight_bytes"] + r["memory"]["kv_cache_bytes"] > r["weight_bytes"]
    # the best dense path is 1.00x of itself, at every workload
    for key, best in result["best_dense"].items():
        ratio = rows[best]["decode" if key == "decode" else "forward"]
        assert (ratio["vs_best_dense"] if key == "decode" else ratio[key]["vs_best_dense"]) == 1.0
    # bytes follow the formats: half the weights zero, so packed bf16 reads less than dense bf16, which reads half fp32
    assert rows["packed-bf16"]["bytes_per_token"] < rows["dense-bf16"]["bytes_per_token"]
    assert rows["dense-bf16"]["bytes_per_token"] * 2 == rows["dense"]["bytes_per_token"]
    assert rows["packed-int8"]["bytes_per_token"] < rows["packed-bf16"]["bytes_per_token"]
    assert result["to_sparse"]["precision"] == "int8"


@needs_transformers
def test_speed_precision_limits_the_paths(llama_dir: Path) -> None:
    from sparseforge.speed import Workload, load_model, measure_speed

    rep = measure_speed(load_model(str(llama_dir)), precision="exact",
                        workload=Workload(batch_sizes=(1,), tokens=0, seq_len=4, rounds=1))
    assert [r["path"] for r in rep.rows] == ["dense", "packed-fp32", "to_sparse"]
    assert rep.best_dense == {"1": "dense"}
    assert "decode" not in rep.rows[0]


@needs_transformers
def test_packed_fp32_path_generates_the_masked_models_tokens() -> None:
    from sparseforge.speed import build_path, generate

    model = _tiny_llama(seed=1)
    packed = build_path(model, "packed-fp32")
    assert packed.module is not model and packed.description.startswith("14 Linear packed")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, ids, 6), generate(packed.module, ids, 6))
    assert type(build_path(model, "packed-int8").module.lm_head).__name__ == "Int8Linear"
    assert build_path(model, "packed-bf16").module.lm_head.weight.dtype == torch.bfloat16


@needs_transformers
def test_speed_cli_refuses_tokens_for_a_model_that_does_not_generate(tmp_path: Path, capsys) -> None:
    from sparseforge.architectures import build
    from sparseforge.cli import main
    from sparseforge.io.checkpoint import save_checkpoint

    path = tmp_path / "lenet.safetensors"
    save_checkpoint(build("lenet300"), str(path), arch="lenet300", arch_kwargs={})
    assert main(["speed", str(path), "--tokens", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "causal LM" in err and "tokens=4" in err


def test_measure_speed_errors_name_the_problem() -> None:
    from sparseforge.speed import Workload, measure_speed

    convs = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(SparseforgeError, match="no nn.Linear"):
        measure_speed(convs, workload=Workload(batch_sizes=(1,), input_shape=(1, 8, 8), rounds=1))
    conv_then_linear = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 4))
    with pytest.raises(SparseforgeError, match="input shape"):
        measure_speed(conv_then_linear, workload=Workload(batch_sizes=(1,), rounds=1))
    with pytest.raises(SparseforgeError, match="precision"):
        measure_speed(nn.Sequential(nn.Linear(8, 8)), precision="fp16")


def test_measure_speed_on_a_plain_module() -> None:
    from sparseforge.speed import Workload, measure_speed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    rep = measure_speed(model, precision="bf16", workload=Workload(batch_sizes=(1, 4), rounds=1))
    assert [r["path"] for r in rep.rows] == ["dense", "dense-bf16", "packed-fp32", "packed-bf16", "to_sparse"]
    assert rep.inputs == "random inputs of shape [32]"
    assert "dense-bf16" in str(rep) and "x best" in str(rep)


def test_apply_choices_rebuilds_what_to_sparse_chose() -> None:
    from sparseforge.kernels.choose import apply_choices, to_sparse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight[torch.rand(64, 64) < 0.9] = 0
    chosen = copy.deepcopy(model)
    rep = to_sparse(chosen, precision="bf16", check_batch_sizes=(), rounds=1, min_speedup=1e-9)  # any path qualifies
    again = copy.deepcopy(model)
    swapped = apply_choices(again, json.loads(json.dumps(rep.to_dict()))["layers"])
    assert "0" in rep.converted and swapped == rep.converted
    assert [type(m).__name__ for m in again] == [type(m).__name__ for m in chosen]
    x = torch.randn(3, 64)
    assert torch.equal(again(x), chosen(x))
    with pytest.raises(SparseforgeError, match="no layer"):
        apply_choices(again, [{"name": "nope", "format": "packed-bf16"}])


@needs_transformers
def test_peak_rss_of_a_path_in_a_fresh_process(llama_dir: Path) -> None:
    from sparseforge.speed import Workload, measure_peak_rss

    mem = measure_peak_rss("sparseforge.speed:load_model", "packed-bf16",
                           Workload(batch_sizes=(1,), tokens=2, seq_len=4, prompt_len=4, rounds=1),
                           loader_kwargs={"path": str(llama_dir)}, threads=1)
    assert mem["peak_rss_bytes"] >= mem["resident_rss_bytes"] >= mem["baseline_rss_bytes"] > 0
    with pytest.raises(SparseforgeError, match="packed-bf16"):
        measure_peak_rss("sparseforge.speed:load_model", "packed-bf16", Workload(rounds=1),
                         loader_kwargs={"path": str(llama_dir / "missing")}, threads=1)
