"""Plain model checkpoints: a safetensors file of the state dict, exact zeros included.

The file holds every tensor of ``model.state_dict()`` plus metadata: the zoo
architecture name and its arguments (so that ``sparseforge prune`` and
``inspect`` can rebuild the model from the file alone), a format version, and
a SHA-256 per tensor so that a corrupted file is detected and the tensor
named. Writes are atomic. (The compressed format, with bitmasks and packed
values, builds on this one; see DESIGN.md, "save/load".)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.files import atomic_path

FORMAT = "sparseforge-checkpoint"
FORMAT_VERSION = 1


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes, as stored in checkpoint and sfz metadata."""
    data = t.detach().cpu().contiguous().reshape(-1)
    # hashlib reads the numpy buffer in place: no second copy of the tensor (tobytes would make one).
    return hashlib.sha256(data.view(torch.uint8).numpy() if data.numel() else b"").hexdigest()


def stored_digests(raw_meta: dict[str, str]) -> dict[str, str]:
    """The per-tensor SHA-256 digests listed in a safetensors file's raw metadata (``{}`` when it lists none)."""
    return json.loads(raw_meta.get("sha256", "{}"))


def verify_tensor(path: str | os.PathLike[str], name: str, tensor: torch.Tensor, digests: dict[str, str]) -> None:
    """Raise :class:`SparseforgeError` when ``tensor``, read as ``name`` from ``path``, does not match its digest.

    Tensors without a digest in ``digests`` pass. One tensor at a time, so a
    reader that streams a file (``sparseforge.merge.streaming``) verifies as it goes.
    """
    if name in digests and tensor_digest(tensor) != digests[name]:
        raise SparseforgeError(f"{path} is corrupted: tensor {name!r} does not match its checksum")


def arch_of(model: nn.Module) -> str | None:
    """The zoo name of ``model``'s class, or None for a model from elsewhere."""
    from sparseforge.zoo.models import MODELS

    return next((name for name, cls in MODELS.items() if type(model) is cls), None)


def arch_metadata(
    model: nn.Module, arch: str | None = None, arch_kwargs: dict[str, Any] | None = None
) -> tuple[str | None, dict[str, Any]]:
    """(architecture name, constructor kwargs) to store with ``model``.

    Default name: the zoo name of the model's class (None for other models);
    default kwargs: for a zoo model, every constructor argument that the model
    keeps as an attribute of the same name (``num_classes``, ``width``), so a
    non-default model is rebuilt at its own size; a ``transformers`` model
    gets ``"hf"`` with its class name and config (:mod:`sparseforge.hf`); else ``{}``.
    """
    if arch is None and arch_kwargs is None:
        from sparseforge.export.transformer import is_hf_model

        if is_hf_model(model):  # class and config, so the file rebuilds it (sparseforge.hf)
            from sparseforge.hf import ARCH, arch_kwargs as hf_kwargs

            return ARCH, hf_kwargs(model)
    arch = arch or arch_of(model)
    if arch_kwargs is None:
        arch_kwargs = {}
        if arch:
            params = inspect.signature(type(model).__init__).parameters
            arch_kwargs = {name: getattr(model, name) for name in params
                           if name != "self" and isinstance(getattr(model, name, None), (int, float, str, bool))}
    return arch, arch_kwargs


def model_for(path: str | os.PathLike[str], meta: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """The model a file's weights go into: ``model``, or a zoo model built from ``meta``.

    ``meta`` has ``arch``, ``arch_kwargs`` and ``compact`` (the sizes of the
    modules :func:`sparseforge.compact` shrank, rebuilt here). Raises
    :class:`SparseforgeError` when no model is given and the file names no
    zoo architecture nor a transformers model.
    """
    if model is None:
        if not meta.get("arch"):
            raise SparseforgeError(
                f"{path} does not name a zoo architecture; pass the model to load it into"
            )
        from sparseforge.hf import ARCH, build_from_metadata

        if meta["arch"] == ARCH:
            model = build_from_metadata(meta.get("arch_kwargs", {}))
        else:
            from sparseforge.zoo.models import build_model

            model = build_model(meta["arch"], **meta.get("arch_kwargs", {}))
    if meta.get("compact"):
        from sparseforge.export.compact import resize_modules

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
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
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
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: returns (state dict, metadata).

    Raises :class:`SparseforgeError` when the file is missing, is not a
    sparseforge checkpoint, was written by a newer format version, is
    truncated, or a tensor's checksum does not match (naming the tensor).
    """
    p = Path(path)
    if not p.is_file():
        raise SparseforgeError(f"checkpoint {p} does not exist (or is not a file)")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
            keys = list(f.keys())
            if raw_meta.get("format") != FORMAT:
                raise SparseforgeError(
                    f"{p} is a safetensors file but not a sparseforge checkpoint (no '{FORMAT}' metadata)"
                )
            version = int(raw_meta.get("format_version", "0"))
            if version > FORMAT_VERSION:
                raise SparseforgeError(
                    f"{p} was written by a newer sparseforge (format version {version}, this one reads "
                    f"up to {FORMAT_VERSION}); upgrade sparseforge to read it"
                )
            digests = stored_digests(raw_meta)
            state = {}
            for k in keys:
                t = f.get_tensor(k)
                verify_tensor(p, k, t, digests)
                state[k] = t
    except SafetensorError as e:
        raise SparseforgeError(f"{p} is not a readable checkpoint (truncated or corrupted?): {e}") from None
    except OSError as e:
        raise SparseforgeError(f"cannot read checkpoint {p}: {e}") from None
    missing = sorted(set(digests) - set(state))
    if missing:
        raise SparseforgeError(f"{p} is missing tensors listed in its metadata: {', '.join(missing[:5])}")
    meta = {
        "format_version": version,
        "arch": raw_meta.get("arch") or None,
        "arch_kwargs": json.loads(raw_meta.get("arch_kwargs", "{}")),
        "extra": json.loads(raw_meta.get("extra", "{}")),
        "compact": json.loads(raw_meta.get("compact", "{}")),
    }
    return state, meta


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
