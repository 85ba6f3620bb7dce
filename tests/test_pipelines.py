"""PruneRecipe, QuantizeRecipe, ExportRecipe: each CLI command is its recipe, from flags, YAML or Python."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import sparseforge as sf
from sparseforge.cli import main
from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.pipelines import ExportRecipe, PruneRecipe, QuantizeRecipe, load_recipe
from sparseforge.zoo import build_model


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    return save_checkpoint(build_model("lenet300"), folder / "lenet.safetensors")


def _tensors(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def _equal(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _recipe_file(folder, **fields) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def test_prune_recipe_from_python_equals_the_command_and_sf_prune(lenet, tmp_path, capsys):
    rep = PruneRecipe(model=str(lenet), out=str(tmp_path / "py.safetensors"), sparsity=0.7, allocation="global",
                      exclude=["fc3"]).run()
    assert isinstance(rep, sf.PruneReport) and sorted(rep.pruned) == ["fc1", "fc2"]
    assert main(["prune", str(lenet), "--sparsity", "0.7", "--allocation", "global", "--exclude", "fc3",
                 "--out", str(tmp_path / "cli.safetensors"), "--quiet"]) == 0
    capsys.readouterr()
    direct, _ = load_checkpoint(lenet)
    sf.prune(direct, "magnitude", 0.7, allocation="global", target=sf.Target(exclude=["fc3"]))
    assert _equal(_tensors(tmp_path / "py.safetensors"), _tensors(tmp_path / "cli.safetensors"))
    assert _equal(_tensors(tmp_path / "cli.safetensors"), {k: v for k, v in direct.state_dict().items()})
    _, meta = load_checkpoint(tmp_path / "cli.safetensors")
    assert meta["extra"]["pruned"]["allocation"] == "global"


def test_prune_recipe_file_with_relative_paths_and_flags_overriding_it(lenet, tmp_path, capsys):
    rel = "../" * len((tmp_path / "recipes").relative_to("/").parts) + str(lenet).lstrip("/")
    recipe = _recipe_file(tmp_path / "recipes", model=rel, out="pruned.safetensors", sparsity=0.5, pattern="2:4")
    loaded = load_recipe(PruneRecipe, recipe)
    assert loaded.model == str(tmp_path / "recipes" / rel) and loaded.out == str(tmp_path / "recipes" / "pruned.safetensors")
    assert main(["prune", "--recipe", recipe, "--quiet"]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {loaded.out}\n")
    nm = load_checkpoint(tmp_path / "recipes" / "pruned.safetensors")[0].fc2.weight
    assert bool(((nm.reshape(100, -1, 4) != 0).sum(-1) == 2).all())
    # a flag overrides the recipe's pattern (and out): unstructured 50% now, not 2:4
    assert main(["prune", "--recipe", recipe, "--pattern", "unstructured", "--out", str(tmp_path / "u.safetensors"),
                 "--quiet", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pruning"]["pattern"] == "unstructured" and abs(printed["sparsity"] - 0.5) < 1e-6
    w = load_checkpoint(tmp_path / "u.safetensors")[0].fc2.weight
    assert not bool(((w.reshape(100, -1, 4) != 0).sum(-1) == 2).all())


@pytest.mark.parametrize("argv, message", [
    (["prune", "--out", "x.safetensors"], "give the model and --out"),
    (["quantize", "m.safetensors"], "give the checkpoint and --out"),
    (["export"], "give the checkpoint and --out"),
])
def test_a_command_without_its_inputs_or_a_recipe_is_a_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error: ") and err.count("\n") == 1 and message in err and "--recipe" in err


@pytest.mark.parametrize("cls, fields, message", [
    (PruneRecipe, {"model": "m", "out": "o.sfz", "sparsty": 0.5}, "unknown key 'sparsty' (did you mean 'sparsity'?)"),
    (PruneRecipe, {"model": "m", "out": "o.sfz", "method": "maskllm"}, "learns N:M masks"),
    (PruneRecipe, {"model": "m", "out": "o.sfz", "method": "obd"}, "method must be one of"),
    (PruneRecipe, {"out": "o.sfz"}, "missing required key 'model'"),
    (QuantizeRecipe, {"checkpoint": "m", "out": "o.sfz", "scheme": "int3"}, "scheme must be one of"),
    (ExportRecipe, {"checkpoint": "m", "out": "o.sfz", "values": "fp8"}, "values must be one of"),
])
def test_recipes_are_checked_before_any_file_is_read(tmp_path, cls, fields, message):
    with pytest.raises(sf.SparseforgeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_recipe(cls, _recipe_file(tmp_path, **fields))


def test_quantize_and_export_recipes_equal_their_commands(lenet, tmp_path, capsys):
    done = QuantizeRecipe(checkpoint=str(lenet), out=str(tmp_path / "py.sfz"), scheme="int4", group_size=4).run()
    assert done["scheme"] == "int4" and done["format"] == "sfz" and done["quality"] is None
    recipe = _recipe_file(tmp_path / "q", checkpoint=str(lenet), out=str(tmp_path / "cli.sfz"), scheme="int4")
    assert main(["quantize", "--recipe", recipe, "--group-size", "4", "--quiet"]) == 0
    assert f"wrote {tmp_path / 'cli.sfz'} (int4, groups of 4, sfz)" in capsys.readouterr().out
    a, b = sf.load(tmp_path / "py.sfz"), sf.load(tmp_path / "cli.sfz")
    assert _equal(a.state_dict(), b.state_dict())
    out = ExportRecipe(checkpoint=str(tmp_path / "py.sfz"), out=str(tmp_path / "plain.safetensors"),
                       format="safetensors").run()
    assert out["bytes"] == (tmp_path / "plain.safetensors").stat().st_size
    assert main(["export", str(tmp_path / "py.sfz"), "--format", "safetensors", "--out",
                 str(tmp_path / "cli.safetensors"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'cli.safetensors'} (safetensors, ")
    assert _equal(_tensors(tmp_path / "plain.safetensors"), _tensors(tmp_path / "cli.safetensors"))


def test_the_example_prune_recipe_reads_and_validates():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "prune-wanda.yaml"
    recipe = load_recipe(PruneRecipe, path)
    assert (recipe.method, recipe.sparsity, recipe.allocation) == ("wanda", 0.6, "owl")
    assert recipe.model == str(path.parent / "hf-model")


def test_an_activation_aware_score_without_method_says_to_use_method(lenet, tmp_path, capsys):
    assert main(["prune", str(lenet), "--score", "wanda", "--sparsity", "0.5", "--out", str(tmp_path / "w.sfz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use --method wanda" in err and not (tmp_path / "w.sfz").exists()
