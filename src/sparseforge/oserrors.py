"""Failures of the file system while writing an output, as one-line :class:`SparseforgeError`\\ s.

A read-only folder, a read-only or full file system, a quota, an output name
that is a folder: these are not bugs in sparseforge but facts about the
machine, and the user can act on them. :func:`write_errors` turns the
``OSError`` (or safetensors' ``SafetensorError`` wrapping an OS error, as
``save_file`` raises on a full disk) raised while writing an output into a
:class:`SparseforgeError` that names the output and the reason, so that the
CLI prints one line and exits with status 2. Every other exception passes
unchanged: a bug keeps its traceback.

:func:`check_writable` asks the same questions before a long computation
(a pruning run, a training run) instead of after it: the folder the output
goes to exists or can be created, is a folder, and can be written to.

>>> import errno
>>> write_failure_reason(OSError(errno.ENOSPC, "No space left on device"))
'no space left on device: free some space or write elsewhere'
>>> write_failure_reason(OSError(errno.ENOENT, "No such file or directory")) is None
True
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sparseforge.errors import SparseforgeError

__all__ = ["REASONS", "check_writable", "reports_write_errors", "write_errors", "write_failure_reason"]

#: errno -> what went wrong, in words: the failures a user's machine causes (not a bug of ours).
REASONS: dict[int, str] = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (is the file or its folder immutable or append-only?)",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOTEMPTY: "a folder of that name is in the way and is not empty",
    errno.ENAMETOOLONG: "file name too long",
    errno.EBUSY: "the path is busy (a mount point?)",
    errno.EIO: "input/output error (a failing disk or a lost network file system?)",
}

# What to do about each reason (the standard: an error says what is wrong and what to do).
_HINTS: dict[int, str] = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "write to another file system",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "write to a folder you can write to",
    errno.EPERM: "write elsewhere",
    errno.EISDIR: "give a file name",
}

# safetensors (Rust) reports an OS error as "... (os error 28)" (0.4+) or "Os { code: 28, ... }" (older).
_RUST_OS_ERROR = re.compile(r"(?:os error |Os \{ code: )(\d+)")


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":  # by name: no import of safetensors for this check
        m = _RUST_OS_ERROR.search(str(exc))
        return int(m.group(1)) if m else None
    return None


def write_failure_reason(exc: BaseException) -> str | None:
    """The reason and what to do, in words, when ``exc`` is a file-system failure a user can act on; else None.

    ``exc`` is an ``OSError`` or a safetensors ``SafetensorError`` that wraps
    one; the errno must be one of :data:`REASONS` (a missing file, for
    example, is not: while writing, that would be a bug).
    """
    code = _errno_of(exc)
    if code not in REASONS:
        return None
    hint = _HINTS.get(code)
    return REASONS[code] + (f": {hint}" if hint else "")


def _as_error(path: str | os.PathLike[str], exc: BaseException) -> SparseforgeError | None:
    # Follow the chain a few links: torch.save into a file object reports a full disk as a
    # RuntimeError of its zip writer raised while handling the OSError(ENOSPC) of the write.
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        reason = write_failure_reason(seen)
        if reason is not None:
            return SparseforgeError(f"cannot write {path}: {reason}")
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a file-system failure while writing ``path`` into a :class:`SparseforgeError` naming ``path``.

    Only the failures of :data:`REASONS` are turned (``cannot write PATH:
    no space left on device: free some space or write elsewhere``); any other
    exception passes through unchanged, traceback and all.
    """
    try:
        yield
    except Exception as exc:
        error = _as_error(path, exc)
        if error is None:
            raise
        raise error from None


F = TypeVar("F", bound=Callable[..., AbstractContextManager[Any]])


def reports_write_errors(context_manager: F) -> F:
    """Decorate a context manager whose first argument is the output path with :func:`write_errors`.

    Failures while entering it, inside the ``with`` body and while it cleans
    up all become one-line errors naming that path, e.g. for
    :func:`sparseforge.files.atomic_path`.
    """

    @functools.wraps(context_manager)
    @contextlib.contextmanager
    def wrapper(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Iterator[Any]:
        with write_errors(path), context_manager(path, *args, **kwargs) as value:
            yield value

    return wrapper  # type: ignore[return-value]


def check_writable(path: str | os.PathLike[str], kind: str = "file", what: str | None = None) -> Path:
    """Check, before any work, that ``path`` can be written as a ``kind`` (``"file"`` or ``"folder"``).

    A file is written beside itself and renamed into place, so its folder must
    be writable; a folder must be a folder (or not exist yet) and writable.
    Missing folders count as writable when their nearest existing parent is
    (the writers create them). ``what`` names the path in messages (default:
    the path itself). Returns ``Path(path)``.

    Raises:
        SparseforgeError: ``path`` is a folder where a file is meant (or a file
            where a folder is), a parent is a file, or the folder is read-only
            (a read-only file system, no permission, an immutable folder).
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    p = Path(path)
    name = what or str(p)
    if kind == "file" and p.is_dir():
        raise SparseforgeError(f"{name} is a folder: give the name of the file to write")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise SparseforgeError(f"{name} exists and is not a folder: give a folder name")
    folder = p if kind == "folder" else p.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SparseforgeError(f"cannot write {name}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        reason = REASONS[errno.EROFS] if read_only else f"the folder {existing} is not writable"
        raise SparseforgeError(f"cannot write {name}: {reason}: write elsewhere")
    return p
