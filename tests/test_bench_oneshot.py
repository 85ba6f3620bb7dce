"""Quick mode of the one-shot transformer benchmark: it runs end to end and writes well-formed JSON.

Quick mode checks the code path (MiniLM with a few calibration windows and
texts, a tiny causal LM trained for ten steps); the claims are checked by the
full run in bench/results/oneshot.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from sparseforge.bench.__main__ import main as bench_main  # noqa: E402
from sparseforge.zoo.text import DEFAULT_FORTUNES_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not Path(DEFAULT_FORTUNES_DIR).is_dir(),
                                reason=f"fortune files not installed in {DEFAULT_FORTUNES_DIR} (apt-get install fortunes)")


def test_oneshot_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "oneshot.json"
    assert bench_main(["oneshot", "--quick", "--threads", "2", "--eval-texts", "16", "--probe-texts", "60",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "oneshot" and result["quick"] is True
    for key, metric in (("minilm", "mean_cosine"), ("causal-lm", "perplexity")):
        rows = result["models"][key]["rows"]
        dense = rows[0]
        assert dense["method"] == "dense"
        pruned = [r for r in rows if r["method"] in ("magnitude", "wanda", "sparsegpt")]
        assert {(r["config"], r["method"]) for r in pruned} == {
            (c, m) for c in ("50%", "2:4") for m in ("magnitude", "wanda", "sparsegpt")}
        for r in pruned:
            assert r["achieved"] == 0.5 and math.isfinite(r[metric])
            if key == "minilm":
                assert 0.0 < r["mean_cosine"] < 1.0 and 0.0 <= r["probe_accuracy"] <= 100.0
            else:
                assert r["perplexity"] > 1.0
        learned = [r for r in rows if r["method"].startswith("maskllm")]
        assert [r["prior"] for r in learned] == ["magnitude", "sparsegpt"]
        for r in learned:
            assert r["achieved"] == 0.5 and r["steps"] == 3 and math.isfinite(r[metric])
        curve = result["models"][key]["essential_sparsity"]
        assert set(curve["curve"]) == {"0.3", "0.6"}
    assert dense["perplexity"] > 1.0
    assert result["models"]["minilm"]["rows"][0]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert {t["method"] for t in result["timing"]} == {"wanda", "sparsegpt"}
    for t in result["timing"]:
        assert t["process_seconds"] > t["seconds"] > 0 and t["peak_rss_mib"] >= t["rss_before_mib"] > 100
