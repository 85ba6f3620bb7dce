"""Model architectures by name: what files store so that loading rebuilds the model.

A checkpoint or ``.sfz`` file records an architecture name and its keyword
arguments (``arch``, ``arch_kwargs``); :func:`build` turns them back into a
freshly initialised model for the weights to go into, and :func:`name_of`
finds the name of a model being saved. Both read :data:`ARCHITECTURES`, so
the file formats never import the zoo or the Hugging Face adapter: those
register here by ``module:attribute``, imported on first use, and a user
adds an architecture from outside the package the same way (see
``docs/extending.md``)::

    @sparseforge.architectures.ARCHITECTURES.register("tiny-mlp")
    class TinyMLP(nn.Module):
        def __init__(self, hidden: int = 32): ...

An entry is a callable ``entry(**arch_kwargs) -> nn.Module`` (a model class
is one). Optionally it has ``matches(model) -> bool`` (default: the model's
class is the entry) and ``arch_kwargs(model) -> dict`` (default: every
constructor argument that the model keeps as an attribute of the same name
and a plain type, so that a model of a non-default size rebuilds at its size).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

__all__ = ["ARCHITECTURES", "HF", "arch_kwargs_of", "build", "name_of"]

ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry("architecture")
"""Architecture names -> model builders (classes, or callables with ``matches``/``arch_kwargs``)."""

HF = "hf"
"""The architecture of Hugging Face ``transformers`` models: rebuilt from their class name and config."""

# The zoo's image classifiers and transformers models live in higher layers: named here, imported on first use.
ARCHITECTURES.register_lazy("lenet300", "sparseforge.zoo.models:LeNet300100")
ARCHITECTURES.register_lazy("conv4", "sparseforge.zoo.models:Conv4")
ARCHITECTURES.register_lazy("resnet20", "sparseforge.zoo.models:ResNet20")
ARCHITECTURES.register_lazy(HF, "sparseforge.io.hf:ARCHITECTURE")


def build(name: str, **kwargs: Any) -> nn.Module:
    """A new model of the architecture ``name``, built with ``kwargs``.

    Raises:
        SparseforgeError: unknown name (the closest one suggested), or an
            argument the architecture does not take. (A ``TypeError`` raised
            inside a constructor stays a visible bug.)

    >>> sum(p.numel() for p in build("lenet300").parameters())
    266610
    >>> build("lenet300", width=3)
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: bad argument for model 'lenet300': got an unexpected keyword argument 'width'
    """
    entry = ARCHITECTURES.get(name)
    try:
        inspect.signature(entry).bind(**kwargs)
    except TypeError as exc:
        raise SparseforgeError(f"bad argument for model {name!r}: {exc}") from None
    return entry(**kwargs)


def name_of(model: nn.Module) -> str | None:
    """The registered architecture ``model`` is an instance of, or None for a model from elsewhere."""
    for name, entry in ARCHITECTURES.items():
        matches = getattr(entry, "matches", None)
        if matches(model) if callable(matches) else type(model) is entry:
            return name
    return None


def arch_kwargs_of(name: str, model: nn.Module) -> dict[str, Any]:
    """The keyword arguments that rebuild ``model`` with :func:`build` ``(name, ...)`` (see the module docstring)."""
    entry = ARCHITECTURES.get(name)
    own = getattr(entry, "arch_kwargs", None)
    if callable(own):
        return dict(own(model))
    params = inspect.signature(entry).parameters
    return {p: getattr(model, p) for p in params
            if p != "self" and isinstance(getattr(model, p, None), (int, float, str, bool))}
