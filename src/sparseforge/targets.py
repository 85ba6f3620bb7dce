"""Which tensors are sparsified: the ``Target`` part.

A :class:`Target` selects modules of a model by type and by name glob and names
the parameter of each (``weight`` by default) that a method will sparsify.
Biases, normalisation layers and embeddings are left alone unless asked for:
the literature prunes the weight matrices of Linear and convolution layers,
and pruning a norm's scale or an embedding row changes what the model can
represent rather than how many connections it has.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseforge.errors import SparseforgeError

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

_TYPE_NAMES: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv1d": nn.Conv1d,
    "conv2d": nn.Conv2d,
    "conv3d": nn.Conv3d,
    "embedding": nn.Embedding,
}


@dataclass(frozen=True)
class Layer:
    """One targeted tensor: the module that owns it, its name and its parameter name."""

    name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def mask_name(self) -> str:
        return f"{self.param_name}_mask"


@dataclass(frozen=True)
class Target:
    """Select the tensors to sparsify by module type and name glob.

    Rule: a module is targeted when it is an instance of one of ``types``, its
    qualified name matches at least one glob of ``include`` and none of
    ``exclude``. Globs use :mod:`fnmatch` syntax (``"layer1.*"``, ``"*fc*"``).
    Every glob in ``include`` must match at least one module of the allowed
    types, otherwise a :class:`SparseforgeError` names the glob and lists
    module names that exist, because a typo would otherwise silently leave a
    layer dense.

    Args:
        include: name globs to target. Default ``("*",)``: every module of the
            allowed types.
        exclude: name globs to leave dense. Default: none.
        types: module classes to consider, or their names (``"linear"``,
            ``"conv2d"``, ...). Default: Linear, Conv1d, Conv2d.
        param_name: the parameter of each module to sparsify. Default ``"weight"``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> [layer.name for layer in Target().select(model)]
        ['0', '2']
        >>> [layer.name for layer in Target(exclude=["2"]).select(model)]
        ['0']
    """

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    types: Sequence[type[nn.Module] | str] = field(default=DEFAULT_TYPES)
    param_name: str = "weight"

    def _resolved_types(self) -> tuple[type[nn.Module], ...]:
        resolved = []
        for t in self.types:
            if isinstance(t, str):
                if t.lower() not in _TYPE_NAMES:
                    raise SparseforgeError(
                        f"unknown module type {t!r} in Target.types; "
                        f"use one of {sorted(_TYPE_NAMES)} or a module class"
                    )
                resolved.append(_TYPE_NAMES[t.lower()])
            else:
                resolved.append(t)
        return tuple(resolved)

    def select(self, model: nn.Module) -> list[Layer]:
        """Return the targeted layers of ``model`` in module order."""
        include = [self.include] if isinstance(self.include, str) else list(self.include)
        exclude = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude)
        types = self._resolved_types()
        candidates = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, types) and isinstance(getattr(module, self.param_name, None), torch.Tensor)
        ]
        for glob in include:
            if not any(fnmatch.fnmatchcase(name, glob) for name, _ in candidates):
                names = [name for name, _ in candidates]
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise SparseforgeError(
                    f"target pattern {glob!r} matches no {'/'.join(t.__name__ for t in types)} module; "
                    f"available: {shown or 'none'}"
                )
        layers = [
            Layer(name, module, self.param_name)
            for name, module in candidates
            if any(fnmatch.fnmatchcase(name, g) for g in include)
            and not any(fnmatch.fnmatchcase(name, g) for g in exclude)
        ]
        if not layers:
            raise SparseforgeError(
                f"the target selects no tensor (include={include}, exclude={exclude}); "
                "loosen the exclude globs or add module types"
            )
        return layers


TargetSpec = Target | Sequence[str] | str | None
"""What a ``target`` argument accepts: a :class:`Target`, a module name glob, a list of them, or None (the
default of the function it is given to); :func:`as_target` turns it into a Target."""


def as_target(spec: TargetSpec) -> Target:
    """Turn ``None`` (every Linear/Conv), a glob or a list of globs into a :class:`Target`."""
    if spec is None:
        return Target()
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, str):
        return Target(include=(spec,))
    return Target(include=tuple(spec))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (e.g. ``"encoder.layer.0.query"``), in place."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)
