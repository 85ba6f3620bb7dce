"""The "write your own" guide's examples run and do what they say; the registry tables of the
architecture page match the registries."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import torch

import sparseforge.quant  # noqa: F401 - registers the quantization schemes, as the tables list them

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDE = DOCS / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


def _tables_module():
    spec = importlib.util.spec_from_file_location("registry_tables", DOCS / "registry_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _registries():
    tables = _tables_module()
    return [getattr(importlib.import_module(m), attr) for m, attr in tables.REGISTRIES]


@pytest.fixture
def run_block(tmp_path, monkeypatch):
    """Run one guide block in a fresh namespace in tmp_path; afterwards remove whatever it registered,
    so that other tests (and the tables check) see only the built-in parts."""
    monkeypatch.chdir(tmp_path)
    registries = _registries()
    before = {r.kind: set(r.names()) for r in registries}

    def run(marker: str) -> dict:
        block = next(b for b in BLOCKS if marker in b)  # by content, so new sections do not shift it
        namespace: dict = {"__name__": "guide_example"}
        exec(compile(block, f"extending.md[{marker}]", "exec"), namespace)
        return namespace

    yield run
    for r in registries:
        for name in set(r.names()) - before[r.kind]:
            r.unregister(name)


def test_the_guide_has_an_example_of_each_kind():
    assert len(BLOCKS) == 7
    for marker in ("@SCORES.register", "@UPDATES.register", "@METHODS.register", "@ARCHITECTURES.register",
                   "@DATASETS.register", "MERGE_METHODS.register", "LAYOUTS.register"):
        assert sum(marker in b for b in BLOCKS) == 1, marker


def test_score_example_prunes_by_name(run_block, capsys):
    ns = run_block("@SCORES.register")
    assert capsys.readouterr().out.strip() == "0.50"
    from sparseforge.scores import SCORES, as_score

    assert SCORES.get("row-relative") is ns["RowRelative"] and isinstance(as_score("Row_Relative"), ns["RowRelative"])
    assert abs(ns["report"].sparsity - 0.5) < 1e-3
    # "rows of small weights are not emptied first": a row 1000x smaller than the others loses all its
    # weights to magnitude pruning, and only its share under the new score
    import sparseforge as sf

    kept = {}
    for score in ("magnitude", "row-relative"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 8)
        with torch.no_grad():
            layer.weight[0] *= 1e-3
        sf.prune(layer, score, sparsity=0.5)
        kept[score] = int((layer.weight[0] != 0).sum())
    assert kept["magnitude"] == 0 and kept["row-relative"] >= 4, kept  # of 16; half the layer is kept


def test_update_example_keeps_every_unit_alive(run_block, capsys):
    ns = run_block("@UPDATES.register")
    assert capsys.readouterr().out.strip() == "[6, 4] [32, 4]"  # hard pruning cuts 26 of 32 units off
    from sparseforge.updates import as_update

    assert isinstance(as_update("keep-rows"), ns["KeepEveryRow"])


def test_method_example_builds_from_a_recipe(run_block, capsys):
    ns = run_block("@METHODS.register")
    assert capsys.readouterr().out.strip() == "gentle-gmp 0.7 5"
    from sparseforge.allocation import ERK
    from sparseforge.methods import METHODS

    assert METHODS.get("gentle-gmp") is ns["GentleGMP"]
    method = ns["method"]
    assert isinstance(method.allocation, ERK) and method.schedule.end == 0.5


def test_architecture_example_loads_without_a_model(run_block, capsys, tmp_path):
    ns = run_block("@ARCHITECTURES.register")
    assert capsys.readouterr().out.strip() == "TinyMLP 32"
    again, model = ns["again"], ns["model"]
    assert type(again) is ns["TinyMLP"]
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a, b.to(a.dtype), atol=1e-3), name  # fp16 values in the .sfz
        assert torch.equal(a == 0, b == 0), name  # the pruned weights stay exactly zero
    assert (tmp_path / "tiny.sfz").is_file()


def test_merge_example_is_the_elementwise_median(run_block, capsys, tmp_path):
    ns = run_block("MERGE_METHODS.register")
    assert capsys.readouterr().out.strip() == "['bias', 'weight']"
    from safetensors.torch import load_file

    import sparseforge as sf

    models = [load_file(tmp_path / f"m{seed}.safetensors") for seed in range(3)]
    for key, merged in ns["merged"].items():
        assert torch.equal(merged, torch.stack([m[key] for m in models]).median(dim=0).values), key
    with pytest.raises(sf.SparseforgeError, match="three or more models"):
        sf.merge.merge_files(["m0.safetensors", "m1.safetensors"], "two.safetensors", method="median")


def test_layout_example_compacts_a_head_of_its_own_attention(run_block, capsys):
    pytest.importorskip("transformers", reason="the layout example builds a Hugging Face model")
    ns = run_block("LAYOUTS.register")
    assert capsys.readouterr().out.strip() == "mixer 3 24"
    from sparseforge.compact.layouts import LAYOUTS

    mixer = ns["model"].mixer
    assert LAYOUTS.get("mixer").o == "wo"
    assert (mixer.wk.out_features, mixer.wv.out_features, mixer.wo.in_features) == (24, 24, 24)
    assert ns["report"].heads[0]["folded"] == 0 and ns["report"].max_abs_diff < 1e-5


def test_architecture_page_tables_match_the_registries():
    tables = _tables_module()
    text = tables.PAGE.read_text(encoding="utf-8")
    assert tables.render(text) == text, "docs/architecture.md is out of date: run python docs/registry_tables.py"
    for registry in _registries():  # every registry has a section, and every name is in it
        section = re.search(rf"<!-- registry: {re.escape(registry.kind)} -->\n(.*?)<!-- /registry -->", text, re.S)
        assert section is not None, registry.kind
        assert all(f"| `{name}` |" in section.group(1) for name in registry.names()), registry.kind


def test_files_page_examples_run_and_print_what_they_say(tmp_path, monkeypatch, capsys):
    """docs/files.md: its blocks, in order, in one namespace; the format its second block registers is removed."""
    from sparseforge.formats import FORMATS

    monkeypatch.chdir(tmp_path)
    before = set(FORMATS.names())
    namespace: dict = {"__name__": "files_example"}
    try:
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / "files.md").read_text(encoding="utf-8"),
                                             flags=re.S)):
            exec(compile(block, f"files.md[{i}]", "exec"), namespace)
    finally:
        for name in set(FORMATS.names()) - before:
            FORMATS.unregister(name)
    assert capsys.readouterr().out.split("\n") == ["sfz lenet300 True", "True", ""]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_docs_links_exist():
    for page in (GUIDE, DOCS / "architecture.md", DOCS / "files.md"):
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).exists(), (page.name, link)


def test_dataset_example_trains_by_name(run_block, capsys):
    ns = run_block("@DATASETS.register")
    assert capsys.readouterr().out.split() == ["48", "True", "0.80"]
    from sparseforge import datasets

    assert datasets.DATASETS.get("Halves") is ns["halves"]
    data = datasets.load("halves", limit_train=10)
    assert data.train_inputs.shape == (10, 1, 28, 28) and data.test_targets.shape == (256,)
    assert ns["metrics"]["recipe"]["data"]["name"] == "halves"
