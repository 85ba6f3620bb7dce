"""Registries: the Registry type, every built-in name still meaning what it meant, and parts a user
registers from outside the package, used from Python, from recipes and from the command line."""

from __future__ import annotations

import functools
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import sparseforge as sf
from sparseforge.allocation import ALLOCATIONS, ERK, LAMP, OWL, Global, Uniform, as_allocation
from sparseforge.architectures import ARCHITECTURES, build, name_of
from sparseforge.cli import main, plugin_modules
from sparseforge.errors import SparseforgeError
from sparseforge.formats import FORMATS
from sparseforge.merge import MERGE_METHODS, TaskArithmetic, merge_files, preset
from sparseforge.methods import METHODS
from sparseforge.patterns import NM, PATTERNS, Block, Channel, Unstructured, as_pattern
from sparseforge.peft import ADAPTERS, LoRA, PaCA
from sparseforge.quant import SCHEMES
from sparseforge.registry import Registry, import_plugins
from sparseforge.schedules import SCHEDULES, Constant, Cubic, Linear, OneShot, as_schedule
from sparseforge.scores import SCORES, SNIP, GradientMagnitude, L1Norm, L2Norm, Magnitude, Random, Taylor, as_score
from sparseforge.updates import UPDATES, HardPrune, SoftShrink, as_update
from sparseforge.zoo.data import DEFAULT_DATA_DIR
from sparseforge.zoo.models import Conv4, LeNet300100, ResNet20

ALL_REGISTRIES = [SCORES, PATTERNS, ALLOCATIONS, SCHEDULES, UPDATES, METHODS, MERGE_METHODS, ADAPTERS, SCHEMES,
                  ARCHITECTURES, FORMATS]

# -- the Registry type ---------------------------------------------------------------------


def test_decorator_call_and_bare_forms_register_and_return_the_object():
    reg: Registry = Registry("widget")

    @reg.register("spinner", aliases=("top",))
    class Spinner:
        """Turns round."""

    @reg.register
    def gadget() -> None:
        """A bare-decorated function, named by its __name__."""

    lever = object()
    assert reg.register("lever", lever) is lever
    assert reg.names() == ["spinner", "gadget", "lever"]
    assert reg.get("spinner") is Spinner and reg.get("TOP") is Spinner and reg.get("gadget") is gadget
    assert reg.get("Lever") is lever
    assert "spinner" in reg and "top" in reg and "SPIN_NER" in reg and "nope" not in reg and 3 not in reg
    assert len(reg) == 3 and list(reg) == reg.names()
    assert reg.items()[0] == ("spinner", Spinner)
    assert reg.canonical("Top") == "spinner" and reg.aliases("spinner") == ("top",)


def test_name_of_names_an_undecorated_registration():
    reg: Registry = Registry("adapter", name_of=lambda cls: cls.method)

    @reg.register
    class Thing:
        method = "thing-one"

    assert reg.get("thing_one") is Thing


def test_unknown_names_suggest_the_closest_and_list_the_known():
    reg: Registry = Registry("colour")
    for name in ("crimson", "cyan", "magenta"):
        reg.register(name, object())
    with pytest.raises(SparseforgeError) as e:
        reg.get("magneta")
    assert str(e.value) == "unknown colour 'magneta'; did you mean 'magenta'? (known: crimson, cyan, magenta)"
    with pytest.raises(SparseforgeError, match=r"^unknown colour 'zzz' \(known: crimson, cyan, magenta\)$"):
        reg.get("zzz")
    # a restricted list, and an alias close to the typo suggests its canonical name
    reg.register("black", object(), aliases=("ebony",))
    err = reg.error("ebon", known=["black"], note="; or a hex code")
    assert str(err) == "unknown colour 'ebon'; did you mean 'black'? (known: black); or a hex code"
    with pytest.raises(SparseforgeError, match="unknown colour 7"):
        reg.get(7)


def test_registering_a_taken_name_or_alias_is_refused_unless_replaced():
    reg: Registry = Registry("score")
    first, second = object(), object()
    reg.register("snip", first, aliases=("sensitivity",))
    for name, aliases in (("snip", ()), ("SNIP", ()), ("other", ("sensitivity",)), ("sensitivity", ())):
        with pytest.raises(SparseforgeError, match="already registered"):
            reg.register(name, second, aliases=aliases)
    assert reg.get("snip") is first
    assert reg.register("snip", first, aliases=("sensitivity",)) is first  # the same registration: a no-op
    with pytest.raises(SparseforgeError, match="repeat a spelling"):
        reg.register("x-y", second, aliases=("x_y",))
    with pytest.raises(SparseforgeError, match="non-empty name"):
        reg.register(" - ", second)
    reg.register("snip", second, replace=True)
    assert reg.get("snip") is second and "sensitivity" not in reg  # the old entry's aliases went with it
    reg.unregister("snip")
    assert "snip" not in reg and reg.names() == []


def test_lazy_entries_import_their_module_on_first_use_only(tmp_path, monkeypatch):
    module = f"sf_lazy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("class Far:\n    '''Defined in a higher layer.'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("thing")
    reg.register_lazy("far", f"{module}:Far")
    assert reg.names() == ["far"] and "far" in reg
    assert module not in sys.modules, "listing a lazy name must not import its module"
    far = reg.get("far")
    assert far.__name__ == "Far" and sys.modules[module].Far is far
    assert reg.table().splitlines()[2] == "| `far` |  | Defined in a higher layer. |"
    with pytest.raises(SparseforgeError, match="'package.module:attribute'"):
        reg.register_lazy("bad", "no_colon_here")
    reg.register_lazy("gone", f"{module}:Missing")
    with pytest.raises(SparseforgeError, match=f"thing 'gone' is registered as {module}:Missing, which cannot be"):
        reg.get("gone")
    del sys.modules[module]


def test_table_lists_names_aliases_and_summaries():
    reg: Registry = Registry("allocation")
    reg.register("er", functools.partial(ERK, kernel=False), aliases=("erdos-renyi",))
    lines = reg.table().splitlines()
    assert lines[0] == "| allocation | aliases | what it is |"
    assert lines[2].startswith("| `er` | `erdos-renyi` | Erdos-Renyi(-Kernel) densities")  # a partial: the class's doc


def test_import_plugins_names_a_module_that_cannot_be_imported():
    with pytest.raises(SparseforgeError, match="cannot import plug-in module 'no_such_sf_plugin'"):
        import_plugins(["no_such_sf_plugin"])
    assert import_plugins(["", "json"]) == ["json"]


def test_plugin_flags_are_read_before_the_command_only():
    assert plugin_modules(["--plugin", "a", "--plugin=b", "merge", "--plugin", "c"]) == ["a", "b"]
    assert plugin_modules(["prune", "--plugin", "a"]) == []
    assert plugin_modules(["--version"]) == []


# -- every built-in name still resolves as before -------------------------------------------


def test_builtin_names_resolve_to_the_same_objects_as_the_old_tables():
    old_scores = {"magnitude": Magnitude, "random": Random, "gradient": GradientMagnitude, "snip": SNIP,
                  "taylor": Taylor, "l1": L1Norm, "l2": L2Norm}
    for name, cls in old_scores.items():
        assert type(as_score(name)) is cls and type(as_score(name.upper())) is cls
    assert as_score("snip") == SNIP() and isinstance(as_score(None), Magnitude)
    old_allocations = {"uniform": Uniform(), "owl": OWL(), "global": Global(), "erk": ERK(), "lamp": LAMP(),
                       "er": ERK(kernel=False)}
    for name, allocation in old_allocations.items():
        assert as_allocation(name) == allocation
    assert set(ALLOCATIONS.names()) == set(old_allocations)
    assert as_allocation({"fc*": 0.5}).per_layer == {"fc*": 0.5}
    for name, cls in {"constant": Constant, "oneshot": OneShot, "linear": Linear, "cubic": Cubic}.items():
        assert type(as_schedule(name, final=0.5)) is cls
    assert as_schedule("one-shot", final=0.5) == as_schedule("ONE_SHOT", final=0.5) == OneShot(final=0.5)
    spellings = {"unstructured": Unstructured(), "dense": Unstructured(), "element": Unstructured(),
                 "channel": Channel(), "channels": Channel(), "filter": Channel(), "row": Channel(),
                 "2:4": NM(2, 4), " 4 : 8 ": NM(4, 8), "block:4": Block(4), "block4": Block(4), "block=8": Block(8),
                 "Block 2": Block(2)}
    for text, pattern in spellings.items():
        assert as_pattern(text) == pattern, text
    assert as_update("hard-prune") == HardPrune() and as_update("soft_shrink") == SoftShrink()
    assert isinstance(as_update(None), HardPrune)


def test_builtin_methods_merge_methods_adapters_schemes_and_architectures():
    for name, preset_fn in {"rigl": sf.methods.RigL, "set": sf.methods.SET, "granet": sf.methods.GraNet,
                            "gmp": sf.methods.GMP, "static": sf.methods.StaticRandom, "issp": sf.methods.ISSP,
                            "sr-ste": sf.methods.SRSTE, "progressive-nm": sf.methods.ProgressiveNM,
                            "global-magnitude": sf.methods.GlobalMagnitude, "fixed-mask": sf.methods.FixedMask}.items():
        assert METHODS.get(name) is preset_fn
    assert METHODS.get("static-random") is sf.methods.StaticRandom
    assert [n for n, m in MERGE_METHODS.items() if not m.python_only] == [
        "average", "task_arithmetic", "ties", "dare", "dare_ties"]
    assert [n for n, m in MERGE_METHODS.items() if m.python_only] == ["fisher", "regmean", "tall"]
    assert preset("ties") == TaskArithmetic(sparsify="magnitude", density=0.2, consensus="ties")
    assert MERGE_METHODS.get("dare").options == ("density", "lam", "seed")
    assert MERGE_METHODS.get("task_arithmetic").options == ("lam",) and MERGE_METHODS.get("average").options == ()
    assert ADAPTERS.get("paca") is PaCA and ADAPTERS.get("lora") is LoRA
    assert {n: (s.bits, s.calibrated) for n, s in SCHEMES.items()} == {
        "int8": (8, False), "int4": (4, False), "gptq-int8": (8, True), "gptq-int4": (4, True)}
    assert ARCHITECTURES.get("lenet300") is LeNet300100 and ARCHITECTURES.get("conv4") is Conv4
    assert ARCHITECTURES.get("resnet20") is ResNet20
    from sparseforge.io import hf

    assert ARCHITECTURES.get(hf.ARCH) is hf.ARCHITECTURE
    assert name_of(build("conv4")) == "conv4" and name_of(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("registry", ALL_REGISTRIES, ids=lambda r: r.kind)
def test_every_registered_entry_resolves_and_describes_itself(registry):
    assert len(registry) > 0
    for name, obj in registry.items():  # lazy entries import: a stale module:attr fails here
        assert obj is not None, name
    table = registry.table()
    assert all(f"| `{name}` |" in table for name in registry.names())


# -- parts registered from outside the package ----------------------------------------------

PLUGIN = '''
"""A user's plug-in: a score, a method preset, a merge method and an architecture, registered from outside."""
import torch
from torch import nn

from sparseforge.architectures import ARCHITECTURES
from sparseforge.merge import MERGE_METHODS, MergeMethod
from sparseforge.methods import GMP, METHODS
from sparseforge.scores import SCORES, Score


@SCORES.register("{p}-smallest")
class KeepSmallest(Score):
    """Keeps the smallest weights (the opposite of magnitude): easy to see in a result."""

    def __call__(self, weight, grad=None):
        return -weight.detach().abs()


@METHODS.register("{p}-method")
def PlugMethod(sparsity: float = 0.5, *, frequency: int = 1):
    """GMP ramped over the whole run, updating every step."""
    return GMP(sparsity, frequency=frequency, end=1.0)


def _max_rule(count, weights=None):
    def rule(key, base, tensors):
        return torch.stack(tensors).amax(dim=0)
    return rule


MERGE_METHODS.register("{p}-max", MergeMethod(_max_rule, summary="element-wise maximum"))


@ARCHITECTURES.register("{p}-mlp")
class PlugMLP(nn.Module):
    """A 784-hidden-10 MLP."""

    def __init__(self, hidden: int = 16, num_classes: int = 10):
        super().__init__()
        self.hidden, self.num_classes = hidden, num_classes
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plug-in module written to tmp_path (the working folder), its names unique to this test;
    everything it registered is removed afterwards, so no test sees another's plug-in."""
    p = f"plug{uuid.uuid4().hex[:6]}"
    module = f"sf_plugin_{p}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.replace("{p}", p))
    monkeypatch.chdir(tmp_path)
    saved_path = list(sys.path)
    names = {SCORES: f"{p}-smallest", METHODS: f"{p}-method", MERGE_METHODS: f"{p}-max", ARCHITECTURES: f"{p}-mlp"}
    yield module, {r.kind: n for r, n in names.items()}
    for registry, name in names.items():
        registry.unregister(name)
    sys.modules.pop(module, None)
    sys.path[:] = saved_path


def _plugin_names(plugin):
    module, names = plugin
    return module, names["score"], names["method"], names["merge method"], names["architecture"]


def test_plugin_parts_work_from_python(plugin, tmp_path):
    module, score, method, merge, arch = _plugin_names(plugin)
    import_plugins([module])
    # the score, by name, through sf.prune: the smallest weights are the ones kept
    torch.manual_seed(0)
    model = build(arch, hidden=8)
    before = model.fc1.weight.detach().clone()
    rep = sf.prune(model, score, sparsity=0.5)
    assert abs(rep.sparsity - 0.5) < 1e-3
    kept = model.fc1.weight != 0
    assert before[kept].abs().max() <= before[~kept].abs().min()
    # the method preset, by name, in a Sparsifier
    mlp = build(arch)
    sparsifier = sf.Sparsifier(mlp, METHODS.get(method)(sparsity=0.75), total_steps=4)
    for _ in range(4):
        sparsifier.step()
    sparsifier.finalize()
    assert abs(sf.report(mlp).sparsity - 0.75) < 1e-3
    # the architecture: a file names it, and loading rebuilds the model at its size without being given one
    sf.save(build(arch, hidden=8), tmp_path / "m.sfz")
    loaded = sf.load(tmp_path / "m.sfz")
    assert type(loaded).__name__ == "PlugMLP" and loaded.fc1.out_features == 8 and name_of(loaded) == arch
    # the merge method, by name, over files
    paths = _two_checkpoints(arch, tmp_path)
    merge_files(paths, tmp_path / "max.safetensors", method=merge)
    _check_max(paths, tmp_path / "max.safetensors")


def _two_checkpoints(arch: str, folder: Path) -> list[Path]:
    from sparseforge.io.checkpoint import save_checkpoint

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(build(arch, hidden=8), folder / f"m{seed}.safetensors"))
    return paths


def _check_max(paths, merged_path) -> None:
    from sparseforge.io.checkpoint import load_checkpoint

    (a, _), (b, _), (m, meta) = (load_checkpoint(p) for p in (*paths, merged_path))
    assert type(m).__name__ == "PlugMLP"  # the merged file still names the plug-in's architecture
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), m.state_dict().values()):
        assert torch.equal(z, torch.maximum(x, y)), name


def test_plugin_merge_method_from_a_merge_recipe(plugin, tmp_path):
    module, _, _, merge, arch = _plugin_names(plugin)
    import_plugins([module])
    paths = _two_checkpoints(arch, tmp_path)
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"method": merge, "models": [p.name for p in paths], "out": "max.safetensors"}))
    sf.merge.load_recipe(recipe).run()
    _check_max(paths, tmp_path / "max.safetensors")
    recipe.write_text(yaml.safe_dump({"method": merge[:-1], "models": ["a", "b"], "out": "o.safetensors"}))
    with pytest.raises(SparseforgeError, match=f"did you mean '{merge}'"):
        sf.merge.load_recipe(recipe)


def test_plugin_method_and_architecture_from_a_training_recipe(plugin):
    module, _, method, _, arch = _plugin_names(plugin)
    from sparseforge.distributed.train import TrainRecipe
    from sparseforge.recipes import from_mapping

    data = {"model": arch, "method": {"name": method, "sparsity": 0.6, "options": {"frequency": 2}},
            "data": {"limit_train": 256}}
    with pytest.raises(SparseforgeError, match=f"unknown architecture '{arch}'"):
        from_mapping(TrainRecipe, data)  # not imported yet: not a choice
    with pytest.raises(SparseforgeError, match=f"unknown method '{method}'"):
        from_mapping(TrainRecipe, dict(data, model="lenet300"))
    import_plugins([module])
    recipe = from_mapping(TrainRecipe, data)
    built = recipe.method.build(recipe.total_steps())
    assert built.sparsity == 0.6 and built.schedule.frequency == 2
    with pytest.raises(SparseforgeError, match="does not take 'frequncy'"):
        from_mapping(TrainRecipe, dict(data, method={"name": method, "options": {"frequncy": 2}}))
    with pytest.raises(SparseforgeError, match=f"did you mean '{arch}'"):
        from_mapping(TrainRecipe, dict(data, model=arch + "x"))


def test_plugin_parts_from_the_command_line(plugin, tmp_path, capsys):
    module, score, method, merge, arch = _plugin_names(plugin)
    import_plugins([module])
    paths = _two_checkpoints(arch, tmp_path)
    # A fresh interpreter would not know the names: forget them, so the CLI's --plugin must bring them back.
    for registry, name in ((SCORES, score), (METHODS, method), (MERGE_METHODS, merge), (ARCHITECTURES, arch)):
        registry.unregister(name)
    sys.modules.pop(module)
    assert main(["prune", str(paths[0]), "--score", score, "--sparsity", "0.5", "--out", "p.safetensors"]) == 2
    assert f"unknown architecture '{arch}'" in capsys.readouterr().err  # the file names the plug-in's model

    assert main(["--plugin", module, "prune", str(paths[0]), "--score", score, "--sparsity", "0.5",
                 "--out", "p.safetensors", "--quiet", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["sparsity"] - 0.5) < 1e-3
    from sparseforge.io.checkpoint import load_checkpoint

    original, _ = load_checkpoint(paths[0])
    pruned, meta = load_checkpoint(tmp_path / "p.safetensors")
    assert meta["arch"] == arch  # rebuilt by the plug-in's architecture, and saved under it again
    w, p = original.fc1.weight, pruned.fc1.weight
    assert w[p != 0].abs().max() <= w[p == 0].abs().min()  # the plug-in's score chose what stayed

    assert main([f"--plugin={module}", "merge", *map(str, paths), "--method", merge, "--out", "max.safetensors",
                 "--quiet"]) == 0
    _check_max(paths, tmp_path / "max.safetensors")
    assert main(["--plugin", module, "inspect", "max.safetensors"]) == 0
    assert f"max.safetensors: {arch}" in capsys.readouterr().out

    assert main(["--plugin", module, "merge", "--help"]) == 0
    assert merge in capsys.readouterr().out  # the help lists what the plug-in registered
    assert main(["--plugin", "no_such_sf_plugin", "inspect", "max.safetensors"]) == 2
    assert "cannot import plug-in module 'no_such_sf_plugin'" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(DEFAULT_DATA_DIR) / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST is not installed")
def test_plugin_trains_from_the_command_line(plugin, tmp_path, capsys):
    module, _, method, _, arch = _plugin_names(plugin)
    recipe = tmp_path / "train.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {arch}
        method: {{name: {method}, sparsity: 0.5}}
        data: {{limit_train: 256, limit_test: 64}}
        train: {{epochs: 1, batch_size: 128}}
    """))
    assert main(["--plugin", module, "train", str(recipe), "--out", "run", "--quiet"]) == 0
    from sparseforge.io.checkpoint import load_checkpoint

    model, meta = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert meta["arch"] == arch and type(model).__name__ == "PlugMLP"
    assert abs(sf.report(model).sparsity - 0.5) < 1e-3


def test_training_workers_import_the_plugins_too(plugin, tmp_path, capsys):
    module, _, method, _, arch = _plugin_names(plugin)
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"model: {arch}\nmethod: {{name: {method}}}\n")
    assert main(["--plugin", module, "train", str(recipe), "--nproc", "2", "--print-command"]) == 0
    command = capsys.readouterr().out.split()
    worker = command[command.index("sparseforge.distributed.launch"):]
    assert worker[worker.index("--plugin") + 1] == module  # torchrun's workers import it before the recipe
    from sparseforge.distributed.launch import build_parser

    assert build_parser().parse_args([str(recipe), "--plugin", module]).plugin == [module]
