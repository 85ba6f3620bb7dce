"""Build and load sparseforge's native CPU kernels (``csrc/packed.cpp``), or say why they are not there.

The kernels are C++ with OpenMP, compiled from the package's own sources
with PyTorch's extension tooling (``torch.utils.cpp_extension``, which needs
``g++`` and ``ninja``). The README's set-up builds them
(``python -m sparseforge.kernels.build``); a process that finds no build
compiles them on first use. The compiled library is cached in
:func:`build_directory`, one folder per source digest, PyTorch version and
Python version, so a changed source or a new PyTorch never loads a stale
build. The vector code is chosen at run time from the CPU's features
(AVX-512 with VBMI2, AVX2 + FMA, or plain C++): one build serves every x86
machine.

When the kernels cannot be built (no compiler, no ``ninja``) or
``SPARSEFORGE_NATIVE=0`` is set, :func:`native` returns None and one
warning says so and how to get them; :mod:`sparseforge.kernels.packed` then
computes the same products with plain PyTorch (correct, not faster).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["SOURCES", "build_directory", "native", "native_status"]

SOURCES: tuple[Path, ...] = (Path(__file__).with_name("csrc") / "packed.cpp",)
_FLAGS = ["-O3", "-fopenmp", "-std=c++17"]

_state: dict[str, object] = {}


def _tag() -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(_FLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.split()[0].encode())
    return h.hexdigest()[:12]


def build_directory() -> Path:
    """Where the compiled kernels live: ``$SPARSEFORGE_KERNEL_DIR`` or ``~/.cache/sparseforge/kernels/<tag>``."""
    root = os.environ.get("SPARSEFORGE_KERNEL_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "sparseforge" / "kernels"
    return base / _tag()


def _module_name() -> str:
    return f"sparseforge_kernels_{_tag()}"


def _import_built(folder: Path) -> ModuleType | None:
    name = _module_name()
    for lib in folder.glob(f"{name}*.so"):
        spec = importlib.util.spec_from_file_location(name, lib)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return None


def _build(folder: Path, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension  # imported only to build: it pulls in setuptools

    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=_module_name(), sources=[str(s) for s in SOURCES], extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=verbose,
    )


def native(build: bool = True, verbose: bool = False) -> ModuleType | None:
    """The compiled kernels module, building it if needed and ``build``; None (and one warning) if unavailable.

    Rule: ``SPARSEFORGE_NATIVE=0`` disables them; a build already in
    :func:`build_directory` is imported without running the compiler;
    otherwise it is compiled there (a few tens of seconds, once). A failure
    is remembered for the process and reported once, with the reason.
    """
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    module: ModuleType | None = None
    reason = ""
    if os.environ.get("SPARSEFORGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        reason = "disabled by SPARSEFORGE_NATIVE=0"
    else:
        folder = build_directory()
        try:
            module = _import_built(folder)
            if module is None and build:
                module = _build(folder, verbose)
            elif module is None:
                reason = f"not built yet (no library in {folder})"
        except Exception as e:  # a compiler's or loader's failure, in any of its many forms
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            # a compiler's message: its first "error" line says more than the command that failed
            first = next((ln for ln in lines if "error" in ln.lower() and not ln.startswith("[")),
                         lines[0] if lines else type(e).__name__)
            reason = f"could not build them: {first[:300]}"
            module = None
    _state["module"] = module
    _state["reason"] = reason
    if module is None:
        warnings.warn(
            f"sparseforge: native sparse kernels unavailable ({reason}); packed layers run on the plain "
            "PyTorch fallback, which gives the same results but is not faster. To get the fast path: "
            "install g++ and `pip install ninja`, then run `python -m sparseforge.kernels.build`.",
            RuntimeWarning, stacklevel=2,
        )
    return module


def native_status() -> dict[str, str | bool]:
    """Whether the native kernels are in use, their instruction set, build folder, and why not if not."""
    m = native()
    return {
        "native": m is not None,
        "isa": m.isa() if m is not None else "pytorch-fallback",
        "best_isa": m.best_isa() if m is not None else "",
        "build_directory": str(build_directory()),
        "reason": str(_state.get("reason", "")),
    }
