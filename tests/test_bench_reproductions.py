"""Quick mode of the GMP and sparse-training reproductions: they run and write well-formed JSON.

Quick mode checks the code path only (one seed, one short epoch on a slice of
Fashion-MNIST); the claims are checked by the full runs in bench/results/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sparseforge.bench.__main__ import main as bench_main
from sparseforge.zoo.data import DEFAULT_DATA_DIR

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
SLICE = ["--limit-train", "512", "--limit-test", "256", "--threads", "1"]


def _accuracy(value: float) -> bool:
    return 0.0 <= value <= 100.0 and not math.isnan(value)


def test_gmp_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "gmp.json"
    assert bench_main(["gmp", "--quick", *SLICE, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gmp" and result["quick"] is True
    assert [r["sparsity"] for r in result["summary"]] == ["90%", "95%"]
    for row in result["summary"]:
        assert _accuracy(row["dense_mean"]) and _accuracy(row["gmp_mean"])
        assert row["drop"] == pytest.approx(row["dense_mean"] - row["gmp_mean"])
        assert row["holds"] in ("yes", "no")
    by_config = {r["config"]: r for r in result["runs"]}
    assert set(by_config) == {"dense", "gmp-0.9", "gmp-0.95"}
    # GMP's final model is at its target sparsity (over the targeted weights), dense stays dense.
    assert by_config["dense"]["sparsity"] == 0.0
    assert by_config["gmp-0.9"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert by_config["gmp-0.95"]["sparsity"] == pytest.approx(0.95, abs=1e-3)


def test_sparse_training_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "sparse-training.json"
    assert bench_main(["sparse-training", "--quick", *SLICE, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "sparse-training" and result["quick"] is True
    assert result["settings"]["sparsities"] == [0.9]
    (row,) = result["summary"]
    assert set(row["accuracy"]) == {"static-uniform", "static-erk", "set", "rigl"}
    assert all(_accuracy(s["mean"]) for s in row["accuracy"].values())
    assert set(row["checks"]) == {"rigl>=set", "set>=static-erk", "erk>=uniform"}
    for run in result["runs"]:
        expected = 0.0 if run["method"] == "dense" else 0.9
        # sparse training holds its sparsity from the first step to the last
        assert run["sparsity"] == pytest.approx(expected, abs=2e-3), run["method"]
