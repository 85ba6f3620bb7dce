"""Sparse training from scratch at 90/95/98%: RigL >= SET >= static random (ERK); ERK >= uniform.

Claims from "Rigging the Lottery" (Evci et al., 2020) and "The Unreasonable
Effectiveness of Random Pruning" (Liu et al., 2022), checked on
Fashion-MNIST: static random masks with uniform and ERK allocation, SET and
RigL (both ERK), each trained from scratch for the same epochs with the same
optimizer at each sparsity; mask updates every quarter epoch (SET until the
end, RigL until 75% of training). Reports test accuracy, mean and spread over
seeds, and whether each ordering holds at each sparsity.
"""

from __future__ import annotations

import argparse
from typing import Any

from sparseforge.bench.common import (
    RunConfig,
    add_common_arguments,
    print_table,
    resolve_common,
    summarize,
    train_run,
)
from sparseforge.methods.sparse_training import SET, RigL, StaticRandom

METHODS = ("static-uniform", "static-erk", "set", "rigl")


def _method(name: str, sparsity: float, seed: int, steps_per_update: int):
    if name == "static-uniform":
        return StaticRandom(sparsity, allocation="uniform", seed=seed)
    if name == "static-erk":
        return StaticRandom(sparsity, allocation="erk", seed=seed)
    if name == "set":
        return SET(sparsity, frequency=steps_per_update, seed=seed)
    if name == "rigl":
        return RigL(sparsity, frequency=steps_per_update, seed=seed)
    raise ValueError(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, seeds=3, epochs=20)
    parser.add_argument("--model", default="lenet300", help="zoo model (default lenet300)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help="sparsities to test (default 0.9 0.95 0.98; quick 0.9)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = resolve_common(args, seeds=3, epochs=20)
    args.sparsities = args.sparsities or ([0.9] if args.quick else [0.9, 0.95, 0.98])
    runs: list[dict[str, Any]] = []
    acc: dict[tuple[str, float], list[float]] = {}
    dense: list[float] = []
    for seed in range(common["seeds"]):
        cfg = RunConfig(model=args.model, epochs=common["epochs"], seed=seed, limit_train=common["limit_train"],
                        limit_test=common["limit_test"], data_dir=common["data_dir"])
        result, _ = train_run(cfg, None)
        print(f"dense seed {seed}: test {result.test_accuracy:.2f}% ({result.seconds:.0f}s)", flush=True)
        runs.append({"method": "dense", "sparsity": 0.0, "seed": seed} | result.to_dict())
        dense.append(result.test_accuracy)
        for sparsity in args.sparsities:
            for name in args.methods:
                method = lambda steps, name=name, s=sparsity, cfg=cfg: _method(
                    name, s, seed, max(1, steps // (4 * cfg.epochs)))
                result, _ = train_run(cfg, method)
                print(f"{name} {sparsity:.0%} seed {seed}: test {result.test_accuracy:.2f}% "
                      f"sparsity {result.sparsity:.4f} ({result.seconds:.0f}s)", flush=True)
                runs.append({"method": name, "sparsity": sparsity, "seed": seed} | result.to_dict())
                acc.setdefault((name, sparsity), []).append(result.test_accuracy)
    d = summarize(dense)
    rows = []
    summary = []
    for sparsity in args.sparsities:
        stats = {name: summarize(acc[(name, sparsity)]) for name in args.methods}
        mean = {name: stats[name]["mean"] for name in args.methods}
        checks = {}
        if {"rigl", "set"} <= set(mean):
            checks["rigl>=set"] = mean["rigl"] >= mean["set"]
        if {"set", "static-erk"} <= set(mean):
            checks["set>=static-erk"] = mean["set"] >= mean["static-erk"]
        if {"static-erk", "static-uniform"} <= set(mean):
            checks["erk>=uniform"] = mean["static-erk"] >= mean["static-uniform"]
        rows.append([f"{sparsity:.0%}"] + [f"{stats[n]['mean']:.2f} ± {stats[n]['std']:.2f}" for n in args.methods]
                    + [" ".join(f"{k}:{'yes' if v else 'NO'}" for k, v in checks.items())])
        summary.append({"sparsity": sparsity, "accuracy": stats, "checks": checks})
    print_table(f"{args.model} from scratch on Fashion-MNIST (test accuracy %; dense {d['mean']:.2f} ± {d['std']:.2f})",
                ["sparsity", *args.methods, "claims"], rows)
    return {"benchmark": "sparse-training", "quick": bool(args.quick),
            "settings": common | {"model": args.model, "sparsities": args.sparsities},
            "dense": d, "summary": summary, "runs": runs}
