"""Saving an adapter alone and loading it onto a fresh base model.

An adapter folder holds two files, written together: a folder holding only
the adapter is written beside it and swapped in whole
(:func:`sparseforge.files.atomic_dir`); in a folder with other files both
files go to temporary files, are flushed, then renamed one after the other
(:func:`sparseforge.files.atomic_paths`):

* ``adapter.safetensors``: the trained tensors, named ``<layer>.<tensor>``
  (PaCA ``partial`` ``[out, r]``; LoRA ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``);
* ``adapter.json``: the format and version, the configuration
  (``method``, ``rank``, ``targets``, ``exclude``, ``seed``, ...), and per
  layer the base's ``in_features``/``out_features``, PaCA's selected column
  ``indices``, and each tensor's shape and SHA-256, so that a corrupted or
  mismatched pair of files is an error that names the tensor; and
  ``sha256``, the SHA-256 of the rest of the JSON (:func:`json_digest`), so
  that a changed byte in the configuration is an error too (files written
  before it still load).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.files import atomic_dir, atomic_paths, write_safetensors
from sparseforge.formats import FORMATS, FileFormat, safetensors_metadata, tensor_digest
from sparseforge.peft.config import config_from_dict
from sparseforge.peft.model import PeftReport, _select, adapter_layers, apply

FORMAT = "sparseforge-adapter"
FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
_DIGEST = "sha256"  # the entry of adapter.json holding the digest of the rest
_LEGACY_KEYS = frozenset({"format", "format_version", "config", "layers"})  # adapter.json before the digest


def json_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of a JSON object less its ``sha256`` entry, in a canonical form (sorted keys, no spaces)."""
    rest = {k: v for k, v in payload.items() if k != _DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the adapters of ``model`` (not the base) to the folder ``path``; returns it.

    The folder gets ``adapter.safetensors`` and ``adapter.json`` (see the
    module docstring); :func:`load_adapter` puts them on a fresh base model.
    """
    layers = adapter_layers(model)
    if not layers:
        raise SparseforgeError("the model has no adapters to save (apply them with sf.peft.apply)")
    configs = {json.dumps(layer.config.to_dict(), sort_keys=True) for layer in layers.values()}
    if len(configs) != 1:
        raise SparseforgeError("the model's adapters come from several sf.peft.apply calls: save_adapter stores one")
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, Any] = {}
    for name, layer in layers.items():
        stored = {short: t.detach().cpu().contiguous().clone() for short, t in layer.adapter_tensors().items()}
        tensors |= {f"{name}.{short}": t for short, t in stored.items()}
        records[name] = {**layer.layer_info(), "tensors": {
            short: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": tensor_digest(t)}
            for short, t in stored.items()}}
    folder = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "config": next(iter(layers.values())).config.to_dict(), "layers": records}

    def write(weights: Path, config: Path) -> None:
        write_safetensors(weights, tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)}, in_place=True)
        config.write_text(json.dumps({**meta, _DIGEST: json_digest(meta)}, indent=2) + "\n")

    ours = {WEIGHTS_FILE, CONFIG_FILE}
    if not folder.exists() or (folder.is_dir() and {p.name for p in folder.iterdir()} <= ours):
        # A folder of the adapter alone is swapped whole: readers see the old pair or the new one.
        with atomic_dir(folder) as tmp:
            write(tmp / WEIGHTS_FILE, tmp / CONFIG_FILE)
        return folder
    # Other files live beside it: both files are written before either is renamed, so only a crash
    # in the microseconds between the renames mixes the pair (the reader detects that).
    with atomic_paths(folder / WEIGHTS_FILE, folder / CONFIG_FILE) as (weights, config):
        write(weights, config)
    return folder


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The adapter's JSON and tensors, checked against each other."""
    meta_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise SparseforgeError(f"{p} not found: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                   "(written by sf.peft.save_adapter)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparseforgeError(f"{meta_path} is not valid JSON ({e}): the file is corrupted") from None
    if isinstance(meta, dict) and _DIGEST in meta:
        if meta[_DIGEST] != json_digest(meta):
            raise SparseforgeError(f"{meta_path} is corrupted: its content does not match its checksum; "
                                   "save the adapter again")
    elif isinstance(meta, dict) and meta.get("format") == FORMAT and set(meta) - _LEGACY_KEYS:
        raise SparseforgeError(f"{meta_path} is corrupted: it holds entries no sparseforge writes "
                               f"({', '.join(sorted(set(meta) - _LEGACY_KEYS)[:3])}); save the adapter again")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SparseforgeError(f"{meta_path} is not a sparseforge adapter file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SparseforgeError(f"{meta_path} has adapter format version {meta.get('format_version')!r}; "
                               f"this sparseforge reads version {FORMAT_VERSION}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise SparseforgeError(f"{weights_path} cannot be read ({e}): the file is corrupted or truncated") from None
    expected = {f"{name}.{short}": info for name, rec in meta["layers"].items() for short, info in rec["tensors"].items()}
    if set(tensors) != set(expected):
        raise SparseforgeError(f"{weights_path} holds tensors {sorted(tensors)} but {meta_path} lists "
                               f"{sorted(expected)}: the two files do not belong together")
    for key, info in expected.items():
        if list(tensors[key].shape) != info["shape"] or tensor_digest(tensors[key]) != info["sha256"]:
            raise SparseforgeError(f"{weights_path}: tensor {key} does not match its recorded shape and SHA-256 "
                                   "(corrupted, or the files come from different saves)")
    return meta, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, freeze: bool = True) -> PeftReport:
    """Put the adapter saved in the folder ``path`` on ``model`` (a fresh base); returns the :class:`PeftReport`.

    The saved configuration is applied again (PaCA with the saved column
    indices) and the trained tensors copied in, so the model computes what the
    trained one did. Checked first, before the model changes: the files'
    integrity, that the configuration's targets select exactly the saved
    layers in ``model``, and that each is an ``nn.Linear`` of the saved shape.
    ``freeze`` as in :func:`sparseforge.peft.apply`.
    """
    return _load(model, path, freeze)[0]


@torch.no_grad()
def _load(model: nn.Module, path: str | os.PathLike[str], freeze: bool) -> tuple[PeftReport, dict[str, Any]]:
    """:func:`load_adapter`, also returning the adapter's JSON (its configuration and layers)."""
    folder = Path(path)
    meta, tensors = _read(folder)
    config = config_from_dict(meta["config"])
    records = meta["layers"]
    selected = dict(_select(model, config))
    if set(selected) != set(records):
        raise SparseforgeError(f"the adapter in {folder} was trained on layers {sorted(records)}, but its targets "
                               f"select {sorted(selected)} in this model: load it onto the same kind of base model")
    for name, rec in records.items():
        w = selected[name].weight
        if list(w.shape) != [rec["out_features"], rec["in_features"]]:
            raise SparseforgeError(f"{name}: the adapter was trained on a base weight of shape "
                                   f"[{rec['out_features']}, {rec['in_features']}], this model's is {list(w.shape)}")
    report = apply(model, config, freeze=freeze, _saved=records)
    for name, layer in adapter_layers(model).items():
        for short, p in layer.adapter_tensors().items():
            p.copy_(tensors[f"{name}.{short}"].to(p.dtype))
    return report, meta


class AdapterFormat(FileFormat):
    """An adapter alone (PaCA or LoRA tensors and configuration: adapter.safetensors and adapter.json in a
    folder), without its base model; written for models with adapters."""

    name = "adapter"
    folder = True
    noun = "a sparseforge adapter folder"
    tag = FORMAT
    partial = True

    @staticmethod
    def folder_of(path: str | os.PathLike[str]) -> Path:
        """The adapter folder ``path`` names: itself, or the folder of its ``adapter.safetensors``."""
        p = Path(path)
        return p.parent if p.is_file() and p.name == WEIGHTS_FILE else p

    def detect(self, path: Path) -> bool:
        """A folder holding ``adapter.json``, or an adapter's weights file (its metadata says ``sparseforge-adapter``)."""
        if path.is_dir():
            return (path / CONFIG_FILE).is_file()
        meta = safetensors_metadata(path)
        return meta is not None and meta.get("format") == FORMAT

    def can_save(self, model: nn.Module) -> bool:
        """Only a model with adapters (:func:`sparseforge.peft.apply`) has an adapter to write."""
        return bool(adapter_layers(model))

    def save(self, model: nn.Module, path: str | os.PathLike[str]) -> Path:
        """:func:`save_adapter`: the adapters of ``model``, not its base."""
        return save_adapter(model, path)

    def load(self, path: str | os.PathLike[str], model: nn.Module | None = None, *,
             freeze: bool = True) -> tuple[nn.Module, dict[str, Any]]:
        """:func:`load_adapter` onto ``model``, which is required: an adapter holds no base model.

        Returns (model, metadata): ``config`` (the adapter's configuration),
        ``layers`` (per adapted layer: its shapes and PaCA's column indices)
        and ``report`` (the :class:`PeftReport`).
        """
        folder = self.folder_of(path)
        if model is None:
            raise SparseforgeError(f"{folder} is an adapter: it holds the adapter's tensors, not the model they go "
                                   "on; pass the base model it was trained on: sparseforge.load(path, model=base)")
        report, meta = _load(model, folder, freeze)
        return model, {"config": meta["config"], "layers": meta["layers"], "report": report}


ADAPTER_FORMAT = FORMATS.register(AdapterFormat())
"""The ``adapter`` entry of :data:`~sparseforge.formats.FORMATS`."""
