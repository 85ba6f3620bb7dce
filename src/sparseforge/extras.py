"""Optional dependencies: the features that need a package outside the core ones, and how to get it.

``pip install sparseforge`` installs only what the library itself needs
(torch, numpy, safetensors, pyyaml, rich). A feature that needs more imports
it through :func:`require`, which names the extra to install when it is
missing: ``plot`` (matplotlib: the demo's ``training.png``), ``rebasin``
(scipy: weight matching's assignment solver), ``bench`` (everything the
benchmarks use: matplotlib, scipy, scikit-image), ``hf`` (transformers and the
offline MiniLM weights).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from sparseforge.errors import SparseforgeError

__all__ = ["EXTRAS", "available", "require"]

#: The distribution that provides each optional top-level module, and the extras that install it.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "matplotlib": ("matplotlib", ("plot", "bench")),
    "scipy": ("scipy", ("rebasin", "bench")),
    "skimage": ("scikit-image", ("bench",)),
    "transformers": ("transformers", ("hf",)),
}


def available(module: str) -> bool:
    """Whether ``module`` (a top-level name such as ``"scipy"``) can be imported here."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"scipy.optimize"``) for ``feature``, or fail in one line naming the extra.

    >>> require("math", "arithmetic").sqrt(4.0)
    2.0
    >>> require("no_such_module_here", "a test")
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: a test needs the Python package no_such_module_here, which is not installed: pip install no_such_module_here
    """
    top = module.split(".")[0]
    if not available(top):
        package, extras = EXTRAS.get(top, (top, ()))
        how = f"pip install 'sparseforge[{extras[0]}]' (or pip install {package})" if extras else f"pip install {package}"
        raise SparseforgeError(f"{feature} needs the Python package {package}, which is not installed: {how}")
    return importlib.import_module(module)
