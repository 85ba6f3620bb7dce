"""SIGKILL every writer while it writes: the previous file survives whole, the next write leaves nothing behind.

Each writer first writes version A of its file in this process; then a
forked child writes version B and is SIGKILLed:

- ``mid-write``: stopped with part of B written into its temporary file;
- ``before-rename``: stopped with B complete and flushed, just before the
  rename (for a folder, the swap);
- ``random-N``: B written over and over, killed after a seeded random delay,
  wherever it happens to be (possibly between writes).

Then: the file (or folder) under the final name must load bit-identically
as A (as A or B for the random kills), the injected kills must have left a
temporary behind (so that the cleanup below is really exercised), and one
more write of B in this process must leave the folder holding exactly the
final names: no stale temporary of the killed writer. The trainer's
checkpoint writer runs in a fresh interpreter (it sets its own thread count,
which a forked child of a threaded process should not) and is resumed after
the kill.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge import files
from sparseforge.io.checkpoint import read_checkpoint, save_checkpoint
from sparseforge.io.sfz import read_sfz
from sparseforge.files import write_json_atomic
from sparseforge.merge.streaming import merge_files
from sparseforge.zoo import build_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="kills forked writers (Linux)")

TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9-]+\.\d+\.[0-9a-f]{8}\.tmp$")
MODES = ["mid-write", "before-rename", "random-0", "random-1", "random-2"]
KILL_TIMEOUT_S = 60
STATE: dict[str, Any] = {}  # what the writers write, built once here and inherited by the forked children
STATS: dict[str, int] = {"kills": 0, "left_temporaries": 0}


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module", autouse=True)
def state(tmp_path_factory) -> None:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kill_inputs")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model("lenet300")
        sf.prune(m, sparsity=0.5)
        models.append(m)
    STATE["models"] = models
    STATE["merge_inputs"] = [[save_checkpoint(models[v], root / f"in{v}{k}.safetensors") for k in range(2)]
                             for v in (0, 1)]
    adapted = []
    for seed in (0, 1):
        m = _mlp(0)
        sf.peft.apply(m, sf.peft.PaCA(rank=4, seed=seed))
        adapted.append(m)
    STATE["adapted"] = adapted
    try:
        from sparseforge.zoo.causal_lm import TINY_CONFIG, build_model as build_lm

        STATE["lms"] = [build_lm(TINY_CONFIG, seed=seed) for seed in (0, 1)]
    except Exception:  # noqa: BLE001 - transformers missing: the save_pretrained cases skip
        STATE["lms"] = None
    yield
    print(f"\nkill test: {STATS['kills']} kills, {STATS['left_temporaries']} left temporaries that the next "
          "write removed")


# -- the writers ------------------------------------------------------------------------------

@dataclass
class Writer:
    target: str  # the final name in the folder
    write: Callable[[Path, int], None]  # (folder, version 0 = A or 1 = B)
    read: Callable[[Path], Any]  # folder -> content, compared bit for bit
    mid_write: str  # how the mid-write kill is injected: "tensor" (after the first tensor), "checksums", "text"


def _read_checkpoint(folder: Path) -> Any:
    return read_checkpoint(folder / "m.safetensors")


def _read_sfz(folder: Path) -> Any:
    state, meta, _ = read_sfz(folder / "m.sfz")
    return state, {k: v for k, v in meta.items() if k != "file_bytes"}


def _read_adapter(folder: Path) -> Any:
    base = _mlp(0)
    sf.peft.load_adapter(base, folder / "adapter")
    return base.state_dict()


def _read_hf(folder: Path) -> Any:
    from sparseforge.io.hf import load_pretrained

    return load_pretrained(folder / "hf")[0].state_dict()


def _write_hf(folder: Path, v: int) -> None:
    from sparseforge.io.hf import save_pretrained

    save_pretrained(STATE["lms"][v], folder / "hf", metadata={"version": v})


WRITERS = {
    "save_checkpoint": Writer("m.safetensors", lambda f, v: save_checkpoint(STATE["models"][v], f / "m.safetensors"),
                              _read_checkpoint, "tensor"),
    "sfz_save": Writer("m.sfz", lambda f, v: sf.save(STATE["models"][v], f / "m.sfz", values="int8"), _read_sfz,
                       "tensor"),
    "merge_files": Writer("m.safetensors", lambda f, v: merge_files(STATE["merge_inputs"][v], f / "m.safetensors"),
                          _read_checkpoint, "tensor"),
    "save_adapter": Writer("adapter", lambda f, v: sf.peft.save_adapter(STATE["adapted"][v], f / "adapter"),
                           _read_adapter, "tensor"),
    "write_json_atomic": Writer("m.json", lambda f, v: write_json_atomic(f / "m.json", {"v": v, "pad": "x" * 300_000}),
                                lambda f: json.loads((f / "m.json").read_text()), "text"),
    "save_pretrained": Writer("hf", _write_hf, _read_hf, "checksums"),
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# -- the killed child -------------------------------------------------------------------------

def _block(ready) -> None:
    ready.set()
    time.sleep(3600)  # until killed


def _child(name: str, folder: Path, mode: str, ready) -> None:
    """Runs in the forked child: write version B, stopped where ``mode`` says, or over and over."""
    torch.set_num_threads(1)  # a forked child of a threaded process must not use the parent's thread pool
    writer = WRITERS[name]
    if mode == "before-rename":
        os.replace = lambda *a, **k: _block(ready)  # noqa: B023 - this child only
        files._exchange = lambda *a, **k: _block(ready)
    elif mode == "mid-write" and writer.mid_write == "tensor":
        raw, calls = files._raw_bytes, []

        def first_tensor_only(t):
            calls.append(1)
            if len(calls) == 2:
                _block(ready)
            return raw(t)

        files._raw_bytes = first_tensor_only
    elif mode == "mid-write" and writer.mid_write == "text":
        def half(self, text, *a, **k):
            pathlib.Path.write_bytes(self, text[: len(text) // 2].encode())
            _block(ready)

        pathlib.Path.write_text = half
    elif mode == "mid-write" and writer.mid_write == "checksums":
        import sparseforge.io.hf

        sparseforge.io.hf._write_checksums = lambda folder: _block(ready)  # weights and config written, not the sums
    if mode.startswith("random"):
        ready.set()
        while True:
            writer.write(folder, 1)
    writer.write(folder, 1)
    raise AssertionError("the injected stop was not reached")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(WRITERS))
def test_killed_writer_loses_nothing_and_leaves_nothing(name: str, mode: str, tmp_path: Path) -> None:
    if name == "save_pretrained" and STATE["lms"] is None:
        pytest.skip("transformers is not installed")
    writer = WRITERS[name]
    reference = {}
    for v in (0, 1):
        writer.write(tmp_path / f"ref{v}", v)
        reference[v] = writer.read(tmp_path / f"ref{v}")
    assert not _same(reference[0], reference[1])
    folder = tmp_path / "out"
    writer.write(folder, 0)

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_child, args=(name, folder, mode, ready), daemon=True)
    child.start()
    try:
        assert ready.wait(KILL_TIMEOUT_S), "the child never reached the point to be killed at"
        if mode.startswith("random"):
            time.sleep(random.Random(f"{name}-{mode}").uniform(0.0, 0.08))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(KILL_TIMEOUT_S)  # reaped: its pid is gone, so its temporaries count as stale
    assert child.exitcode == -signal.SIGKILL, f"the child ended otherwise ({child.exitcode})"
    STATS["kills"] += 1

    content = writer.read(folder)
    allowed = (reference[0],) if not mode.startswith("random") else (reference[0], reference[1])
    assert any(_same(content, ref) for ref in allowed), "the file under the final name is not a complete version"
    left = _temporaries(folder)
    STATS["left_temporaries"] += len(left)
    if not mode.startswith("random"):
        assert left, "the kill left no temporary: the injection missed the write"

    writer.write(folder, 1)  # the next write: cleans up after the killed one
    assert [p.name for p in folder.iterdir()] == [writer.target] and not _temporaries(folder)
    assert _same(writer.read(folder), reference[1])


def _temporaries(folder: Path) -> list[str]:
    """Temporary files and folders of sparseforge's naming anywhere under ``folder`` (an adapter's are inside it)."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if TEMPORARY.match(p.name)]


# -- the trainer's checkpoints ----------------------------------------------------------------

TRAIN_DRIVER = """
import os, sys, time, torch
import sparseforge.files as files
from sparseforge.distributed.train import TrainRecipe, from_mapping, run

out, mode = sys.argv[1], sys.argv[2]
recipe = from_mapping(TrainRecipe, {recipe!r}, "recipe")
real_save, saves = torch.save, []

def stop():
    print("ready", flush=True)
    time.sleep(3600)

def save(obj, f, *args, **kwargs):
    saves.append(f)
    if len(saves) == 3 and mode == "mid-write":  # half of the third checkpoint written
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):  # the trainer hands torch.save an open file
            f.write(half)
            f.flush()
        else:
            open(f, "wb").write(half)
        stop()
    real_save(obj, f, *args, **kwargs)
    if len(saves) == 3 and mode == "before-rename":
        stop()

torch.save = save
run(recipe, out, quiet=True)
print("finished", flush=True)
"""


def test_killed_trainer_checkpoint_resumes_and_leaves_nothing(tmp_path: Path) -> None:
    mode = "mid-write"  # (before-rename is the same atomic_path as every writer above; one trainer run is enough)
    from sparseforge.distributed.train import TrainRecipe, from_mapping, run
    from sparseforge.training.checkpoint import latest_checkpoint, list_checkpoints, load_training_checkpoint
    from sparseforge.zoo.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except Exception:  # noqa: BLE001 - any reason the data cannot be read
        pytest.skip("Fashion-MNIST files not available")
    mapping = {"model": "lenet300", "data": {"limit_train": 128, "limit_test": 64},
               "method": {"name": "gmp", "sparsity": 0.5}, "train": {"epochs": 1, "batch_size": 32, "seed": 0},
               "checkpoint": {"every_steps": 1, "keep": 2}}
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(TRAIN_DRIVER).replace("{recipe!r}", repr(mapping)))
    out = tmp_path / "run"
    src = str(Path(sf.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"the trainer did not stop at its third checkpoint: {line}{proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(KILL_TIMEOUT_S)
        proc.stdout.close()
        proc.stderr.close()
    STATS["kills"] += 1
    ckpts = out / "checkpoints"
    assert [step for step, _ in list_checkpoints(out)] == [1, 2]  # the third never got its name
    assert latest_checkpoint(out) == ckpts / "step-00000002.pt"
    assert load_training_checkpoint(latest_checkpoint(out), torch.device("cpu"))["step"] == 2
    left = [p.name for p in ckpts.iterdir() if TEMPORARY.match(p.name)]
    assert left and all(p.startswith(".step-00000003.pt.") for p in left)
    STATS["left_temporaries"] += len(left)

    threads = torch.get_num_threads()
    try:
        metrics = run(from_mapping(TrainRecipe, mapping, "recipe"), out, quiet=True)  # resume: the next writes
    finally:
        torch.set_num_threads(threads)
    assert metrics["steps"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003.pt", "step-00000004.pt"]  # keep: 2, no temporary
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.json", "model.safetensors"]
