"""YAML recipes: a YAML mapping onto the config dataclasses, one to one, validated.

A recipe is plain YAML whose keys are the fields of a config dataclass (and
whose nested mappings are the fields of nested dataclasses). :func:`from_mapping`
builds the config and rejects what would otherwise be silently ignored or
fail late: an unknown key (with the closest known key suggested), a value of
the wrong type (naming the key's full path, e.g. ``train.epochs``), a missing
required key. After construction the config's own ``validate()`` (when it has
one) checks ranges, so the rules live in one place whether a config comes
from Python or from YAML.

>>> from dataclasses import dataclass
>>> @dataclass
... class Optim:
...     lr: float = 0.1
...     betas: tuple[float, ...] = (0.9, 0.999)
>>> from_mapping(Optim, {"lr": 1, "betas": [0.8, 0.99]})
Optim(lr=1.0, betas=(0.8, 0.99))
>>> from_mapping(Optim, {"lrr": 0.05})
Traceback (most recent call last):
...
sparseforge.errors.SparseforgeError: recipe: unknown key 'lrr' (did you mean 'lr'?); known keys of the recipe: lr, betas
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sparseforge.errors import SparseforgeError

__all__ = ["from_mapping", "read_yaml", "to_mapping"]

T = TypeVar("T")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML recipe file whose top level is a mapping.

    Raises:
        SparseforgeError: the file is missing, is not valid YAML (with the
            line and column of the problem), is empty (only comments or blank
            lines: an explicit ``{}`` asks for all defaults), or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise SparseforgeError(f"recipe {p} does not exist (or is not a file)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SparseforgeError(f"recipe {p} is not valid YAML{where}: {problem}") from None
    if data is None:  # an empty file, or only comments: most likely the wrong file, so no default run
        raise SparseforgeError(f"recipe {p} is empty (no keys, only comments or blank lines): write the recipe's "
                               "keys into it (an explicit '{}' means all defaults)")
    if not isinstance(data, dict):
        raise SparseforgeError(f"recipe {p} must be a YAML mapping (key: value lines), got {type(data).__name__}")
    return data


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "recipe", _path: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, recursively, checking keys and types.

    Args:
        cls: a dataclass type; fields that are dataclasses take nested mappings.
        data: the mapping (e.g. from :func:`read_yaml`); None means all defaults.
        where: what to call the source in error messages (e.g. the file name).

    Raises:
        SparseforgeError: unknown or missing keys, or values of the wrong type,
            naming the full key path; or whatever ``cls.validate()`` raises.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise SparseforgeError(f"{where}: {_path or 'the top level'} must be a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            full = _join(_path, str(key))
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SparseforgeError(
                f"{where}: unknown key {full!r}{hint}; known keys of {_path or 'the recipe'}: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        full = _join(_path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SparseforgeError(f"{where}: missing required key {full!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], where, full)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate) and not _path:
        validate()
    return obj


def to_mapping(config: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (tuples as lists): what :func:`from_mapping` reads back."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


# -- helpers -----------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(tp: Any, value: Any, where: str, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and converted: lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where, path)
            except SparseforgeError:
                continue  # the message below names every accepted type
        names = " or ".join(_type_name(a) for a in args)
        raise SparseforgeError(f"{where}: {path} must be {names}, got {_describe(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise SparseforgeError(f"{where}: {path} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SparseforgeError(f"{where}: {path} must be a list, got {_describe(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise SparseforgeError(f"{where}: {path} must have {len(args)} items, got {len(value)}")
            items = [_convert(a, v, where, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise SparseforgeError(f"{where}: {path} must be a mapping, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SparseforgeError(f"{where}: {path} must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SparseforgeError(f"{where}: {path} must be an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SparseforgeError(f"{where}: {path} must be a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SparseforgeError(f"{where}: {path} must be a string, got {_describe(value)}")
        return value
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
