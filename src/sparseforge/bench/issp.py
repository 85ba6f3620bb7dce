"""ISS-P beats hard magnitude pruning from scratch at 90% sparsity: x2 super-resolution and Fashion-MNIST.

Claim from "Iterative Soft Shrinkage Learning for Efficient Image
Super-Resolution" (Wang et al., ICCV 2023): training a sparse network from a
random initialisation, shrinking the lowest-magnitude percentage of every
layer by a factor alpha at each iteration (ISS-P) and only then pruning it
hard gives a better sparse model than hard pruning. Checked at 90%
sparsity, every method trained from the same random initialisation with the
same optimizer, batches and number of steps:

- ``dense``: no sparsity (the ceiling).
- ``gmp``: gradual magnitude pruning (hard, monotone: Zhu and Gupta's cubic
  schedule from 0 to 90%) over the same pruning stage, then fine-tuning with
  the mask frozen: the library's standard "hard magnitude pruning from
  scratch" baseline.
- ``iht``: the paper's own hard counterpart, ISS-P with alpha = 0 (iterative
  hard thresholding): the lowest 90% are set to zero at every step but may
  grow back, hard mask at the end of the pruning stage.
- ``iss-p``: ISS-P, alpha = 0.95, every step, hard mask at the end of the
  pruning stage (1/3 of the run, as in the released code), then fine-tuning.

(a) x2 super-resolution: ESPCN on the luminance of the natural images in
``skimage.data``, split by image; PSNR (dB, border 2) on the held-out images,
with bicubic upscaling as the no-learning reference. (b) Fashion-MNIST:
LeNet-300-100 through ``bench.common.train_run``; test accuracy. Reports mean
and sample std over seeds; the claim holds on a task when ISS-P's mean beats
GMP's (the table also gives IHT and the spread, to judge the margin).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from sparseforge.bench.common import (
    RunConfig,
    add_common_arguments,
    print_table,
    resolve_common,
    summarize,
    train_run,
)
from sparseforge.errors import SparseforgeError
from sparseforge.method import Method
from sparseforge.methods.gmp import GMP
from sparseforge.methods.issp import ISSP
from sparseforge.report import report
from sparseforge.training import SparsifierCallback
from sparseforge.zoo.superres import ESPCN, bicubic_psnr, evaluate_sr, superres_data, train_sr

CONFIGS = ("dense", "gmp", "iht", "iss-p")


def make_method(name: str, sparsity: float, shrink: float, end: float, steps: int) -> Method | None:
    """The method of configuration ``name`` for a run of ``steps`` optimizer steps."""
    if name == "dense":
        return None
    if name == "gmp":
        # About 20 pruning events over the same pruning stage as ISS-P.
        return GMP(sparsity, start=0, end=end, frequency=max(1, int(end * steps) // 20))
    if name == "iht":
        return ISSP(sparsity, shrink=0.0, end=end)
    if name == "iss-p":
        return ISSP(sparsity, shrink=shrink, end=end)
    raise SparseforgeError(f"unknown configuration {name!r}; use one of {', '.join(CONFIGS)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, seeds=3, epochs=2)
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity (default 0.9)")
    parser.add_argument("--shrink", type=float, default=0.95, help="ISS-P's alpha (default 0.95)")
    parser.add_argument("--end", type=float, default=1 / 3,
                        help="end of the pruning stage, fraction of the run (default 1/3, as in the paper's code)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--tasks", nargs="+", default=["superres", "fashion-mnist"],
                        choices=["superres", "fashion-mnist"])
    parser.add_argument("--sr-steps", type=int, default=None, help="SR training steps (default 1000; quick 40)")
    parser.add_argument("--sr-lr", type=float, default=1e-3, help="SR Adam learning rate, cosine-decayed (default 1e-3)")
    parser.add_argument("--sr-patch", type=int, default=None, help="SR HR patch side (default 48; quick 32)")
    parser.add_argument("--sr-batch", type=int, default=16, help="SR patches per batch (default 16)")


def _superres(args: argparse.Namespace, seeds: int, log) -> dict[str, Any]:
    steps = args.sr_steps or (40 if args.quick else 1000)
    patch = args.sr_patch or (32 if args.quick else 48)
    scale = 2
    data = superres_data(scale=scale, patch_size=patch, batch_size=args.sr_batch, seed=0)
    bicubic = bicubic_psnr(data.test, scale)
    log(f"superres: bicubic PSNR {bicubic['psnr']:.3f} dB on {', '.join(n for n, _, _ in data.test)}")
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):
        for name in args.configs:
            torch.manual_seed(seed)
            model = ESPCN(scale)
            data.sampler.reseed(seed)  # every configuration sees the same batches for a seed
            opt = torch.optim.Adam(model.parameters(), lr=args.sr_lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            method = make_method(name, args.sparsity, args.shrink, args.end, steps)
            start = time.perf_counter()
            # train_sr is sparseforge.fit over the patch sampler; the Sparsifier attaches as a callback.
            loss = train_sr(model, data.sampler, opt, steps, loss="l1", scheduler=sched,
                            callbacks=[] if method is None else [SparsifierCallback(method, finalize=True)])
            ev = evaluate_sr(model, data.test, scale)
            rep = report(model)
            row = {"task": "superres", "config": name, "seed": seed, "psnr": ev["psnr"],
                   "per_image": ev["per_image"], "sparsity": rep.sparsity, "train_loss": loss,
                   "seconds": time.perf_counter() - start}
            runs.append(row)
            log(f"superres {name} seed {seed}: PSNR {ev['psnr']:.3f} dB, sparsity {rep.sparsity:.4f}, "
                f"loss {loss:.4f} ({row['seconds']:.0f}s)")
    summary = {name: summarize([r["psnr"] for r in runs if r["config"] == name]) for name in args.configs}
    return {"bicubic": bicubic, "summary": summary, "runs": runs,
            "settings": {"scale": scale, "steps": steps, "patch": patch, "batch": args.sr_batch, "lr": args.sr_lr,
                         "model": "espcn", "loss": "l1", "optimizer": "adam+cosine",
                         "test_images": [n for n, _, _ in data.test]}}


def _fashion_mnist(args: argparse.Namespace, common: dict[str, Any], log) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for seed in range(common["seeds"]):
        cfg = RunConfig(model="lenet300", epochs=common["epochs"], seed=seed, limit_train=common["limit_train"],
                        limit_test=common["limit_test"], data_dir=common["data_dir"])
        for name in args.configs:
            method = None if name == "dense" else (
                lambda steps, name=name: make_method(name, args.sparsity, args.shrink, args.end, steps))
            result, _ = train_run(cfg, method)
            runs.append({"task": "fashion-mnist", "config": name, "seed": seed} | result.to_dict())
            log(f"fashion-mnist {name} seed {seed}: test {result.test_accuracy:.2f}% "
                f"sparsity {result.sparsity:.4f} ({result.seconds:.0f}s)")
    summary = {name: summarize([r["test_accuracy"] for r in runs if r["config"] == name]) for name in args.configs}
    return {"summary": summary, "runs": runs, "settings": {"model": "lenet300", "epochs": common["epochs"],
                                                           "limit_train": common["limit_train"]}}


def _claim(summary: dict[str, dict[str, float]]) -> dict[str, Any]:
    """ISS-P's mean against GMP's (the claim) and IHT's, with the spreads to judge the margin."""
    out: dict[str, Any] = {}
    if "iss-p" not in summary:
        return out
    for rival in ("gmp", "iht"):
        if rival in summary:
            diff = summary["iss-p"]["mean"] - summary[rival]["mean"]
            out[f"iss-p-minus-{rival}"] = diff
            out[f"iss-p>{rival}"] = diff > 0
    if "iss-p>gmp" in out:
        out["holds"] = out["iss-p>gmp"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = resolve_common(args, seeds=3, epochs=2)
    if not 0.0 < args.sparsity < 1.0:
        raise SparseforgeError(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if not 0.0 < args.end <= 1.0:
        raise SparseforgeError(f"--end must be a fraction of the run in (0, 1], got {args.end}")

    def log(line: str) -> None:
        print(line, flush=True)

    result: dict[str, Any] = {"benchmark": "issp", "quick": bool(args.quick),
                              "settings": common | {"sparsity": args.sparsity, "shrink": args.shrink,
                                                    "end": args.end, "configs": args.configs,
                                                    "threads": torch.get_num_threads()}}
    rows = []
    if "superres" in args.tasks:
        sr = _superres(args, common["seeds"], log)
        sr["claim"] = _claim(sr["summary"])
        result["superres"] = sr
        b = sr["bicubic"]["psnr"]
        rows.append(["x2 SR PSNR (dB)", "bicubic", b, 0.0, "-"])
        for name, s in sr["summary"].items():
            rows.append(["x2 SR PSNR (dB)", name, s["mean"], s["std"],
                         "-" if name == "dense" or "gmp" not in sr["summary"]
                         else f"{s['mean'] - sr['summary']['gmp']['mean']:+.3f}"])
    if "fashion-mnist" in args.tasks:
        fm = _fashion_mnist(args, common, log)
        fm["claim"] = _claim(fm["summary"])
        result["fashion_mnist"] = fm
        for name, s in fm["summary"].items():
            rows.append(["Fashion-MNIST acc (%)", name, s["mean"], s["std"],
                         "-" if name == "dense" or "gmp" not in fm["summary"]
                         else f"{s['mean'] - fm['summary']['gmp']['mean']:+.2f}"])
    print_table(f"ISS-P vs hard magnitude pruning from scratch at {args.sparsity:.0%} sparsity "
                f"(mean over {common['seeds']} seed(s))", ["task", "config", "mean", "± std", "vs gmp"],
                [[t, c, f"{m:.3f}", f"{s:.3f}", d] for t, c, m, s, d in rows])
    for task in ("superres", "fashion_mnist"):
        if task in result and "holds" in result[task]["claim"]:
            c = result[task]["claim"]
            print(f"{task}: ISS-P {'beats' if c['holds'] else 'does NOT beat'} GMP "
                  f"({c['iss-p-minus-gmp']:+.3f}); vs IHT {c.get('iss-p-minus-iht', float('nan')):+.3f}")
    return result


def plot(result: dict[str, Any], path: str) -> None:
    """Bar chart (mean ± std over seeds) of both tasks from a result of :func:`run`, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [(k, t) for k, t in (("superres", "x2 SR: PSNR on held-out images (dB)"),
                                 ("fashion_mnist", "Fashion-MNIST LeNet-300-100: test accuracy (%)")) if k in result]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], tasks):
        summary = result[key]["summary"]
        names = list(summary)
        means = [summary[n]["mean"] for n in names]
        stds = [summary[n]["std"] for n in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=["0.6" if n == "dense" else "C0" if n == "iss-p" else "C1"
                                                           for n in names])
        if key == "superres":
            ax.axhline(result[key]["bicubic"]["psnr"], color="k", ls="--", lw=1, label="bicubic")
            ax.legend(loc="upper right")
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        if key == "superres":
            high = max(high, result[key]["bicubic"]["psnr"])
        pad = 0.15 * (high - low) + 1e-6
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"ISS-P vs hard pruning from scratch at {result['settings']['sparsity']:.0%} sparsity "
                 f"({result['settings']['seeds']} seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
