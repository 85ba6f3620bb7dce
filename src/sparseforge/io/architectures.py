"""Rebuilding a model from the architecture name a file stores: the one lookup every reader goes through.

Checkpoints and ``.sfz`` files store ``arch`` (a name) and ``arch_kwargs``
(its constructor arguments) so that loading needs no model. The names map
to ``"module:attribute"`` strings of callables that take the stored
arguments as keywords (a zoo model's class; for transformers models,
:func:`sparseforge.io.hf.build_from_metadata`). The strings are resolved when
a file is loaded, never when :mod:`sparseforge.io` is imported, so the file
formats do not depend on the zoo or on ``transformers``.

This table is the seam where the architecture registry plugs in: replace
:data:`ARCHITECTURES` by the registry's lookup and nothing else changes.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from sparseforge.errors import SparseforgeError

__all__ = ["ARCHITECTURES", "HF_ARCH", "architecture_of", "build_architecture"]

#: the ``arch`` name sparseforge files give a transformers model (its kwargs: class name and config)
HF_ARCH = "hf"

#: architecture name -> ``"module:attribute"`` of a callable taking the stored ``arch_kwargs`` as keywords.
#: The zoo's names are those of :data:`sparseforge.zoo.models.MODELS` (a test keeps the two equal).
ARCHITECTURES: dict[str, str] = {
    "lenet300": "sparseforge.zoo.models:LeNet300100",
    "conv4": "sparseforge.zoo.models:Conv4",
    "resnet20": "sparseforge.zoo.models:ResNet20",
    HF_ARCH: "sparseforge.io.hf:build_from_metadata",
}


def _split(target: str) -> tuple[str, str]:
    module, _, attr = target.partition(":")
    return module, attr


def _resolve(name: str, table: Mapping[str, str]) -> Callable[..., nn.Module]:
    try:
        module, attr = _split(table[name])
    except (KeyError, TypeError):
        known = ", ".join(sorted(table))
        raise SparseforgeError(f"unknown architecture {name!r}; known: {known}") from None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SparseforgeError(f"architecture {name!r} names {table[name]}, which cannot be imported: {e}") from None


def build_architecture(name: str, kwargs: Mapping[str, Any] | None = None,
                       table: Mapping[str, str] = ARCHITECTURES) -> nn.Module:
    """A new model of architecture ``name`` built with ``kwargs`` (as a file stores them).

    Raises :class:`SparseforgeError` for an unknown name or arguments the
    architecture does not take.

    >>> model = build_architecture("lenet300", {"num_classes": 10})
    >>> type(model).__name__
    'LeNet300100'
    >>> build_architecture("vgg")
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: unknown architecture 'vgg'; known: conv4, hf, lenet300, resnet20
    """
    builder = _resolve(name, table)
    kwargs = dict(kwargs or {})
    try:
        # checked up front so that a wrong argument is a user error, while a TypeError
        # raised inside a constructor stays a visible bug
        inspect.signature(builder).bind(**kwargs)
    except TypeError as e:
        raise SparseforgeError(f"bad argument for architecture {name!r}: {e}") from None
    return builder(**kwargs)


def architecture_of(model: nn.Module, table: Mapping[str, str] = ARCHITECTURES) -> str | None:
    """The name under which ``model``'s class is listed, or None (a model from elsewhere).

    Nothing is imported: a model's class is loaded whenever the model exists.
    """
    cls = type(model)
    for name, target in table.items():
        module, attr = _split(target)
        if getattr(sys.modules.get(module), attr, None) is cls:
            return name
    return None
