"""IMP with rewinding finds tickets at <= 20% of the weights within 0.3 points of dense; reinit is worse.

Claim from "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
Networks" (Frankle and Carbin 2019), with rewinding to step k from "Linear
Mode Connectivity and the Lottery Ticket Hypothesis" (Frankle et al. 2020),
checked on Fashion-MNIST with LeNet-300-100: iterative magnitude pruning
(prune 20% of the remaining weights per round, globally by magnitude; rewind
the kept weights to step k; retrain under the fixed mask) finds subnetworks
at 20% or less of the weights whose test accuracy matches or beats the dense
network's (within 0.3 points), while the same masks with a fresh random
initialisation (the paper's "random reinit" control) do worse. Rewinding to
k = 0 (the original LTH) and to k = one epoch are run from the same dense
training; a random mask with the same per-layer counts (starting from the
same rewind weights) is the second control. Every retraining runs the
remaining steps of the same schedule as the dense run (SGD with Nesterov
momentum, cosine decay: see ``bench/common.py``), with the run's seed for data
order; the controls start at the same step k. Reports mean and standard
deviation over seeds and a plot of test accuracy against the fraction of
weights remaining.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
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
from sparseforge.methods.imp import CONTROLS, IMP
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.models import build_model

EPOCHS = 3
CLAIM_DENSITY = 0.20  # tickets at this fraction of the weights or fewer ...
CLAIM_TOLERANCE = 0.3  # ... reach dense accuracy minus this many points, or more


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, seeds=3, epochs=EPOCHS)
    parser.add_argument("--model", default="lenet300", help="zoo model (default lenet300)")
    parser.add_argument("--rate", type=float, default=0.2, help="fraction of remaining weights pruned per round")
    parser.add_argument("--rounds", type=int, default=None, help="IMP rounds (default 8: 16.8%% left; quick 2)")
    parser.add_argument("--rewind-epochs", type=float, nargs="+", default=None,
                        help="rewind points k in epochs of training (default 0 1; quick 0 0.25)")
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")


def _plot(path: str, dense: dict[str, float], by_k: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_k), figsize=(6 * len(by_k), 4.5), squeeze=False, sharey=True)
    for ax, block in zip(axes[0], by_k):
        x = [100.0 * r["density"] for r in block["rounds"]]
        ax.axhspan(dense["mean"] - dense["std"], dense["mean"] + dense["std"], color="0.85", label="dense ± std")
        ax.axhline(dense["mean"], color="0.4", lw=1)
        for key, label, style in (("imp", "IMP (winning ticket)", "o-"), ("reinit", "random reinit", "s--"),
                                  ("random", "random mask", "^:")):
            y = [r[key]["mean"] for r in block["rounds"]]
            e = [r[key]["std"] for r in block["rounds"]]
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=label)
        ax.set_xscale("log")
        ax.invert_xaxis()  # as in the paper: pruning proceeds left to right
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:.1f}" for v in x], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("% of weights remaining (log scale)")
        ax.set_title(f"rewind to step {block['rewind_step']} ({block['rewind_epochs']:g} epochs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = resolve_common(args, seeds=3, epochs=EPOCHS)
    quick = bool(args.quick)
    rounds = args.rounds or (2 if quick else 8)
    rewind_epochs = args.rewind_epochs or ([0.0, 0.25] if quick else [0.0, 1.0])
    if sorted(set(rewind_epochs)) != sorted(rewind_epochs) or any(e < 0 for e in rewind_epochs):
        raise SparseforgeError(f"--rewind-epochs must be distinct and >= 0, got {rewind_epochs}")
    batch_size = RunConfig().batch_size
    train_loader, _ = fashion_mnist(batch_size, common["data_dir"], 0, common["limit_train"], 1)
    steps_per_epoch = len(train_loader)
    ks = [int(round(e * steps_per_epoch)) for e in rewind_epochs]
    if max(ks) >= common["epochs"] * steps_per_epoch:
        raise SparseforgeError(f"rewind point {max(rewind_epochs)} epochs is not inside a {common['epochs']}-epoch run")

    runs: list[dict[str, Any]] = []
    dense_acc: list[float] = []
    # acc[k][round][kind] -> list over seeds; density[k][round]
    acc: dict[int, dict[int, dict[str, list[float]]]] = {k: {} for k in ks}
    density: dict[int, dict[int, float]] = {k: {} for k in ks}
    for seed in range(common["seeds"]):
        cfg = RunConfig(model=args.model, epochs=common["epochs"], seed=seed, limit_train=common["limit_train"],
                        limit_test=common["limit_test"], data_dir=common["data_dir"])

        def model_factory(cfg: RunConfig = cfg) -> torch.nn.Module:
            return build_model(cfg.model)

        def make_train_fn(k: int | None, cfg: RunConfig = cfg, seed: int = seed):
            def train_fn(model, method, start_step, on_step):
                name = "dense" if method is None else method.name
                result, _ = train_run(cfg, method, model=model, start_step=start_step, on_step=on_step)
                where = "" if k is None else f" k={k}"
                print(f"{args.model} seed {seed}{where} {name}: test {result.test_accuracy:.2f}% "
                      f"sparsity {result.sparsity:.4f} ({result.seconds:.0f}s)", flush=True)
                return result.to_dict()

            return train_fn

        imps = [IMP(rate=args.rate, rounds=rounds, rewind_step=k) for k in ks]
        torch.manual_seed(seed)
        model = model_factory()
        for imp in imps:
            imp.start(model)

        def observe_all(step: int, m: torch.nn.Module) -> None:
            for imp in imps:
                imp.observe(step, m)

        # One dense run serves every rewind point: its step-k states and its trained weights.
        dense = make_train_fn(None)(model, None, 0, observe_all)
        dense_acc.append(dense["test_accuracy"])
        trained = {name: t.clone() for name, t in model.state_dict().items()}
        seed_runs: dict[str, Any] = {"seed": seed, "dense": dense, "imp": {}}
        for k, imp in zip(ks, imps):
            model.load_state_dict(trained)
            train_fn = make_train_fn(k)
            rounds_out = []
            for _ in range(rounds):
                rr = imp.run_round(model, train_fn, model_factory=model_factory, controls=CONTROLS, seed=seed)
                density[k][rr.round] = rr.density
                cell = acc[k].setdefault(rr.round, {"imp": [], "reinit": [], "random": []})
                cell["imp"].append(rr.metrics["test_accuracy"])
                for kind in CONTROLS:
                    cell[kind].append(rr.controls[kind]["test_accuracy"])
                rounds_out.append(rr.to_dict())
            seed_runs["imp"][str(k)] = rounds_out
        runs.append(seed_runs)

    dense_s = summarize(dense_acc)
    by_k: list[dict[str, Any]] = []
    rows = []
    claims = []
    for k, epochs_k in zip(ks, rewind_epochs):
        block_rounds = []
        for r in sorted(acc[k]):
            cell = {kind: summarize(v) for kind, v in acc[k][r].items()}
            block_rounds.append({"round": r, "density": density[k][r], **cell,
                                 "imp_minus_dense": cell["imp"]["mean"] - dense_s["mean"]})
            rows.append([f"{k} ({epochs_k:g} ep)", r, 100.0 * density[k][r], cell["imp"]["mean"], cell["imp"]["std"],
                         cell["reinit"]["mean"], cell["reinit"]["std"], cell["random"]["mean"],
                         cell["random"]["std"], cell["imp"]["mean"] - dense_s["mean"]])
        by_k.append({"rewind_step": k, "rewind_epochs": epochs_k, "rounds": block_rounds})
        # The claim at <= 20% of the weights: the best such round must be within the tolerance of
        # dense, and the reinitialised control at that round below it.
        eligible = [b for b in block_rounds if b["density"] <= CLAIM_DENSITY + 1e-12]
        if not eligible:
            claims.append({"rewind_step": k, "rewind_epochs": epochs_k, "holds": None,
                           "why": f"no round reached {CLAIM_DENSITY:.0%} of the weights or fewer"})
            continue
        best = max(eligible, key=lambda b: b["imp"]["mean"])
        matches = best["imp"]["mean"] >= dense_s["mean"] - CLAIM_TOLERANCE
        reinit_worse = best["reinit"]["mean"] < best["imp"]["mean"]
        claims.append({"rewind_step": k, "rewind_epochs": epochs_k, "round": best["round"],
                       "density": best["density"], "imp_mean": best["imp"]["mean"], "imp_std": best["imp"]["std"],
                       "dense_mean": dense_s["mean"], "dense_std": dense_s["std"],
                       "reinit_mean": best["reinit"]["mean"], "random_mean": best["random"]["mean"],
                       "matches_dense": matches, "reinit_worse": reinit_worse, "holds": bool(matches and reinit_worse)})

    print_table(f"IMP on Fashion-MNIST {args.model}: test accuracy % (mean over {common['seeds']} seeds); "
                f"dense {dense_s['mean']:.2f} ± {dense_s['std']:.2f}",
                ["rewind k", "round", "% weights", "IMP", "± std", "reinit", "± std", "random mask", "± std",
                 "IMP - dense"], rows)
    for c in claims:
        if c["holds"] is None:
            print(f"k={c['rewind_step']}: claim not checked: {c['why']}")
        else:
            print(f"k={c['rewind_step']}: best ticket at {100 * c['density']:.1f}% of the weights: "
                  f"{c['imp_mean']:.2f}% vs dense {c['dense_mean']:.2f}% (needs >= dense - {CLAIM_TOLERANCE}); "
                  f"reinit {c['reinit_mean']:.2f}%: claim {'holds' if c['holds'] else 'does NOT hold'}")

    plot_path = None
    if not args.no_plot:
        stem = args.json or os.path.join("bench", "results", f"lottery{'-quick' if quick else ''}.json")
        plot_path = args.plot or str(Path(stem).with_suffix(".png"))
        _plot(plot_path, dense_s, by_k, f"Lottery tickets, Fashion-MNIST {args.model}, "
                                         f"{common['seeds']} seed(s), {common['epochs']} epochs per run")
        print(f"wrote {plot_path}")

    holds = [c["holds"] for c in claims if c["holds"] is not None]
    return {
        "benchmark": "lottery",
        "quick": quick,
        "claim": (f"IMP with rewinding finds subnetworks at {CLAIM_DENSITY:.0%} or less of the weights that match "
                  f"or beat dense test accuracy (within {CLAIM_TOLERANCE} points) when retrained; the random "
                  "re-initialisation control is worse at the same density"),
        "holds": (any(holds) if holds else None),
        "claims": claims,
        "settings": common | {"model": args.model, "rate": args.rate, "rounds": rounds,
                              "rewind_epochs": rewind_epochs, "rewind_steps": ks, "steps_per_epoch": steps_per_epoch,
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "expected_density_final": (1 - args.rate) ** rounds},
        "dense": dense_s,
        "by_rewind": by_k,
        "plot": plot_path,
        "runs": runs,
    }

