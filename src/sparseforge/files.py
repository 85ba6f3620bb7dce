"""Writing files so that nothing is lost: temporary file in the same folder, fsync, then rename.

Every file sparseforge writes goes through :func:`atomic_path` (or
:func:`atomic_dir` for a folder): the content is written under a temporary
name beside the target, flushed to disk, and renamed over the target, so a
reader (or a crash) sees the old file or the new one, never half of one.

Temporary names say who wrote them: ``.NAME.<host>.<pid>.<random>.tmp``.
A writer killed outright (SIGKILL, power loss) cannot remove its temporary
file, so each write first removes the temporaries of its own naming for the
same target whose process is gone (on this host; a live process's are left
alone). :func:`remove_stale_temporaries` does the same for a whole folder.

:func:`write_safetensors` writes a safetensors file one tensor at a time
straight into that temporary file: ``safetensors.torch.save_file`` (0.5 and
later) writes its own ``.tmpXXXXXX`` file beside the target and renames it,
which a kill leaves behind and whose mode (0600) ignores the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sparseforge.errors import SparseforgeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_dir", "atomic_path", "atomic_paths", "remove_stale_temporaries", "safetensors_dtype", "temporary_name",
    "write_json_atomic", "write_safetensors",
]

# The host goes into the name so that a folder shared between machines (NFS) never has
# a live writer's temporary file removed by another machine, where its pid means nothing.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMP_TAIL = r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp"


def temporary_name(target_name: str) -> str:
    """The name of a new temporary file (or folder) for a target named ``target_name``.

    ``.NAME.<host>.<pid>.<8 hex digits>.tmp``: hidden, recognisably
    sparseforge's, and saying which process on which host wrote it.
    """
    return f".{target_name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process: perhaps another thread is writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user holds the pid, so it is alive
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], target_name: str | None = None) -> list[Path]:
    """Remove the temporaries of dead writers in ``folder``; returns the paths removed.

    Only names of this module's naming (:func:`temporary_name`) for
    ``target_name`` (any target when None), written on this host, by a
    process that no longer exists, are removed; files of live processes
    and every other file stay. A killed child still counts as alive until
    its parent has waited for it (a zombie keeps its pid).
    """
    pattern = re.compile(rf"^\.(?P<target>{re.escape(target_name) if target_name else '.+'}){_TEMP_TAIL}$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        except OSError:  # a read-only folder: nothing to be done now, the next write retries
            continue
        removed.append(Path(entry.path))
    return removed


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` to disk: a crash after the rename must not leave an empty file under the final name."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        if directory:
            return  # a folder that cannot be opened for reading: skip the (best-effort) folder sync
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot sync a folder (EINVAL); files must sync.
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _check_target(target: Path, want_dir: bool) -> None:
    if want_dir and target.exists() and not target.is_dir():
        raise SparseforgeError(f"{target} exists and is not a folder; give the name of a folder to write")
    if not want_dir and target.is_dir():
        raise SparseforgeError(f"{target} is a folder; give the name of a file to write")

from sparseforge.oserrors import reports_write_errors


@reports_write_errors  # a full disk or read-only folder: one line naming the path, not a traceback
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success flush it to disk and rename it over ``path``.

    An exception while writing leaves any earlier file at ``path`` untouched
    and removes the temporary file; a kill leaves the earlier file whole and a
    temporary file that the next write to ``path`` removes (see
    :func:`remove_stale_temporaries`). The file is created empty with the
    mode a plain ``open()`` gives (``0666`` less the umask); write into it
    in place (do not replace it with another file).
    Raises :class:`SparseforgeError` when ``path`` is a folder.
    """
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: all are written, flushed, then renamed in order.

    A failure before the renames leaves every earlier file as it was; only a
    crash between the renames (microseconds, after everything is on disk)
    leaves the first files new and the others old, so a reader must check
    that they belong together (the adapter's JSON lists its tensors' digests).
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        _check_target(target, want_dir=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent, target.name)
    tmps: list[Path] = []
    try:
        for target in targets:
            tmps.append(target.parent / temporary_name(target.name))
            # O_EXCL: the name is new; mode 0666 less the umask, as open() gives (mkstemp's 0600 would stay).
            os.close(os.open(tmps[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        yield list(tmps)
        for tmp in tmps:
            _fsync(tmp)
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
        for folder in dict.fromkeys(target.parent for target in targets):
            _fsync(folder, directory=True)  # makes the renames themselves durable
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask alone must set it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(folder: Path) -> None:
    """Give everything under ``folder`` the modes ``open()``/``mkdir()`` would give (libraries may write 0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            executable = os.stat(p).st_mode & 0o100
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it replaces the folder ``path``.

    The swap is one step where the system allows (Linux ``renameat2``):
    readers see the old folder or the new one. Elsewhere the old folder is
    first renamed away, so a crash at that instant leaves no folder at
    ``path``. Files and folders written inside get the modes ``open()``
    and ``mkdir()`` give (``0666``/``0777`` less the umask), and are flushed
    to disk before the swap. Stale temporary folders of dead writers for the
    same target are removed first, as in :func:`atomic_path`. Raises
    :class:`SparseforgeError` when ``path`` exists and is not a folder.
    """
    target = Path(path)
    _check_target(target, want_dir=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    # Earlier versions renamed the replaced folder to this fixed name; garbage once the target exists.
    legacy_old = target.parent / f".{target.name}.old"
    if legacy_old.is_dir() and target.is_dir():
        shutil.rmtree(legacy_old, ignore_errors=True)
    tmp = target.parent / temporary_name(target.name)
    os.mkdir(tmp, 0o777)
    old: Path | None = None
    try:
        yield tmp
        _normal_modes(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root), directory=True)
        if target.exists():
            if not _exchange(tmp, target):  # tmp now holds the old folder when it succeeds
                old = target.parent / temporary_name(target.name)
                os.replace(target, old)
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
        _fsync(target.parent, directory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike[str], payload: object) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


# -- safetensors, written one tensor at a time ----------------------------------------------

# torch dtype name -> (safetensors dtype, rank). safetensors orders tensors in the file by
# decreasing rank (its Dtype enum order: wider types first, so that every tensor stays aligned
# when the file is memory-mapped), then by name; the same order gives byte-identical files.
_ST_DTYPES = {
    "bool": ("BOOL", 0), "uint8": ("U8", 1), "int8": ("I8", 2), "float8_e5m2": ("F8_E5M2", 3),
    "float8_e4m3fn": ("F8_E4M3", 4), "int16": ("I16", 5), "uint16": ("U16", 6), "float16": ("F16", 7),
    "bfloat16": ("BF16", 8), "int32": ("I32", 9), "uint32": ("U32", 10), "float32": ("F32", 11),
    "complex64": ("C64", 12), "float64": ("F64", 13), "int64": ("I64", 14), "uint64": ("U64", 15),
}


def safetensors_dtype(t: torch.Tensor) -> str:
    """The safetensors name of ``t``'s dtype (``F32``, ``BF16``, ``BOOL``...); SparseforgeError when it has none."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in _ST_DTYPES:
        raise SparseforgeError(f"tensors of dtype {name} cannot be stored in a safetensors file")
    return _ST_DTYPES[name][0]


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """``t``'s bytes in row-major order, little-endian, without copying a contiguous CPU tensor."""
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
    *, in_place: bool = False,
) -> Path:
    """Write ``tensors`` to a safetensors file at ``path``, atomically, one tensor at a time.

    The layout is the safetensors format's: an 8-byte little-endian header
    length, the JSON header (``__metadata__`` and each tensor's ``dtype``,
    ``shape``, ``data_offsets``) padded with spaces to a multiple of 8, then
    the tensors' bytes. Byte for byte what ``safetensors.torch.save``
    writes for the same tensors (same order: wider dtypes first, then by
    name; metadata entries sorted, where safetensors writes them in hash
    order), but each tensor is copied to the file on its own (no second copy
    of the model in memory) and into :func:`atomic_path`'s temporary file
    (no temporary file of its own). Tensors may share memory (tied weights
    are written twice). Little-endian hosts only, as torch itself.
    ``in_place=True`` writes straight into ``path``: a temporary file of
    :func:`atomic_path` or :func:`atomic_paths` that the caller renames.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps str to str")
    def rank(name: str) -> int:
        return _ST_DTYPES.get(str(tensors[name].dtype).removeprefix("torch."), ("", 0))[1]

    order = sorted(tensors, key=lambda k: (-rank(k), k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": safetensors_dtype(t), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with contextlib.nullcontext(Path(path)) if in_place else atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(_raw_bytes(tensors[name]))
    return Path(path)
