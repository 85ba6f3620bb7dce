"""Interleaved, median-based timing of alternatives on a shared, noisy machine.

One routine, used by :func:`sparseforge.to_sparse` (to choose a layer's
format) and by the speed benchmarks (``overhead``, ``speed``): the
alternatives are timed in alternating blocks within one run, the order
flipping every round, so that a slow spell of the machine hits all of them
alike, and each is summarised by its median time per call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

from sparseforge.errors import SparseforgeError


def time_block(fn: Callable[[], object], n: int, sync: Callable[[], None] | None = None) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls (``sync()`` after them, e.g. CUDA)."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - start) / n


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    block_seconds: float = 0.05,
    warmup_blocks: int = 2,
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], int]:
    """Time each of ``fns`` in ``rounds`` interleaved blocks; return per-call seconds and the block length.

    Rule: the first function is probed with 3 calls to choose the calls per
    block (``max(1, int(block_seconds / probe))``, the same for every
    function, so that one block of the first lasts about ``block_seconds``);
    every function then runs ``warmup_blocks`` untimed blocks; then each round
    times one block of every function, in the given order on even rounds and
    reversed on odd ones.

    Returns ``({name: [seconds per call, one per round]}, calls_per_block)``;
    summarise with :func:`median_ms`.
    """
    if not fns:
        raise SparseforgeError("time_interleaved needs at least one function to time")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise SparseforgeError(f"rounds must be a positive integer, got {rounds!r}")
    names = list(fns)
    probe = time_block(fns[names[0]], 3, sync)
    per_block = max(1, int(block_seconds / max(probe, 1e-9)))
    for name in names:
        for _ in range(warmup_blocks):
            time_block(fns[name], per_block, sync)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(time_block(fns[name], per_block, sync))
    return times, per_block


def median_ms(seconds: list[float]) -> float:
    """The median of per-call times in seconds, in milliseconds."""
    return statistics.median(seconds) * 1e3
