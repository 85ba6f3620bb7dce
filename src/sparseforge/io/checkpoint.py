"""Plain model checkpoints: a safetensors file of the state dict, exact zeros included.

The file holds every tensor of ``model.state_dict()`` plus metadata: the zoo
architecture name and its arguments (so that ``sparseforge prune`` and
``inspect`` can rebuild the model from the file alone), a format version, a SHA-256 per tensor so that a corrupted file is detected
and the tensor named, and a SHA-256 of the header (every metadata entry and
every tensor's name, dtype and shape: ``header_sha256``) so that a flipped
byte in the metadata is detected too (files written before it still load).
Writes are atomic (:func:`sparseforge.files.write_safetensors`). (The compressed format, with bitmasks and packed
values, builds on this one: :mod:`sparseforge.io.sfz`.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseforge.architectures import ARCHITECTURES, arch_kwargs_of, build, name_of
from sparseforge.compact import resize_modules
from sparseforge.errors import SparseforgeError
from sparseforge.files import write_safetensors
from sparseforge.formats import (
    CHECKPOINT_FORMAT, CHECKPOINT_LEGACY_KEYS, CHECKPOINT_VERSION, FORMATS, FileFormat, open_checked,
    safetensors_metadata, seal_metadata, tensor_digest, verify_tensor,
)

FORMAT = CHECKPOINT_FORMAT
FORMAT_VERSION = CHECKPOINT_VERSION


def arch_of(model: nn.Module) -> str | None:
    """The registered architecture name of ``model`` (:func:`sparseforge.architectures.name_of`), or None."""
    return name_of(model)


def arch_metadata(
    model: nn.Module, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None
) -> tuple[str | None, dict[str, Any]]:
    """(architecture name, constructor kwargs) to store with ``model``.

    Default name: the registered architecture of the model
    (:data:`~sparseforge.architectures.ARCHITECTURES`: a zoo model's name,
    ``"hf"`` for a ``transformers`` model; None for other models); default
    kwargs: what that architecture says rebuilds the model
    (:func:`~sparseforge.architectures.arch_kwargs_of`: for a zoo model,
    every constructor argument that the model keeps as an attribute of the
    same name, so a non-default model is rebuilt at its own size; for a
    ``transformers`` model its class name and config); else ``{}``.
    """
    arch = arch or name_of(model)
    if arch_kwargs is None:
        arch_kwargs = arch_kwargs_of(arch, model) if arch and arch in ARCHITECTURES else {}
    return arch, arch_kwargs


def model_for(path: str | os.PathLike[str], meta: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """The model a file's weights go into: ``model``, or one built from ``meta`` by its registered architecture.

    ``meta`` has ``arch``, ``arch_kwargs`` and ``compact`` (the sizes of the
    modules :func:`sparseforge.compact` shrank, rebuilt here). Raises
    :class:`SparseforgeError` when no model is given and the file names no
    registered architecture (:data:`~sparseforge.architectures.ARCHITECTURES`).
    """
    if model is None:
        if not meta.get("arch"):
            raise SparseforgeError(
                f"{path} does not name a zoo architecture; pass the model to load it into"
            )
        model = build(meta["arch"], **meta.get("arch_kwargs", {}))
    if meta.get("compact"):
        resize_modules(model, meta["compact"])
    return model


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.state_dict()`` to a safetensors file, atomically.

    Args:
        model: the model (finalize a Sparsifier first: masks are not saved).
        path: destination file (``.safetensors``).
        arch: zoo architecture name; default: inferred for zoo models.
        arch_kwargs: constructor arguments of the architecture. Default: the
            model's ``num_classes`` for zoo models.
        extra: JSON-serialisable metadata to store (e.g. the training report).

    Returns the path written.
    """
    arch, arch_kwargs = arch_metadata(model, arch, arch_kwargs)
    # No copy of the model: the writer copies one tensor at a time into the file.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "arch": arch or "",
        "arch_kwargs": json.dumps(arch_kwargs),
        "sha256": json.dumps({k: tensor_digest(v) for k, v in state.items()}),
        "extra": json.dumps(extra or {}),
    }
    compacted = getattr(model, "sparseforge_compact", None)
    if compacted:  # sizes of the modules compact() shrank, so that loading rebuilds them
        meta["compact"] = json.dumps(compacted)
    return write_safetensors(path, state, seal_metadata(meta, state))


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: returns (state dict, metadata).

    Raises :class:`SparseforgeError` when the file is missing, is not a
    sparseforge checkpoint (a training checkpoint of ``sparseforge train`` is
    named as such), was written by a newer format version, is truncated, its
    header does not match its digest, or a tensor's checksum does not match
    (naming the tensor).
    """
    p = Path(path)
    with open_checked(p, tag=FORMAT, what="a sparseforge checkpoint", legacy_keys=CHECKPOINT_LEGACY_KEYS,
                      max_version=FORMAT_VERSION) as (f, raw_meta, version):
        digests = _json_entry(p, raw_meta, "sha256")
        state = {}
        for k in f.keys():
            t = f.get_tensor(k)
            verify_tensor(p, k, t, digests)
            state[k] = t
    missing = sorted(set(digests) - set(state))
    if missing:
        raise SparseforgeError(f"{p} is missing tensors listed in its metadata: {', '.join(missing[:5])}")
    meta = {
        "format_version": version,
        "arch": raw_meta.get("arch") or None,
        "arch_kwargs": _json_entry(p, raw_meta, "arch_kwargs"),
        "extra": _json_entry(p, raw_meta, "extra"),
        "compact": _json_entry(p, raw_meta, "compact"),
    }
    return state, meta


def _json_entry(path: Path, raw_meta: Mapping[str, str], key: str) -> dict[str, Any]:
    """The JSON object in metadata entry ``key`` (``{}`` when absent); corrupted when it is not one."""
    try:
        value = json.loads(raw_meta.get(key, "{}"))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SparseforgeError(f"{path} is corrupted: its {key!r} metadata is not a JSON object; write the file again")
    return value


def load_checkpoint(
    path: str | os.PathLike[str], model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint into ``model``, or into a new zoo model built from its metadata.

    A checkpoint of a compacted model (:func:`sparseforge.compact`) stores the
    new module sizes; they are rebuilt in ``model`` (of the original sizes)
    before the weights are loaded.

    Returns (model, metadata). Example:

        >>> import tempfile, os, sparseforge as sf
        >>> from sparseforge.zoo import build_model
        >>> model = build_model("lenet300")
        >>> _ = sf.prune(model, sparsity=0.5)
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = save_checkpoint(model, path)
        >>> loaded, meta = load_checkpoint(path)
        >>> meta["arch"], round(sf.report(loaded).sparsity, 3)
        ('lenet300', 0.5)
    """
    state, meta = read_checkpoint(path)
    model = model_for(path, meta, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise SparseforgeError(f"{path} does not fit the model: {' '.join(first)}") from None
    return model, meta


def load_compacted(path: str | os.PathLike[str], model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint of a compacted model: rebuild the stored shapes, then load the weights.

    The same as :func:`load_checkpoint` (which rebuilds compacted shapes
    whenever the metadata holds them); ``model`` is a freshly built model of
    the original sizes, or None for zoo models. Returns (model, metadata).
    """
    return load_checkpoint(path, model)


class CheckpointFormat(FileFormat):
    """A plain checkpoint: the state dict in a safetensors file (exact zeros included), with the architecture
    and a SHA-256 per tensor in its metadata; written for names ending in `.safetensors`."""

    name = "checkpoint"
    suffixes = (".safetensors",)
    noun = "a plain sparseforge checkpoint"
    tag = FORMAT

    def detect(self, path: Path) -> bool:
        """A safetensors file whose metadata says ``format: sparseforge-checkpoint`` (whatever its name)."""
        meta = safetensors_metadata(path)
        return meta is not None and meta.get("format") == FORMAT

    def save(self, model: nn.Module, path: str | os.PathLike[str], *, arch: str | None = None,
             arch_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
        """:func:`save_checkpoint`."""
        return save_checkpoint(model, path, arch=arch, arch_kwargs=arch_kwargs, extra=extra)

    def load(self, path: str | os.PathLike[str], model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """:func:`load_checkpoint`."""
        return load_checkpoint(path, model)


CHECKPOINT = FORMATS.register(CheckpointFormat(), aliases=("safetensors",))
"""The ``checkpoint`` entry of :data:`~sparseforge.formats.FORMATS` (also named ``safetensors``)."""
