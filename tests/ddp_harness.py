"""Two gloo processes on CPU for the DDP tests: spawn, meet, run one function, return JSON.

Workers are spawned with ``torch.multiprocessing`` ("spawn"), meet through a
FileStore in the test's folder and talk over loopback only (gloo bound to
``lo``, on ports it picks itself), each on one thread. Every collective has a
timeout and :func:`spawn` kills workers that outlive its own, so a hang fails
the test instead of blocking the suite. The function runs as
``fn(rank, out_dir, **kwargs)`` in every worker and returns plain data, which
comes back as JSON. ``fn`` must be a module-level function of a test module
(spawned workers import it by name).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SPAWN_TIMEOUT_S = 150.0
COLLECTIVE_TIMEOUT_S = 60.0


def _entry(rank: int, fn: Callable[..., Any], store_path: str, out_dir: str, kwargs: dict[str, Any]) -> None:
    """Worker process: join the gloo group, run ``fn`` and write its result as JSON."""
    torch.set_num_threads(1)
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        result = fn(rank, Path(out_dir), **kwargs)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], out_dir: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Run ``fn(rank, out_dir, **kwargs)`` on two ranks; return each rank's result (workers killed on timeout)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(
        _entry, args=(fn, str(out_dir / "store"), str(out_dir), kwargs), nprocs=WORLD, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        # join() raises with the worker's traceback when one fails (and ends the other).
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: DDP workers still running after {SPAWN_TIMEOUT_S:.0f} s (a hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
