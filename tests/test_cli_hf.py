"""The CLI on Hugging Face models: ``prune`` with calibration text, ``quantize``, ``export --format hf``.

A tiny LLaMA-style causal LM (with a byte-level BPE tokenizer trained on
fortunes) is saved with ``save_pretrained`` and pruned through ``main()``;
the real all-MiniLM-L6-v2 encoder is pruned once too. Checks: exact N:M
counts in every targeted layer, embeddings/norms/LM head untouched, the
output folder and the .sfz file rebuild the model without code, the CLI's
result equals the Python API's, and bad input gets one clear line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from sparseforge.cli import main  # noqa: E402
from sparseforge.zoo.text import DEFAULT_FORTUNES_DIR  # noqa: E402

if not Path(DEFAULT_FORTUNES_DIR).is_dir():
    pytest.skip(f"fortune files not installed in {DEFAULT_FORTUNES_DIR} (apt-get install fortunes)",
                allow_module_level=True)

SMALL = ["--samples", "8", "--seq-len", "32", "--eval-texts", "32"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from sparseforge.io.hf import save_pretrained
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model, train_tokenizer
    from sparseforge.zoo.text import fortunes

    tokenizer = train_tokenizer(fortunes().calibration[:1500], vocab_size=TINY_CONFIG.vocab_size)
    model = build_model(TINY_CONFIG, tokenizer)
    return save_pretrained(model, tmp_path_factory.mktemp("lm") / "tiny-llama", tokenizer)


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_prune_sparsegpt_2of4_writes_a_loadable_folder(lm_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "pruned"
    result = run_json(capsys, "prune", str(lm_dir), "--method", "sparsegpt", "--pattern", "2:4", *SMALL, "--out", str(out))
    q = result["quality"]
    assert q["dense"]["perplexity"] > 1 and q["pruned"]["perplexity"] > 1 and q["pruned"]["texts"] == 32
    dense = AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True)
    pruned = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert sorted(result["layers"]) == sorted(n for n in linear_weights(pruned) if n.startswith("model.layers."))
    for name, w in linear_weights(pruned).items():
        if name in result["layers"]:
            assert torch.equal((w.reshape(w.shape[0], -1, 4) != 0).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))
    before = dense.state_dict()
    for key, value in pruned.state_dict().items():  # embeddings, norms and the LM head stay as they were
        if not any(key == f"{n}.weight" for n in result["layers"]):
            assert torch.equal(value, before[key]), key
    assert json.loads((out / "sparseforge.json").read_text())["method"] == "sparsegpt"


def test_prune_to_sfz_equals_the_python_api_and_rebuilds_without_code(lm_dir, tmp_path, capsys):
    import sparseforge as sf
    from sparseforge.io.hf import load_pretrained
    from sparseforge.zoo.text import calibration_batches, read_texts, split_texts

    out = tmp_path / "pruned.sfz"
    run_json(capsys, "prune", str(lm_dir), "--method", "wanda", "--sparsity", "0.5", *SMALL, "--out", str(out))
    loaded = sf.load(out)  # no model given: class and config come from the file
    model, tokenizer = load_pretrained(lm_dir)
    batches = calibration_batches(tokenizer, split_texts(read_texts()).calibration, 8, 32, seed=0)
    sf.prune(model, "wanda", 0.5, calibration=batches)
    assert type(loaded) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_owl_allocation_from_the_cli(lm_dir, tmp_path, capsys):
    result = run_json(capsys, "prune", str(lm_dir), "--method", "wanda", "--sparsity", "0.7", "--allocation", "owl",
                      *SMALL, "--out", str(tmp_path / "owl"))
    per_block = {n.split(".")[2]: v["sparsity"] for n, v in result["layers"].items()}
    assert len(per_block) == 2 and sum(per_block.values()) / 2 == pytest.approx(0.7)
    assert max(per_block.values()) - min(per_block.values()) == pytest.approx(0.16)


def test_clear_errors(lm_dir, tmp_path, capsys):
    assert main(["prune", str(tmp_path / "missing"), "--method", "wanda", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prune", str(lm_dir), "--pattern", "3:7", *SMALL, "--out", str(tmp_path / "o")]) == 2
    assert "not divisible by M=7" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("".join(f"Sentence number {i}.\n\n" for i in range(30)))
    assert main(["prune", str(lm_dir), "--calibration", str(short), *SMALL, "--samples", "64",
                 "--out", str(tmp_path / "o")]) == 2
    assert "calibration text too short" in capsys.readouterr().err
    assert main(["prune", str(lm_dir), "--method", "maskllm", *SMALL, "--out", str(tmp_path / "o")]) == 2
    assert "pass --pattern 2:4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_quantize_and_export_hf_models(lm_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    q = tmp_path / "q.sfz"
    assert main(["quantize", str(lm_dir), "--scheme", "gptq-int4", "--group-size", "16", *SMALL, "--out", str(q)]) == 0
    assert "perplexity dense" in capsys.readouterr().out
    exported = tmp_path / "exported"
    assert main(["export", str(q), "--format", "hf", "--out", str(exported)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True)
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    for group in w.reshape(-1, 16):  # symmetric int4 per group of 16 inputs: at most 15 levels (-7..7 steps)
        assert group.unique().numel() <= 15


def test_minilm_wanda_from_the_cli(tmp_path, capsys):
    from sparseforge.zoo.minilm import minilm_path

    path = minilm_path()
    out = tmp_path / "minilm-wanda"
    result = run_json(capsys, "prune", str(path), "--sparsity", "0.5", "--samples", "16", "--seq-len", "64",
                      "--eval-texts", "64", "--out", str(out))
    assert result["method"] == "wanda" and result["achieved"] == 0.5 and len(result["layers"]) == 36
    assert 0.5 < result["quality"]["pruned"]["mean_cosine"] < 1.0
    from sparseforge.io.hf import load_pretrained

    pruned, tokenizer = load_pretrained(out)
    dense, _ = load_pretrained(path)
    assert tokenizer is not None
    assert torch.equal(pruned.pooler.dense.weight, dense.pooler.dense.weight)
    assert torch.equal(pruned.embeddings.word_embeddings.weight, dense.embeddings.word_embeddings.weight)
    assert float((pruned.encoder.layer[3].intermediate.dense.weight == 0).float().mean()) == 0.5


def test_readme_transformer_example(tmp_path: Path, monkeypatch) -> None:
    """The README's one-shot transformer example runs: 2:4 in every encoder Linear, the folder reloads."""
    import re

    from sparseforge.io.hf import load_pretrained

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "sf.prune(" in b and "sparsegpt" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md[transformer]", "exec"), namespace)
    model, report, pruned = namespace["model"], namespace["report"], namespace["pruned"]
    assert report.achieved == 0.5 and len(report.pruned) == 36   # "36 encoder Linears"
    assert len(report.layers) == 37 and report.sparsity < 0.5    # the model's report: the pooler stays dense
    modules = dict(model.named_modules())
    for name in report.pruned:
        w = modules[name].weight
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
    assert 0.6 < pruned.mean_cosine < 1.0
    reloaded, tokenizer = load_pretrained(tmp_path / "minilm-2of4")
    assert tokenizer is not None
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
