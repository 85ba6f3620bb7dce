"""Registries: one name -> object table per kind of plug-in (scores, methods, merge rules, ...).

Every part that a user may name in a string (a score in ``prune(..., score="snip")``,
a method in a YAML recipe, a merge rule on the command line) is registered
once, next to its definition, in the :class:`Registry` of its kind. Lookups,
"did you mean" suggestions, CLI help and choices, recipe validation and the
tables in ``docs/architecture.md`` all read the registry, so a name is never
listed twice, and a user adds a part from outside the package by registering
it the same way (see ``docs/extending.md``).

>>> colors = Registry("color")
>>> @colors.register("crimson", aliases=("dark-red",))
... class Crimson:
...     '''A deep red.'''
>>> colors.get("Dark_Red") is Crimson      # case, "-" and "_" do not matter
True
>>> colors.names()
['crimson']
>>> colors.get("crimsom")
Traceback (most recent call last):
...
sparseforge.errors.SparseforgeError: unknown color 'crimsom'; did you mean 'crimson'? (known: crimson)
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from sparseforge.errors import SparseforgeError

__all__ = ["Registry", "import_plugins", "summary"]

T = TypeVar("T")
O = TypeVar("O")

_LAZY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _normalize(name: str) -> str:
    """The lookup key of a name: case, surrounding blanks, ``-``, ``_`` and inner blanks do not matter."""
    return re.sub(r"[\s_-]+", "", str(name)).casefold()


@dataclass
class _Entry:
    """One registered name: its object, or where to import it from (``module:attr``) until first use."""

    name: str
    obj: Any = None
    target: str | None = None  # "module:attr" of a lazy entry not resolved yet
    aliases: tuple[str, ...] = ()


class Registry(Generic[T]):
    """A table of named objects of one ``kind`` ("score", "merge method", ...).

    Names are looked up without regard to case, blanks, ``-`` and ``_``
    (``"dare-ties"``, ``"DARE_TIES"`` and ``"dare_ties"`` are one name), and
    listed in registration order under the spelling they were registered with.

    Args:
        kind: what the objects are, for messages ("unknown <kind> 'x'").
        name_of: the name an object registers under when :meth:`register`
            is given none. Default: the object's ``name`` attribute if it is
            a string, else its ``__name__`` in lower case.
    """

    def __init__(self, kind: str, *, name_of: Callable[[Any], str] | None = None) -> None:
        self.kind = kind
        self._name_of = name_of
        self._entries: dict[str, _Entry] = {}  # normalized canonical name -> entry
        self._keys: dict[str, str] = {}  # normalized name or alias -> normalized canonical name

    # -- registering ----------------------------------------------------------------

    @overload
    def register(self, name: O, /) -> O: ...

    @overload
    def register(self, name: str | None = None, obj: None = None, *, aliases: Iterable[str] = (),
                 replace: bool = False) -> Callable[[O], O]: ...

    @overload
    def register(self, name: str | None, obj: O, *, aliases: Iterable[str] = (), replace: bool = False) -> O: ...

    def register(self, name: Any = None, obj: Any = None, *, aliases: Iterable[str] = (),
                 replace: bool = False) -> Any:
        """Register an object under ``name`` (and ``aliases``): as a decorator or as a call.

        - ``@registry.register("snip")`` or bare ``@registry.register`` above a
          class or function (the bare form names it by ``name_of``);
        - ``registry.register("er", partial(ERK, kernel=False))``.

        Returns the object (so the decorated name still refers to it).

        Registering the same object under the same name and aliases again
        changes nothing.

        Raises:
            SparseforgeError: the name or an alias is taken (by another entry,
                or by this one under another spelling) and ``replace`` is False.
        """
        if name is not None and not isinstance(name, str):  # bare decorator: @registry.register
            return self._add(self._default_name(name), name, None, aliases, replace)
        if obj is not None:
            return self._add(name or self._default_name(obj), obj, None, aliases, replace)

        def decorate(o: O) -> O:
            return self._add(name or self._default_name(o), o, None, aliases, replace)

        return decorate

    def register_lazy(self, name: str, target: str, *, aliases: Iterable[str] = (), replace: bool = False) -> None:
        """Register ``name`` for the object ``target`` (``"package.module:attr"``), imported on first use.

        A registry in a low layer can so name objects defined in higher
        layers (model architectures of the zoo, a user's plug-in) without
        importing them: :meth:`names` lists the name at once, :meth:`get`
        imports the module the first time the name is looked up.
        """
        if not isinstance(target, str) or not _LAZY_RE.match(target):
            raise SparseforgeError(f"{self.kind} {name!r}: a lazy target is 'package.module:attribute', got {target!r}")
        self._add(name, None, target, aliases, replace)

    def _default_name(self, obj: Any) -> str:
        if self._name_of is not None:
            return self._name_of(obj)
        label = getattr(obj, "name", None)
        if isinstance(label, str) and label:
            return label
        return str(getattr(obj, "__name__", "")).lower()

    def _add(self, name: str, obj: Any, target: str | None, aliases: Iterable[str], replace: bool) -> Any:
        if not isinstance(name, str) or not _normalize(name):
            raise SparseforgeError(f"a {self.kind} needs a non-empty name, got {name!r}")
        key = _normalize(name)
        aliases = tuple(aliases)
        new_keys = [key, *(_normalize(a) for a in aliases)]
        if len(set(new_keys)) != len(new_keys):
            raise SparseforgeError(f"{self.kind} {name!r}: its aliases {aliases} repeat a spelling of one name")
        same = self._entries.get(key)
        if same is not None and same.aliases == aliases and (
                (obj is not None and same.obj is obj) or (target is not None and same.target == target)):
            return obj  # the same registration again (a module imported twice): nothing to change
        taken = [k for k in new_keys if k in self._keys and self._keys[k] != key]
        if key in self._entries:
            taken.insert(0, key)
        if taken and not replace:
            owner = self._entries[self._keys[taken[0]]].name
            raise SparseforgeError(
                f"{self.kind} {name!r} is already registered (as {owner!r}); pick another name, or pass "
                "replace=True to replace it"
            )
        for k in taken:  # replace=True: drop whatever held these spellings
            self._drop(self._keys[k])
        self._entries[key] = _Entry(name=name, obj=obj, target=target, aliases=aliases)
        for k in new_keys:
            self._keys[k] = key
        return obj

    def _drop(self, key: str) -> None:
        self._entries.pop(key, None)
        for k in [k for k, v in self._keys.items() if v == key]:
            del self._keys[k]

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (a no-op when absent): for tests and for replacing plug-ins."""
        key = self._keys.get(_normalize(name))
        if key is not None:
            self._drop(key)

    # -- looking up -----------------------------------------------------------------

    def get(self, name: str) -> T:
        """The object registered as ``name`` (or an alias), imported first if it was registered lazily.

        Raises:
            SparseforgeError: no such name: the message suggests the closest
                known name and lists them all (see :meth:`error`).
        """
        key = self._keys.get(_normalize(name)) if isinstance(name, str) else None
        if key is None:
            raise self.error(name)
        return self._resolve(self._entries[key])

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (``"DARE-TIES"`` -> ``"dare_ties"``); SparseforgeError when unknown."""
        key = self._keys.get(_normalize(name)) if isinstance(name, str) else None
        if key is None:
            raise self.error(name)
        return self._entries[key].name

    def _resolve(self, entry: _Entry) -> T:
        if entry.target is not None:
            module, _, attr = entry.target.partition(":")
            try:
                obj: Any = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as e:
                raise SparseforgeError(f"{self.kind} {entry.name!r} is registered as {entry.target}, which cannot "
                                       f"be imported: {e}") from None
            entry.obj, entry.target = obj, None
        return entry.obj

    def error(self, name: Any, *, known: Iterable[str] | None = None, note: str = "",
              closest_to: str | None = None) -> SparseforgeError:
        """The error for an unknown ``name``: "unknown <kind> 'x'; did you mean 'y'? (known: ...)<note>".

        ``known`` replaces the listed names (e.g. only those a command accepts);
        ``closest_to`` is the part of ``name`` to suggest a name for (default: all of it).
        """
        listed = list(self.names() if known is None else known)
        spellings = {_normalize(n): n for n in listed}
        for alias_key, key in self._keys.items():  # a close alias suggests its canonical name
            if self._entries[key].name in listed:
                spellings.setdefault(alias_key, self._entries[key].name)
        query = _normalize(str(name if closest_to is None else closest_to))
        close = difflib.get_close_matches(query, list(spellings), n=1, cutoff=0.6)
        hint = f"; did you mean {spellings[close[0]]!r}?" if close else ""
        return SparseforgeError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(listed)}){note}")

    def names(self) -> list[str]:
        """The registered names (not the aliases), in registration order."""
        return [e.name for e in self._entries.values()]

    def aliases(self, name: str) -> tuple[str, ...]:
        """The other spellings registered for ``name``."""
        key = self._keys.get(_normalize(name))
        return self._entries[key].aliases if key is not None else ()

    def items(self) -> list[tuple[str, T]]:
        """(name, object) pairs in registration order; lazily registered objects are imported."""
        return [(e.name, self._resolve(e)) for e in list(self._entries.values())]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _normalize(name) in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"

    def table(self, describe: Callable[[str, T], str] | None = None) -> str:
        """A Markdown table of the registered names, their aliases and what each is (for the docs).

        ``describe(name, obj)`` gives the last column; default: the first
        line of the object's docstring.
        """
        describe = describe or (lambda name, obj: summary(obj))
        rows = [f"| {self.kind} | aliases | what it is |", "| --- | --- | --- |"]
        for name, obj in self.items():
            aliases = ", ".join(f"`{a}`" for a in self.aliases(name))
            text = describe(name, obj).replace("|", "\\|")
            rows.append(f"| `{name}` | {aliases} | {text} |")
        return "\n".join(rows) + "\n"


def summary(obj: Any) -> str:
    """One line saying what a registered object is: its ``summary`` attribute, else the first paragraph
    of its docstring (of the wrapped function, for a ``functools.partial``)."""
    text = getattr(obj, "summary", None)
    if not isinstance(text, str):
        target = obj.func if isinstance(obj, functools.partial) else obj
        text = inspect.getdoc(target) or ""
    return " ".join(text.strip().split("\n\n")[0].split())


def import_plugins(modules: Iterable[str]) -> list[str]:
    """Import each plug-in module (``package.module``), whose import registers its parts; returns their names.

    Modules are found on ``sys.path`` and in the current folder. The CLI
    imports those named by ``sparseforge --plugin MODULE`` before it parses
    the command (so that its choices include what they register).

    Raises:
        SparseforgeError: a module cannot be imported (the message names it
            and the import error).
    """
    modules = [m.strip() for m in modules if m.strip()]
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # a plug-in next to the user's recipe, as `python -m` would find it
    done = []
    for name in modules:
        name = name.strip()
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SparseforgeError(f"cannot import plug-in module {name!r}: {e}") from None
        done.append(name)
    return done
