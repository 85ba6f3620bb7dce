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
  reproduction (``sparseforge.bench.common.make_optimizer``). With
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
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.progress import Progress
from sparseforge.recipes import from_mapping, read_yaml, to_mapping
from sparseforge.threads import set_threads

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DebugConfig",
    "DistributedConfig",
    "MethodConfig",
    "TRAIN_EXAMPLES",
    "TrainConfig",
    "TrainRecipe",
    "default_out_dir",
    "epoch_permutation",
    "latest_checkpoint",
    "load_recipe",
    "rank_slice",
    "run",
]

TRAIN_EXAMPLES = 60000
"""Examples in the Fashion-MNIST training split (``data.limit_train`` keeps the first ones)."""

CHECKPOINT_FORMAT = "sparseforge-train-checkpoint"
CHECKPOINT_VERSION = 2
#: Versions this trainer resumes from: 1 was written without the content digest.
READABLE_CHECKPOINT_VERSIONS = (1, 2)
_CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")


DENSE = "none"
"""``method.name`` that trains dense; any other name is a preset of :data:`sparseforge.methods.METHODS`."""


# -- the recipe ------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Fashion-MNIST: ``dir`` (default: ``$SPARSEFORGE_DATA`` or the system copy), and the
    first ``limit_train`` / ``limit_test`` examples of each split (default: all)."""

    dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None

    def num_train(self) -> int:
        """Training examples the run sees."""
        return min(self.limit_train or TRAIN_EXAMPLES, TRAIN_EXAMPLES)


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
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
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

        if self.model not in ARCHITECTURES:
            raise SparseforgeError(f"model: {ARCHITECTURES.error(self.model)}")
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


# -- data sharding ---------------------------------------------------------------------


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of ``range(num_examples)`` drawn from ``(seed, epoch)``.

    The same on every rank and for every world size (numpy's SeedSequence mixes the
    pair, so nearby seeds and epochs give unrelated orders).

    >>> epoch_permutation(5, 0, 0).tolist() == epoch_permutation(5, 0, 0).tolist()
    True
    >>> sorted(epoch_permutation(5, 0, 1).tolist())
    [0, 1, 2, 3, 4]
    """
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, np.uint64)
    gen = torch.Generator().manual_seed(int(state[0]) & (2**63 - 1))
    return torch.randperm(num_examples, generator=gen)


def rank_slice(batch: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Positions in the epoch's permutation that rank ``rank`` trains on at global batch ``batch``.

    Global batch ``b`` covers ``[b * B, (b + 1) * B)``; rank ``r`` of ``W`` takes the
    ``r``-th of ``W`` equal contiguous pieces (``B`` must be a multiple of ``W``).

    >>> [rank_slice(1, 8, r, 2) for r in range(2)]
    [slice(8, 12, None), slice(12, 16, None)]
    """
    local = batch_size // world_size
    start = batch * batch_size + rank * local
    return slice(start, start + local)


# -- checkpoints -----------------------------------------------------------------------


def _checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    folder = _checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CHECKPOINT_RE.match(p.name)  # temporary files of an interrupted write do not match
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete training checkpoint in run folder ``out_dir``, or None.

    Checkpoints are renamed into place only once fully written, so every
    ``step-N.pt`` is complete; a file that still fails to load (a damaged disk)
    is skipped with a warning in favour of the one before.
    """
    for _, path in reversed(_checkpoints(Path(out_dir))):
        try:
            _load_state(path, torch.device("cpu"), mmap=True)
            return path
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older one
            import warnings

            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    return None


def _load_state(path: Path, device: torch.device, mmap: bool = False) -> dict[str, Any]:
    # weights_only=False: the file holds plain Python data besides tensors (the recipe, the
    # metrics, the methods' RNG states) and is one this trainer wrote into its own run folder.
    # mmap: a cheap readability check that does not read the tensors.
    try:
        state = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except OSError as e:
        raise SparseforgeError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged zip or pickle fails in many ways, all of them "unreadable"
        raise SparseforgeError(f"{path} is not a readable training checkpoint (truncated or corrupted: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SparseforgeError(f"{path} is not a sparseforge training checkpoint")
    version = state.get("version")
    if version not in READABLE_CHECKPOINT_VERSIONS:
        raise SparseforgeError(f"{path} has checkpoint version {version!r}; this sparseforge reads "
                               f"{', '.join(map(str, READABLE_CHECKPOINT_VERSIONS))}")
    if version >= 2:
        # torch.load does not check the zip's CRCs: a flipped byte in a tensor loads silently.
        digest = state.pop("sha256", None)
        if digest is None or digest != state_digest(state):
            raise SparseforgeError(f"{path} is corrupted: its content does not match its checksum")
    return state


def state_digest(state: Any) -> str:
    """SHA-256 over a nested checkpoint payload: its structure, every tensor's dtype, shape and
    bytes, every array's bytes and every other leaf's ``repr``. Keys named ``sha256`` are left
    out, so the digest can be stored in the payload it covers."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(obj, np.ndarray):
            h.update(f"A{obj.dtype}{obj.shape}".encode())
            h.update(np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, dict):
            keys = [key for key in obj if key != "sha256"]
            h.update(f"D{len(keys)}".encode())
            for key in keys:
                h.update(repr(key).encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__}{len(obj)}".encode())
            for item in obj:
                visit(item)
        else:
            h.update(repr(obj).encode())

    visit(state)
    return h.hexdigest()


# -- the worker ------------------------------------------------------------------------


@dataclass
class _World:
    rank: int
    size: int
    local_rank: int
    owns_group: bool
    distributed: bool  # a process group exists (also a one-process one, for a comm hook)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _init_world(recipe: TrainRecipe, device_backend: str) -> _World:
    """Join the torchrun group (env vars RANK, WORLD_SIZE, MASTER_ADDR...) when WORLD_SIZE > 1."""
    timeout = timedelta(seconds=recipe.distributed.timeout_s)
    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                      owns_group=False, distributed=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(device_backend, timeout=timeout)
        return _World(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), owns_group=True,
                      distributed=True)
    if recipe.distributed.comm != "allreduce":
        # The hook compresses and (for DGC) carries the momentum: without it one process would
        # train a different model than N processes do. A one-process group in memory runs it.
        dist.init_process_group(device_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return _World(0, 1, 0, owns_group=True, distributed=True)
    return _World(0, 1, 0, owns_group=False, distributed=False)


def _register_comm(ddp_model: nn.Module, recipe: TrainRecipe) -> Any:
    """Install the recipe's gradient communication hook (all-reduce is counted too); returns its state."""
    from sparseforge.distributed import dgc

    comm = recipe.distributed.comm
    if comm == "dgc":
        return dgc.register_dgc(ddp_model, recipe.distributed.dgc_config(recipe.train.momentum))
    if comm == "powersgd":
        d = recipe.distributed
        start = d.powersgd_start_step if d.powersgd_start_step is not None else max(2, recipe.total_steps() // 10)
        return dgc.register_powersgd(ddp_model, rank=d.powersgd_rank, start_powerSGD_iter=start)
    return dgc.register_allreduce_counter(ddp_model)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _gather(world: _World, obj: Any) -> list[Any]:
    if not world.distributed or world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def _all_sum(world: _World, values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world.distributed and world.size > 1:
        dist.all_reduce(t)
    return t.tolist()


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
    world = _init_world(recipe, backend)
    try:
        recipe.check_launch(world.size)
        with Progress(world.rank == 0 and not quiet) as shown:  # rank 0's progress, on stderr
            return _train(recipe, out, resume, quiet, world, backend, shown)
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(recipe: TrainRecipe, out: Path, resume: bool, quiet: bool, world: _World, backend: str,
           shown: Progress) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    from sparseforge.distributed.masks import check_masks_identical
    from sparseforge.export.checkpoint import save_checkpoint
    from sparseforge.files import atomic_path, remove_stale_temporaries, write_json_atomic
    from sparseforge.report import report
    from sparseforge.sparsifier import Sparsifier
    from sparseforge.zoo.data import fashion_mnist
    from sparseforge.zoo.models import build_model
    from sparseforge.zoo.training import evaluate

    started = time.perf_counter()
    t, rank, W = recipe.train, world.rank, world.size
    if backend == "nccl":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # The user's OMP_NUM_THREADS (the launcher's default for N processes), else the idle cores.
    threads = set_threads(W)
    lead = rank == 0
    progress_on = lead and not quiet

    # -- data: every rank holds the whole (small) training set and indexes its piece.
    with shown.phase("reading Fashion-MNIST"):
        train_loader, test_loader = fashion_mnist(t.batch_size, recipe.data.dir, t.seed, recipe.data.limit_train,
                                                  recipe.data.limit_test)
    x_train, y_train = train_loader.x.to(device), train_loader.y.to(device)
    n_train = x_train.shape[0]
    spe, total = recipe.steps_per_epoch(), recipe.total_steps()

    # -- the model, optimizer, schedule and Sparsifier (before the DDP wrapper).
    torch.manual_seed(t.seed)
    model = build_model(recipe.model).to(device)
    dgc_on = recipe.distributed.comm == "dgc"
    momentum = 0.0 if dgc_on else t.momentum  # DGC's hook applies the momentum (momentum correction)
    weight_decay = t.weight_decay
    if dgc_on and float(recipe.distributed.dgc.get("weight_decay", 0.0)) > 0:
        weight_decay = 0.0  # the hook adds it before its momentum, as the DGC authors' code does
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    method = recipe.method.build(total)
    sparsifier = Sparsifier(model, method, total_steps=total, optimizer=opt) if method is not None else None

    # -- resume (rank 0 picks the file, so every rank loads the same one).
    ckpt_dir = _checkpoint_dir(out)
    if not resume:
        if lead:  # the old run's outputs too: a new run killed early must not leave them looking current
            for p in [p for _, p in _checkpoints(out)] + [out / "metrics.json", out / "model.safetensors"]:
                p.unlink(missing_ok=True)
        world.barrier()
    latest = latest_checkpoint(out) if resume and lead else None
    chosen = [str(latest) if latest is not None else None]
    if world.distributed and W > 1:
        dist.broadcast_object_list(chosen, src=0)
    step, history, seconds_before, sums = 0, [], 0.0, [0.0, 0.0, 0.0]
    hook_states, hook_world = None, W
    comm_before: list[dict[str, Any]] = []
    if chosen[0] is not None:
        with shown.phase(f"loading {chosen[0]}"):
            state = _load_state(Path(chosen[0]), device)
        saved = from_mapping(TrainRecipe, state["recipe"], f"the recipe saved in {chosen[0]}").training_part()
        mine = recipe.training_part()
        if saved != mine:
            diff = [k for k in mine if mine[k] != saved.get(k)]
            raise SparseforgeError(
                f"the run folder {out} holds checkpoints of another recipe (differences in: {', '.join(diff)}): "
                "use another --out, or --no-resume to start over there"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if sparsifier is not None:
            sparsifier.load_state_dict(state["sparsifier"])
        step = int(state["step"])
        history = list(state["history"])
        seconds_before = float(state["seconds"])
        comm_before = list(state.get("comm", []))
        hook_states = state.get("hook_states")
        hook_world = int(state["world_size"])
        if lead:
            sums = list(state["epoch_sums"])  # the epoch's global sums so far, counted once (on rank 0)
        if state["world_size"] == W:
            _set_rng_state(state["rng"][rank], device)
        else:
            # Another world size: no saved stream fits this rank; derive one from (seed, step, rank).
            torch.manual_seed(int(np.random.SeedSequence([t.seed, step, rank]).generate_state(1)[0]))
        if progress_on:
            print(f"resuming {out} at step {step}/{total} from {Path(chosen[0]).name} "
                  f"(written by {state['world_size']} process(es), now {W}; {threads.describe()})", flush=True)
        del state
    elif lead and progress_on:
        print(f"sparseforge train: {recipe.model}, method {recipe.method.name}"
              f"{'' if method is None else f' at sparsity {recipe.method.sparsity:g}'}, {t.epochs} epoch(s) of "
              f"{spe} steps, global batch {t.batch_size} over {W} process(es) ({backend}), "
              f"{threads.describe()} -> {out}", flush=True)

    net: nn.Module = model
    comm_state = None
    if world.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        comm_state = _register_comm(net, recipe)
        if dgc_on and hasattr(comm_state, "check_optimizer"):
            comm_state.check_optimizer(opt)
        if hook_states is not None and hasattr(comm_state, "load_state_dict"):
            # Each rank's own unsent residual and momentum on the same world size; on another
            # one only the warm-up position carries over (no rank's residual belongs to the new ranks).
            same = hook_world == W and len(hook_states) == W
            comm_state.load_state_dict(hook_states[rank if same else 0], list(model.parameters()), residuals=same)

    def save(epoch: int, batch: int) -> None:
        """Every rank joins (RNG states and loss sums are gathered); rank 0 writes, the others wait."""
        rngs = _gather(world, _rng_state(device))
        global_sums = _all_sum(world, sums, device) if W > 1 else list(sums)
        stats = _gather(world, comm_state.stats() if comm_state is not None else None)
        hooks = (_gather(world, comm_state.state_dict(list(model.parameters())))
                 if hasattr(comm_state, "state_dict") else None)
        if lead:
            payload = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
                "step": step, "epoch": epoch, "batch_in_epoch": batch, "rng": rngs, "world_size": W,
                "recipe": to_mapping(recipe), "history": history, "epoch_sums": global_sums,
                "seconds": seconds_before + time.perf_counter() - started,
                "comm": comm_before + [s for s in stats if s is not None][:1],
                "hook_states": hooks,
            }
            payload["sha256"] = state_digest(payload)
            with atomic_path(ckpt_dir / f"step-{step:08d}.pt") as tmp, open(tmp, "wb") as f:
                torch.save(payload, f)  # a file object: a full disk raises OSError(ENOSPC), not torch's RuntimeError
            for _, old in _checkpoints(out)[:-recipe.checkpoint.keep]:
                old.unlink(missing_ok=True)
            # Each checkpoint has a new name, so atomic_path's cleanup (same name) never meets the
            # temporary file of a write that was killed: remove those of every dead writer here.
            remove_stale_temporaries(ckpt_dir)
        world.barrier()

    every = recipe.checkpoint.every_steps
    bar = shown.start("train: steps", total, completed=step)
    try:
        while step < total:
            epoch, start_batch = divmod(step, spe)
            epoch_started = time.perf_counter()  # for a run resumed mid-epoch: this process's part of it
            order = epoch_permutation(n_train, t.seed, epoch).to(device)
            net.train()
            for b in range(start_batch, spe):
                idx = order[rank_slice(b, t.batch_size, rank, W)]
                xb, yb = x_train[idx], y_train[idx]
                opt.zero_grad(set_to_none=True)
                logits = net(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                opt.step()
                sched.step()
                if sparsifier is not None:
                    sparsifier.step()
                step += 1
                with torch.no_grad():
                    sums[0] += float(loss.detach()) * yb.shape[0]
                    sums[1] += float((logits.argmax(1) == yb).sum())
                    sums[2] += yb.shape[0]
                bar.advance(info=f"epoch {epoch + 1}/{t.epochs}, loss {float(loss.detach()):.3f}")
                if recipe.debug.step_delay_s:
                    time.sleep(recipe.debug.step_delay_s)
                if every is not None and step % every == 0 and step < total and step % spe:
                    save(epoch, b + 1)
            # -- end of the epoch: global training sums, test on rank 0, checkpoint.
            loss_sum, correct, count = _all_sum(world, sums, device) if W > 1 else sums
            sums = [0.0, 0.0, 0.0]
            row = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / count,
                   "train_accuracy": 100.0 * correct / count,
                   "sparsity": sparsifier.sparsity() if sparsifier is not None else 0.0}
            if lead:
                ev = evaluate(model, test_loader)
                row |= {"test_loss": ev["loss"], "test_accuracy": ev["accuracy"]}
            now = time.perf_counter()
            # The epoch's own time, and the run's (earlier segments of a resumed run included), as the demo.
            row |= {"epoch_seconds": now - epoch_started, "total_seconds": seconds_before + now - started}
            if progress_on:
                print(f"epoch {epoch + 1:3d}/{t.epochs}  train loss {row['train_loss']:.4f}  "
                      f"test acc {row['test_accuracy']:6.2f}%  sparsity {100 * row['sparsity']:5.1f}%  "
                      f"epoch {row['epoch_seconds']:.1f} s, total {row['total_seconds']:.1f} s", flush=True)
            history.append(row)
            if every is None or step % every == 0 or step == total:
                save(epoch + 1, 0)
        bar.finish()
    finally:
        bar.finish(ok=False)  # after an error: the display stops, and the error says the rest

    # -- the end: masks identical on every rank, finalized model, metrics.
    digest = check_masks_identical(sparsifier) if sparsifier is not None else None
    digests = _gather(world, digest)
    comm_stats = _gather(world, comm_state.stats() if comm_state is not None else None)
    final_sparsity = sparsifier.sparsity() if sparsifier is not None else 0.0
    if sparsifier is not None:
        sparsifier.finalize()
    seconds = seconds_before + time.perf_counter() - started
    metrics = {
        "recipe": to_mapping(recipe),
        "world_size": W,
        "backend": backend if world.distributed else None,
        "steps": step,
        "steps_per_epoch": spe,
        "history": history,
        "final": {"test_accuracy": history[-1].get("test_accuracy") if history else None,
                  "test_loss": history[-1].get("test_loss") if history else None,
                  "sparsity": final_sparsity},
        "mask_digests": digests,
        "masks_identical": digest is not None and len(set(digests)) == 1,
        "comm": {"kind": recipe.distributed.comm,
                 "stats_by_rank": comm_stats if comm_state is not None else None,
                 "earlier_segments": comm_before},
        "seconds": seconds,
        "threads": threads.to_dict(),
        "torch": torch.__version__,
    }
    if lead:
        rep = report(model)
        metrics["report"] = rep.to_dict()
        with shown.phase(f"writing {out}/model.safetensors and metrics.json"):
            save_checkpoint(model, out / "model.safetensors", arch=recipe.model,
                            extra={"test_accuracy": metrics["final"]["test_accuracy"], "steps": step,
                                   "method": recipe.method.name, "sparsity": final_sparsity})
            write_json_atomic(out / "metrics.json", metrics)
        if progress_on:
            print(f"done: {step} steps, test accuracy {metrics['final']['test_accuracy']:.2f}%, sparsity "
                  f"{100 * final_sparsity:.1f}%, total {seconds:.1f} s; {out}/metrics.json, {out}/model.safetensors",
                  flush=True)
    world.barrier()
    return metrics
