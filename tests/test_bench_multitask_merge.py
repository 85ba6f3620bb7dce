"""Quick mode of the multi-task merging benchmark: it runs end to end and its JSON holds together.

The claims are for the full run (bench/results/multitask-merge.json); this
checks the code path on 1000 training examples per task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparseforge.bench.__main__ import main as bench_main
from sparseforge.bench.multitask_merge import LAMBDAS, TASKS, Task, task_data
from sparseforge.zoo.data import DEFAULT_DATA_DIR

needs_data = pytest.mark.skipif(
    not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST is not installed"
)


@needs_data
def test_task_data_relabels_and_holds_out_validation():
    train, val, test = task_data(Task("footwear", (5, 7, 9)), None, 0, 600, 90)
    ys = torch.cat([y for _, y in train] + [y for _, y in val])
    assert len(ys) == 600 and set(ys.tolist()) == {0, 1, 2}
    assert len(val.x) == 60 and len(test.x) == 90
    rot, _, _ = task_data(Task("rot90", tuple(range(10)), "rot90"), None, 0, 50, 10)
    plain, _, _ = task_data(Task("all", tuple(range(10))), None, 0, 50, 10)
    # Same examples in the same split order, the images turned by 90 degrees.
    assert torch.equal(torch.rot90(plain.x, 1, dims=(2, 3)), rot.x)


@needs_data
def test_multitask_merge_quick(tmp_path):
    out = tmp_path / "mtm.json"
    assert bench_main(["multitask-merge", "--quick", "--limit-train", "1000", "--limit-test", "300",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    methods = r["methods"]
    assert {"individual", "weight averaging", "task arithmetic", "Fisher", "RegMean (alpha 0.9)",
            "TALL masks (per-task)", "consensus TA (k=2)"} <= set(methods)
    assert any(m.startswith("TIES") for m in methods) and any(m.startswith("DARE") for m in methods)
    seed = r["per_seed"][0]
    individual = seed["individual"]["accuracy"]
    for task, acc in zip(TASKS, individual):  # fine-tuning learned each task
        assert acc > 100.0 / len(task.classes) + 15, (task.name, acc)
    for name, row in seed.items():
        assert len(row["accuracy"]) == len(TASKS) and all(0 <= a <= 100 for a in row["accuracy"])
        assert row["normalized"] == pytest.approx([100 * a / i for a, i in zip(row["accuracy"], individual)])
        if "lambda" in row:
            assert row["lambda"] in LAMBDAS
    storage = methods["TALL masks (per-task)"]["storage"]
    # 4 tasks: base + merged vector (2 x 32 bits) + 4 one-bit masks per weight, against 4 x 32 bits.
    assert storage["num_tasks"] == 4 and storage["ratio"] == pytest.approx(68 / 128, rel=1e-3)
