"""Merge recipes: a YAML file that maps one to one onto :class:`MergeRecipe`, run by ``sparseforge merge --recipe``.

A recipe names the method, the model files and the hyperparameters::

    method: ties
    base: base.safetensors
    models: [math.safetensors, code.safetensors]
    density: 0.2
    lambda: 1.0
    out: merged.safetensors

The YAML key ``lambda`` is the field :attr:`MergeRecipe.lam` (``lambda`` is a
Python keyword); error messages call it ``lambda`` and the key ``lam`` is
refused, so a recipe has one spelling. Relative paths in a recipe file are
relative to the folder of the recipe, not to the working directory. Keys and
types are checked by :func:`sparseforge.recipes.from_mapping` (an unknown key
names the closest known one), and the options by :meth:`MergeRecipe.validate`,
the same rules as :func:`~sparseforge.merge.streaming.merge_files`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseforge.errors import SparseforgeError
from sparseforge.merge.streaming import merge_files, merge_rule
from sparseforge.progress import Progress
from sparseforge.recipes import from_mapping, read_yaml

__all__ = ["YAML_ALIASES", "MergeRecipe", "load_recipe"]

YAML_ALIASES = {"lambda": "lam"}
"""YAML key -> field of :class:`MergeRecipe`, for keys that are not Python names."""


@dataclass
class MergeRecipe:
    """A streaming merge of safetensors files (see :func:`~sparseforge.merge.streaming.merge_files`).

    Args:
        models: the models' files (the fine-tuned ones for task-vector methods). Required.
        out: the merged file. Required.
        method: a file merge method of :data:`~sparseforge.merge.core.MERGE_METHODS` (default
            ``average``; the task-vector presets; one a plug-in registered).
        base: the base model's file; required by the task-vector methods, refused by ``average``.
        weights: one weight per model (default uniform for ``average``, all 1 for task vectors).
        density: fraction of each task vector kept (``ties`` default 0.2, ``dare``/``dare_ties`` 0.1).
        lam: the task-vector scaling coefficient lambda (YAML key ``lambda``), default 1.0.
        seed: seed of DARE's drops, default 0.

    >>> MergeRecipe(models=["a.safetensors", "b.safetensors"], out="m.safetensors").method
    'average'
    """

    models: list[str]
    out: str
    method: str = "average"
    base: str | None = None
    weights: list[float] | None = None
    density: float | None = None
    lam: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` on options :func:`merge_files` would refuse (files are not opened)."""
        if not self.models:
            raise SparseforgeError("models: list at least one model file to merge")
        if not self.out:
            raise SparseforgeError("out: give the file to write the merged model to")
        merge_rule(self.method, len(self.models), base=self.base is not None, weights=self.weights,
                   density=self.density, lam=self.lam, seed=self.seed)

    def run(self, progress: bool | Progress = False) -> dict[str, Any]:
        """Validate and run the merge; returns :func:`merge_files`' report (``progress`` as there)."""
        self.validate()
        return merge_files(self.models, self.out, method=self.method, base=self.base, weights=self.weights,
                           density=self.density, lam=self.lam, seed=self.seed, progress=progress)

    def to_yaml_mapping(self) -> dict[str, Any]:
        """The recipe as the YAML mapping :func:`load_recipe` reads (``lam`` written as ``lambda``)."""
        fields = {_yaml_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _yaml_key(field: str) -> str:
    return next((key for key, name in YAML_ALIASES.items() if name == field), field)


def _yaml_names(message: str, where: str) -> str:
    # from_mapping names fields; say the YAML keys instead (lam -> lambda), leaving the file name alone.
    prefix = f"{where}: "
    head, body = (prefix, message[len(prefix):]) if message.startswith(prefix) else ("", message)
    for key, field in YAML_ALIASES.items():
        body = re.sub(rf"(?<![\w/.-]){re.escape(field)}(?![\w/.-])", key, body)
    return head + body


def load_recipe(path: str | os.PathLike[str]) -> MergeRecipe:
    """Read a merge recipe YAML file into a validated :class:`MergeRecipe`, its paths made relative to the file.

    Raises :class:`SparseforgeError` for a missing or invalid file, an
    unknown key (the closest known key suggested), a value of the wrong type
    or a missing ``models``/``out``, naming the YAML key, and for options the
    merge refuses (see :meth:`MergeRecipe.validate`).
    """
    p = Path(path)
    where = f"recipe {p}"
    data = read_yaml(p)
    for key, field in YAML_ALIASES.items():
        if field in data:
            raise SparseforgeError(f"{where}: unknown key {field!r}; the recipe key is {key!r}")
        if key in data:
            data[field] = data.pop(key)
    try:
        recipe = from_mapping(MergeRecipe, data, where=where)
    except SparseforgeError as e:
        raise SparseforgeError(_yaml_names(str(e), where)) from None
    folder = p.parent

    def rel(value: str) -> str:
        return str(folder / value) if not Path(value).is_absolute() else value

    return dataclasses.replace(
        recipe, models=[rel(m) for m in recipe.models], out=rel(recipe.out),
        base=None if recipe.base is None else rel(recipe.base),
    )
