"""Plain model checkpoints: a safetensors file of the state dict, exact zeros included.

The file holds every tensor of ``model.state_dict()`` plus metadata: the zoo
architecture name and its arguments (so that ``sparseforge prune`` and
``inspect`` can rebuild the model from the file alone), a format version, a SHA-256 per tensor so that a corrupted file is detected
and the tensor named, and a SHA-256 of the header (every metadata entry and
every tensor's name, dtype and shape: ``header_sha256``) so that a flipped
byte in the metadata is detected too (files written before it still load).
Writes are atomic (:func:`sparseforge.files.write_safetensors`). (The compressed format, with bitmasks and packed
values, builds on this one: :mod:`sparseforge.export.sfz`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from sparseforge.architectures import ARCHITECTURES, arch_kwargs_of, build, name_of
from sparseforge.errors import SparseforgeError
from sparseforge.files import safetensors_dtype, write_safetensors

FORMAT = "sparseforge-checkpoint"
FORMAT_VERSION = 1
#: the metadata entry holding the SHA-256 of the rest of the header (see :func:`header_digest`)
HEADER_DIGEST = "header_sha256"
# The metadata entries that checkpoints written before the header digest hold: a file
# without the digest but with another entry has had a byte of an entry's name flipped.
LEGACY_KEYS = frozenset({"format", "format_version", "arch", "arch_kwargs", "sha256", "extra", "compact"})


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


def header_digest(metadata: Mapping[str, str], table: Mapping[str, tuple[str, Sequence[int]]]) -> str:
    """SHA-256 (hex) of a safetensors header: its metadata (less this digest) and each tensor's dtype and shape.

    ``table`` maps tensor names to (safetensors dtype name, shape). The
    tensors' bytes have digests of their own (:func:`tensor_digest`); this
    one covers what the reader takes from the header, so that a flipped byte
    there (a name, an architecture argument, a recorded report) is an error
    and not a silently different model or report.
    """
    canonical = {
        "metadata": {k: v for k, v in metadata.items() if k != HEADER_DIGEST},
        "tensors": {k: [dtype, [int(n) for n in shape]] for k, (dtype, shape) in table.items()},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_metadata(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``metadata`` with its :data:`HEADER_DIGEST` entry (re)computed for a file holding ``tensors``."""
    table = {k: (safetensors_dtype(t), list(t.shape)) for k, t in tensors.items()}
    plain = {k: v for k, v in metadata.items() if k != HEADER_DIGEST}
    return {**plain, HEADER_DIGEST: header_digest(plain, table)}


def check_header(
    path: str | os.PathLike[str], handle: Any, metadata: Mapping[str, str], legacy_keys: Collection[str],
    max_version: int,
) -> None:
    """Raise :class:`SparseforgeError` when an open safetensors file's header does not match its digest.

    ``handle`` is the file opened with ``safetensors.safe_open``. A file
    without a :data:`HEADER_DIGEST` entry was written before there was one:
    it passes when its metadata holds only ``legacy_keys`` (an entry whose
    name a flipped byte changed is corrupted). A mismatch in a file that
    says it has a format version above ``max_version`` is reported as a
    newer file (a later version may compute the digest otherwise).
    """
    stored = metadata.get(HEADER_DIGEST)
    if stored is None:
        unknown = sorted(set(metadata) - set(legacy_keys))
        if unknown:
            raise SparseforgeError(f"{path} is corrupted: its metadata holds entries no sparseforge writes "
                                   f"({', '.join(repr(k) for k in unknown[:3])}); write the file again")
        return
    table = {}
    for k in handle.keys():
        piece = handle.get_slice(k)
        table[k] = (piece.get_dtype(), piece.get_shape())
    if header_digest(metadata, table) != stored:
        try:
            newer = int(metadata.get("format_version", "0")) > max_version
        except ValueError:
            newer = False
        if newer:
            raise SparseforgeError(f"{path} was written by a newer sparseforge (format version "
                                   f"{metadata['format_version']}, this one reads up to {max_version}): "
                                   "upgrade sparseforge to read it")
        raise SparseforgeError(f"{path} is corrupted: its metadata does not match its checksum; write the file again")


def foreign_format(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a safetensors file, when its first bytes say what it is instead; None otherwise.

    Recognised: PyTorch files (``torch.save``: a zip archive, or a pickle in
    the legacy format), naming a training checkpoint of ``sparseforge train``
    as such and pointing to the run's ``model.safetensors``. The file is not
    unpickled (that would run code from it): a training checkpoint is told
    by its format name in the first bytes of its pickle, which torch.save
    stores uncompressed.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    zipped = head.startswith(b"PK\x03\x04")  # torch.save since torch 1.6
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # the legacy format
    if not (zipped or pickled):
        return None
    from sparseforge.distributed.train import CHECKPOINT_FORMAT

    if CHECKPOINT_FORMAT.encode() in head:
        run_model = p.parent.parent / "model.safetensors"
        where = (f" ({run_model})" if run_model.is_file() else
                 " (written when the run finishes; until then resume the run with sparseforge train)")
        return (f"{p} is a training checkpoint written by `sparseforge train` (a torch.save file for resuming "
                f"the run), not a model file: pass the run folder's model.safetensors instead{where}")
    return (f"{p} is a PyTorch file written by torch.save, not a sparseforge model file: pass a "
            "sparseforge checkpoint (.safetensors) or .sfz file instead (from Python, load the model and "
            "write one with sparseforge.save_checkpoint)")


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
    if not p.is_file():
        raise SparseforgeError(f"checkpoint {p} does not exist (or is not a file)")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
            keys = list(f.keys())
            if HEADER_DIGEST in raw_meta or raw_meta.get("format") == FORMAT:
                check_header(p, f, raw_meta, LEGACY_KEYS, FORMAT_VERSION)
            if raw_meta.get("format") != FORMAT:
                raise SparseforgeError(
                    f"{p} is a safetensors file but not a sparseforge checkpoint (no '{FORMAT}' metadata)"
                )
            version = _version(p, raw_meta)
            if version > FORMAT_VERSION:
                raise SparseforgeError(
                    f"{p} was written by a newer sparseforge (format version {version}, this one reads "
                    f"up to {FORMAT_VERSION}); upgrade sparseforge to read it"
                )
            digests = _json_entry(p, raw_meta, "sha256")
            state = {}
            for k in keys:
                t = f.get_tensor(k)
                verify_tensor(p, k, t, digests)
                state[k] = t
    except SafetensorError as e:
        raise SparseforgeError(foreign_format(p) or
                               f"{p} is not a readable checkpoint (truncated or corrupted?): {e}") from None
    except OSError as e:
        raise SparseforgeError(f"cannot read checkpoint {p}: {e}") from None
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


def _version(path: Path, raw_meta: Mapping[str, str]) -> int:
    try:
        return int(raw_meta.get("format_version", "0"))
    except ValueError:
        raise SparseforgeError(f"{path} is corrupted: its format version {raw_meta['format_version']!r} is not "
                               "a number") from None


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
