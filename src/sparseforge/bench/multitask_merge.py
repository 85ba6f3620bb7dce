"""Multi-task merging: normalized accuracy of averaging, task arithmetic, TIES, DARE, Fisher, RegMean, TALL/consensus.

A FusionBench-style table ("FusionBench: A Comprehensive Benchmark of Deep
Model Fusion", Tang et al. 2024, which reports on CLIP-ViT-B/32 over 8 tasks:
66.5 for weight averaging, 68.0 task arithmetic, 72.2 TIES, 70.6 Fisher, 82.4
RegMean, as average absolute accuracy) at Fashion-MNIST scale:

- a shared base model is trained on classes 0-4 (5-way);
- it is fine-tuned separately, body and a fresh task head, on four tasks:
  ``footwear`` (sandal / sneaker / ankle boot), ``tops`` (T-shirt / pullover /
  coat / shirt), ``rot90`` (all 10 classes, images rotated by 90 degrees) and
  ``negative`` (all 10 classes, inverted images): two label-space tasks and
  two input-distribution tasks, like FusionBench's mix of datasets;
- the fine-tuned *bodies* are merged by each method (each task keeps its own
  head, as task arithmetic keeps CLIP's per-task zero-shot heads), and every
  task is evaluated with the merged body and its own head.

Reported per method: test accuracy per task, their mean (absolute, as
FusionBench), and the mean *normalized* accuracy (merged accuracy divided by
the individual fine-tuned model's, in %). The scaling coefficient lambda of
task arithmetic, TIES, DARE and consensus merging is chosen on a validation
split held out of each task's training data (the task arithmetic paper's
protocol), never on the test set. The "pretrained" row is the base body with a
linear probe per task (FusionBench's zero-shot row); "individual" are the
fine-tuned models themselves (100% normalized by definition); "TALL masks"
rebuilds each task's model from the base, the merged vector and a binary mask
per task (a compression method, reported with its storage).

The model defaults to LeNet-300-100 (every layer Linear, so RegMean applies to
all of them; a CPU-sized run); ``--model conv4`` runs the same protocol on
Conv-4, where RegMean merges the Linear layers and averages the convolutions.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseforge.bench.common import RunConfig, make_optimizer, print_table, summarize
from sparseforge.errors import SparseforgeError
from sparseforge.merge import (
    consensus_merge, fisher_diagonal, fisher_merge, gram_matrices, merge_task_arithmetic, merged_task_vector,
    preset, reconstruct, regmean, storage_report, tall_masks, weighted_average,
)
from sparseforge.zoo.data import TensorLoader, load_fashion_mnist, normalize_images
from sparseforge.zoo.models import build_model
from sparseforge.zoo.training import evaluate, train_epoch

HEAD = "fc3"  # the classifier of LeNet-300-100 and Conv-4; everything else is the shared body
BASE_CLASSES = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Task:
    """A classification task over Fashion-MNIST: which classes (relabelled 0..C-1), which input transform."""

    name: str
    classes: tuple[int, ...]
    transform: str = "none"  # "none" | "rot90" | "negative"


TASKS = (
    Task("footwear", (5, 7, 9)),
    Task("tops", (0, 2, 4, 6)),
    Task("rot90", tuple(range(10)), "rot90"),
    Task("negative", tuple(range(10)), "negative"),
)
LAMBDAS = (0.2, 0.3, 0.5, 0.7, 1.0, 1.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet300", help="zoo model with an fc3 head: lenet300 (default), conv4")
    parser.add_argument("--seeds", type=int, default=None, help="independent repetitions (default 3; quick 1)")
    parser.add_argument("--base-epochs", type=int, default=None, help="epochs of the base model (default 5; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per task (default 3; quick 1)")
    parser.add_argument("--limit-train", type=int, default=None, help="training examples per task (default all; quick 2000)")
    parser.add_argument("--limit-test", type=int, default=None, help="test examples per task (default all; quick 500)")
    parser.add_argument("--density", type=float, default=0.2, help="TIES density (default 0.2, the paper's)")
    parser.add_argument("--dare-density", type=float, default=0.3, help="DARE keep probability (default 0.3)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")


# -- data --------------------------------------------------------------------------


def _images(images: torch.Tensor, transform: str) -> torch.Tensor:
    if transform == "rot90":
        images = torch.rot90(images, 1, dims=(1, 2))
    elif transform == "negative":
        images = 255 - images
    return normalize_images(images)


def task_data(task: Task | tuple[str, tuple[int, ...], str], data_dir: str | None, seed: int,
              limit_train: int | None, limit_test: int | None,
              batch_size: int = 128) -> tuple[TensorLoader, TensorLoader, TensorLoader]:
    """(train, validation, test) loaders of one task; validation is 10% held out of training."""
    task = task if isinstance(task, Task) else Task(*task)
    out = []
    for split, limit in (("train", limit_train), ("test", limit_test)):
        images, labels = load_fashion_mnist(split, data_dir)
        keep = torch.isin(labels, torch.tensor(task.classes))
        images, labels = images[keep], labels[keep]
        relabel = torch.full((10,), -1, dtype=torch.long)
        relabel[list(task.classes)] = torch.arange(len(task.classes))
        labels = relabel[labels]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        out.append((_images(images, task.transform), labels))
    (x, y), (xt, yt) = out
    n_val = max(1, len(y) // 10)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))
    val, tr = perm[:n_val], perm[n_val:]
    return (TensorLoader(x[tr], y[tr], batch_size, shuffle=True, seed=seed),
            TensorLoader(x[val], y[val], 512), TensorLoader(xt, yt, 512))


# -- models ------------------------------------------------------------------------


def _train(model: nn.Module, loader: TensorLoader, epochs: int, lr: float) -> None:
    """The reproductions' optimizer (SGD, Nesterov 0.9, weight decay 5e-4, cosine); frozen parameters
    (``requires_grad=False``) get no gradient, so SGD leaves them untouched."""
    opt, sched = make_optimizer(model, RunConfig(lr=lr), epochs * len(loader))
    for _ in range(epochs):
        train_epoch(model, loader, opt, sched.step)


def _with_head(body: Mapping[str, torch.Tensor], head_model: nn.Module) -> nn.Module:
    """A copy of ``head_model`` whose body tensors are replaced by ``body``."""
    model = copy.deepcopy(head_model)
    state = model.state_dict()
    state.update(body)
    model.load_state_dict(state)
    return model


def body_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict that every task shares (all but the head)."""
    return {k: v for k, v in state.items() if not k.startswith(HEAD + ".")}


def _linear_probe(base: nn.Module, task: Task, train: TensorLoader, epochs: int, seed: int, model_name: str) -> nn.Module:
    torch.manual_seed(seed)
    model = _with_head(body_of(base.state_dict()), build_model(model_name, num_classes=len(task.classes)))
    head = getattr(model, HEAD)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    _train(model, train, epochs, 0.05)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# -- the run -----------------------------------------------------------------------


def _select_lambda(make: Callable[[float], dict[str, torch.Tensor]], heads: list[nn.Module],
                   vals: list[TensorLoader], individual_val: list[float]) -> tuple[float, dict[str, torch.Tensor]]:
    """The lambda whose merged body has the best mean normalized validation accuracy."""
    best = None
    for lam in LAMBDAS:
        body = make(lam)
        score = sum(evaluate(_with_head(body, h), v)["accuracy"] / iv
                    for h, v, iv in zip(heads, vals, individual_val)) / len(heads)
        if best is None or score > best[0]:
            best = (score, lam, body)
    return best[1], best[2]


def run_seed(args: argparse.Namespace, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    torch.manual_seed(seed)
    base_task = Task("base", BASE_CLASSES)
    base_train, _, _ = task_data(base_task, args.data_dir, seed, args.limit_train, args.limit_test)
    base = build_model(args.model, num_classes=len(BASE_CLASSES))
    _train(base, base_train, args.base_epochs, 0.05)
    base_body = body_of(base.state_dict())
    data = [task_data(t, args.data_dir, seed, args.limit_train, args.limit_test) for t in TASKS]

    finetuned, fishers, grams = [], [], []
    for i, (task, (train, _, _)) in enumerate(zip(TASKS, data)):
        torch.manual_seed(seed * 100 + i)
        model = _with_head(base_body, build_model(args.model, num_classes=len(task.classes)))
        _train(model, train, args.epochs, 0.02)
        finetuned.append(model)
        calib = [b for _, b in zip(range(8), train)]  # 1024 examples of the task's own training data
        fishers.append(body_of(fisher_diagonal(model, calib)))
        grams.append(gram_matrices(model, calib, names=[n for n, m in model.named_modules()
                                                        if isinstance(m, nn.Linear) and n != HEAD]))
        log(f"  seed {seed}: fine-tuned {task.name}")
    bodies = [body_of(m.state_dict()) for m in finetuned]
    vals = [v for _, v, _ in data]
    tests = [t for _, _, t in data]
    individual_val = [evaluate(m, v)["accuracy"] for m, v in zip(finetuned, vals)]

    def test_accuracies(body_for_task: Callable[[int], Mapping[str, torch.Tensor]]) -> list[float]:
        return [evaluate(_with_head(body_for_task(i), finetuned[i]), tests[i])["accuracy"] for i in range(len(TASKS))]

    rows: dict[str, dict[str, Any]] = {}
    rows["individual"] = {"accuracy": [evaluate(m, t)["accuracy"] for m, t in zip(finetuned, tests)]}
    probes = [_linear_probe(base, t, d[0], args.epochs, seed, args.model) for t, d in zip(TASKS, data)]
    rows["pretrained (linear probe)"] = {"accuracy": [evaluate(p, t)["accuracy"] for p, t in zip(probes, tests)]}
    avg = weighted_average(bodies)
    rows["weight averaging"] = {"accuracy": test_accuracies(lambda i: avg)}

    def spec_merge(name: str, **kw: Any) -> Callable[[float], dict[str, torch.Tensor]]:
        return lambda lam: merge_task_arithmetic(base_body, bodies, preset(name, lam=lam, **kw))

    for label, make in (
        ("task arithmetic", spec_merge("task_arithmetic")),
        (f"TIES (density {args.density})", spec_merge("ties", density=args.density)),
        (f"DARE (density {args.dare_density})", spec_merge("dare", density=args.dare_density, seed=seed)),
        ("consensus TA (k=2)", lambda lam: consensus_merge(base_body, bodies, k=2, lam=lam)[0]),
    ):
        lam, body = _select_lambda(make, finetuned, vals, individual_val)
        rows[label] = {"accuracy": test_accuracies(lambda i, b=body: b), "lambda": lam}
    fisher = fisher_merge(bodies, fishers)
    rows["Fisher"] = {"accuracy": test_accuracies(lambda i: fisher)}
    reg = regmean(bodies, grams)
    rows["RegMean (alpha 0.9)"] = {"accuracy": test_accuracies(lambda i: reg)}

    merged_vector = merged_task_vector(base_body, bodies, preset("task_arithmetic"))
    masks = tall_masks(base_body, bodies, lambdas=0.4, merged_vector=merged_vector)
    rows["TALL masks (per-task)"] = {
        "accuracy": test_accuracies(lambda i: reconstruct(base_body, merged_vector, masks[i])),
        "storage": storage_report(base_body, masks),
    }
    for row in rows.values():
        row["normalized"] = [100.0 * a / ind for a, ind in zip(row["accuracy"], rows["individual"]["accuracy"])]
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    args.seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    args.base_epochs = args.base_epochs if args.base_epochs is not None else (1 if quick else 5)
    args.epochs = args.epochs if args.epochs is not None else (1 if quick else 3)
    if quick:
        args.limit_train = args.limit_train or 2000
        args.limit_test = args.limit_test or 500
    if args.model not in ("lenet300", "conv4"):
        raise SparseforgeError(f"--model must be lenet300 or conv4 (a zoo model with an fc3 head), got {args.model!r}")
    start = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(run_seed(args, seed, print))
    methods = list(per_seed[0])
    table = {}
    for name in methods:
        acc = [[r[name]["accuracy"][i] for r in per_seed] for i in range(len(TASKS))]
        mean_abs = [sum(r[name]["accuracy"]) / len(TASKS) for r in per_seed]
        mean_norm = [sum(r[name]["normalized"]) / len(TASKS) for r in per_seed]
        table[name] = {
            "tasks": {t.name: summarize(a) for t, a in zip(TASKS, acc)},
            "mean_accuracy": summarize(mean_abs),
            "normalized_accuracy": summarize(mean_norm),
        }
        if "lambda" in per_seed[0][name]:
            table[name]["lambda"] = [r[name]["lambda"] for r in per_seed]
        if "storage" in per_seed[0][name]:
            table[name]["storage"] = per_seed[0][name]["storage"]
    print_table(
        f"Merging {len(TASKS)} fine-tuned {args.model} ({args.seeds} seeds): test accuracy %",
        ["method", *[t.name for t in TASKS], "mean", "normalized"],
        [[name, *[f"{row['tasks'][t.name]['mean']:.2f}" for t in TASKS], f"{row['mean_accuracy']['mean']:.2f}",
          f"{row['normalized_accuracy']['mean']:.1f} ± {row['normalized_accuracy']['std']:.1f}"]
         for name, row in table.items()],
    )
    return {
        "benchmark": "multitask_merge",
        "quick": quick,
        "config": {"model": args.model, "seeds": args.seeds, "base_epochs": args.base_epochs, "epochs": args.epochs,
                   "limit_train": args.limit_train, "limit_test": args.limit_test, "ties_density": args.density,
                   "dare_density": args.dare_density, "lambdas": list(LAMBDAS),
                   "tasks": [{"name": t.name, "classes": list(t.classes), "transform": t.transform} for t in TASKS],
                   "base_classes": list(BASE_CLASSES)},
        "methods": table,
        "per_seed": per_seed,
        "seconds": time.perf_counter() - start,
    }


__all__ = ["TASKS", "Task", "body_of", "run", "task_data"]
