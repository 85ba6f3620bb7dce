"""Sparse model soups: a soup of 3 retrainings at 80% and 90% sparsity keeps exact sparsity and beats the mean of its ingredients.

Claim from "Sparse Model Soups: A Recipe for Improved Pruning via Model
Averaging" (Zimmer, Spiegel and Pokutta, ICLR 2024): models retrained from
the same pruned network under the same mask, with different random seeds
(here: data order and initial state of every random draw), can be averaged;
the average keeps the shared mask exactly and is more accurate than its
ingredients. Sparse Model Soups (SMS) starts every prune-retrain cycle from
the previous cycle's soup
(:func:`sparseforge.merge.sparse_soups.sparse_model_soup`).

Setup on Fashion-MNIST with LeNet-300-100: dense training (10 epochs), then
three cycles pruning globally by magnitude to 50%, 80% and 90% of the Linear
weights, each retraining m = 3 copies for 5 epochs under the fixed mask and
averaging them uniformly. The paper's IMP-style schedule prunes a constant
fraction per cycle over several cycles; three cycles (50% -> 80% -> 90%) is a
short geometric-like ramp that passes through both sparsities of the claim
within the time budget. Every retraining uses the shared reproduction recipe
(``bench/common.py``: SGD with Nesterov momentum, learning rate 0.05 restarted
and cosine-decayed in every cycle). Baselines: the mean, min and max of the
ingredients (the best single ingredient is the paper's "best ingredient"),
and IMP continuing from one model (SMS with m = 1: prune the previous cycle's
single model, retrain it once, with the soup's first ingredient's seeds), as
in the paper. Reports per cycle and over seeds; the soup's zero pattern is
checked to be exactly the shared mask of its ingredients.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from sparseforge.bench.common import RunConfig, print_table, summarize, train_run
from sparseforge.errors import SparseforgeError
from sparseforge.merge.sparse_soups import check_shared_mask, sparse_model_soup
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.models import build_model
from sparseforge.zoo.training import evaluate

CLAIM_SPARSITIES = (0.8, 0.9)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet300", help="zoo model (default lenet300)")
    parser.add_argument("--seeds", type=int, default=None, help="independent runs (default 3; quick 1)")
    parser.add_argument("--dense-epochs", type=int, default=None, help="dense pretraining epochs (default 10; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="retraining epochs per cycle (default 5; quick 1)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9],
                        help="sparsity of each cycle (default 0.5 0.8 0.9)")
    parser.add_argument("--ingredients", type=int, default=3, help="m, retrainings per cycle (default 3)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training examples (quick: 1024)")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test examples (quick: 500)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = bool(args.quick)
    seeds = args.seeds or (1 if quick else 3)
    dense_epochs = args.dense_epochs or (1 if quick else 10)
    epochs = args.epochs or (1 if quick else 5)
    limit_train = args.limit_train or (1024 if quick else None)
    limit_test = args.limit_test or (500 if quick else None)
    if args.ingredients < 2:
        raise SparseforgeError(f"--ingredients must be at least 2 for a soup, got {args.ingredients}")
    _, test_loader = fashion_mnist(RunConfig().batch_size, args.data_dir, 0, limit_train, limit_test)

    def cfg(seed: int, n_epochs: int) -> RunConfig:
        return RunConfig(model=args.model, epochs=n_epochs, seed=seed, limit_train=limit_train,
                         limit_test=limit_test, data_dir=args.data_dir)

    def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
        ev = evaluate(model, test_loader)
        return {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"]}

    runs = []
    # per (cycle index) lists over seeds
    cells: dict[int, dict[str, list[float]]] = {}
    for seed in range(seeds):
        dense_result, dense = train_run(cfg(seed, dense_epochs))
        print(f"seed {seed} dense: test {dense_result.test_accuracy:.2f}% ({dense_result.seconds:.0f}s)", flush=True)
        dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
        ingredient_states: list[dict[str, torch.Tensor]] = []

        def train_fn(model, method, run_seed, keep=ingredient_states, label="SMS"):
            result, _ = train_run(cfg(run_seed, epochs), method, model=model)
            keep.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"  {label} {method.name} seed {run_seed}: test {result.test_accuracy:.2f}% "
                  f"sparsity {result.sparsity:.4f} ({result.seconds:.0f}s)", flush=True)
            return {"test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
                    "sparsity": result.sparsity, "seconds": result.seconds}

        model = build_model(args.model)
        model.load_state_dict(dense_state)
        soups = sparse_model_soup(model, train_fn, args.sparsities, ingredients=args.ingredients,
                                  evaluate=evaluate_fn, seed=seed)
        imp_model = build_model(args.model)
        imp_model.load_state_dict(dense_state)
        imp = sparse_model_soup(imp_model, lambda m, meth, s: train_fn(m, meth, s, keep=[], label="IMP"),
                                args.sparsities, ingredients=1, evaluate=evaluate_fn, seed=seed)
        cycles_out = []
        for i, (cycle, imp_cycle) in enumerate(zip(soups, imp)):
            states = ingredient_states[i * args.ingredients:(i + 1) * args.ingredients]
            keys = {f"{name}.weight": name for name in cycle.masks}
            shared = check_shared_mask(states, names=list(keys))
            total = sum(m.numel() for m in cycle.masks.values())
            zeros = sum(int((cycle.soup[k] == 0).sum()) for k in keys)
            mask_equal = all(torch.equal(shared[k], cycle.masks[name]) and torch.equal(cycle.soup[k] != 0, shared[k])
                             for k, name in keys.items())
            accs = [m["test_accuracy"] for m in cycle.ingredients]
            out = {"cycle": cycle.cycle, "sparsity": cycle.sparsity, "soup_sparsity": zeros / total,
                   "exact_sparsity": zeros == round(cycle.sparsity * total), "mask_equal": mask_equal,
                   "soup": cycle.metrics, "ingredients": cycle.ingredients,
                   "ingredient_mean": sum(accs) / len(accs), "ingredient_min": min(accs), "ingredient_max": max(accs),
                   "imp": imp_cycle.metrics, "seeds": cycle.seeds}
            cycles_out.append(out)
            cell = cells.setdefault(i, {k: [] for k in ("soup", "mean", "min", "max", "imp", "gain")})
            cell["soup"].append(cycle.metrics["test_accuracy"])
            cell["mean"].append(out["ingredient_mean"])
            cell["min"].append(out["ingredient_min"])
            cell["max"].append(out["ingredient_max"])
            cell["imp"].append(imp_cycle.metrics["test_accuracy"])
            cell["gain"].append(cycle.metrics["test_accuracy"] - out["ingredient_mean"])
            print(f"seed {seed} cycle {cycle.cycle} ({100 * cycle.sparsity:.0f}%): soup "
                  f"{cycle.metrics['test_accuracy']:.2f}% vs ingredients {out['ingredient_mean']:.2f}% "
                  f"[{out['ingredient_min']:.2f}, {out['ingredient_max']:.2f}], IMP "
                  f"{imp_cycle.metrics['test_accuracy']:.2f}%; soup sparsity {out['soup_sparsity']:.4f} "
                  f"exact {out['exact_sparsity']} mask equal {mask_equal}", flush=True)
        runs.append({"seed": seed, "dense": dense_result.to_dict(), "cycles": cycles_out})

    summary = []
    rows = []
    for i, s in enumerate(args.sparsities):
        cell = {k: summarize(v) for k, v in cells[i].items()}
        exact = all(r["cycles"][i]["exact_sparsity"] and r["cycles"][i]["mask_equal"] for r in runs)
        summary.append({"cycle": i + 1, "sparsity": s, "exact_sparsity_and_mask": exact, **cell})
        rows.append([i + 1, f"{100 * s:.0f}%", cell["soup"]["mean"], cell["soup"]["std"], cell["mean"]["mean"],
                     cell["min"]["mean"], cell["max"]["mean"], cell["imp"]["mean"], cell["gain"]["mean"], str(exact)])
    dense_s = summarize([r["dense"]["test_accuracy"] for r in runs])
    print_table(f"Sparse model soups, Fashion-MNIST {args.model}, m={args.ingredients}: test accuracy % (mean over "
                f"{seeds} seed(s)); dense {dense_s['mean']:.2f}",
                ["cycle", "sparsity", "soup", "± std", "ingr. mean", "ingr. min", "ingr. max", "IMP (m=1)",
                 "soup - mean", "exact mask"], rows)
    claims = []
    for row in summary:
        if any(abs(row["sparsity"] - c) < 1e-9 for c in CLAIM_SPARSITIES):
            beats = row["soup"]["mean"] > row["mean"]["mean"]
            claims.append({"sparsity": row["sparsity"], "exact": row["exact_sparsity_and_mask"],
                           "soup_beats_mean": beats, "soup_beats_best": row["soup"]["mean"] > row["max"]["mean"],
                           "soup_beats_imp": row["soup"]["mean"] > row["imp"]["mean"],
                           "holds": bool(beats and row["exact_sparsity_and_mask"])})
            print(f"{100 * row['sparsity']:.0f}%: soup {row['soup']['mean']:.2f}% vs ingredient mean "
                  f"{row['mean']['mean']:.2f}% (best {row['max']['mean']:.2f}%, IMP {row['imp']['mean']:.2f}%), "
                  f"exact mask {row['exact_sparsity_and_mask']}: claim {'holds' if claims[-1]['holds'] else 'does NOT hold'}")
    return {
        "benchmark": "sparse-soups",
        "quick": quick,
        "claim": ("a uniform soup of 3 retrainings under one mask at 80% and 90% sparsity keeps exactly that mask "
                  "and beats the mean test accuracy of its ingredients"),
        "holds": (all(c["holds"] for c in claims) if claims else None),
        "claims": claims,
        "settings": {"model": args.model, "seeds": seeds, "dense_epochs": dense_epochs, "epochs": epochs,
                     "sparsities": list(args.sparsities), "ingredients": args.ingredients,
                     "limit_train": limit_train, "limit_test": limit_test, "threads": torch.get_num_threads(),
                     "torch": torch.__version__},
        "dense": dense_s,
        "cycles": summary,
        "runs": runs,
    }
