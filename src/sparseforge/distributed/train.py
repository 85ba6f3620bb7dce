"""Sparse training from a YAML recipe, in one process or on torchrun/DDP (``sparseforge train``).

A :class:`TrainRecipe` names the model, the data, the sparsity method, the
optimizer settings, how the ranks communicate and how often to checkpoint;
its YAML keys are its fields, one to one (:mod:`sparseforge.recipes`). Every
rule that can be checked before a process starts is checked by
:meth:`TrainRecipe.validate` and, for a given number of processes, by
:meth:`TrainRecipe.check_launch`.

The rules of a run (:func:`run`):

- **Data, independent of the world size.** Epoch ``e`` visits the training
  set in one permutation drawn from ``(seed, e)``; global batch ``b`` is the
  slice ``[b * B, (b + 1) * B)`` of it (``B`` = ``train.batch_size``, the
  *global* batch size; the incomplete last batch is dropped), and rank ``r``
  of ``W`` takes the ``r``-th of ``W`` equal contiguous pieces of it. Each
  rank's loss is the mean over its piece and DDP averages the gradients, so
  every step sees the mean gradient of the same global batch for any ``W``
  (up to the order of float summation). A checkpoint written by ``W`` ranks
  therefore resumes on any other number of ranks that divides ``B``. (Not
  for BatchNorm: ``resnet20`` normalizes over each rank's piece, so its
  training depends on ``W`` as it does under any plain DDP.)
- **Masks.** The :class:`~sparseforge.Sparsifier` is attached to the plain
  model, after ``init_process_group`` and before the DDP wrapper (see
  :mod:`sparseforge.distributed.masks`): mask updates read DDP's averaged
  gradients and rank 0's masks are broadcast after each one. At the end every
  rank's :func:`~sparseforge.distributed.mask_digest` is compared
  (:func:`~sparseforge.distributed.check_masks_identical`) and recorded.
- **Optimizer.** SGD with Nesterov momentum (``train.momentum``, 0.9) and
  weight decay, learning rate cosine-annealed to 0 over the run, as in every
  reproduction and the demo (:class:`sparseforge.training.SGDConfig`). With
  ``distributed.comm: dgc`` the momentum moves into the communication hook
  (Deep Gradient Compression's momentum correction, "Deep Gradient
  Compression: Reducing the Communication Bandwidth for Distributed
  Training", Lin et al. 2018): the optimizer is built with momentum 0 and the
  hook gets ``train.momentum`` unless ``distributed.dgc.momentum`` is given.
- **Checkpoints.** Every ``checkpoint.every_steps`` steps (default: at the end
  of every epoch) and at the end, rank 0 writes
  ``OUT/checkpoints/step-NNNNNNNN.pt`` atomically (model, optimizer,
  Sparsifier and scheduler states, step, epoch and position in it, every
  rank's RNG state, the world size, the recipe, the metrics so far) while the
  other ranks wait at a barrier, and keeps the newest ``checkpoint.keep``.
  A run started again on the same folder resumes from the newest complete
  checkpoint, on the same or another number of ranks; on the same number of
  ranks (and with ``comm: allreduce``) it ends with bit-identical weights.
- **Outputs.** ``OUT/metrics.json`` (per-epoch test accuracy and loss,
  sparsity, ``epoch_seconds`` and ``total_seconds``, world size, threads,
  seconds, mask digests, communication statistics) and
  ``OUT/model.safetensors``: the finalized model (exact zeros, no masks), a
  sparseforge checkpoint that ``sparseforge inspect`` reads.
- **Threads.** Each process uses ``OMP_NUM_THREADS`` threads when the
  environment sets it, else :func:`sparseforge.threads.default_threads`: the
  cores not busy with other work, shared among the processes. The first line
  and ``metrics.json`` (``threads``) say how many.
- **Progress.** Rank 0 prints one line per epoch (its time and the run's
  total so far) on stdout, and a live bar on stderr (plain lines when stderr
  is not a terminal; see :mod:`sparseforge.progress`); ``quiet`` turns both off.

The loop itself is :func:`sparseforge.training.fit`; a run is its callbacks:
the Sparsifier, the DDP comm hook, the per-epoch history, the checkpoints and
the progress (see :func:`_train`). ``metrics.json`` also holds every rank's
digest of the trained weights (``weight_digests``: DDP keeps them identical)
and, per rank, the bytes per step the comm hook sent after its warm-up
(``comm.after_warmup_by_rank``).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparseforge import datasets
from sparseforge.architectures import build
from sparseforge.distributed import dgc
from sparseforge.distributed.masks import check_masks_identical
from sparseforge.errors import SparseforgeError
from sparseforge.files import write_json_atomic
from sparseforge.progress import Progress
from sparseforge.quality import evaluate
from sparseforge.recipes import from_mapping, read_yaml, to_mapping
from sparseforge.report import report
from sparseforge.sparsifier import Sparsifier
from sparseforge.threads import set_threads
from sparseforge.training import (
    Callback,
    CheckpointCallback,
    CommHookCallback,
    FitState,
    History,
    LambdaCallback,
    ProgressCallback,
    SGDConfig,
    ShardedPermutation,
    SparsifierCallback,
    World,
    fit,
)
from sparseforge.training.checkpoint import (  # noqa: F401 - CHECKPOINT_FORMAT and _VERSION re-exported, as before
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    latest_checkpoint,
    state_digest,
)
from sparseforge.training.data import epoch_permutation, rank_slice  # noqa: F401 - re-exported

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DebugConfig",
    "DistributedConfig",
    "MethodConfig",
    "TrainConfig",
    "TrainRecipe",
    "default_out_dir",
    "epoch_permutation",
    "latest_checkpoint",
    "load_recipe",
    "rank_slice",
    "run",
]

DENSE = "none"
"""``method.name`` that trains dense; any other name is a preset of :data:`sparseforge.methods.METHODS`."""


# -- the recipe ------------------------------------------------------------------------


@dataclass
class DataConfig:
    """The data: ``name``, a classification dataset of :data:`sparseforge.datasets.DATASETS` (default
    ``fashion-mnist``, or a plug-in's); ``dir``, where its files are (Fashion-MNIST: default
    ``$SPARSEFORGE_DATA`` or the system copy); and the first ``limit_train`` / ``limit_test`` examples of
    each split (default: all)."""

    name: str = "fashion-mnist"
    dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None

    def num_train(self) -> int:
        """Training examples the run sees (the dataset's declared size, else counted by loading it)."""
        from sparseforge.datasets import num_train

        total = num_train(self.name, self.dir, what="sparseforge train")
        return min(self.limit_train or total, total)


@dataclass
class MethodConfig:
    """The sparsity method: ``name`` (a preset of :data:`sparseforge.methods.METHODS`; ``none`` trains dense), the
    model-level ``sparsity`` (0.9), and ``options``: other keyword arguments of the
    preset (e.g. ``frequency``, ``drop_fraction``, ``allocation``, ``end``), checked
    by building the method."""

    name: str = "rigl"
    sparsity: float = 0.9
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, total_steps: int | None = None):
        """The :class:`~sparseforge.methods.Method` (None for ``none``), its schedule checked
        against ``total_steps``; bad options are a :class:`SparseforgeError`."""
        from sparseforge.methods import METHODS

        if self.name != DENSE and self.name not in METHODS:
            raise SparseforgeError(f"method.name: {METHODS.error(self.name, known=[DENSE, *METHODS.names()])}")
        if self.name == DENSE:
            if self.options:
                raise SparseforgeError(
                    f"method.options {sorted(self.options)} given with method.name 'none' (dense training): "
                    "remove them or name a method"
                )
            return None
        preset = METHODS.get(self.name)
        accepted = [n for n, p in inspect.signature(preset).parameters.items() if n != "sparsity"]
        if "sparsity" not in inspect.signature(preset).parameters:
            raise SparseforgeError(f"method.name {self.name} takes no sparsity (it fixes its own): a training "
                                   "recipe's method takes method.sparsity; build this one from Python")
        unknown = [k for k in self.options if k not in accepted]
        if unknown:
            close = difflib.get_close_matches(unknown[0], accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SparseforgeError(
                f"method.options: {self.name} does not take {unknown[0]!r}{hint}; it takes: {', '.join(accepted)}"
            )
        try:
            method = preset(sparsity=self.sparsity, **self.options)
        except SparseforgeError as e:
            raise SparseforgeError(f"method ({self.name}): {e}") from None
        except (TypeError, ValueError) as e:
            raise SparseforgeError(f"method ({self.name}): bad options {self.options}: {e}") from None
        if total_steps is not None:
            try:
                method.schedule.resolve(total_steps)
            except SparseforgeError as e:
                raise SparseforgeError(f"method ({self.name}) over a run of {total_steps} steps: {e}") from None
        return method


@dataclass
class TrainConfig:
    """Optimization: ``epochs`` (1); ``batch_size``: the GLOBAL batch (128), split equally
    over the ranks; SGD ``lr`` (0.05, cosine-annealed to 0), Nesterov ``momentum`` (0.9;
    0 = plain SGD), ``weight_decay`` (5e-4); ``seed`` (0) of the initial weights, the
    data order and the methods' random parts."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = SGDConfig.lr
    momentum: float = SGDConfig.momentum
    weight_decay: float = SGDConfig.weight_decay
    seed: int = 0


@dataclass
class DistributedConfig:
    """How the ranks talk.

    ``backend``: ``auto`` (nccl when CUDA is available, else gloo), ``gloo`` (CPU) or
    ``nccl`` (one GPU per rank). ``comm``: the gradient exchange: ``allreduce`` (DDP's
    own), ``dgc`` (Deep Gradient Compression; ``dgc`` holds
    :class:`sparseforge.distributed.dgc.DGCConfig` fields, e.g. ``density: 0.001``;
    its ``momentum`` defaults to ``train.momentum``, which the optimizer then leaves
    out) or ``powersgd`` (PowerSGD, "PowerSGD: Practical Low-Rank Gradient Compression
    for Distributed Optimization", Vogels et al. 2019: rank ``powersgd_rank``, 2, after
    ``powersgd_start_step`` steps of plain all-reduce; default null: 10% of the run, at
    least 2). ``timeout_s``: collective timeout (600 s). With one process and ``comm``
    other than allreduce, a one-process group is made so that the hook still shapes the
    training. Checkpoints keep every rank's DGC state (momentum, unsent residual,
    warm-up position; the threshold sampling is seeded by the step): resumed on the
    same number of processes a DGC run continues exactly; on another number only the
    warm-up position carries over (each rank's residual is its own). PowerSGD's error
    feedback is not checkpointed: a resumed PowerSGD run restarts it, so it stays
    close to the uninterrupted run but does not equal it.
    """

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    comm: Literal["allreduce", "dgc", "powersgd"] = "allreduce"
    dgc: dict[str, Any] = field(default_factory=dict)
    powersgd_rank: int = 2
    powersgd_start_step: int | None = None
    timeout_s: float = 600.0

    def resolved_backend(self) -> str:
        """``gloo`` or ``nccl``: ``auto`` is nccl when CUDA is available."""
        if self.backend == "auto":
            return "nccl" if torch.cuda.is_available() else "gloo"
        return self.backend

    def dgc_config(self, momentum: float):
        """The :class:`~sparseforge.distributed.dgc.DGCConfig` of ``dgc`` (its momentum defaulting
        to ``momentum``), keys and types checked under the path ``distributed.dgc``, validated."""
        from sparseforge.distributed.dgc import DGCConfig

        options = dict(self.dgc)
        options.setdefault("momentum", momentum)
        config = from_mapping(DGCConfig, options, "recipe", "distributed.dgc")
        try:
            config.validate()
        except SparseforgeError as e:
            raise SparseforgeError(f"distributed.dgc: {e}") from None
        return config


@dataclass
class CheckpointConfig:
    """``every_steps``: write a checkpoint every this many steps (default null: at the end
    of every epoch; always at the end of the run); ``keep``: how many to keep (2)."""

    every_steps: int | None = None
    keep: int = 2


@dataclass
class DebugConfig:
    """For tests of interruption: ``step_delay_s`` sleeps this long after every step (0),
    so that a run can be killed in the middle at a predictable point."""

    step_delay_s: float = 0.0


@dataclass
class TrainRecipe:
    """A sparse training run, as written in a YAML recipe (keys one to one with the fields).

    ``model``: an architecture of :data:`sparseforge.architectures.ARCHITECTURES` (the zoo's ``lenet300``,
    ``conv4``, ``resnet20``, or a plug-in's); ``out``: the run
    folder (default ``runs/<recipe file name>``; the CLI's ``--out`` wins). See
    :class:`DataConfig`, :class:`MethodConfig`, :class:`TrainConfig`,
    :class:`DistributedConfig`, :class:`CheckpointConfig`.

    >>> r = from_mapping(TrainRecipe, {"method": {"name": "gmp", "sparsity": 0.8}, "data": {"limit_train": 1000}})
    >>> r.steps_per_epoch(), r.total_steps()
    (7, 7)
    >>> r.check_launch(3)
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: train.batch_size 128 (the global batch) cannot be split equally over 3 processes: use a multiple of 3 (e.g. 129) or another --nproc
    """

    model: str = "lenet300"
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    out: str | None = None

    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the incomplete last one dropped): the same for any world size."""
        return self.data.num_train() // self.train.batch_size

    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.steps_per_epoch() * self.train.epochs

    def validate(self) -> None:
        """Check everything that does not depend on the number of processes or the machine."""
        from sparseforge.architectures import ARCHITECTURES
        from sparseforge.datasets import DATASETS

        if self.model not in ARCHITECTURES:
            raise SparseforgeError(f"model: {ARCHITECTURES.error(self.model)}")
        if self.data.name not in DATASETS:
            raise SparseforgeError(f"data.name: {DATASETS.error(self.data.name)}")
        for name, value in (("data.limit_train", self.data.limit_train), ("data.limit_test", self.data.limit_test)):
            if value is not None and value < 1:
                raise SparseforgeError(f"{name} must be >= 1 (or null: the whole split), got {value}")
        t = self.train
        for name, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size)):
            if value < 1:
                raise SparseforgeError(f"{name} must be >= 1, got {value}")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            raise SparseforgeError(f"train.lr must be a positive number, got {t.lr}")
        if not 0.0 <= t.momentum < 1.0:
            raise SparseforgeError(f"train.momentum must be in [0, 1), got {t.momentum}")
        if not t.weight_decay >= 0:
            raise SparseforgeError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if self.data.num_train() < t.batch_size:
            raise SparseforgeError(
                f"the training set has {self.data.num_train()} examples, fewer than one global batch "
                f"(train.batch_size {t.batch_size}): lower train.batch_size or raise data.limit_train"
            )
        self.method.build(self.total_steps())
        d = self.distributed
        if d.powersgd_rank < 1:
            raise SparseforgeError(f"distributed.powersgd_rank must be >= 1, got {d.powersgd_rank}")
        if d.powersgd_start_step is not None and d.powersgd_start_step < 2:
            raise SparseforgeError(f"distributed.powersgd_start_step must be >= 2 (DDP rebuilds its buckets at "
                                   f"the first step), got {d.powersgd_start_step}")
        if not d.timeout_s > 0:
            raise SparseforgeError(f"distributed.timeout_s must be > 0, got {d.timeout_s}")
        if d.dgc and d.comm != "dgc":
            raise SparseforgeError(f"distributed.dgc is set but distributed.comm is {d.comm!r}: set comm: dgc "
                                   "or remove the dgc options")
        if d.comm == "dgc":
            d.dgc_config(t.momentum)
        c = self.checkpoint
        if c.every_steps is not None and c.every_steps < 1:
            raise SparseforgeError(f"checkpoint.every_steps must be >= 1 (or null: every epoch), got {c.every_steps}")
        if c.keep < 1:
            raise SparseforgeError(f"checkpoint.keep must be >= 1, got {c.keep}")
        if not self.debug.step_delay_s >= 0:
            raise SparseforgeError(f"debug.step_delay_s must be >= 0, got {self.debug.step_delay_s}")

    def check_launch(self, world_size: int) -> None:
        """Check that ``world_size`` processes can run this recipe on this machine.

        The global batch must split equally (same batches for any world size), and
        nccl needs a CUDA device per process.
        """
        if world_size < 1:
            raise SparseforgeError(f"the number of processes must be >= 1, got {world_size}")
        b = self.train.batch_size
        if b % world_size:
            up = (b // world_size + 1) * world_size
            raise SparseforgeError(
                f"train.batch_size {b} (the global batch) cannot be split equally over {world_size} processes: "
                f"use a multiple of {world_size} (e.g. {up}) or another --nproc"
            )
        if self.distributed.resolved_backend() == "nccl":
            if not torch.cuda.is_available():
                raise SparseforgeError("distributed.backend nccl needs CUDA, which is not available here: "
                                       "use backend gloo (CPU) or auto")
            if world_size > torch.cuda.device_count():
                raise SparseforgeError(f"distributed.backend nccl runs one process per GPU: {world_size} processes, "
                                       f"{torch.cuda.device_count()} GPU(s)")

    def training_part(self) -> dict[str, Any]:
        """The settings that define the trained model (what a resumed run must share)."""
        m = to_mapping(self)
        part = {k: m[k] for k in ("model", "data", "method", "train")}
        part["comm"] = self.distributed.comm
        part["dgc"] = m["distributed"]["dgc"]
        part["powersgd"] = [self.distributed.powersgd_rank, self.distributed.powersgd_start_step]
        return part


def load_recipe(path: str | os.PathLike[str]) -> TrainRecipe:
    """Read and validate a YAML training recipe (:class:`TrainRecipe`)."""
    return from_mapping(TrainRecipe, read_yaml(path), where=str(path))


def default_out_dir(recipe: TrainRecipe, recipe_path: str | os.PathLike[str] | None = None) -> Path:
    """The run folder: ``recipe.out``, else ``runs/<recipe file stem>``, else ``runs/train``."""
    if recipe.out:
        return Path(recipe.out)
    return Path("runs") / (Path(recipe_path).stem if recipe_path else "train")


# -- the worker ------------------------------------------------------------------------


def _init_world(recipe: TrainRecipe, device_backend: str) -> tuple[World, bool]:
    """Join the torchrun group (env vars RANK, WORLD_SIZE, MASTER_ADDR...) when WORLD_SIZE > 1.

    Returns the world and whether this call created its process group (then :func:`run` destroys it).
    """
    timeout = timedelta(seconds=recipe.distributed.timeout_s)
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                     distributed=True), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(device_backend, timeout=timeout)
        return World(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), distributed=True), True
    if recipe.distributed.comm != "allreduce":
        # The hook compresses and (for DGC) carries the momentum: without it one process would
        # train a different model than N processes do. A one-process group in memory runs it.
        dist.init_process_group(device_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return World(0, 1, 0, distributed=True), True
    return World(0, 1, 0, distributed=False), False


def _comm_callback(recipe: TrainRecipe, device: torch.device) -> CommHookCallback:
    """The recipe's gradient communication hook (all-reduce is counted too), as a callback of the run.

    Its steady state (what ``comm.after_warmup_by_rank`` reports) starts after DGC's warm-up,
    after PowerSGD's all-reduce steps, at once for all-reduce.
    """
    d = recipe.distributed
    ids = [device.index] if device.type == "cuda" else None
    if d.comm == "dgc":
        config = d.dgc_config(recipe.train.momentum)
        return CommHookCallback(lambda ddp: dgc.register_dgc(ddp, config), steady_from=config.warmup_steps,
                                device_ids=ids)
    if d.comm == "powersgd":
        start = d.powersgd_start_step if d.powersgd_start_step is not None else max(2, recipe.total_steps() // 10)
        return CommHookCallback(lambda ddp: dgc.register_powersgd(ddp, rank=d.powersgd_rank, start_powerSGD_iter=start),
                                steady_from=start, device_ids=ids)
    return CommHookCallback(dgc.register_allreduce_counter, device_ids=ids)


def run(recipe: TrainRecipe, out_dir: str | os.PathLike[str] | None = None, resume: bool = True,
        quiet: bool = False) -> dict[str, Any]:
    """Train ``recipe`` in this process: one rank of a torchrun job, or alone.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) the process joins the
    group (the recipe's backend, env:// rendezvous); alone, nothing of
    torch.distributed is used (unless ``distributed.comm`` needs a hook, see
    :class:`DistributedConfig`). A process group that is already initialised is
    used as it is. See the module docstring for the rules of the run.

    Args:
        recipe: the validated recipe.
        out_dir: the run folder (default :func:`default_out_dir`).
        resume: continue from the newest checkpoint in ``out_dir`` if there is one
            (it must come from a recipe with the same model, data, method, train and
            comm settings). ``False`` deletes the folder's checkpoints, metrics.json and
            model.safetensors, and starts over.
        quiet: no progress output.

    Returns:
        the metrics written to ``metrics.json`` (on every rank).
    """
    recipe.validate()
    out = Path(out_dir) if out_dir is not None else default_out_dir(recipe)
    backend = recipe.distributed.resolved_backend()
    if not (dist.is_available() and dist.is_initialized()):
        recipe.check_launch(int(os.environ.get("WORLD_SIZE", "1")))  # before joining: every rank fails alike
    world, owns_group = _init_world(recipe, backend)
    try:
        recipe.check_launch(world.size)
        with Progress(world.lead and not quiet) as shown:  # rank 0's progress, on stderr
            return _train(recipe, out, resume, quiet, world, backend, shown)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(recipe: TrainRecipe, out: Path, resume: bool, quiet: bool, world: World, backend: str,
           shown: Progress) -> dict[str, Any]:
    """One rank's run: the recipe's model, data and callbacks put together and trained by :func:`fit`."""
    started = time.perf_counter()
    t, rank, W = recipe.train, world.rank, world.size
    if backend == "nccl":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # The user's OMP_NUM_THREADS (the launcher's default for N processes), else the idle cores.
    threads = set_threads(W)
    lead = world.lead
    progress_on = lead and not quiet

    # -- data: every rank holds the whole (small) training set and takes its piece of each global batch.
    with shown.phase(f"reading {recipe.data.name}"):
        examples = datasets.load(recipe.data.name, recipe.data.dir, limit_train=recipe.data.limit_train,
                                 limit_test=recipe.data.limit_test, kind=datasets.Classification,
                                 what="sparseforge train")
    _, test_loader = examples.loaders(t.batch_size, t.seed)
    data = ShardedPermutation(examples.train_inputs.to(device), examples.train_targets.to(device), t.batch_size,
                              t.seed, rank, W)
    spe, total = recipe.steps_per_epoch(), recipe.total_steps()

    # -- the model, optimizer, schedule and Sparsifier (before the DDP wrapper).
    torch.manual_seed(t.seed)
    model = build(recipe.model).to(device)
    dgc_on = recipe.distributed.comm == "dgc"
    weight_decay = t.weight_decay
    if dgc_on and float(recipe.distributed.dgc.get("weight_decay", 0.0)) > 0:
        weight_decay = 0.0  # the hook adds it before its momentum, as the DGC authors' code does
    # DGC's hook applies the momentum (momentum correction): the optimizer then has none.
    opt, sched = SGDConfig(lr=t.lr, momentum=0.0 if dgc_on else t.momentum,
                           weight_decay=weight_decay).build(model.parameters(), total)
    method = recipe.method.build(total)
    sparsifier = Sparsifier(model, method, total_steps=total, optimizer=opt) if method is not None else None

    def check_recipe(payload: Mapping[str, Any]) -> None:
        saved = from_mapping(TrainRecipe, payload["recipe"], "the recipe saved in the checkpoint").training_part()
        mine = recipe.training_part()
        if saved != mine:
            diff = [k for k in mine if mine[k] != saved.get(k)]
            raise SparseforgeError(
                f"the run folder {out} holds checkpoints of another recipe (differences in: {', '.join(diff)}): "
                "use another --out, or --no-resume to start over there"
            )

    def announce(state: FitState) -> None:
        if not progress_on:
            return
        if state.resumed_from is not None:
            print(f"resuming {out} at step {state.step}/{total} from {state.resumed_from.name} "
                  f"(written by {checkpointing.resumed_world_size} process(es), now {W}; {threads.describe()})",
                  flush=True)
        else:
            print(f"sparseforge train: {recipe.model}, method {recipe.method.name}"
                  f"{'' if method is None else f' at sparsity {recipe.method.sparsity:g}'}, {t.epochs} epoch(s) of "
                  f"{spe} steps, global batch {t.batch_size} over {W} process(es) ({backend}), "
                  f"{threads.describe()} -> {out}", flush=True)

    def print_row(row: dict[str, Any], state: FitState) -> None:
        if progress_on:
            print(f"epoch {row['epoch']:3d}/{t.epochs}  train loss {row['train_loss']:.4f}  "
                  f"test acc {row['test_accuracy']:6.2f}%  sparsity {100 * row['sparsity']:5.1f}%  "
                  f"epoch {row['epoch_seconds']:.1f} s, total {row['total_seconds']:.1f} s", flush=True)

    # -- the callbacks: what makes this run a `sparseforge train` run.
    sparsifying = SparsifierCallback(sparsifier) if sparsifier is not None else None
    comm = _comm_callback(recipe, device) if world.distributed else None
    def test(m: torch.nn.Module) -> dict[str, float]:
        ev = evaluate(m, test_loader)
        return {"test_loss": ev["loss"], "test_accuracy": ev["accuracy"]}

    history = History(test, extra=lambda state: {"sparsity": sparsifier.sparsity() if sparsifier is not None else 0.0},
                      on_row=print_row)
    checkpointing = CheckpointCallback(
        out, every_steps=recipe.checkpoint.every_steps, keep=recipe.checkpoint.keep, resume=resume,
        # Entries a checkpoint of this trainer always has, whichever callbacks the run holds.
        extra={"recipe": to_mapping(recipe), "sparsifier": None, "comm": [], "hook_states": None},
        check=check_recipe, seed=t.seed, also_remove=("metrics.json", "model.safetensors"), progress=shown)
    callbacks: list[Callback] = [c for c in (sparsifying, comm) if c is not None] + [history, checkpointing]
    callbacks += [LambdaCallback(order=55, on_fit_start=announce),
                  ProgressCallback(shown, "train: steps",
                                   info=lambda s: f"epoch {s.epoch + 1}/{t.epochs}, loss {float(s.loss.detach()):.3f}")]
    if recipe.debug.step_delay_s:
        callbacks.append(LambdaCallback(on_step_end=lambda state: time.sleep(recipe.debug.step_delay_s)))
    state = fit(model, data, opt, F.cross_entropy, epochs=t.epochs, scheduler=sched, callbacks=callbacks,
                world=world, device=device, started=started)

    # -- the end: masks identical on every rank, weights too, finalized model, metrics.
    digest = check_masks_identical(sparsifier) if sparsifier is not None else None
    digests = world.gather(digest)
    weight_digests = world.gather(state_digest(model.state_dict()))
    comm_stats = world.gather(comm.stats() if comm is not None else None)
    final_sparsity = sparsifier.sparsity() if sparsifier is not None else 0.0
    if sparsifier is not None:
        sparsifier.finalize()
    seconds = state.elapsed()
    rows = history.rows
    metrics = {
        "recipe": to_mapping(recipe),
        "world_size": W,
        "backend": backend if world.distributed else None,
        "steps": state.step,
        "steps_per_epoch": spe,
        "history": rows,
        "final": {"test_accuracy": rows[-1].get("test_accuracy") if rows else None,
                  "test_loss": rows[-1].get("test_loss") if rows else None,
                  "sparsity": final_sparsity},
        "mask_digests": digests,
        "masks_identical": digest is not None and len(set(digests)) == 1,
        # The trained weights of every rank (before finalizing): DDP keeps them bit-identical.
        "weight_digests": weight_digests,
        "weights_identical": len(set(weight_digests)) == 1,
        "comm": {"kind": recipe.distributed.comm,
                 "stats_by_rank": comm_stats if comm is not None else None,
                 "after_warmup_by_rank": world.gather(comm.after_warmup()) if comm is not None else None,
                 "earlier_segments": comm.earlier if comm is not None else []},
        "seconds": seconds,
        "threads": threads.to_dict(),
        "torch": torch.__version__,
    }
    if lead:
        # io sits above distributed: the checkpoint writer is reached by name, through the registry that io fills
        from sparseforge.formats import get_format

        rep = report(model)
        metrics["report"] = rep.to_dict()
        with shown.phase(f"writing {out}/model.safetensors and metrics.json"):
            get_format("checkpoint")[1].save(
                model, out / "model.safetensors", arch=recipe.model,
                extra={"test_accuracy": metrics["final"]["test_accuracy"], "steps": state.step,
                       "method": recipe.method.name, "sparsity": final_sparsity})
            write_json_atomic(out / "metrics.json", metrics)
        if progress_on:
            print(f"done: {state.step} steps, test accuracy {metrics['final']['test_accuracy']:.2f}%, sparsity "
                  f"{100 * final_sparsity:.1f}%, total {seconds:.1f} s; {out}/metrics.json, {out}/model.safetensors",
                  flush=True)
    world.barrier()
    return metrics
