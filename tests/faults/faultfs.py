"""Failing file systems for the fault-injection tests: read-only folders and file systems, a full disk.

Fixtures for ``tests/faults``: import the ones a test module uses
(``from faultfs import full_fs``). This is not a ``conftest.py`` on purpose:
pytest imports every conftest as the module ``conftest`` (rootdir/prepend
import mode), so a second one would shadow ``tests/conftest.py``, from which
test modules import helpers (``from conftest import build_mlp``).

Each fixture yields a folder that already holds ``previous.safetensors``
(bytes :data:`PREVIOUS`, an output a command must leave as it was) and an
empty folder ``existing-dir.safetensors`` (a folder where a file is meant),
and undoes what it did at teardown, whatever the test did.

- :func:`writable_dir`: a plain folder (the control).
- :func:`readonly_dir`: a folder that cannot be written: mode 0555, and
  ``chattr +i`` (immutable) too where modes do not stop this process (root).
- :func:`readonly_fs`: a read-only bind mount of a folder (root only).
- :func:`full_fs`: a 64 KiB tmpfs, too small for any model written here (root only).

Mounting needs root (and a kernel that lets this process mount, which
containers may refuse): without it the test is skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PREVIOUS = b"the output of an earlier run: must survive a failed write\n"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _populate(folder: Path) -> None:
    (folder / "previous.safetensors").write_bytes(PREVIOUS)
    (folder / "existing-dir.safetensors").mkdir()


def _run(*cmd: str) -> str | None:
    """None when ``cmd`` succeeds, else why it failed (for the skip reason)."""
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]} is not installed"
    res = subprocess.run(cmd, capture_output=True, text=True)
    return None if res.returncode == 0 else f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}"


def _need_root(what: str) -> None:
    if not is_root():
        pytest.skip(f"needs root to {what} (run the suite as root to include it)")


@pytest.fixture
def writable_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    _populate(folder)
    return folder


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "readonly"
    folder.mkdir()
    _populate(folder)
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):  # root (CAP_DAC_OVERRIDE) writes through modes: make it immutable
            why = _run("chattr", "+i", str(folder))
            if why is not None:
                pytest.skip(f"this process ignores folder modes and cannot set the immutable flag: {why}")
            immutable = True
        yield folder
    finally:
        if immutable:
            _run("chattr", "-i", str(folder))
        folder.chmod(0o755)


@pytest.fixture
def readonly_fs(tmp_path: Path) -> Iterator[Path]:
    _need_root("bind-mount a folder read-only")
    source = tmp_path / "ro-source"
    source.mkdir()
    _populate(source)
    mount = tmp_path / "ro-mount"
    mount.mkdir()
    why = _run("mount", "--bind", str(source), str(mount))
    if why is not None:
        pytest.skip(f"cannot bind-mount here: {why}")
    try:
        why = _run("mount", "-o", "remount,ro,bind", str(mount))
        if why is not None:
            pytest.skip(f"cannot remount the bind mount read-only: {why}")
        yield mount
    finally:
        _run("umount", str(mount))


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    _need_root("mount a tiny tmpfs")
    mount = tmp_path / "full"
    mount.mkdir()
    why = _run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount))
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        _populate(mount)
        yield mount
    finally:
        _run("umount", str(mount))
