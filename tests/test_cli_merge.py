"""``sparseforge merge``: files and YAML recipes end to end, on zoo checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import sparseforge.merge as sm
from sparseforge.cli import main
from sparseforge.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sparseforge.merge.recipe import MergeRecipe, load_recipe
from sparseforge.zoo import build_model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A LeNet-300-100 base and two perturbed copies, saved as sparseforge checkpoints."""
    folder = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = build_model("lenet300")
    save_checkpoint(base, folder / "base.safetensors")
    for i in (1, 2):
        torch.manual_seed(i)
        tuned = build_model("lenet300")
        with torch.no_grad():
            for p, b in zip(tuned.parameters(), base.parameters()):
                p.copy_(b + 0.01 * torch.randn_like(b))
        save_checkpoint(tuned, folder / f"ft{i}.safetensors")
    return folder


def _tensors(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def _equal(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_ties_end_to_end_loads_and_inspects(zoo, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--method", "ties", "--base", str(zoo / "base.safetensors"), str(zoo / "ft1.safetensors"),
            str(zoo / "ft2.safetensors"), "--density", "0.2", "--lambda", "1.0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ties" in printed and "6 tensors" in printed and f"wrote {out}" in printed
    model, meta = load_checkpoint(out)  # digests verified, zoo model rebuilt from the carried metadata
    assert meta["arch"] == "lenet300" and meta["extra"]["merge"]["density"] == 0.2
    base = _tensors(zoo / "base.safetensors")
    expected = sm.ties(base, [_tensors(zoo / "ft1.safetensors"), _tensors(zoo / "ft2.safetensors")], density=0.2)
    assert _equal(model.state_dict(), expected)
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["arch"] == "lenet300" and inspected["extra"]["merge"]["method"] == "ties"


def test_cli_average_with_weights_and_quiet(zoo, tmp_path, capsys):
    out = tmp_path / "soup.safetensors"
    assert main(["merge", str(zoo / "ft1.safetensors"), str(zoo / "ft2.safetensors"), "--weights", "1", "3",
                 "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    expected = sm.weighted_average([_tensors(zoo / "ft1.safetensors"), _tensors(zoo / "ft2.safetensors")], [1, 3])
    assert _equal(_tensors(out), expected)


def _write_recipe(folder, **fields) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def test_recipe_equals_the_equivalent_flags_and_paths_are_relative_to_it(zoo, tmp_path, capsys):
    # The recipe lives in its own folder; its relative paths point from there to the zoo folder.
    rel = "../" * len((tmp_path / "recipes").relative_to("/").parts) + str(zoo).lstrip("/")
    recipe = _write_recipe(tmp_path / "recipes", method="dare_ties", base=f"{rel}/base.safetensors",
                           models=[f"{rel}/ft1.safetensors", f"{rel}/ft2.safetensors"], density=0.3,
                           **{"lambda": 0.8}, seed=4, out="merged.safetensors")
    assert main(["merge", "--recipe", recipe, "--quiet"]) == 0
    from_recipe = tmp_path / "recipes" / "merged.safetensors"  # out is relative to the recipe too
    flags = tmp_path / "flags.safetensors"
    assert main(["merge", "--method", "dare_ties", "--base", str(zoo / "base.safetensors"), str(zoo / "ft1.safetensors"),
                 str(zoo / "ft2.safetensors"), "--density", "0.3", "--lambda", "0.8", "--seed", "4", "--out",
                 str(flags), "--quiet"]) == 0
    assert _equal(_tensors(from_recipe), _tensors(flags))
    loaded = load_recipe(recipe)
    assert loaded.lam == 0.8 and loaded.seed == 4 and loaded.to_yaml_mapping()["lambda"] == 0.8


def test_flags_override_the_recipe(zoo, tmp_path):
    recipe = _write_recipe(tmp_path, method="ties", base=str(zoo / "base.safetensors"),
                           models=[str(zoo / "ft1.safetensors"), str(zoo / "ft2.safetensors")], density=0.2,
                           out="from-recipe.safetensors")
    assert main(["merge", "--recipe", recipe, "--density", "0.6", "--out", str(tmp_path / "o.safetensors"),
                 "--quiet"]) == 0
    assert not (tmp_path / "from-recipe.safetensors").exists()
    base = _tensors(zoo / "base.safetensors")
    tasks = [_tensors(zoo / "ft1.safetensors"), _tensors(zoo / "ft2.safetensors")]
    assert _equal(_tensors(tmp_path / "o.safetensors"), sm.ties(base, tasks, density=0.6))
    assert not _equal(_tensors(tmp_path / "o.safetensors"), sm.ties(base, tasks, density=0.2))


@pytest.mark.parametrize("fields, message", [
    ({"models": ["a.safetensors"], "out": "m.safetensors", "densty": 0.2},
     "unknown key 'densty' (did you mean 'density'?)"),
    ({"models": ["a.safetensors"], "out": "m.safetensors", "lambd": 0.2},
     "unknown key 'lambd' (did you mean 'lambda'?); known keys of the recipe: models, out, method, base, weights, "
     "density, lambda, seed"),
    ({"models": ["a.safetensors"], "out": "m.safetensors", "lam": 0.2}, "the recipe key is 'lambda'"),
    ({"models": ["a.safetensors"], "out": "m.safetensors", "method": "ties", "base": "b.safetensors",
      "lambda": "big"}, "lambda must be a number, got str 'big'"),
    ({"out": "m.safetensors"}, "missing required key 'models'"),
    ({"models": ["a.safetensors"], "out": "m.safetensors", "method": "ties"}, "give the base"),
    ({"models": ["a.safetensors"], "out": "m.safetensors", "method": "magic"},
     "unknown merge method 'magic' (known: average, task_arithmetic, ties, dare, dare_ties)"),
    ({"models": ["a.safetensors"], "out": "m.safetensors", "method": "regmean"}, "Python API only"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, capsys, fields, message):
    recipe = _write_recipe(tmp_path, **fields)
    assert main(["merge", "--recipe", recipe]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown merge method 'nope' (known: average, task_arithmetic, ties, dare, dare_ties)"),
    (["--method", "fisher"], "Python API only"),
    (["--method", "ties"], "give the base"),
    (["--weights", "1", "-1"], "do not sum sensibly"),
    (["--weights", "0", "0"], "do not sum sensibly"),
])
def test_bad_flags_are_one_line_errors(zoo, tmp_path, capsys, argv, message):
    out = tmp_path / "o.safetensors"
    models = [str(zoo / "ft1.safetensors"), str(zoo / "ft2.safetensors")]
    assert main(["merge", *models, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseforge: error: ") and message in err
    assert not out.exists()


def test_missing_models_or_out_is_an_error(zoo, capsys):
    assert main(["merge", "--out", "x.safetensors"]) == 2
    assert main(["merge", str(zoo / "ft1.safetensors")]) == 2
    assert "--recipe" in capsys.readouterr().err


def test_merge_recipe_run_from_python(zoo, tmp_path):
    recipe = MergeRecipe(models=[str(zoo / "ft1.safetensors"), str(zoo / "ft2.safetensors")],
                         out=str(tmp_path / "m.safetensors"), method="task_arithmetic",
                         base=str(zoo / "base.safetensors"), lam=0.5)
    report = recipe.run()
    assert report["method"] == "task_arithmetic" and report["tensors"] == 6
    base = _tensors(zoo / "base.safetensors")
    tasks = [_tensors(zoo / "ft1.safetensors"), _tensors(zoo / "ft2.safetensors")]
    assert _equal(_tensors(tmp_path / "m.safetensors"), sm.task_arithmetic(base, tasks, lam=0.5))
