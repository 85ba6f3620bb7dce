"""The demo: train a dense model on Fashion-MNIST (or another registered dataset), prune it to 90% with GMP, compare.

Phase 1 trains the dense model. Phase 2 starts twice from that model, with
the same optimizer settings and the same batches: once dense (the baseline),
once under gradual magnitude pruning to the target sparsity, which ends
after 60% of the phase so the rest fine-tunes at the final sparsity. The run
folder gets ``metrics.json``, ``training.png`` (accuracy and sparsity over
training, per-layer sparsity) and the final sparse checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparseforge import datasets
from sparseforge.architectures import ARCHITECTURES, build
from sparseforge.errors import SparseforgeError
from sparseforge.io.checkpoint import save_checkpoint
from sparseforge.extras import require
from sparseforge.files import atomic_path, write_json_atomic
from sparseforge.methods.gmp import GMP
from sparseforge.patterns import check_sparsity
from sparseforge.quality import evaluate
from sparseforge.report import report
from sparseforge.sparsifier import Sparsifier
from sparseforge.training import FitState, History, ProgressCallback, SGDConfig, SparsifierCallback, fit


@dataclass
class DemoConfig:
    """Settings of the demo run (the CLI flags of ``sparseforge demo``).

    Defaults: LeNet-300-100 on Fashion-MNIST (``dataset``: any classification
    dataset of :data:`sparseforge.datasets.DATASETS`), 90% sparsity, 8 dense epochs then 8 epochs of
    GMP (pruning every quarter epoch, ending at 60% of the phase) against 8
    more dense epochs; SGD with Nesterov momentum 0.9, learning rate 0.05
    with a cosine decay per phase, weight decay 5e-4, batch 128, seed 0.
    """

    model: str = "lenet300"
    dataset: str = datasets.IMAGES
    sparsity: float = 0.9
    dense_epochs: int = 8
    sparse_epochs: int = 8
    batch_size: int = 128
    lr: float = SGDConfig.lr
    weight_decay: float = SGDConfig.weight_decay
    prune_end: float = 0.6
    seed: int = 0
    data_dir: str | None = None
    runs_dir: str = "runs"
    name: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None

    def validate(self) -> None:
        """Raise :class:`SparseforgeError` on a setting the run would refuse (nothing is read)."""
        check_sparsity(self.sparsity)
        if self.model not in ARCHITECTURES:
            raise SparseforgeError(f"--model: {ARCHITECTURES.error(self.model)}")
        if self.dataset not in datasets.DATASETS:
            raise SparseforgeError(f"--dataset: {datasets.DATASETS.error(self.dataset)}")
        for field in ("dense_epochs", "sparse_epochs", "batch_size"):
            if int(getattr(self, field)) < 1:
                raise SparseforgeError(f"{field.replace('_', '-')} must be >= 1, got {getattr(self, field)}")
        if not self.lr > 0:
            raise SparseforgeError(f"lr must be > 0, got {self.lr}")


class _Console:
    """The run's lines on stdout (one per epoch, the table); live progress goes to stderr (``progress``)."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        from sparseforge.progress import Progress

        self.quiet = quiet
        self.console = Console(highlight=False)
        self.progress = Progress(not quiet)

    def print(self, *args: Any) -> None:
        if not self.quiet:
            self.console.print(*args, markup=False)


def _train_phase(model: torch.nn.Module, train: Any, test: Any, cfg: DemoConfig, epochs: int, label: str,
                 out: _Console, history: list[dict[str, Any]], started: float,
                 method: Any = None) -> Sparsifier | None:
    """Train ``model`` for ``epochs`` with :func:`~sparseforge.training.fit` (under ``method`` when given).

    The same SGD (Nesterov momentum 0.9) with its own cosine decay in every phase; one history
    row and one printed line per epoch; returns the phase's Sparsifier (None when dense).
    """
    opt, sched = SGDConfig(lr=cfg.lr, weight_decay=cfg.weight_decay).build(model.parameters(), epochs * len(train))
    sparsifying = SparsifierCallback(method) if method is not None else None

    def test_metrics(m: torch.nn.Module) -> dict[str, float]:
        ev = evaluate(m, test)
        return {"test_loss": ev["loss"], "test_accuracy": ev["accuracy"]}

    def add_row(row: dict[str, Any], state: FitState) -> None:
        total = time.perf_counter() - started  # the demo's clock: all phases
        history.append({"phase": label, "epoch": row["epoch"], "train_loss": row["train_loss"],
                        "train_accuracy": row["train_accuracy"], "test_loss": row["test_loss"],
                        "test_accuracy": row["test_accuracy"], "sparsity": row["sparsity"],
                        "epoch_seconds": row["epoch_seconds"], "total_seconds": total})
        out.print(
            f"[{label:>6}] epoch {row['epoch']:2d}/{epochs}  loss {row['train_loss']:.4f}  "
            f"test acc {row['test_accuracy']:6.2f}%  sparsity {100 * row['sparsity']:5.1f}%  "
            f"epoch {row['epoch_seconds']:.1f} s, total {total:.1f} s"
        )

    callbacks = [
        History(test_metrics, extra=lambda state: {"sparsity": sparsifying.sparsity() if sparsifying else 0.0},
                on_row=add_row),
        ProgressCallback(out.progress, lambda state: f"{label} epoch {state.epoch + 1}/{epochs}: batches",
                         per_epoch=True, info=lambda state: f"loss {float(state.loss.item()):.3f}"),
    ]
    fit(model, train, opt, F.cross_entropy, epochs=epochs, scheduler=sched,
        callbacks=[sparsifying, *callbacks] if sparsifying else callbacks)
    return sparsifying.sparsifier if sparsifying else None


def _plot(path: Path, history: list[dict[str, Any]], layer_rows: list[dict[str, Any]], cfg: DemoConfig) -> None:
    matplotlib = require("matplotlib", "sparseforge demo (its training.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense_pre = [h for h in history if h["phase"] == "dense"]
    for phase, style in (("dense", "-"), ("base", "--"), ("sparse", "-")):
        rows = [h for h in history if h["phase"] == phase]
        offset = 0 if phase == "dense" else len(dense_pre)
        xs = [offset + h["epoch"] for h in rows]
        if phase != "dense" and dense_pre:
            xs = [len(dense_pre)] + xs
            rows = [dense_pre[-1]] + rows
        label = {"dense": "dense (phase 1)", "base": "dense baseline", "sparse": f"GMP to {cfg.sparsity:.0%}"}[phase]
        ax.plot(xs, [h["test_accuracy"] for h in rows], style, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.model} on {cfg.dataset}")
    sx = ax.twinx()
    sparse_rows = [h for h in history if h["phase"] == "sparse"]
    sx.plot([len(dense_pre)] + [len(dense_pre) + h["epoch"] for h in sparse_rows],
            [0.0] + [100 * h["sparsity"] for h in sparse_rows],
            ":", color="gray", label="sparsity")
    sx.set_ylabel("sparsity (%)")
    sx.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()
    lines2 = sx.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right")
    bx.barh([r["name"] for r in layer_rows], [100 * r["sparsity"] for r in layer_rows])
    bx.set_xlim(0, 100)
    bx.set_xlabel("sparsity (%)")
    bx.set_title("per-layer sparsity of the final model")
    bx.invert_yaxis()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict[str, Any]:
    """Run the demo and write its run folder; returns the metrics written to ``metrics.json``.

    The CPU threads are those of :func:`sparseforge.threads.set_threads`: ``OMP_NUM_THREADS``
    when set, else the cores not busy with other work; the first line and ``metrics.json``
    (``threads``) say how many. Progress goes to stderr unless ``quiet``.
    """
    cfg.validate()
    require("matplotlib", "sparseforge demo (its training.png)")  # before training, not after it
    out = _Console(quiet)
    try:
        return _run(cfg, out, quiet)
    finally:
        out.progress.close()


def _run(cfg: DemoConfig, out: _Console, quiet: bool) -> dict[str, Any]:
    from sparseforge.threads import set_threads

    threads = set_threads()
    torch.manual_seed(cfg.seed)
    name = cfg.name or f"demo-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.runs_dir) / name
    with out.progress.phase(f"reading {cfg.dataset}"):
        examples = datasets.load(cfg.dataset, cfg.data_dir, limit_train=cfg.limit_train, limit_test=cfg.limit_test,
                                 kind=datasets.Classification, what="the demo")
        train, test = examples.loaders(cfg.batch_size, cfg.seed)
    model = build(cfg.model)
    out.print(
        f"sparseforge demo: {cfg.model} on {cfg.dataset} ({train.num_examples} train / {test.num_examples} test), "
        f"{cfg.dense_epochs} dense epochs, then {cfg.sparse_epochs} epochs of GMP to {cfg.sparsity:.0%} "
        f"against {cfg.sparse_epochs} more dense epochs, {threads.describe()} -> {run_dir}"
    )
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    _train_phase(model, train, test, cfg, cfg.dense_epochs, "dense", out, history, started)

    # Both phase-2 runs see the same batches and the same initial weights.
    loader_state = train.state_dict()
    baseline = copy.deepcopy(model)
    _train_phase(baseline, train, test, cfg, cfg.sparse_epochs, "base", out, history, started)
    train.load_state_dict(loader_state)
    sparse = copy.deepcopy(model)
    method = GMP(sparsity=cfg.sparsity, end=cfg.prune_end, frequency=max(1, len(train) // 4))
    sparsifier = _train_phase(sparse, train, test, cfg, cfg.sparse_epochs, "sparse", out, history, started, method)
    sparsifier.finalize()

    dense_eval = evaluate(baseline, test)
    sparse_eval = evaluate(sparse, test)
    dense_report = report(baseline)
    sparse_report = report(sparse)
    layer_rows = [asdict(r) | {"sparsity": r.sparsity} for r in sparse_report.layers]
    metrics = {
        "config": asdict(cfg),
        "dense": {"test_accuracy": dense_eval["accuracy"], "test_loss": dense_eval["loss"], "report": dense_report.to_dict()},
        "sparse": {"test_accuracy": sparse_eval["accuracy"], "test_loss": sparse_eval["loss"], "report": sparse_report.to_dict()},
        "accuracy_drop": dense_eval["accuracy"] - sparse_eval["accuracy"],
        "history": history,
        "seconds": time.perf_counter() - started,
        "threads": threads.to_dict(),
        "torch": torch.__version__,
    }
    created = not run_dir.exists()
    with out.progress.phase(f"writing {run_dir}"):
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            save_checkpoint(sparse, run_dir / "model.safetensors", extra={"test_accuracy": sparse_eval["accuracy"]})
            _plot(run_dir / "training.png", history, layer_rows, cfg)
            write_json_atomic(run_dir / "metrics.json", metrics)
        except BaseException:
            if created:  # a full disk on the first file: no empty run folder left behind
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise

    if not quiet:
        from rich.table import Table

        t = Table(title=f"{cfg.model}: dense vs {cfg.sparsity:.0%} GMP on {cfg.dataset}")
        for col in ("model", "test accuracy", "sparsity", "nonzero params", "FLOPs / sample"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for label, ev, rep in (("dense", dense_eval, dense_report), ("sparse (GMP)", sparse_eval, sparse_report)):
            t.add_row(
                label, f"{ev['accuracy']:.2f}%", f"{100 * rep.total_sparsity:.1f}%",
                f"{rep.total_nonzeros:,} / {rep.total_params:,}", f"{rep.sparse_flops:,}",
            )
        out.console.print(t)
        out.print(
            f"accuracy drop: {metrics['accuracy_drop']:+.2f} points; "
            f"run folder: {run_dir} (metrics.json, training.png, model.safetensors); "
            f"total {metrics['seconds']:.1f} s"
        )
    return metrics
