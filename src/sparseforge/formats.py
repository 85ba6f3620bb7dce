"""What every file sparseforge writes shares: format names, SHA-256 digests, and telling other formats apart.

Checkpoints, ``.sfz`` files, adapters and merged files are safetensors files
whose metadata holds a SHA-256 per stored tensor (:func:`tensor_digest`) and
one of the whole header (:data:`HEADER_DIGEST`: every metadata entry and every
tensor's name, dtype and shape), so that a flipped byte anywhere is an error
naming what is corrupted. The readers in :mod:`sparseforge.io`, the streaming
merge (:mod:`sparseforge.merge.streaming`) and the adapter files
(:mod:`sparseforge.peft.saving`) check them with the functions here; this
module sits below all of them (it imports nothing of sparseforge but errors,
files and registry).

Every format that :func:`sparseforge.save` writes and :func:`sparseforge.load`
reads is a :class:`FileFormat` registered in :data:`FORMATS`, by the module
that defines it, when it is imported: ``checkpoint`` and ``sfz`` and ``hf`` by
:mod:`sparseforge.io`, ``adapter`` by :mod:`sparseforge.peft`. A reader of a
safetensors-based format opens its files with :func:`open_checked`, which
checks the header digest and turns every other kind of file into an error
that says what the file is.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import struct
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.files import safetensors_dtype
from sparseforge.registry import Registry

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_LEGACY_KEYS", "CHECKPOINT_VERSION", "FORMATS", "HEADER_DIGEST",
    "TRAINING_CHECKPOINT_FORMAT", "CheckedFile", "FileFormat", "check_header", "check_options", "foreign_format",
    "header_digest", "open_checked", "safetensors_metadata", "seal_metadata", "stored_digests", "tensor_digest",
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
            raise _newer(path, metadata["format_version"], max_version)
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


def _newer(path: str | os.PathLike[str], version: object, max_version: int) -> SparseforgeError:
    """The error for a file of a format version above ``max_version`` (the only case that says "upgrade")."""
    return SparseforgeError(f"{path} was written by a newer sparseforge (format version {version}); this one reads "
                            f"up to {max_version}: upgrade sparseforge to read it")


def _version(path: str | os.PathLike[str], metadata: Mapping[str, str]) -> int:
    """The ``format_version`` entry of a file's metadata (0 when absent); a non-number is corrupted."""
    try:
        return int(metadata.get("format_version", "0"))
    except ValueError:
        raise SparseforgeError(f"{path} is corrupted: its format version {metadata['format_version']!r} is not "
                               "a number") from None


# -- file formats ------------------------------------------------------------------------------


class FileFormat:
    """A kind of model file that :func:`sparseforge.save` writes and :func:`sparseforge.load` reads.

    Subclass it, set the attributes, implement :meth:`detect`, :meth:`save`
    and :meth:`load`, and register it in :data:`FORMATS` (an instance, or the
    class itself with ``@FORMATS.register``: it is instantiated without
    arguments when used). ``sf.save(model, path, format="name", **options)``
    hands ``options`` to :meth:`save` unchanged, ``sf.load(path, model,
    **options)`` to :meth:`load`.

    Attributes:
        name: the name it is registered under (``format="sfz"``).
        suffixes: endings of file names that :func:`sparseforge.save` writes
            in this format when no ``format`` is given (``(".sfz",)``).
        folder: whether a file of this format is a folder. A name that ends
            in none of the formats' suffixes is written as a folder, by the
            one folder format whose :meth:`can_save` accepts the model.
        noun: what one file of it is, with its article, for messages
            (``"an sfz file"``).
        tag: for a format of safetensors files, the ``format`` entry of their
            metadata (so that another reader can say what such a file is).
        partial: whether its files hold only part of a model (an adapter):
            loading one needs the model it goes on, and commands that convert
            whole models do not offer it.
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()
    folder: bool = False
    noun: str = "a model file"
    tag: str | None = None
    partial: bool = False

    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds a file (or folder) of this format, told by what it holds, not by its name.

        Called on every path :func:`sparseforge.load` is given, for every
        format: it must be cheap (read a header, look for a file) and must
        not raise (a damaged file that still says what it is should be
        detected, so that :meth:`load` names the damage).
        """
        raise NotImplementedError(f"file format {self.name!r} does not implement detect()")

    def save(self, model: nn.Module, path: str | os.PathLike[str], **options: Any) -> Path:
        """Write ``model`` to ``path`` in this format; returns the path written."""
        raise NotImplementedError(f"file format {self.name!r} does not implement save()")

    def load(self, path: str | os.PathLike[str], model: nn.Module | None = None,
             **options: Any) -> tuple[nn.Module, dict[str, Any]]:
        """Read ``path`` into ``model`` (None: a model the file describes); returns (model, metadata)."""
        raise NotImplementedError(f"file format {self.name!r} does not implement load()")

    def can_save(self, model: nn.Module) -> bool:
        """Whether this format can hold ``model`` (asked only to pick a folder format from a name)."""
        return True

    def suffix_of(self, path: str | os.PathLike[str]) -> str | None:
        """The longest of :attr:`suffixes` that the name of ``path`` ends in (case ignored), or None."""
        name = Path(path).name.lower()
        hits = [s for s in self.suffixes if name.endswith(s.lower()) and len(name) > len(s)]
        return max(hits, key=len) if hits else None

    def __repr__(self) -> str:
        return f"<file format {self.name!r}>"


FORMATS: Registry[FileFormat | type[FileFormat]] = Registry("file format")
"""Every file format by name: ``checkpoint`` (alias ``safetensors``), ``sfz``, ``hf``, ``adapter``, and yours.

The built-in ones are registered by the modules that define them, when they
are imported (:mod:`sparseforge.io` and :mod:`sparseforge.peft`); importing
any part of sparseforge imports the package, and the package imports both,
so they are always there."""


def _formats() -> list[tuple[str, FileFormat]]:
    """(registered name, format) of every registered format, in registration order (classes instantiated)."""
    return [(name, obj() if isinstance(obj, type) else obj) for name, obj in FORMATS.items()]


def get_format(name: str) -> tuple[str, FileFormat]:
    """(registered name, format) of ``name``; an unknown name is an error that lists the known ones."""
    canonical = FORMATS.canonical(name)
    obj = FORMATS.get(canonical)
    return canonical, obj() if isinstance(obj, type) else obj


def _listing() -> str:
    return ", ".join(f"{name} ({fmt.noun})" for name, fmt in _formats())


def _by_suffix(path: str | os.PathLike[str]) -> tuple[str, FileFormat] | None:
    """The format whose suffix the name of ``path`` ends in (the longest such suffix wins), or None."""
    named = [(len(s), name, fmt) for name, fmt in _formats() if (s := fmt.suffix_of(path)) is not None]
    if not named:
        return None
    _, name, fmt = max(named, key=lambda t: t[0])
    return name, fmt


def format_for_saving(path: str | os.PathLike[str], model: nn.Module,
                      format: str | None = None) -> tuple[str, FileFormat]:
    """(name, format) that :func:`sparseforge.save` writes ``model`` to ``path`` in.

    ``format`` names it; else the suffix of the name picks it (``.sfz``,
    ``.safetensors``, a registered one), else the path is a folder of the
    one folder format that can hold the model (a ``transformers`` model: a
    Hugging Face folder; a model with adapters: an adapter folder).
    """
    if format is not None:
        return get_format(format)
    p = Path(path)
    named = _by_suffix(p)
    if named is not None:
        return named
    formats = _formats()
    endings = ", ".join(dict.fromkeys(s for _, fmt in formats for s in fmt.suffixes))
    if not p.is_file():
        folders = [(name, fmt) for name, fmt in formats if fmt.folder and fmt.can_save(model)]
        if len(folders) == 1:
            return folders[0]
        if len(folders) > 1:
            names = " or ".join(f"format={name!r}" for name, _ in folders)
            raise SparseforgeError(f"{p}: this {type(model).__name__} can be written as "
                                   f"{' or as '.join(fmt.noun for _, fmt in folders)}: pass {names}")
    folder_nouns = " or ".join(fmt.noun for _, fmt in formats if fmt.folder)
    folder_hint = f", or a folder name for {folder_nouns}" if folder_nouns else ""
    raise SparseforgeError(f"cannot tell which format to write {p} in from its name: give a name ending in "
                           f"{endings}{folder_hint}, or pass format= (known: {_listing()})")


def format_for_loading(path: str | os.PathLike[str], format: str | None = None) -> tuple[str, FileFormat]:
    """(name, format) that :func:`sparseforge.load` reads ``path`` with: told by its content.

    With ``format``, that one, unless the content is another format's (an
    error naming it). A path no format detects is read by the format its
    suffix names (whose reader says what is wrong: truncated, corrupted, not
    a file); with no such suffix it is an error that lists the known formats.
    """
    p = Path(path)
    found = [(name, fmt) for name, fmt in _formats() if _detects(name, fmt, p)]
    if format is not None:
        name, fmt = get_format(format)
        if found and name not in {n for n, _ in found}:
            other, other_fmt = found[0]
            raise SparseforgeError(f"{p} is {other_fmt.noun} (format {other!r}), not {fmt.noun} (format {name!r}): "
                                   f"pass format={other!r}, or leave format out to read it as what it is")
        return name, fmt
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise SparseforgeError(f"{p} holds {' and '.join(fmt.noun for _, fmt in found)}: pass "
                               f"{' or '.join(f'format={n!r}' for n, _ in found)} to say which to read")
    if not p.exists():
        raise SparseforgeError(f"{p} does not exist")
    named = _by_suffix(p)
    if named is not None:
        return named
    what = foreign_format(p) or f"{p} is in none of the file formats sparseforge reads"
    raise SparseforgeError(f"{what} (known formats: {_listing()})")


def _detects(name: str, fmt: FileFormat, path: Path) -> bool:
    """``fmt.detect(path)``; a detect() that raises (a plug-in's bug) is named, since it stops every load."""
    try:
        return bool(fmt.detect(path))
    except Exception as e:
        raise SparseforgeError(f"file format {name!r} failed to tell whether {path} is one of its files "
                               f"({type(e).__name__}: {e}); its detect() must return False instead of raising") from e


def _what_it_is(found: str | None, tag: str) -> str:
    """What a safetensors file whose ``format`` entry is ``found`` is, said to a reader expecting ``tag``."""
    for name, fmt in _formats():
        if fmt.tag is not None and fmt.tag == found:
            how = "sparseforge.load(path, model=...)" if fmt.partial else "sparseforge.load"
            convert = "" if fmt.partial else ", or convert it with `sparseforge export`"
            return f"{fmt.noun} (format {name!r}: read it with {how}{convert})"
    return f"no '{tag}' metadata"


class CheckedFile(NamedTuple):
    """A safetensors file opened by :func:`open_checked`: the open handle, its metadata and format version."""

    handle: Any
    metadata: dict[str, str]
    version: int


@contextlib.contextmanager
def open_checked(path: str | os.PathLike[str], *, tag: str, what: str, legacy_keys: Collection[str],
                 max_version: int) -> Iterator[CheckedFile]:
    """Open a sparseforge safetensors file of the format ``tag``, its header checked; yields a :class:`CheckedFile`.

    ``what`` is what such a file is, with its article (``"an sfz file"``).
    Raises :class:`SparseforgeError` when the path is not a file, the header
    does not match its digest (:func:`check_header`, with ``legacy_keys`` and
    ``max_version``), the file is a safetensors file of another format (named
    when it is one of :data:`FORMATS`), its version is above ``max_version``,
    or it cannot be read (a PyTorch file is named as such: :func:`foreign_format`).
    Errors reading the handle inside the ``with`` block are mapped the same way.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    kind = what.split(" ", 1)[-1]
    if not p.is_file():
        raise SparseforgeError(f"{kind} {p} does not exist (or is not a file)")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = dict(f.metadata() or {})
            if HEADER_DIGEST in raw or raw.get("format") == tag:
                check_header(p, f, raw, legacy_keys, max_version)
            if raw.get("format") != tag:
                raise SparseforgeError(f"{p} is a safetensors file but not {what}: {_what_it_is(raw.get('format'), tag)}")
            version = _version(p, raw)
            if version > max_version:
                raise _newer(p, version, max_version)
            yield CheckedFile(f, raw, version)
    except SafetensorError as e:
        raise SparseforgeError(foreign_format(p) or f"{p} is not a readable {kind} (truncated or corrupted, or "
                               f"another format?): {e}") from None
    except OSError as e:
        raise SparseforgeError(f"cannot read {kind} {p}: {e}") from None


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The metadata in the header of a safetensors file, read without mapping the file; None when ``path`` is
    not a file whose header can be read (detection asks this of every path it is given, so it never raises)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:  # safetensors' own limit: a larger number is not a header length
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


_FIXED = frozenset({"self", "model", "path"})


def options_of(fn: Callable[..., Any]) -> list[str] | None:
    """The keyword options ``fn`` takes besides ``model`` and ``path``; None when it takes any (``**options``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _FIXED]


def check_options(fn: Callable[..., Any], options: Mapping[str, Any], what: str) -> None:
    """Raise :class:`SparseforgeError` when ``fn`` (``what``: "the sfz writer") does not take every keyword of
    ``options``: the message names each unknown one, the closest known one, and all it takes."""
    import difflib

    known = options_of(fn)
    if known is None:
        return
    unknown = [k for k in options if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SparseforgeError(f"{what} takes no option {', '.join(map(repr, unknown))}{hint} "
                               f"(its options: {', '.join(known) or 'none'})")
