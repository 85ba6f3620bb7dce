"""How many CPU threads each process uses: the user's ``OMP_NUM_THREADS``, else the idle cores.

One rule for ``sparseforge train`` (one process or N under torchrun), the
demo and the other commands:

- ``OMP_NUM_THREADS`` set in the environment wins, as it is (per process);
- otherwise :func:`default_threads`: the cores this process may use, less
  the work already running on them (the 1-minute load average, scaled to
  those cores), rounded, at least 1, shared among the ``world_size``
  processes.

Why: PyTorch starts one thread per core whatever else runs. On a busy
2-core machine a one-process training run took 85-95 s with two threads
against 8 s with one, and the demo 426 s against 33 s: threads that wait
for a core spin and hold the others back. With the machine idle the default
is all its cores, as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from sparseforge.errors import SparseforgeError

__all__ = ["SOURCE_ENV", "ThreadChoice", "available_cores", "choose_threads", "default_threads", "other_load",
           "set_threads", "worker_env"]

#: the environment variable the launcher sets beside OMP_NUM_THREADS to say how it chose it
SOURCE_ENV = "SPARSEFORGE_THREADS_SOURCE"


@dataclass(frozen=True)
class ThreadChoice:
    """The threads per process, and why: ``source`` is ``"OMP_NUM_THREADS"`` or ``"default"``."""

    threads: int
    source: str
    cores: int
    load: float | None
    world_size: int = 1

    def describe(self) -> str:
        """For a run's first line, e.g. ``1 thread per process (default: 2 cores, load 1.4 from other work)``."""
        n = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        n += " per process" if self.world_size > 1 else ""
        if self.source == "default":
            load = "" if self.load is None else f", load {self.load:.1f} from other work"
            return f"{n} (default: {self.cores} core{'s' if self.cores != 1 else ''}{load}; set OMP_NUM_THREADS to choose)"
        return f"{n} ({self.source})"

    def to_dict(self) -> dict[str, object]:
        """For ``metrics.json``."""
        return asdict(self)


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max" and float(period) > 0:
            cores = min(cores, max(1, math.ceil(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def other_load(cores: int | None = None) -> float | None:
    """The 1-minute load average, scaled to ``cores`` of the machine's CPUs (None where unknown).

    The load average counts runnable tasks on the whole machine; a process
    limited to some of its CPUs sees its share of it.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    total = os.cpu_count() or 1
    cores = available_cores() if cores is None else cores
    return load * min(cores, total) / total


def default_threads(world_size: int = 1, *, cores: int | None = None, load: float | None = None) -> int:
    """Threads per process when the user set none: the idle cores shared among ``world_size`` processes.

    ``max(1, round(cores - load))`` idle cores (``cores`` default
    :func:`available_cores`, ``load`` default :func:`other_load`; no load
    figure counts as 0), divided by ``world_size`` (at least 1 each). Always
    between 1 and ``cores``.
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    if load is None:
        load = other_load(cores)
    idle = cores if load is None or not math.isfinite(load) else round(cores - max(0.0, load))
    idle = min(cores, max(1, idle))
    return max(1, idle // max(1, int(world_size)))


def _env_threads(value: str) -> int:
    # OpenMP allows a list (one count per nesting level): the first is the one that matters here.
    first = value.split(",")[0].strip()
    try:
        n = int(first)
    except ValueError:
        n = 0
    if n < 1:
        raise SparseforgeError(f"OMP_NUM_THREADS={value!r} is not a positive whole number: set it to the threads "
                               "each process should use (e.g. OMP_NUM_THREADS=1), or unset it for the default")
    return n


def choose_threads(world_size: int = 1, *, env: Mapping[str, str] | None = None, cores: int | None = None,
                   load: float | None = None) -> ThreadChoice:
    """The threads per process: ``OMP_NUM_THREADS`` from ``env`` (default ``os.environ``) if set, else the default.

    ``cores`` and ``load`` are for :func:`default_threads` (defaults: this
    machine's). An ``OMP_NUM_THREADS`` that is not a positive whole number is
    a :class:`SparseforgeError`.
    """
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else max(1, int(cores))
    value = env.get("OMP_NUM_THREADS", "").strip()
    if value:
        return ThreadChoice(_env_threads(value), env.get(SOURCE_ENV) or "OMP_NUM_THREADS", cores, None, world_size)
    if load is None:
        load = other_load(cores)
    return ThreadChoice(default_threads(world_size, cores=cores, load=load), "default", cores,
                        None if load is None else round(load, 2), world_size)


def set_threads(world_size: int = 1, *, env: Mapping[str, str] | None = None, cores: int | None = None,
                load: float | None = None) -> ThreadChoice:
    """:func:`choose_threads`, then ``torch.set_num_threads`` with it; returns the choice."""
    import torch

    choice = choose_threads(world_size, env=env, cores=cores, load=load)
    torch.set_num_threads(choice.threads)
    return choice


def worker_env(nproc: int, env: Mapping[str, str] | None = None, *, cores: int | None = None,
               load: float | None = None) -> dict[str, str]:
    """The environment for ``nproc`` worker processes: ``env`` (default ``os.environ``) with ``OMP_NUM_THREADS``.

    A user's ``OMP_NUM_THREADS`` is kept as it is; otherwise it is set to
    :func:`default_threads` for ``nproc`` processes (which also silences
    torchrun's notice that it sets it to 1), and :data:`SOURCE_ENV` says so,
    for the workers' reports.
    """
    out = dict(os.environ if env is None else env)
    out.pop(SOURCE_ENV, None)  # a label left by an outer run would misname the user's own setting
    choice = choose_threads(nproc, env=out, cores=cores, load=load)
    if choice.source == "default":
        out["OMP_NUM_THREADS"] = str(choice.threads)
        load_text = "" if choice.load is None else f", load {choice.load:.1f} from other work"
        out[SOURCE_ENV] = f"default: {choice.cores} cores{load_text}, {nproc} processes"
    return out
