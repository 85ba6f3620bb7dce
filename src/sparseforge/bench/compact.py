"""Channel pruning that pays: prune 50% of the channels, fine-tune, compact; size, speed and accuracy.

For each model (Conv-4 and ResNet-20; Conv-4 alone in quick mode) on
Fashion-MNIST (the first 12,000 training images and 5,000 test images unless
``--limit-train``/``--limit-test``, to keep the run near 15 minutes on 2
cores): train dense
for 2 epochs (batch 64, SGD with Nesterov momentum, lr 0.05, cosine); then two continuations of the same length from that point: the dense
model fine-tuned (the baseline), and the model channel-pruned over its
dependency groups (``sf.prune_channels``, L1 by default, 50% of every
group's channels) and fine-tuned with the pruned slices re-zeroed after every
step. The pruned model is then compacted (``sf.compact``). Reported:
parameters dense vs compacted, inference time at batch 64 (eval mode, no
grad) of the dense and the compacted model timed in alternating blocks within
one run (the order flips every round; medians), and test accuracy of the
dense, masked and compacted models (masked and compacted must agree to float
noise: the compacted model is the masked one with its zero channels removed).
Targets: >= 1.8x fewer parameters, >= 1.7x faster, masked within 1 point of
the dense baseline.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from sparseforge.bench.common import RunConfig, add_common_arguments, resolve_common, train_run
from sparseforge.compact import compact
from sparseforge.oneshot.prune import prune_channels
from sparseforge.timing import median_ms, time_interleaved
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.training import evaluate

TARGETS = {"param_ratio": 1.8, "speedup": 1.7, "accuracy_drop": 1.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, seeds=1, epochs=2)  # --seeds is accepted and ignored: one seed
    parser.add_argument("--models", nargs="+", default=None,
                        help="zoo models (default conv4 resnet20; quick: conv4)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default 1)")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of each group's channels (default 0.5)")
    parser.add_argument("--score", default="l1", help="l1 (default), l2 or taylor")
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch for timing (default 64)")
    parser.add_argument("--train-batch-size", type=int, default=64, help="training batch (default 64)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30, quick 3)")


def _max_logit_diff(a: nn.Module, b: nn.Module, loader) -> float:
    a.eval()
    b.eval()
    diff = 0.0
    with torch.no_grad():
        for x, _ in loader:
            diff = max(diff, float((a(x) - b(x)).abs().max()))
    return diff


def measure(name: str, common: dict[str, Any], args: argparse.Namespace, log) -> dict[str, Any]:
    """One model: dense training, the two continuations, compaction, timing."""
    quick = bool(args.quick)
    seed = 0
    ft_epochs = args.finetune_epochs or 1
    cfg = RunConfig(model=name, epochs=common["epochs"], batch_size=args.train_batch_size, seed=seed,
                    limit_train=common["limit_train"], limit_test=common["limit_test"], data_dir=common["data_dir"])
    ft = RunConfig(model=name, epochs=ft_epochs, lr=args.finetune_lr, batch_size=args.train_batch_size, seed=seed + 1,
                   limit_train=common["limit_train"], limit_test=common["limit_test"], data_dir=common["data_dir"])
    t0 = time.perf_counter()
    trained, model = train_run(cfg, log=log, label=f"{name} dense")
    dense_start = copy.deepcopy(model)

    dense_ft, dense = train_run(ft, model=copy.deepcopy(dense_start), log=log, label=f"{name} dense fine-tune")

    masked = copy.deepcopy(dense_start)
    calibration = None
    if str(args.score).lower() == "taylor":
        train, _ = fashion_mnist(128, common["data_dir"], seed, limit_train=128 * 8, limit_test=1)
        calibration = list(train)
    pruning = prune_channels(masked, args.score, sparsity=args.sparsity, calibration=calibration)
    _, test = fashion_mnist(256, common["data_dir"], seed, limit_train=1, limit_test=common["limit_test"])
    after_prune = evaluate(masked, test)["accuracy"]
    masked_ft, masked = train_run(ft, model=masked, log=log, label=f"{name} pruned fine-tune",
                                  on_step=lambda step, m: pruning.apply(m))
    pruning.apply(masked)

    small = copy.deepcopy(masked)
    rep = compact(small)
    acc_masked = evaluate(masked, test)["accuracy"]
    acc_small = evaluate(small, test)["accuracy"]
    diff = _max_logit_diff(masked, small, test)
    train_seconds = time.perf_counter() - t0

    x = torch.randn(args.batch_size, *dense.input_shape, generator=torch.Generator().manual_seed(0))
    dense.eval()
    small.eval()

    def run_dense() -> None:
        with torch.no_grad():
            dense(x)

    def run_small() -> None:
        with torch.no_grad():
            small(x)

    rounds = args.rounds or (3 if quick else 30)
    times, per_block = time_interleaved({"dense": run_dense, "compacted": run_small}, rounds, block_seconds=0.1)
    ms_dense, ms_small = median_ms(times["dense"]), median_ms(times["compacted"])
    params_dense = sum(p.numel() for p in dense.parameters())
    params_small = sum(p.numel() for p in small.parameters())
    row = {
        "model": name,
        "score": str(args.score),
        "sparsity": args.sparsity,
        "epochs": cfg.epochs,
        "finetune_epochs": ft_epochs,
        "params_dense": params_dense,
        "params_compacted": params_small,
        "param_ratio": params_dense / params_small,
        "ms_dense": round(ms_dense, 4),
        "ms_compacted": round(ms_small, 4),
        "speedup": ms_dense / ms_small,
        "speedup_median_of_round_ratios": statistics.median(
            d / s for d, s in zip(times["dense"], times["compacted"])),
        "rounds": rounds,
        "calls_per_block": per_block,
        "batch_size": args.batch_size,
        "accuracy_dense_before_finetune": trained.test_accuracy,
        "accuracy_dense": dense_ft.test_accuracy,
        "accuracy_after_prune": after_prune,
        "accuracy_masked": acc_masked,
        "accuracy_compacted": acc_small,
        "accuracy_drop": dense_ft.test_accuracy - acc_masked,
        "max_abs_diff": diff,
        "pruned_channels": pruning.pruned_channels,
        "widths": {k: v.get("out_channels", v.get("out_features", v.get("num_features")))
                   for k, v in rep.shapes.items() if v["kind"] in ("Conv2d", "Linear")},
        "train_seconds": round(train_seconds, 1),
    }
    row["holds"] = {
        "param_ratio": row["param_ratio"] >= TARGETS["param_ratio"],
        "speedup": row["speedup"] >= TARGETS["speedup"],
        "accuracy": row["accuracy_drop"] <= TARGETS["accuracy_drop"],
        "identical": abs(acc_small - acc_masked) < 1e-9,
    }
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = resolve_common(args, seeds=1, epochs=2)
    if args.limit_train is None:
        common["limit_train"] = 512 if args.quick else 12000
    if args.limit_test is None:
        common["limit_test"] = 500 if args.quick else 5000

    def log(line: str) -> None:
        print(line, flush=True)

    results = []
    for name in args.models or (["conv4"] if args.quick else ["conv4", "resnet20"]):
        r = measure(name, common, args, log)
        print(
            f"{name}: params {r['params_dense']:,} -> {r['params_compacted']:,} ({r['param_ratio']:.2f}x, "
            f"target >= {TARGETS['param_ratio']}); batch {r['batch_size']} {r['ms_dense']:.2f} -> "
            f"{r['ms_compacted']:.2f} ms ({r['speedup']:.2f}x, target >= {TARGETS['speedup']}); accuracy dense "
            f"{r['accuracy_dense']:.2f} masked {r['accuracy_masked']:.2f} compacted {r['accuracy_compacted']:.2f} "
            f"(max logit diff {r['max_abs_diff']:.1e})",
            flush=True,
        )
        results.append(r)
    return {
        "benchmark": "compact",
        "quick": bool(args.quick),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "targets": TARGETS,
        "results": results,
    }
