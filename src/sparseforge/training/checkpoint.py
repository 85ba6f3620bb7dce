"""Training checkpoints: the version-2 file format, its content digest, and the run folder's checkpoint list.

A training checkpoint is one ``torch.save`` of a nested payload (tensors,
numbers, strings, lists, dicts) whose top-level keys are written by the
training loop (:class:`~sparseforge.training.CheckpointCallback`: model,
optimizer, scheduler, step, position, RNG states, world size, seconds) and by
the callbacks that keep state (the Sparsifier's masks, a DDP comm hook's
residuals, the metrics history) plus whatever the caller adds (``sparseforge
train`` adds its recipe). ``format`` names the kind of file and ``version``
its layout; version 2 adds ``sha256``, a digest of everything else
(:func:`state_digest`), because ``torch.load`` does not check the zip's CRCs
and a flipped byte in a tensor would otherwise load silently. Files are
written under a temporary name and renamed into place
(:mod:`sparseforge.files`), so every ``step-NNNNNNNN.pt`` in a run folder's
``checkpoints/`` is complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseforge.errors import SparseforgeError
from sparseforge.files import atomic_path, remove_stale_temporaries
from sparseforge.formats import TRAINING_CHECKPOINT_FORMAT

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "READABLE_CHECKPOINT_VERSIONS",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_checkpoint",
    "rng_state",
    "set_rng_state",
    "state_digest",
    "write_training_checkpoint",
]

CHECKPOINT_FORMAT = TRAINING_CHECKPOINT_FORMAT  # in formats.py, beside the formats io tells apart
CHECKPOINT_VERSION = 2
#: Versions this code resumes from: 1 was written without the content digest.
READABLE_CHECKPOINT_VERSIONS = (1, 2)
_CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run folder keeps its training checkpoints: ``RUN/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The file of the checkpoint written after optimizer step ``step``: ``RUN/checkpoints/step-NNNNNNNN.pt``."""
    return checkpoint_dir(run_dir) / f"step-{int(step):08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in run folder ``run_dir``, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CHECKPOINT_RE.match(p.name)  # temporary files of an interrupted write do not match
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete training checkpoint in run folder ``run_dir``, or None.

    Checkpoints are renamed into place only once fully written, so every
    ``step-N.pt`` is complete; a file that still fails to load (a damaged disk)
    is skipped with a warning in favour of the one before.
    """
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            load_training_checkpoint(path, torch.device("cpu"), mmap=True)
            return path
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older one
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None


def load_training_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read a training checkpoint, checking its format, version and (version 2) content digest.

    Args:
        path: a ``step-N.pt`` file.
        device: where its tensors are loaded.
        mmap: map the file instead of reading it (a cheap readability check).

    Raises:
        SparseforgeError: the file cannot be read, is not a training checkpoint, has
            an unknown version, or its content does not match its digest.
    """
    path = Path(path)
    # weights_only=False: the file holds plain Python data besides tensors (a recipe, the
    # metrics, the methods' RNG states) and is one that this code wrote into its own run folder.
    try:
        state = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except OSError as e:
        raise SparseforgeError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged zip or pickle fails in many ways, all of them "unreadable"
        raise SparseforgeError(f"{path} is not a readable training checkpoint (truncated or corrupted: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SparseforgeError(f"{path} is not a sparseforge training checkpoint")
    version = state.get("version")
    if version not in READABLE_CHECKPOINT_VERSIONS:
        raise SparseforgeError(f"{path} has checkpoint version {version!r}; this sparseforge reads "
                               f"{', '.join(map(str, READABLE_CHECKPOINT_VERSIONS))}")
    if version >= 2:
        digest = state.pop("sha256", None)
        if digest is None or digest != state_digest(state):
            raise SparseforgeError(f"{path} is corrupted: its content does not match its checksum")
    return state


def write_training_checkpoint(payload: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``payload`` (format and version keys included) with its digest to ``path``, atomically.

    The payload gets its ``sha256`` entry here. A kill during the write leaves a
    temporary file that this function removes on its next call in the same folder.
    """
    path = Path(path)
    payload["sha256"] = state_digest(payload)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # a file object: a full disk raises OSError(ENOSPC), not torch's RuntimeError
    # Each checkpoint has a new name, so atomic_path's cleanup (same name) never meets the
    # temporary file of a write that was killed: remove those of every dead writer here.
    remove_stale_temporaries(path.parent)
    return path


def state_digest(state: Any) -> str:
    """SHA-256 over a nested checkpoint payload: its structure, every tensor's dtype, shape and
    bytes, every array's bytes and every other leaf's ``repr``. Keys named ``sha256`` are left
    out, so the digest can be stored in the payload it covers.

    >>> state_digest({"w": torch.zeros(2), "sha256": "x"}) == state_digest({"w": torch.zeros(2)})
    True
    >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(3)})
    False
    """
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(obj, np.ndarray):
            h.update(f"A{obj.dtype}{obj.shape}".encode())
            h.update(np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, dict):
            keys = [key for key in obj if key != "sha256"]
            h.update(f"D{len(keys)}".encode())
            for key in keys:
                h.update(repr(key).encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__}{len(obj)}".encode())
            for item in obj:
                visit(item)
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG state (and the CUDA device's, on CUDA), as a checkpoint keeps it."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore a state of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
