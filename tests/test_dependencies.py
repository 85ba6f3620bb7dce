"""``pip install sparseforge`` pulls only what the library needs; plots, scipy and scikit-image are extras.

The core dependency list is checked in ``pyproject.toml``, and a fresh
interpreter imports every library module (everything but ``sparseforge.bench``)
without loading matplotlib, scipy or scikit-image. A feature that needs one of
them says which extra to install, in one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sparseforge
from sparseforge.errors import SparseforgeError
from sparseforge.extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]
# ninja: torch.utils.cpp_extension builds the native sparse kernels with it (g++ comes from the system)
CORE = {"torch", "numpy", "safetensors", "pyyaml", "rich", "ninja"}
OPTIONAL = {"matplotlib": "matplotlib", "scipy": "scipy", "skimage": "scikit-image"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_are_what_the_library_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == CORE
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert set(OPTIONAL.values()) <= extras["bench"], "the benchmarks need all three"
    assert "matplotlib" in extras["plot"] and "scipy" in extras["rebasin"]
    # every extra that EXTRAS names for an error message exists and installs that package
    for module, (package, names) in EXTRAS.items():
        for name in names:
            assert package.lower() in extras[name], (module, name)


def test_make_setup_installs_the_extras_the_tests_and_demo_use() -> None:
    makefile = (ROOT / "Makefile").read_text()
    installed = re.search(r"-e '\.\[([a-z,]+)\]'", makefile).group(1).split(",")
    assert {"test", "hf", "bench"} <= set(installed)
    # and builds the native kernels once, so that no test or demo waits for the compiler
    assert "-m sparseforge.kernels.build" in makefile


def test_importing_the_library_loads_no_optional_dependency() -> None:
    code = f"""
import importlib, json, pkgutil, sys
import sparseforge
imported, failed = [], []
for info in pkgutil.walk_packages(sparseforge.__path__, "sparseforge."):
    if info.name == "sparseforge.bench" or info.name.startswith("sparseforge.bench."):
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except ImportError as e:  # a module of an extra that is not installed here (hf)
        failed.append(info.name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(OPTIONAL)!r}))
print(json.dumps({{"loaded": loaded, "imported": imported, "failed": failed}}))
"""
    src = str(Path(sparseforge.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": src})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], f"importing the library loaded {result['loaded']}"
    # the walk reached the library: the training loop, the trainer, merging, the zoo
    for name in ("sparseforge.training", "sparseforge.distributed.train", "sparseforge.merge.rebasin",
                 "sparseforge.demo", "sparseforge.zoo.superres"):
        assert name in result["imported"], name


def test_a_missing_extra_is_one_line_naming_it(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(SparseforgeError) as info:
        require("scipy.optimize", "weight matching (Git Re-Basin)")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("weight matching (Git Re-Basin) needs the Python package scipy, which is not installed: "
                       "pip install 'sparseforge[rebasin]' (or pip install scipy)")


def test_demo_without_matplotlib_fails_before_training(tmp_path, monkeypatch, capsys) -> None:
    import importlib.util

    from sparseforge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["demo", "--runs-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'sparseforge[plot]'" in err, err
    assert not any(tmp_path.iterdir()), "the demo started before finding matplotlib missing"


def test_bench_without_its_extra_is_one_line_naming_it(monkeypatch, capsys) -> None:
    from sparseforge import bench
    from sparseforge.bench.__main__ import main as bench_main

    def needs_matplotlib(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(bench.benchmarks()["overhead"], "run", needs_matplotlib)
    assert bench_main(["overhead"]) == 2
    err = capsys.readouterr().err
    assert err == ("sparseforge.bench: error: the overhead benchmark needs matplotlib, which is not installed: "
                   "pip install 'sparseforge[bench]'\n")
