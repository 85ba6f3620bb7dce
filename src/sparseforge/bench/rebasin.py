"""Git Re-Basin: weight matching shrinks the loss barrier on the linear interpolation path by >= 80%.

Claim from "Git Re-Basin: Merging Models modulo Permutation Symmetries"
(Ainsworth, Hayase and Srinivasa, ICLR 2023): two networks trained from
different initialisations and data orders are separated by a loss barrier on
the straight line between their weights, and most of it is an artefact of the
order of their hidden units: after permuting B's units to match A's
(weight matching, :func:`sparseforge.merge.rebasin.weight_matching`) the
barrier nearly vanishes. The paper shows near-zero barriers for wide MLPs on
MNIST and large reductions for VGG/ResNets, with the barrier shrinking as
width grows; LeNet-300-100 and Conv-4 are narrow, so the numbers here are
what these widths give, not a tuned result.

Setup: for each pair p, two models of the same architecture trained with
seeds 2p and 2p+1 (different initialisation and data order) by the shared
reproduction recipe (``bench/common.py``: SGD with Nesterov momentum, cosine
decay). Test loss and accuracy are measured at alpha in {0, 0.1, ..., 1} along
``(1 - alpha) A + alpha B`` (naive) and ``(1 - alpha) A + alpha pi(B)``
(matched). Barrier = max over alpha of ``L(alpha) - ((1 - alpha) L(0) + alpha
L(1))``; the reduction is ``1 - matched / naive``. Models with BatchNorm
(``--models resnet20``) get their BatchNorm statistics recomputed at every
point (as in the paper). Conv-4 is trained on the first 10000 training
examples for 3 epochs and evaluated on the first 2000 test examples, to fit
the time budget of a shared 2-core CPU; LeNet-300-100 uses the full sets,
10 epochs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from sparseforge.bench.common import RunConfig, print_table, summarize, train_run
from sparseforge.errors import SparseforgeError
from sparseforge.compact.dependency import analyze
from sparseforge.merge.rebasin import apply_permutation, interpolation_path, loss_barrier, weight_matching
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.models import classifier_names

CLAIM_REDUCTION = 80.0  # percent of the naive barrier removed by weight matching
# Per-model defaults of a full run: (epochs, limit_train, limit_test). None = the whole set.
FULL: dict[str, tuple[int, int | None, int | None]] = {
    "lenet300": (10, None, None),
    "conv4": (3, 10000, 2000),
    "resnet20": (3, 10000, 2000),
}
QUICK = (1, 1024, 500)
BN_BATCHES = 20  # training batches used to recompute BatchNorm statistics at each point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None, choices=classifier_names(),
                        help="architectures (default lenet300 conv4)")
    parser.add_argument("--pairs", type=int, default=None, help="independent pairs per model (default 2; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model (default: lenet300 10, conv4 3)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training examples (default per model)")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test examples (default per model)")
    parser.add_argument("--points", type=int, default=None, help="alphas on the path, ends included (default 11; quick 3)")
    parser.add_argument("--max-iter", type=int, default=100, help="weight matching sweeps at most (default 100)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")


def _plot(path: str, blocks: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4.2), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        for i, pair in enumerate(block["pairs"]):
            for key, style, color in (("naive", "--", "tab:red"), ("matched", "-", "tab:blue")):
                pts = pair[key]["path"]
                ax.plot([p["alpha"] for p in pts], [p["loss"] for p in pts], style, marker="o", ms=3, color=color,
                        alpha=0.9 if i == 0 else 0.5,
                        label=f"{key} (barrier {block[key]['mean']:.3f})" if i == 0 else None)
        ax.set_xlabel("alpha  ((1 - alpha) A + alpha B)")
        ax.set_ylabel("test loss")
        ax.set_title(f"{block['model']}: barrier -{block['reduction_percent']:.0f}%")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _path_summary(path: list[dict[str, float]]) -> dict[str, Any]:
    alphas = [p["alpha"] for p in path]
    acc = [p["accuracy"] for p in path]
    # The accuracy barrier mirrors the loss one: the largest drop below the straight line.
    acc_barrier = max((1 - a) * acc[0] + a * acc[-1] - v for a, v in zip(alphas, acc))
    return {"barrier": loss_barrier(alphas, [p["loss"] for p in path]), "accuracy_barrier": acc_barrier,
            "midpoint_accuracy": min(path, key=lambda p: abs(p["alpha"] - 0.5))["accuracy"], "path": path}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    models = args.models or ["lenet300", "conv4"]
    pairs = args.pairs or (1 if quick else 2)
    points = args.points or (3 if quick else 11)
    if pairs < 1 or points < 2:
        raise SparseforgeError(f"--pairs must be >= 1 and --points >= 2, got {pairs} and {points}")
    alphas = [i / (points - 1) for i in range(points)]
    blocks: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    rows = []
    for name in models:
        epochs, limit_train, limit_test = QUICK if quick else FULL[name]
        epochs = args.epochs or epochs
        limit_train = args.limit_train or limit_train
        limit_test = args.limit_test or limit_test
        settings[name] = {"epochs": epochs, "limit_train": limit_train, "limit_test": limit_test}
        pair_out = []
        for p in range(pairs):
            trained = []
            for seed in (2 * p, 2 * p + 1):
                cfg = RunConfig(model=name, epochs=epochs, seed=seed, limit_train=limit_train,
                                limit_test=limit_test, data_dir=args.data_dir)
                result, model = train_run(cfg)
                print(f"{name} seed {seed}: test {result.test_accuracy:.2f}% loss {result.test_loss:.4f} "
                      f"({result.seconds:.0f}s)", flush=True)
                trained.append((result, model))
            (ra, a), (rb, b) = trained
            train_loader, test_loader = fashion_mnist(RunConfig().batch_size, args.data_dir, 0, limit_train, limit_test)
            has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
            bn_batches = [x for (x, _), _ in zip(train_loader, range(BN_BATCHES))] if has_bn else None
            start = time.perf_counter()
            perms = weight_matching(a, b, max_iter=args.max_iter, seed=p)
            match_seconds = time.perf_counter() - start
            graph = analyze(a)
            b_matched = apply_permutation(b, graph, perms)
            moved = sum(int((perm != torch.arange(perm.numel())).sum()) for perm in perms.values())
            naive = _path_summary(interpolation_path(a, a.state_dict(), b.state_dict(), test_loader, alphas,
                                                     bn_batches=bn_batches))
            matched = _path_summary(interpolation_path(a, a.state_dict(), b_matched, test_loader, alphas,
                                                       bn_batches=bn_batches))
            # pi(B) is B with its units reordered: the path's end must score as B does.
            end_gap = abs(matched["path"][-1]["loss"] - naive["path"][-1]["loss"])
            print(f"{name} pair {p}: barrier naive {naive['barrier']:.4f} matched {matched['barrier']:.4f}; "
                  f"midpoint accuracy naive {naive['midpoint_accuracy']:.2f}% matched "
                  f"{matched['midpoint_accuracy']:.2f}% (matching {match_seconds:.1f}s, {moved} units moved)",
                  flush=True)
            pair_out.append({"seeds": [2 * p, 2 * p + 1], "a": ra.to_dict(), "b": rb.to_dict(),
                             "match_seconds": match_seconds, "units_moved": moved,
                             "groups": {str(g): int(v.numel()) for g, v in perms.items()},
                             "end_loss_gap": end_gap, "naive": naive, "matched": matched})
        naive_s = summarize([q["naive"]["barrier"] for q in pair_out])
        matched_s = summarize([q["matched"]["barrier"] for q in pair_out])
        reduction = 100.0 * (1.0 - matched_s["mean"] / naive_s["mean"]) if naive_s["mean"] > 0 else float("nan")
        block = {"model": name, "naive": naive_s, "matched": matched_s, "reduction_percent": reduction,
                 "naive_midpoint_accuracy": summarize([q["naive"]["midpoint_accuracy"] for q in pair_out]),
                 "matched_midpoint_accuracy": summarize([q["matched"]["midpoint_accuracy"] for q in pair_out]),
                 "endpoint_accuracy": summarize([r for q in pair_out for r in (q["a"]["test_accuracy"],
                                                                                 q["b"]["test_accuracy"])]),
                 "holds": bool(reduction >= CLAIM_REDUCTION), "pairs": pair_out}
        blocks.append(block)
        rows.append([name, len(pair_out), block["endpoint_accuracy"]["mean"], naive_s["mean"], matched_s["mean"],
                     reduction, block["naive_midpoint_accuracy"]["mean"], block["matched_midpoint_accuracy"]["mean"]])

    print_table(f"Git Re-Basin on Fashion-MNIST: test-loss barrier on the linear path ({points} points, mean over "
                "pairs)", ["model", "pairs", "end acc %", "barrier naive", "barrier matched", "reduction %",
                           "mid acc naive", "mid acc matched"], rows)
    for b in blocks:
        print(f"{b['model']}: barrier reduced by {b['reduction_percent']:.1f}% (claim >= {CLAIM_REDUCTION:.0f}%): "
              f"{'holds' if b['holds'] else 'does NOT hold'}")

    plot_path = None
    if not args.no_plot:
        stem = args.json or os.path.join("bench", "results", f"rebasin{'-quick' if quick else ''}.json")
        plot_path = args.plot or str(Path(stem).with_suffix(".png"))
        _plot(plot_path, blocks, f"Linear interpolation, naive vs weight matching (Fashion-MNIST, {pairs} pair(s))")
        print(f"wrote {plot_path}")
    return {
        "benchmark": "rebasin",
        "quick": quick,
        "claim": (f"weight matching (Git Re-Basin) reduces the test-loss barrier on the linear interpolation "
                  f"path between independently trained models by >= {CLAIM_REDUCTION:.0f}%"),
        "holds": all(b["holds"] for b in blocks),
        "settings": {"models": settings, "pairs": pairs, "alphas": alphas, "max_iter": args.max_iter,
                     "bn_reset_batches": BN_BATCHES, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "models": blocks,
        "plot": plot_path,
    }
