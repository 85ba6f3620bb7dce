"""Benchmarks: ``python -m sparseforge.bench <name> [--quick] [--json out.json]``.

Each benchmark is a module in this package exposing ``add_arguments(parser)``
and ``run(args) -> dict`` (its docstring's first line is its help); the
runner finds them by those two functions, prints what they print and writes
the JSON they return. Speed benchmarks interleave the configurations they
compare within one run and report medians and ratios, because this machine
is shared and noisy. Reproductions average over seeds and report the spread.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def benchmarks() -> dict[str, ModuleType]:
    """Benchmark modules by name (the module name, with ``_`` shown as ``-``)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "run") and hasattr(module, "add_arguments"):
            found[info.name.replace("_", "-")] = module
    return dict(sorted(found.items()))
