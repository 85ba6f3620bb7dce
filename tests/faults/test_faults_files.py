"""The shared writers of sparseforge.files: the safetensors layout, modes, temporaries, fsync order, folders.

Every file the project writes goes through ``atomic_path``/``atomic_paths``/
``atomic_dir`` and, for tensors, ``write_safetensors``: these tests pin what
the rest of the faults suite relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

import sparseforge as sf
from sparseforge import files
from sparseforge.errors import SparseforgeError
from sparseforge.io.checkpoint import save_checkpoint
from sparseforge.files import (
    atomic_dir, atomic_path, remove_stale_temporaries, temporary_name, write_json_atomic, write_safetensors,
)
from sparseforge.merge.streaming import merge_files

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64]


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(ALL_DTYPES):
        name = str(dtype).removeprefix("torch.")
        base = torch.randn(3, 5, generator=gen) * 50
        if dtype == torch.bool:
            t = base > 0
        elif dtype.is_complex:
            t = torch.complex(base, -base)
        else:
            t = base.to(dtype)
        out[f"{i:02d}.{name}"] = t
        out[f"{i:02d}.{name}.scalar"] = t[1, 2].clone()  # 0-d
        out[f"{i:02d}.{name}.empty"] = t[:0]  # no elements
    out["transposed"] = torch.randn(4, 6, generator=gen).t()  # not contiguous
    out["weight.tied"] = out["transposed"]  # shares memory with another entry
    return out


def _dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the safetensors layout -------------------------------------------------------------------

def test_write_safetensors_matches_safetensors_byte_for_byte(tmp_path) -> None:
    tensors = _tensors()
    reference = {k: v.contiguous().clone() for k, v in tensors.items()}  # safetensors refuses shared memory
    for metadata in (None, {"format": "x"}):
        path = write_safetensors(tmp_path / "a.safetensors", tensors, metadata)
        assert path.read_bytes() == save(reference, metadata=metadata)
    meta = {"é\n": "\u001f\"\\/\u2028", "b": "2", "a": "1"}
    write_safetensors(tmp_path / "m.safetensors", tensors, meta)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(_bits(got), _bits(v))  # bit for bit (NaN, -0.0 and float8 included)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "m.safetensors"]


def test_write_safetensors_refuses_before_writing(tmp_path) -> None:
    write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(2)})
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(SparseforgeError, match="complex128 cannot be stored"):
        write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(2), "z": torch.ones(2, dtype=torch.complex128)})
    with pytest.raises(TypeError, match="str to str"):
        write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(2)}, {"n": 1})  # type: ignore[dict-item]
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# -- modes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_writer_gives_the_umask_modes(tmp_path, umask: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    old = os.umask(umask)
    try:
        written = [
            save_checkpoint(model, tmp_path / "m.safetensors", arch="", arch_kwargs={}),
            sf.save(model, tmp_path / "m.sfz", arch="", arch_kwargs={}),
            write_safetensors(tmp_path / "raw.safetensors", {"a": torch.ones(1)}),
        ]
        merge_files([written[0], written[0]], tmp_path / "merged.safetensors")
        written.append(tmp_path / "merged.safetensors")
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        written.append(tmp_path / "m.json")
        sf.peft.apply(model, sf.peft.LoRA(rank=2))
        adapter = sf.peft.save_adapter(model, tmp_path / "adapter")
        written += [adapter / "adapter.safetensors", adapter / "adapter.json"]
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inner").mkdir()
            (tmp / "inner" / "secret").write_text("x")
            os.chmod(tmp / "inner" / "secret", 0o600)  # as safetensors' own writer leaves its files
        written.append(tmp_path / "folder" / "inner" / "secret")
    finally:
        os.umask(old)
    for path in written:
        assert _mode(path) == 0o666 & ~umask, f"{path.name}: {oct(_mode(path))}"
    for folder in (adapter, tmp_path / "folder", tmp_path / "folder" / "inner"):
        assert _mode(folder) == 0o777 & ~umask, f"{folder.name}: {oct(_mode(folder))}"


# -- temporaries ------------------------------------------------------------------------------

def test_temporaries_say_who_wrote_them_and_dead_writers_are_cleaned(tmp_path) -> None:
    dead, me = _dead_pid(), os.getpid()
    host = files._HOST
    stale = tmp_path / f".m.json.{host}.{dead}.0123abcd.tmp"
    live = tmp_path / f".m.json.{host}.{os.getppid()}.0123abcd.tmp"  # our parent: alive
    mine = tmp_path / f".m.json.{host}.{me}.89abcdef.tmp"  # this process (another thread's write)
    elsewhere = tmp_path / f".m.json.other-host.{dead}.0123abcd.tmp"  # its pid means nothing here
    other_target = tmp_path / f".n.json.{host}.{dead}.0123abcd.tmp"
    longer_name = tmp_path / f".m.json.bak.{host}.{dead}.0123abcd.tmp"  # the temporary of m.json.bak
    unrelated = [tmp_path / ".m.json.tmp", tmp_path / f"m.json.{host}.{dead}.0123abcd.tmp",
                 tmp_path / f".m.json.{host}.{dead}.0123abcd.tmpx"]
    stale_dir = tmp_path / f".m.json.{host}.{dead}.fedcba98.tmp"
    for p in [stale, live, mine, elsewhere, other_target, longer_name, *unrelated]:
        p.write_text("x" * 100)
    stale_dir.mkdir()
    (stale_dir / "inner").write_text("x")

    seen = []
    with atomic_path(tmp_path / "m.json") as tmp:
        seen.append(tmp.name)
        tmp.write_text("{}")
    assert seen[0].startswith(f".m.json.{host}.{me}.") and seen[0].endswith(".tmp")
    assert temporary_name("m.json") != temporary_name("m.json")  # random part
    left = {p.name for p in tmp_path.iterdir()}
    assert stale.name not in left and stale_dir.name not in left  # dead writer, same target: removed
    assert {live.name, mine.name, elsewhere.name, other_target.name, longer_name.name, "m.json"} <= left
    assert all(p.name in left for p in unrelated)

    removed = remove_stale_temporaries(tmp_path)  # a whole folder: every target
    assert sorted(p.name for p in removed) == sorted([other_target.name, longer_name.name])
    assert {p.name for p in tmp_path.iterdir()} == left - {other_target.name, longer_name.name}


def test_failed_write_leaves_the_old_file_and_nothing_else(tmp_path) -> None:
    write_json_atomic(tmp_path / "m.json", {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert json.loads((tmp_path / "m.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    (tmp_path / "dir").mkdir()
    with pytest.raises(SparseforgeError, match="dir is a folder; give the name of a file"):
        write_json_atomic(tmp_path / "dir", {"v": 2})
    (tmp_path / "file").write_text("x")
    with pytest.raises(SparseforgeError, match="file exists and is not a folder"):
        with atomic_dir(tmp_path / "file"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "m.json"]
    assert not any((tmp_path / "dir").iterdir())


def test_the_file_is_on_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch) -> None:
    """fsync(file) -> rename -> fsync(folder): a crash after the rename cannot leave an empty file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b) -> None:
        events.append(("replace", str(a), str(b)))
        real_replace(a, b)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the synced files")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(3)})
    (tmp,) = [e[1] for e in events if e[0] == "replace"]
    assert events == [("fsync", tmp), ("replace", tmp, str(tmp_path / "m.safetensors")), ("fsync", str(tmp_path))]


def test_atomic_dir_swaps_the_folder_whole(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out"
    for version, exchange in ((1, True), (2, True), (3, False)):
        if not exchange:  # systems without renameat2: two renames
            monkeypatch.setattr(files, "_exchange", lambda a, b: False)
        with atomic_dir(target) as tmp:
            (tmp / f"v{version}").write_text(str(version))
            assert not (target / f"v{version}").exists()  # nothing visible before the swap
        assert [p.name for p in target.iterdir()] == [f"v{version}"]
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "v4").write_text("4")
            raise RuntimeError("failed while writing")
    assert [p.name for p in target.iterdir()] == ["v3"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / ".out.old").mkdir()  # what earlier versions named the replaced folder
    with atomic_dir(target) as tmp:
        (tmp / "v5").write_text("5")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_pretrained_folder_checksums(tmp_path) -> None:
    pytest.importorskip("transformers")
    from sparseforge.io.hf import load_pretrained, save_pretrained, verify_checksums
    from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model

    out = save_pretrained(build_model(TINY_CONFIG), tmp_path / "hf", metadata={"a": 1})
    assert verify_checksums(out)
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sums[-1] == f"# {len(sums) - 2} files" and any(line.endswith("  model.safetensors") for line in sums)
    if shutil.which("sha256sum"):  # the standard tool reads the same file
        done = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    (out / "README.md").write_text("added later: not listed, not checked")
    load_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparseforgeError, match=r"config.json does not match its checksum in SHA256SUMS"):
        load_pretrained(out)
    (out / "SHA256SUMS").unlink()  # folders of other writers have none: not checked
    assert not verify_checksums(out)
