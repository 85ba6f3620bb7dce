"""The README's Python examples run, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sparseforge.zoo.data import DEFAULT_DATA_DIR

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
needs_data = pytest.mark.skipif(
    not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@needs_data
def test_lifecycle_example_reaches_its_sparsity(capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md[lifecycle]", "exec"), namespace)
    model = namespace["model"]
    import sparseforge as sf

    rep = sf.report(model)
    # The targeted weights are exactly 90% zero (up to one element per layer).
    assert abs(rep.sparsity - 0.9) < 3 / rep.layer_params
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert "fc1" in capsys.readouterr().out


def test_oneshot_example():
    namespace: dict = {}
    exec(compile(BLOCKS[1], "README.md[oneshot]", "exec"), namespace)
    rep = namespace["report"]
    assert abs(rep.sparsity - 0.8) < 1e-3
    model = namespace["model"]
    # every layer kept at least one weight
    assert all(layer.nonzeros >= 1 for layer in rep.layers)
    assert type(model).__name__ == "ResNet20"


@needs_data
def test_sparse_training_example_holds_its_sparsity(capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[2], "README.md[rigl]", "exec"), namespace)
    assert "sparsity 0.950" in capsys.readouterr().out
    model = namespace["model"]
    import sparseforge as sf

    # RigL's masks keep 95% of the targeted weights pruned; finalize leaves exact zeros.
    rep = sf.report(model)
    assert rep.sparsity >= 0.95 - 3 / rep.layer_params
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


@needs_data
def test_fit_example_trains_through_the_loop(capsys):
    # Found by content, not position, so sections added elsewhere do not shift it.
    block = next(b for b in BLOCKS if "sf.fit(" in b)
    namespace: dict = {}
    exec(compile(block, "README.md[fit]", "exec"), namespace)
    history, model = namespace["history"], namespace["model"]
    assert [row["epoch"] for row in history.rows] == [1, 2, 3] and history.rows[-1]["step"] == 3 * 32
    assert history.rows[-1]["test_accuracy"] > 60.0  # it learned (10 classes: chance is 10%)
    assert "sparsity 0.900" in capsys.readouterr().out
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())  # finalized at the end


def test_readme_links_exist():
    root = README.parent
    for link in re.findall(r"\]\(([^)#:]+)\)", README.read_text()):
        assert (root / link).exists(), link


def test_merging_example_streams_the_same_merge(tmp_path, monkeypatch, capsys):
    # Found by content, not position, so sections added elsewhere do not shift it.
    block = next(b for b in BLOCKS if "merge_files(" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md[merging]", "exec"), namespace)
    from sparseforge.io.checkpoint import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "merged.safetensors")
    merged, base = namespace["merged"], namespace["base"].state_dict()
    assert meta["arch"] == "lenet300" and meta["extra"]["merge"]["method"] == "ties"
    assert all(torch.equal(model.state_dict()[k], merged[k]) for k in merged)   # "= merged, tensor for tensor"
    assert not torch.equal(merged["fc1.weight"], base["fc1.weight"])
    soup, states = namespace["soup"], namespace["states"]
    assert torch.allclose(soup["fc1.weight"], (states[0]["fc1.weight"] + states[1]["fc1.weight"]) / 2)
    assert "6 tensors" in capsys.readouterr().out


def test_to_sparse_example_runs_packed_from_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    block = next(b for b in BLOCKS if "sf.to_sparse(" in b)
    namespace: dict = {}
    exec(compile(block, "README.md[to_sparse]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([1, 10])" in out and "fc1" in out
    from sparseforge.kernels.packed import PackedLinear

    packed, model = namespace["packed"], namespace["model"]
    assert all(isinstance(getattr(packed, n), PackedLinear) for n in ("fc1", "fc2", "fc3"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():   # bf16 values; the two may differ by bf16 rounding of the activations
        torch.testing.assert_close(packed(x), model(x), rtol=2e-2, atol=2e-2)
