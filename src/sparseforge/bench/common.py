"""What the reproduction benchmarks share: one training run on Fashion-MNIST, seeds, summaries.

A reproduction calls :func:`train_run` once per (configuration, seed), then
:func:`summarize` to get mean, standard deviation, min and max over seeds,
and writes its JSON through the runner (``python -m sparseforge.bench``).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.method import Method
from sparseforge.report import report
from sparseforge.training import FitState, History, LambdaCallback, SGDConfig, SparsifierCallback, fit
from sparseforge.zoo.data import fashion_mnist
from sparseforge.zoo.models import build_model
from sparseforge.zoo.training import evaluate


@dataclass
class RunConfig:
    """One supervised training run on Fashion-MNIST.

    Defaults: LeNet-300-100, 20 epochs, batch 128, SGD with Nesterov momentum
    0.9, learning rate 0.05 with cosine decay, weight decay 5e-4, the full
    training and test sets, seed 0.
    """

    model: str = "lenet300"
    epochs: int = 20
    batch_size: int = 128
    lr: float = SGDConfig.lr
    momentum: float = SGDConfig.momentum
    weight_decay: float = SGDConfig.weight_decay
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    data_dir: str | None = None


@dataclass
class RunResult:
    """What one run measured: final test accuracy, sparsity, history per epoch."""

    test_accuracy: float
    test_loss: float
    sparsity: float
    nonzeros: int
    params: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(model: nn.Module, cfg: RunConfig, steps: int):
    """SGD (Nesterov) + cosine decay over ``steps`` with ``cfg``'s settings (:class:`~sparseforge.training.SGDConfig`)."""
    return SGDConfig(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay).build(model.parameters(), steps)


def train_run(
    cfg: RunConfig,
    method: Method | Callable[[int], Method] | None = None,
    model: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
    label: str = "",
    start_step: int = 0,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> tuple[RunResult, nn.Module]:
    """Train ``model`` (default: a fresh ``cfg.model`` seeded with ``cfg.seed``) under ``method``, with :func:`fit`.

    Args:
        cfg: the run's settings.
        method: a Method, a function ``total_steps -> Method``, or None (dense).
        model: start from this model instead of a fresh one (e.g. a rewound ticket).
        log: called with one line per epoch.
        label: prefix of the log lines.
        start_step: begin at this step of the run instead of 0: the learning
            rate schedule and the data order continue from there and only the
            remaining steps are trained (a lottery ticket rewound to step k is
            retrained this way). The method sees the remaining steps as its run.
        on_step: called as ``on_step(step, model)`` after every optimizer step,
            ``step`` counting from the start of the run (e.g. to save the
            weights at step k).

    Returns (result, model); the model is finalized (plain, exact zeros).
    """
    torch.manual_seed(cfg.seed)
    train, test = fashion_mnist(cfg.batch_size, cfg.data_dir, cfg.seed, cfg.limit_train, cfg.limit_test)
    if model is None:
        model = build_model(cfg.model)
    steps = cfg.epochs * len(train)
    if not 0 <= int(start_step) < steps:
        raise SparseforgeError(f"start_step must be in [0, {steps}) for a run of {steps} steps, got {start_step}")
    opt, sched = make_optimizer(model, cfg, steps)
    with warnings.catch_warnings():
        # Advancing the schedule to start_step before any optimizer step is the point here.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_step):
            sched.step()
    # fit starts inside epoch start_step // len(train) at its batch start_step % len(train): the
    # loader's next pass must be that epoch's.
    train.load_state_dict({"epoch": int(start_step) // len(train), "seed": cfg.seed})
    sparsifying = SparsifierCallback(method, finalize=True) if method is not None else None

    def test_metrics(m: nn.Module) -> dict[str, float]:
        ev = evaluate(m, test)
        return {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"]}

    history: list[dict[str, Any]] = []

    def add_row(row: dict[str, Any], state: FitState) -> None:
        kept = {k: row[k] for k in ("epoch", "train_loss", "sparsity", "test_accuracy", "test_loss") if k in row}
        history.append(kept)
        if log is not None:
            acc = f"  test {kept['test_accuracy']:.2f}%" if "test_accuracy" in kept else ""
            log(f"{label} epoch {kept['epoch']}/{cfg.epochs} loss {kept['train_loss']:.4f} "
                f"sparsity {kept['sparsity']:.3f}{acc}")

    callbacks = [History(test_metrics, evaluate_every=5, on_row=add_row,
                         extra=lambda state: {"sparsity": sparsifying.sparsity() if sparsifying else 0.0})]
    if sparsifying is not None:
        callbacks.append(sparsifying)
    if on_step is not None:
        callbacks.append(LambdaCallback(on_step_end=lambda state: on_step(state.step, model)))
    start = time.perf_counter()
    fit(model, train, opt, F.cross_entropy, epochs=cfg.epochs, scheduler=sched, callbacks=callbacks,
        start_step=int(start_step))
    ev = evaluate(model, test)
    rep = report(model)
    result = RunResult(
        test_accuracy=ev["accuracy"], test_loss=ev["loss"], sparsity=rep.sparsity,
        nonzeros=rep.layer_nonzeros, params=rep.layer_params, seconds=time.perf_counter() - start, history=history,
    )
    return result, model


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals) if vals else math.nan,
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals) if vals else math.nan,
        "max": max(vals) if vals else math.nan,
        "n": len(vals),
    }


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a results table (rich) to stdout."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r])
    Console(highlight=False).print(t)


def add_common_arguments(parser, *, seeds: int = 3, epochs: int = 20) -> None:
    """Flags every reproduction takes: --seeds, --epochs, --limit-train, --threads, --data-dir."""
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per configuration (default {seeds}; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {epochs}; quick 1)")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training examples (quick: 2048)")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test examples (quick: 1000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder")


def resolve_common(args, *, seeds: int = 3, epochs: int = 20) -> dict[str, Any]:
    """Apply --threads and return seeds/epochs/limits with the quick-mode defaults filled in."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    quick = bool(getattr(args, "quick", False))
    return {
        "seeds": args.seeds or (1 if quick else seeds),
        "epochs": args.epochs or (1 if quick else epochs),
        "limit_train": args.limit_train or (2048 if quick else None),
        "limit_test": args.limit_test or (1000 if quick else None),
        "data_dir": args.data_dir,
    }
