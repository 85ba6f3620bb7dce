"""GMP reaches 90% sparsity within 1 point of dense accuracy, and 95% within 2 points.

Claim from "To prune, or not to prune" (Zhu and Gupta, 2017), checked on
Fashion-MNIST: a dense model and GMP to 90% and 95% sparsity, trained from
scratch for the same number of epochs with the same optimizer; GMP prunes
every quarter epoch along the cubic schedule from 10% to 70% of training and
fine-tunes for the rest. Reports test accuracy (mean and spread over seeds)
and the accuracy drop against dense.
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
from sparseforge.methods.gmp import GMP

CLAIM = {0.9: 1.0, 0.95: 2.0}  # sparsity -> allowed accuracy drop (points)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, seeds=3, epochs=20)
    parser.add_argument("--models", nargs="+", default=["lenet300"], help="zoo models (default lenet300)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = resolve_common(args, seeds=3, epochs=20)
    results: list[dict[str, Any]] = []
    rows = []
    for model in args.models:
        per_config: dict[str, list[float]] = {}
        for seed in range(common["seeds"]):
            cfg = RunConfig(model=model, epochs=common["epochs"], seed=seed, limit_train=common["limit_train"],
                            limit_test=common["limit_test"], data_dir=common["data_dir"])
            configs = [("dense", None)] + [
                (f"gmp-{s:g}", lambda steps, s=s, cfg=cfg: GMP(
                    sparsity=s, start=0.1, end=0.7, frequency=max(1, steps // (4 * cfg.epochs))))
                for s in args.sparsities
            ]
            for name, method in configs:
                result, _ = train_run(cfg, method, label=f"{model} {name} seed {seed}",
                                      log=lambda line: print(line, flush=True))
                print(f"{model} {name} seed {seed}: test {result.test_accuracy:.2f}% "
                      f"sparsity {result.sparsity:.4f} ({result.seconds:.0f}s)", flush=True)
                results.append({"model": model, "config": name, "seed": seed} | result.to_dict())
                per_config.setdefault(name, []).append(result.test_accuracy)
        dense = summarize(per_config["dense"])
        for s in args.sparsities:
            acc = summarize(per_config[f"gmp-{s:g}"])
            drop = dense["mean"] - acc["mean"]
            allowed = CLAIM.get(s)
            holds = None if allowed is None else drop <= allowed
            rows.append([model, f"{s:.0%}", dense["mean"], dense["std"], acc["mean"], acc["std"], drop,
                         "-" if allowed is None else f"<= {allowed}", "-" if holds is None else ("yes" if holds else "no")])
    print_table("GMP vs dense on Fashion-MNIST (test accuracy %, mean over seeds)",
                ["model", "sparsity", "dense", "± std", "GMP", "± std", "drop", "claim", "holds"], rows)
    summary = [dict(zip(["model", "sparsity", "dense_mean", "dense_std", "gmp_mean", "gmp_std", "drop",
                          "allowed_drop", "holds"], r)) for r in rows]
    return {"benchmark": "gmp", "quick": bool(args.quick), "settings": common | {"models": args.models},
            "summary": summary, "runs": results}
