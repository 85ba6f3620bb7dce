"""Inference speed of to_sparse models against the same dense (masked) models on CPU.

Two models pruned to 90% unstructured sparsity with one-shot magnitude
pruning (``sf.prune``, uniform over the layers): an MLP 784-4096-4096-10 and
LeNet-300-100. Each is copied and converted with ``sf.to_sparse`` (default
rule: a layer turns sparse only if it is >= 1.1x faster at batch 1 and not
slower at batches 8, 64 and 256); then the dense and the converted model run
forward passes under ``torch.inference_mode`` at batch 1, 8 and 64, timed in
alternating blocks within one run (the order flips every round) and compared
by their medians. Inputs are random tensors: the time does not depend on the
values. Targets: the MLP at least 2x faster at batch 1; LeNet-300-100 never
slower than dense (ratio >= 0.95, allowing for noise). A third model, the
same MLP with 90% of its 8x8 blocks pruned (hidden layers only), shows where
``to_sparse`` picks BSR over CSR; it has no target.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from sparseforge.kernels.choose import to_sparse
from sparseforge.oneshot import prune
from sparseforge.timing import median_ms, time_interleaved
from sparseforge.zoo.models import build_model

TARGETS = {
    "mlp4096": {"batch_size": 1, "min_ratio": 2.0, "what": ">= 2x faster at batch 1"},
    "lenet300": {"batch_size": None, "min_ratio": 0.95, "what": "never slower than dense (>= 0.95 at every batch)"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per batch size (default 40, quick 3)")
    parser.add_argument("--hidden", type=int, default=None, help="MLP hidden width (default 4096, quick 256)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])


def mlp(hidden: int, seed: int = 0) -> nn.Sequential:
    """784 -> hidden -> hidden -> 10 with ReLU, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def measure(name: str, dense: nn.Module, sparsity: float, batch_sizes: list[int], rounds: int,
            check_batch_sizes: tuple[int, ...], convert_rounds: int = 7, pattern: str = "unstructured",
            target: list[str] | None = None) -> dict[str, Any]:
    """Prune ``dense`` in place, convert a copy with to_sparse, time both at each batch size."""
    prune(dense, "magnitude", sparsity=sparsity, pattern=pattern, target=target)
    dense.eval()
    sparse = copy.deepcopy(dense)
    start = time.perf_counter()
    choice = to_sparse(sparse, batch_size=1, check_batch_sizes=check_batch_sizes, rounds=convert_rounds)
    convert_s = time.perf_counter() - start
    rows = []
    with torch.inference_mode():
        for b in batch_sizes:
            x = torch.randn(b, 1, 28, 28)
            diff = float((dense(x) - sparse(x)).abs().max())
            times, per_block = time_interleaved({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, rounds)
            d, s = median_ms(times["dense"]), median_ms(times["sparse"])
            per_round = [dt / st for dt, st in zip(times["dense"], times["sparse"])]
            rows.append({
                "batch_size": b, "dense_ms": round(d, 5), "sparse_ms": round(s, 5),
                "speedup": round(d / s, 3), "speedup_median_of_round_ratios": round(statistics.median(per_round), 3),
                "max_abs_diff": diff, "calls_per_block": per_block,
            })
    return {"model": name, "sparsity": sparsity, "pattern": pattern, "to_sparse_seconds": round(convert_s, 2),
            "converted": choice.converted, "to_sparse": choice.to_dict(), "batches": rows}


def _verdict(result: dict[str, Any]) -> dict[str, Any]:
    target = TARGETS.get(result["model"])
    if target is None:
        return {}
    rows = [r for r in result["batches"] if target["batch_size"] in (None, r["batch_size"])]
    holds = bool(rows) and all(r["speedup"] >= target["min_ratio"] for r in rows)
    return {"target": target["what"], "holds": holds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    rounds = args.rounds or (3 if quick else 40)
    hidden = args.hidden or (256 if quick else 4096)
    check = (8,) if quick else (8, 64, 256)
    load_before = os.getloadavg()
    results = []
    # The block-sparse MLP shows BSR against CSR; its 10-row output layer (not a multiple of 8) stays dense.
    models = [(f"mlp{hidden}", mlp(hidden), "unstructured", None), ("lenet300", build_model("lenet300"), "unstructured", None),
              (f"mlp{hidden}-block8", mlp(hidden), "block:8", ["1", "3"])]
    for name, model, pattern, target in models:
        r = measure(name, model, args.sparsity, list(args.batch_sizes), rounds, check, 3 if quick else 7,
                    pattern, target)
        r |= _verdict(r)
        results.append(r)
        print(f"{name}: converted {r['converted'] or 'nothing'} in {r['to_sparse_seconds']} s", flush=True)
        for row in r["batches"]:
            print(f"  batch {row['batch_size']:4d}  dense {row['dense_ms']:9.4f} ms  sparse {row['sparse_ms']:9.4f} ms  "
                  f"speedup {row['speedup']:5.2f}x  (max |diff| {row['max_abs_diff']:.1e})", flush=True)
        if "holds" in r:
            print(f"  target {r['target']}: {'meets' if r['holds'] else 'MISSES'}", flush=True)
    return {
        "benchmark": "speed",
        "quick": quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "results": results,
    }
