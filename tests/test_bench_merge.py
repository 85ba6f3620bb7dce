"""Quick modes of the merging benchmarks (rebasin, sparse-soups): they run end to end and their JSON holds together.

Quick mode checks the code path on 1024 training and 500 test examples and one
epoch; the claims are for the full runs (bench/results/rebasin.json,
bench/results/sparse-soups.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparseforge.bench.__main__ import main as bench_main
from sparseforge.zoo.data import DEFAULT_DATA_DIR

pytestmark = pytest.mark.skipif(not Path(DEFAULT_DATA_DIR).is_dir(), reason="Fashion-MNIST not installed")


def test_rebasin_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "rebasin.json"
    assert bench_main(["rebasin", "--quick", "--threads", "1", "--models", "lenet300", "conv4",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "rebasin" and r["quick"] is True
    assert Path(r["plot"]).is_file() and Path(r["plot"]).stat().st_size > 1000
    assert [b["model"] for b in r["models"]] == ["lenet300", "conv4"]
    for block in r["models"]:
        pair = block["pairs"][0]
        for key in ("naive", "matched"):
            path = pair[key]["path"]
            assert [p["alpha"] for p in path] == r["settings"]["alphas"] == [0.0, 0.5, 1.0]
            assert pair[key]["barrier"] >= 0.0  # the ends are on the path, so never below 0
        # Both paths start at A, and pi(B) scores as B does: only the middle may differ.
        assert pair["naive"]["path"][0] == pair["matched"]["path"][0]
        assert pair["end_loss_gap"] < 1e-4
        assert pair["units_moved"] > 0  # independent models are not aligned already
        expected = 100.0 * (1.0 - block["matched"]["mean"] / block["naive"]["mean"])
        assert block["reduction_percent"] == pytest.approx(expected)


def test_sparse_soups_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "soups.json"
    assert bench_main(["sparse-soups", "--quick", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "sparse-soups" and r["quick"] is True
    assert [c["sparsity"] for c in r["cycles"]] == [0.5, 0.8, 0.9]
    for cycle in r["runs"][0]["cycles"]:
        # Exact sparsity and the ingredients' shared mask are properties, whatever the accuracy.
        assert cycle["exact_sparsity"] and cycle["mask_equal"]
        assert cycle["soup_sparsity"] == pytest.approx(cycle["sparsity"], abs=1e-5)
        assert len(cycle["ingredients"]) == 3 and len(set(cycle["seeds"])) == 3
        accs = [m["test_accuracy"] for m in cycle["ingredients"]]
        assert cycle["ingredient_min"] == min(accs) <= cycle["ingredient_mean"] <= max(accs) == cycle["ingredient_max"]
        assert all(abs(m["sparsity"] - cycle["sparsity"]) < 1e-4 for m in cycle["ingredients"])
        assert 0.0 <= cycle["imp"]["test_accuracy"] <= 100.0
    assert {c["sparsity"] for c in r["claims"]} == {0.8, 0.9}
