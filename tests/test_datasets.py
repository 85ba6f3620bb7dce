"""Datasets by name (sparseforge.datasets), the recipes that read them, CompactRecipe and inspect_file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sparseforge as sf
from sparseforge import datasets
from sparseforge.cli import main
from sparseforge.datasets import DATASETS, Classification, Texts
from sparseforge.distributed.train import TrainRecipe, run
from sparseforge.distributed.train import load_recipe as load_train_recipe
from sparseforge.errors import SparseforgeError
from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.pipelines import (
    CompactRecipe, ExportRecipe, Inspection, PruneRecipe, QuantizeRecipe, inspect_file, load_recipe,
)
from sparseforge.recipes import from_mapping, to_mapping
from sparseforge.zoo.data import DEFAULT_DATA_DIR

needs_data = pytest.mark.skipif(
    not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)

# A user's plug-in: two well separated classes of 28x28 "images", no size declared (counted by loading).
PLUGIN = '''
import torch

from sparseforge.datasets import DATASETS, Classification


@DATASETS.register("blobs")
def blobs(data_dir=None):
    """Two Gaussian blobs of 28x28 images, 512 for training and 128 for testing."""
    gen = torch.Generator().manual_seed(0)
    def split(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 1, 28, 28, generator=gen) + (2.0 * y - 1.0).reshape(-1, 1, 1, 1)
        return x, y
    return Classification(*split(512), *split(128))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The module name of a plug-in that registers the dataset ``blobs``, importable from the current folder."""
    name = "blobs_plugin"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    DATASETS.unregister("blobs")
    sys.modules.pop(name, None)


@pytest.fixture
def blobs(plugin):
    """The plug-in imported: ``blobs`` is registered."""
    __import__(plugin)
    return "blobs"


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(sf.architectures.build("lenet300"), tmp_path_factory.mktemp("zoo") / "lenet.safetensors")


def _tensors(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- the registry --------------------------------------------------------------------------------


def test_the_zoo_datasets_are_named_without_importing_the_zoo():
    code = ("import sys, sparseforge, sparseforge.cli, sparseforge.datasets as d; "
            "print(d.DATASETS.names(), any(m.startswith('sparseforge.zoo') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fashion-mnist', 'fortunes'] False"


def test_a_registered_dataset_loads_by_any_spelling_limited_and_counted(blobs):
    data = datasets.load("BLOBS", limit_train=100, limit_test=7)
    assert isinstance(data, Classification)
    assert data.train_inputs.shape == (100, 1, 28, 28) and data.test_targets.shape == (7,)
    full = datasets.load("blobs")
    assert torch.equal(full.train_inputs[:100], data.train_inputs)  # the limit keeps the first examples
    assert datasets.num_train("blobs") == 512  # no declared size: counted by loading


def test_dataset_errors_name_the_dataset_and_what_is_wrong(blobs):
    with pytest.raises(SparseforgeError, match=r"unknown dataset 'blob'; did you mean 'blobs'\?"):
        datasets.load("blob")
    with pytest.raises(SparseforgeError, match="'blobs' holds classification data; calibration needs text data"):
        datasets.load("blobs", kind=Texts, what="calibration")

    @DATASETS.register("broken")
    def broken():
        return [1, 2, 3]

    try:
        with pytest.raises(SparseforgeError, match="returned list; a dataset returns"):
            datasets.load("broken")
    finally:
        DATASETS.unregister("broken")


@needs_data
def test_fashion_mnist_declares_its_true_size_and_loads_as_the_zoo_does():
    from sparseforge.zoo.data import fashion_mnist

    assert datasets.num_train("fashion-mnist") == 60000
    assert datasets.load("fashion-mnist", limit_train=None, limit_test=1).num_train == 60000
    data = datasets.load("fashion-mnist", limit_train=300, limit_test=50)
    train, test = fashion_mnist(batch_size=64, seed=3, limit_train=300, limit_test=50)
    mine_train, mine_test = data.loaders(64, 3)
    for a, b in ((train, mine_train), (test, mine_test)):
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


# -- a user's dataset in the training recipe, the CLI and the demo --------------------------------


def test_a_user_dataset_trains_by_name_in_a_train_recipe(blobs, tmp_path):
    recipe = from_mapping(TrainRecipe, {"model": "lenet300", "data": {"name": "blobs"},
                                        "method": {"name": "gmp", "sparsity": 0.5},
                                        "train": {"epochs": 2, "batch_size": 64}})
    assert recipe.steps_per_epoch() == 512 // 64
    metrics = run(recipe, tmp_path / "run", quiet=True)
    assert metrics["steps"] == 2 * 8 and metrics["recipe"]["data"]["name"] == "blobs"
    assert metrics["final"]["test_accuracy"] > 95.0  # the blobs are separable: it learned them, not Fashion-MNIST
    model, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert abs(sf.report(model).sparsity - 0.5) < 1e-3


def test_a_train_recipe_refuses_an_unknown_or_text_dataset(blobs, tmp_path):
    with pytest.raises(SparseforgeError, match="data.name: unknown dataset 'blbos'; did you mean 'blobs'"):
        from_mapping(TrainRecipe, {"data": {"name": "blbos"}})
    with pytest.raises(SparseforgeError, match="holds text data; sparseforge train needs classification data"):
        from_mapping(TrainRecipe, {"data": {"name": "fortunes"}})


def test_cli_prune_calibrates_on_a_user_dataset_by_name(plugin, lenet, tmp_path, capsys):
    out = tmp_path / "snip.safetensors"
    assert main(["--plugin", plugin, "prune", str(lenet), "--score", "snip", "--sparsity", "0.6", "--dataset", "blobs",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    # the same gradients from Python: SNIP on the dataset's first 4 shuffled batches of 128 (all 512 examples)
    batches = datasets.load("blobs").calibration(8, 128, seed=0)
    assert len(batches) == 4
    model, _ = load_checkpoint(lenet)
    torch.manual_seed(0)
    sf.prune(model, "snip", 0.6, calibration=batches, target=sf.Target(include=("*",)))
    assert _equal(_tensors(out), model.state_dict())
    from_python = tmp_path / "python.safetensors"
    PruneRecipe(model=str(lenet), out=str(from_python), score="snip", sparsity=0.6, dataset="blobs").run()
    assert _equal(_tensors(from_python), _tensors(out))  # the recipe from Python is the command


def test_cli_dataset_choices_come_from_the_registry(plugin, lenet, tmp_path, capsys):
    assert main(["prune", str(lenet), "--dataset", "blobs", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "invalid choice: 'blobs'" in capsys.readouterr().err  # not registered without the plug-in
    assert main(["--plugin", plugin, "quantize", "--help"]) == 0
    assert "blobs" in capsys.readouterr().out


def test_demo_trains_on_a_user_dataset(plugin, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["--plugin", plugin, "demo", "--dataset", "blobs", "--runs-dir", str(tmp_path), "--name", "b",
                 "--dense-epochs", "1", "--sparse-epochs", "1", "--sparsity", "0.5", "--batch-size", "64",
                 "--quiet"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "blobs"
    assert metrics["dense"]["test_accuracy"] > 95.0
    assert abs(metrics["sparse"]["report"]["sparsity"] - 0.5) < 1e-3


# -- recipes: YAML and Python are one config -------------------------------------------------------


@pytest.mark.parametrize("recipe", [
    PruneRecipe(model="/m/model.safetensors", out="/m/p.sfz", method="wanda", sparsity=0.6, pattern="2:4",
                dataset="fortunes", calibration="/texts", samples=16, include=["layers.*"], exclude=["head"]),
    QuantizeRecipe(checkpoint="/m/model.safetensors", out="/m/q.sfz", scheme="gptq-int4", group_size=64,
                   dataset="fashion-mnist", calibration_batches=2, data_dir="/data", seed=3),
    CompactRecipe(checkpoint="/m/pruned.safetensors", out="/m/small.safetensors"),
    ExportRecipe(checkpoint="/m/model.safetensors", out="/m/model.sfz", values="int8"),
], ids=lambda r: type(r).__name__)
def test_a_recipe_written_as_yaml_reads_back_equal(recipe, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(to_mapping(recipe)))
    assert load_recipe(type(recipe), path) == recipe


def test_a_train_recipe_written_as_yaml_reads_back_equal(blobs, tmp_path):
    recipe = from_mapping(TrainRecipe, {"model": "conv4", "data": {"name": "blobs", "limit_train": 256},
                                        "method": {"name": "rigl", "sparsity": 0.8, "options": {"frequency": 2}},
                                        "train": {"epochs": 3, "batch_size": 32}})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(to_mapping(recipe)))
    assert load_train_recipe(path) == recipe


def test_a_recipe_naming_an_unknown_dataset_is_refused_before_any_file_is_read(tmp_path):
    for recipe in (PruneRecipe(model=str(tmp_path / "missing"), out="x.sfz", dataset="fashion_mnsit"),
                   QuantizeRecipe(checkpoint=str(tmp_path / "missing"), out="x.sfz", dataset="fashion_mnsit")):
        with pytest.raises(SparseforgeError, match="unknown dataset 'fashion_mnsit'; did you mean 'fashion-mnist'"):
            recipe.run()


# -- compact and inspect ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel_pruned(lenet, tmp_path_factory) -> Path:
    model, _ = load_checkpoint(lenet)
    sf.prune(model, "l1", 0.5, pattern="channel", target=sf.Target(include=("fc1", "fc2")))
    return save_checkpoint(model, tmp_path_factory.mktemp("pruned") / "channels.safetensors", arch="lenet300",
                           extra={"note": "channels"})


def test_compact_recipe_equals_the_compact_command(channel_pruned, tmp_path, capsys):
    rep = CompactRecipe(checkpoint=str(channel_pruned), out=str(tmp_path / "py.safetensors")).run()
    assert rep.params_after < rep.params_before
    assert main(["compact", str(channel_pruned), "--out", str(tmp_path / "cli.safetensors"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(rep.to_dict()))
    assert _equal(_tensors(tmp_path / "py.safetensors"), _tensors(tmp_path / "cli.safetensors"))
    py, cli = load_checkpoint(tmp_path / "py.safetensors")[1], load_checkpoint(tmp_path / "cli.safetensors")[1]
    assert py["extra"] == cli["extra"] and py["extra"]["compacted"]["params_after"] == rep.params_after
    assert py["extra"]["note"] == "channels"  # the source's metadata travels
    # and from a YAML recipe, the flags overriding its out
    recipe = tmp_path / "compact.yaml"
    recipe.write_text(yaml.safe_dump({"checkpoint": str(channel_pruned), "out": "ignored.safetensors"}))
    assert main(["compact", "--recipe", str(recipe), "--out", str(tmp_path / "yaml.safetensors"), "--quiet"]) == 0
    assert _equal(_tensors(tmp_path / "yaml.safetensors"), _tensors(tmp_path / "cli.safetensors"))


def test_inspect_file_fields_and_the_command_prints_them(channel_pruned, tmp_path, capsys):
    found = inspect_file(channel_pruned)
    assert isinstance(found, Inspection)
    model, meta = load_checkpoint(channel_pruned)
    assert (found.checkpoint, found.arch, found.extra, found.sfz) == (str(channel_pruned), "lenet300",
                                                                      {"note": "channels"}, None)
    assert found.report.to_dict() == sf.report(model).to_dict()
    assert main(["inspect", str(channel_pruned), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(found.to_dict()))
    assert main(["inspect", str(channel_pruned)]) == 0
    assert capsys.readouterr().out == str(found)
    assert str(found).startswith(f"{channel_pruned}: lenet300\n")

    sfz = tmp_path / "model.sfz"
    ExportRecipe(checkpoint=str(channel_pruned), out=str(sfz), values="fp32").run()
    packed = inspect_file(sfz)
    assert packed.sfz["file_bytes"] == sfz.stat().st_size
    assert packed.sfz["tensors"]["fc1.weight"]["nnz"] == int((model.fc1.weight != 0).sum())
    assert all("sha256" not in info for info in packed.sfz["tensors"].values())
    assert packed.report.to_dict() == found.report.to_dict()  # fp32 values: the same model
    assert packed.to_dict()["format"] == "sfz" and "sfz format version" in str(packed)

