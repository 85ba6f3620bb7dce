"""Training-step overhead of a masked model against the same dense model.

For each model, a dense copy and a copy under a ``Sparsifier`` at 90%
sparsity (fixed mask, magnitude, SGD with momentum) take training steps on the
same batch of 128, each the step :func:`sparseforge.fit` takes (the
Sparsifier as its callback); the two are timed in alternating blocks within one run
(the order flips every round) and the medians of the per-step times are
compared. Inputs are random tensors of Fashion-MNIST's shape: step time does
not depend on the pixel values, and the benchmark needs no data files.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch
from torch import nn

from sparseforge.method import Method
from sparseforge.schedules import OneShot
from sparseforge.sparsifier import Sparsifier
from sparseforge.timing import time_interleaved
from sparseforge.training import SparsifierCallback, TrainingRun
from sparseforge.zoo.models import build_model

TARGET_PCT = {"conv4": 3.0, "lenet300": 6.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["conv4", "lenet300"], help="zoo models to time")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 40, quick 5)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sparsity: float | None):
    """One training step of :func:`sparseforge.fit` on ``(x, y)``, with a Sparsifier callback when ``sparsity``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    callbacks = []
    if sparsity is not None:
        sparsifier = Sparsifier(model, Method(schedule=OneShot(final=sparsity)), optimizer=opt)
        callbacks.append(SparsifierCallback(sparsifier))
    run = TrainingRun(model, None, opt, nn.functional.cross_entropy, callbacks=callbacks)
    run.start()
    return lambda: run.step(x, y)


def measure(name: str, batch_size: int, rounds: int, sparsity: float) -> dict[str, Any]:
    """Median per-step milliseconds of the dense and the masked model, interleaved."""
    torch.manual_seed(0)
    dense = build_model(name)
    masked = copy.deepcopy(dense)
    x = torch.randn(batch_size, *dense.input_shape)
    y = torch.randint(0, dense.num_classes, (batch_size,))
    steps = {"dense": _stepper(dense, x, y, None), "masked": _stepper(masked, x, y, sparsity)}
    # Steps per block: enough that one block lasts ~50 ms, so timer noise is small.
    times, per_block = time_interleaved(steps, rounds, block_seconds=0.05)
    dense_ms = statistics.median(times["dense"]) * 1e3
    masked_ms = statistics.median(times["masked"]) * 1e3
    ratios = [m / d for m, d in zip(times["masked"], times["dense"])]
    return {
        "model": name,
        "batch_size": batch_size,
        "sparsity": sparsity,
        "dense_ms": round(dense_ms, 4),
        "masked_ms": round(masked_ms, 4),
        "overhead_pct": round((masked_ms / dense_ms - 1.0) * 100.0, 2),
        "overhead_pct_median_of_round_ratios": round((statistics.median(ratios) - 1.0) * 100.0, 2),
        "rounds": rounds,
        "steps_per_block": per_block,
        "target_pct": TARGET_PCT.get(name),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (5 if args.quick else 40)
    results = []
    for name in args.models:
        r = measure(name, args.batch_size, rounds, args.sparsity)
        target = r["target_pct"]
        verdict = "-" if target is None else ("meets" if r["overhead_pct"] < target else "MISSES")
        print(
            f"{name:10s} dense {r['dense_ms']:8.3f} ms  masked {r['masked_ms']:8.3f} ms  "
            f"overhead {r['overhead_pct']:+6.2f}%  (target < {target}%: {verdict})",
            flush=True,
        )
        results.append(r)
    return {
        "benchmark": "overhead",
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }
