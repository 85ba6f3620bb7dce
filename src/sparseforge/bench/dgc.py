"""DGC at 0.1% density is within 1 point of all-reduce accuracy with >= 100x fewer gradient bytes.

Claim from "Deep Gradient Compression: Reducing the Communication Bandwidth
for Distributed Training" (Lin et al., ICLR 2018): gradient compression of
270x to 600x without loss of accuracy (ResNet, CIFAR-10 / ImageNet), thanks
to momentum correction, local clipping, momentum factor masking and warm-up.
Checked here on Fashion-MNIST with LeNet-300-100 under DDP: 2 processes on
gloo (CPU, one thread each), global batch 128 split evenly (each global batch
is the single-process loader's batch, rank r takes every other example), the
same seeds, data order and cosine schedule for every variant:

- ``allreduce``: plain DDP averaging, SGD with Nesterov momentum 0.9 and
  weight decay 5e-4 (the project's reproduction optimizer, bench/common.py);
- ``dgc-1%`` and ``dgc-0.1%``: :func:`sparseforge.distributed.register_dgc`
  at densities 0.01 and 0.001, Nesterov momentum correction 0.9 and the weight
  decay in the hook, momentum factor masking, sampled threshold (1%), the
  paper's exponential warm-up (densities 1/4, 1/16, ... down to the target)
  over the first ``--warmup-epochs`` (default 0.5 of 10: the paper's 4 of ~90
  ImageNet epochs scaled to our run), SGD with momentum 0 and weight decay 0;
- ``powersgd-r2``: PyTorch's PowerSGD hook at rank 2, plain all-reduce for the
  first 10% of steps (PyTorch's suggested start), same SGD as all-reduce.

Full run: 10 epochs, 2 seeds (about 15 minutes on a shared 2-core CPU).
Reported per variant: final test accuracy (mean over seeds), gradient bytes
this rank sent per step (whole run, and after DGC's warm-up), the ratio of
all-reduce's bytes to them, wall time of the training loop. Bytes are the
payload each rank contributes to the collectives (see
``sparseforge.distributed.dgc``): with 2 ranks, what ring all-reduce and ring
all-gather put on the wire per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sparseforge.bench.common import add_common_arguments, print_table, resolve_common, summarize
from sparseforge.distributed.dgc import (
    DGCConfig,
    register_allreduce_counter,
    register_dgc,
    register_powersgd,
)
from sparseforge.errors import SparseforgeError
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.models import build_model
from sparseforge.zoo.training import evaluate

EPOCHS = 10
WORLD = 2
WARMUP_EPOCHS = 0.5  # the paper's 4 warm-up epochs of ~90 (ImageNet), scaled to our 10: 0.44, rounded up
BATCH = 128  # global batch: 64 per rank
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
CLAIM_DENSITY = 0.001
CLAIM_POINTS = 1.0
CLAIM_RATIO = 100.0
VARIANTS = ("allreduce", "dgc-1%", "dgc-0.1%", "powersgd-r2")
DENSITY = {"dgc-1%": 0.01, "dgc-0.1%": 0.001}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, seeds=2, epochs=EPOCHS)
    parser.add_argument("--model", default="lenet300", help="zoo model (default lenet300; see the README for why)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="a subset of the variants")
    parser.add_argument("--warmup-epochs", type=float, default=None,
                        help="DGC density warm-up in epochs (default 0.5)")
    parser.add_argument("--powersgd-start", type=float, default=0.1,
                        help="fraction of steps of plain all-reduce before PowerSGD (default 0.1)")


def _digest(model: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def _train_variant(variant: str, seed: int, rank: int, settings: dict[str, Any]) -> dict[str, Any]:
    train, test = fashion_mnist(BATCH, settings["data_dir"], seed, settings["limit_train"], settings["limit_test"])
    steps_per_epoch = len(train)
    total = settings["epochs"] * steps_per_epoch
    warmup = int(round(settings["warmup_epochs"] * steps_per_epoch))
    torch.manual_seed(seed)
    model = build_model(settings["model"])
    ddp = DistributedDataParallel(model)
    dgc_on = variant in DENSITY
    # Steady state starts after DGC's warm-up, after PowerSGD's all-reduce steps, at once for all-reduce.
    steady_from = 0
    if dgc_on:
        steady_from = warmup
        state = register_dgc(ddp, DGCConfig(density=DENSITY[variant], momentum=MOMENTUM, nesterov=True,
                                            weight_decay=WEIGHT_DECAY, warmup_steps=warmup, seed=seed))
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
        state.check_optimizer(opt)
    else:
        if variant == "powersgd-r2":
            steady_from = max(2, int(settings["powersgd_start"] * total))
            state = register_powersgd(ddp, rank=2, start_powerSGD_iter=steady_from)
        else:
            state = register_allreduce_counter(ddp)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    after_warmup: dict[str, float] | None = state.stats() if steady_from == 0 else None
    history = []
    step = 0
    seconds = 0.0
    for epoch in range(1, settings["epochs"] + 1):
        ddp.train()
        start = time.perf_counter()
        loss_sum, batches = 0.0, 0
        for xb, yb in train:
            # every rank walks the same global batch and takes its share (rank r: examples r, r + 2, ...)
            x, y = xb[rank::WORLD], yb[rank::WORLD]
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach())
            batches += 1
            if step == steady_from:
                after_warmup = state.stats()
        seconds += time.perf_counter() - start
        row = {"epoch": epoch, "train_loss": loss_sum / max(batches, 1), "bytes_per_step": state.stats()["bytes_per_step"]}
        if epoch == settings["epochs"] or epoch % 5 == 0:
            row["test_accuracy"] = evaluate(model, test)["accuracy"]
        history.append(row)
        if rank == 0:
            acc = f" test {row['test_accuracy']:.2f}%" if "test_accuracy" in row else ""
            print(f"{variant} seed {seed} epoch {epoch}: loss {row['train_loss']:.4f}{acc} "
                  f"({row['bytes_per_step']:.0f} B/step, {seconds:.0f}s)", flush=True)
    ev = evaluate(model, test)
    stats = state.stats()
    steady = None
    if after_warmup is not None and stats["steps"] > after_warmup["steps"]:
        n = stats["steps"] - after_warmup["steps"]
        steady = {"steps": n, "bytes_per_step": (stats["bytes_sent"] - after_warmup["bytes_sent"]) / n,
                  "dense_bytes_per_step": (stats["dense_bytes"] - after_warmup["dense_bytes"]) / n}
    digests: list[Any] = [None] * WORLD
    dist.all_gather_object(digests, _digest(model))
    return {"variant": variant, "seed": seed, "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
            "seconds": seconds, "steps": step, "steady_from_step": steady_from, "stats": stats,
            "after_warmup": steady, "ranks_identical": all(d == digests[0] for d in digests),
            "history": history}


def _worker(rank: int, store_path: str, out_path: str, settings: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        runs = [_train_variant(v, seed, rank, settings) for seed in range(settings["seeds"])
                for v in settings["variants"]]
        if rank == 0:
            Path(out_path).write_text(json.dumps(runs))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = resolve_common(args, seeds=2, epochs=EPOCHS)
    quick = bool(args.quick)
    if quick and not args.epochs:
        common["epochs"] = 2  # warm-up in the first, the target density in the second
    if quick and not args.limit_train:
        common["limit_train"] = 1024
    warmup_epochs = WARMUP_EPOCHS if args.warmup_epochs is None else float(args.warmup_epochs)
    if not 0 <= warmup_epochs < common["epochs"]:
        raise SparseforgeError(f"--warmup-epochs must be in [0, epochs={common['epochs']}), got {warmup_epochs}")
    if not 0 < args.powersgd_start < 1:
        raise SparseforgeError(f"--powersgd-start must be in (0, 1), got {args.powersgd_start}")
    variants = list(dict.fromkeys(args.variants or VARIANTS))
    settings = common | {"model": args.model, "variants": variants, "warmup_epochs": warmup_epochs,
                         "powersgd_start": args.powersgd_start}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sf-bench-dgc-") as tmp:
        out = Path(tmp) / "runs.json"
        mp.start_processes(_worker, args=(str(Path(tmp) / "store"), str(out), settings), nprocs=WORLD,
                           start_method="spawn")
        runs = json.loads(out.read_text())
    elapsed = time.perf_counter() - start

    by_variant: dict[str, list[dict[str, Any]]] = {v: [r for r in runs if r["variant"] == v] for v in variants}
    dense_per_step = runs[0]["stats"]["dense_bytes_per_step"]
    summary = []
    for v, rs in by_variant.items():
        acc = summarize([r["test_accuracy"] for r in rs])
        per_step = _mean([r["stats"]["bytes_per_step"] for r in rs])
        steady = [r["after_warmup"]["bytes_per_step"] for r in rs if r["after_warmup"]]
        steady_mean = _mean(steady) if steady else None
        summary.append({
            "variant": v, "accuracy": acc, "bytes_per_step": per_step,
            "ratio": dense_per_step / per_step if per_step else None,
            "bytes_per_step_after_warmup": steady_mean,
            "ratio_after_warmup": dense_per_step / steady_mean if steady_mean else None,
            "seconds": _mean([r["seconds"] for r in rs]),
            "ranks_identical": all(r["ranks_identical"] for r in rs),
        })
    base = next((s for s in summary if s["variant"] == "allreduce"), None)
    for s in summary:
        s["accuracy_minus_allreduce"] = s["accuracy"]["mean"] - base["accuracy"]["mean"] if base else None

    rows = [[s["variant"], s["accuracy"]["mean"], s["accuracy"]["std"],
             "-" if s["accuracy_minus_allreduce"] is None else f"{s['accuracy_minus_allreduce']:+.2f}",
             f"{s['bytes_per_step']:.0f}", f"{s['ratio']:.1f}x" if s["ratio"] else "-",
             "-" if s["ratio_after_warmup"] is None else f"{s['ratio_after_warmup']:.1f}x",
             f"{s['seconds']:.1f}"] for s in summary]
    print_table(f"DDP on Fashion-MNIST {args.model}, {WORLD} gloo ranks, {common['epochs']} epochs, "
                f"{common['seeds']} seed(s); all-reduce sends {dense_per_step:.0f} B/step per rank",
                ["variant", "test acc %", "± std", "vs all-reduce", "B/step/rank", "ratio (run)",
                 "ratio (after warm-up)", "train s"], rows)
    claim = next((s for s in summary if s["variant"] == "dgc-0.1%"), None)
    holds = None
    if claim is not None and base is not None:
        # The paper's compression ratios are per-iteration gradient sizes at the target density
        # (after warm-up); the whole run's ratio, warm-up included, is reported beside it.
        steady = claim["ratio_after_warmup"] or 0.0
        holds = bool(claim["accuracy_minus_allreduce"] >= -CLAIM_POINTS and steady >= CLAIM_RATIO)
        print(f"dgc-0.1%: {claim['accuracy_minus_allreduce']:+.2f} points vs all-reduce (needs >= -{CLAIM_POINTS}), "
              f"{steady:.0f}x fewer bytes per step after warm-up (needs >= {CLAIM_RATIO:.0f}x; whole run "
              f"{claim['ratio']:.0f}x): claim {'holds' if holds else 'does NOT hold'}")
    return {
        "benchmark": "dgc",
        "quick": quick,
        "claim": (f"DGC at {CLAIM_DENSITY:.1%} density is within {CLAIM_POINTS:g} point of all-reduce test accuracy "
                  f"with >= {CLAIM_RATIO:.0f}x fewer gradient bytes per step at the target density (after the warm-up, "
                  "as the paper reports gradient sizes); the whole run's ratio is reported too"),
        "holds": holds,
        "settings": settings | {"world_size": WORLD, "global_batch": BATCH, "lr": LR, "momentum": MOMENTUM,
                                "nesterov": True, "weight_decay": WEIGHT_DECAY, "threads_per_rank": 1,
                                "backend": "gloo", "torch": torch.__version__,
                                "dense_bytes_per_step": dense_per_step, "wall_seconds": elapsed},
        "summary": summary,
        "runs": runs,
    }


def _mean(values: list[float]) -> float:
    """Mean of a non-empty list (NaN when empty)."""
    return sum(values) / len(values) if values else math.nan
