"""What every file sparseforge writes shares: format names, SHA-256 digests, and telling other formats apart.

Checkpoints, ``.sfz`` files, adapters and merged files are safetensors files
whose metadata holds a SHA-256 per stored tensor (:func:`tensor_digest`) and
one of the whole header (:data:`HEADER_DIGEST`: every metadata entry and every
tensor's name, dtype and shape), so that a flipped byte anywhere is an error
naming what is corrupted. The readers in :mod:`sparseforge.io`, the streaming
merge (:mod:`sparseforge.merge.streaming`) and the adapter files
(:mod:`sparseforge.peft.saving`) check them with the functions here; this
module sits below all of them (it imports nothing of sparseforge but errors
and files).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sparseforge.errors import SparseforgeError
from sparseforge.files import safetensors_dtype

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_LEGACY_KEYS", "CHECKPOINT_VERSION", "HEADER_DIGEST", "TRAINING_CHECKPOINT_FORMAT",
    "check_header", "foreign_format", "header_digest", "seal_metadata", "stored_digests", "tensor_digest",
    "verify_tensor",
]

#: the ``format`` metadata entry of a plain checkpoint (:mod:`sparseforge.io.checkpoint`)
CHECKPOINT_FORMAT = "sparseforge-checkpoint"
#: the newest plain-checkpoint format version (the version this sparseforge writes and reads up to)
CHECKPOINT_VERSION = 1
# The metadata entries that checkpoints written before the header digest hold: a file
# without the digest but with another entry has had a byte of an entry's name flipped.
CHECKPOINT_LEGACY_KEYS = frozenset({"format", "format_version", "arch", "arch_kwargs", "sha256", "extra", "compact"})
#: the ``format`` entry of the torch.save payloads ``sparseforge train`` writes to resume a run
TRAINING_CHECKPOINT_FORMAT = "sparseforge-train-checkpoint"
#: the metadata entry holding the SHA-256 of the rest of the header (see :func:`header_digest`)
HEADER_DIGEST = "header_sha256"


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
    if TRAINING_CHECKPOINT_FORMAT.encode() in head:
        run_model = p.parent.parent / "model.safetensors"
        where = (f" ({run_model})" if run_model.is_file() else
                 " (written when the run finishes; until then resume the run with sparseforge train)")
        return (f"{p} is a training checkpoint written by `sparseforge train` (a torch.save file for resuming "
                f"the run), not a model file: pass the run folder's model.safetensors instead{where}")
    return (f"{p} is a PyTorch file written by torch.save, not a sparseforge model file: pass a "
            "sparseforge checkpoint (.safetensors) or .sfz file instead (from Python, load the model and "
            "write one with sparseforge.save_checkpoint)")
