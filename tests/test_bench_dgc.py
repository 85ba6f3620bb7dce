"""Quick mode of the DGC benchmark: two gloo ranks train every variant and the JSON holds together.

Quick mode checks the code path (2 short epochs on 512 examples); the claim is
checked by the full run (bench/results/dgc.json). The byte counts do not depend
on the data, so they are checked exactly here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist

from sparseforge.bench.__main__ import main as bench_main
from sparseforge.zoo.data import DEFAULT_DATA_DIR

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
                       reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"),
]

LENET_PARAMS = (784 * 300, 300, 300 * 100, 100, 100 * 10, 10)
LENET_ENTRIES = sum(LENET_PARAMS)


def test_dgc_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "dgc.json"
    assert bench_main(["dgc", "--quick", "--limit-train", "512", "--limit-test", "256", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "dgc" and r["quick"] is True and r["holds"] in (True, False)
    s = {row["variant"]: row for row in r["summary"]}
    assert list(s) == ["allreduce", "dgc-1%", "dgc-0.1%", "powersgd-r2"]
    dense = 4 * LENET_ENTRIES
    assert r["settings"]["dense_bytes_per_step"] == dense
    for row in s.values():
        assert 0.0 <= row["accuracy"]["mean"] <= 100.0 and row["seconds"] > 0
        assert row["ranks_identical"], row["variant"]  # every rank applies the same averaged update
    assert s["allreduce"]["ratio"] == 1.0 and s["allreduce"]["accuracy_minus_allreduce"] == 0.0
    # After warm-up DGC sends at most k = ceil(d * n) entries of 8 bytes per parameter tensor of n
    # entries, and an 8-byte count per bucket (LeNet-300-100 fits in one), per step.
    for name, density in (("dgc-1%", 0.01), ("dgc-0.1%", 0.001)):
        bound = dense / (8 * sum(math.ceil(density * n) for n in LENET_PARAMS) + 8)
        assert s[name]["ratio_after_warmup"] >= bound * (1 - 1e-9), name
        # ... and during the warm-up much more, so the whole run compresses less
        assert 1.0 < s[name]["ratio"] < s[name]["ratio_after_warmup"]
    assert s["dgc-0.1%"]["ratio_after_warmup"] > 5 * s["dgc-1%"]["ratio_after_warmup"]
    # PowerSGD rank 2: P and Q of the three weight matrices (r = 2), the biases whole.
    powersgd = (784 + 300) * 2 + (300 + 100) * 2 + (100 + 10) * 2 + 300 + 100 + 10
    assert s["powersgd-r2"]["ratio_after_warmup"] == pytest.approx(LENET_ENTRIES / powersgd)
    for run in r["runs"]:
        assert run["steps"] == 8 and run["stats"]["steps"] == 8
