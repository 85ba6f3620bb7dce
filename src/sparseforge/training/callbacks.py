"""The callbacks of :func:`~sparseforge.training.fit`: Sparsifier, DDP comm hooks, metrics, checkpoints, progress.

Each keeps its own state in the run's checkpoints (``state_dict`` /
``load_state_dict``), under the top-level keys of the version-2 training
checkpoint (:mod:`sparseforge.training.checkpoint`): ``sparsifier``,
``comm`` and ``hook_states``, ``history`` and ``epoch_sums``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.files import write_json_atomic
from sparseforge.method import Method
from sparseforge.progress import Progress, Task
from sparseforge.sparsifier import Sparsifier
from sparseforge.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    rng_state,
    set_rng_state,
    write_training_checkpoint,
)
from sparseforge.training.loop import Callback, FitState

__all__ = ["CheckpointCallback", "CommHookCallback", "History", "ProgressCallback", "SparsifierCallback"]


class SparsifierCallback(Callback):
    """Runs a :class:`~sparseforge.Sparsifier` in the loop: ``sparsifier.step()`` after every optimizer step.

    Args:
        sparsifier: a Sparsifier built on the plain model with the run's optimizer; or a
            :class:`~sparseforge.methods.Method` (or a function ``total_steps -> Method``) from
            which one is built at the start of the run, over the steps left to train.
        finalize: at the end of the run, leave the plain model with exact zeros
            (:meth:`~sparseforge.Sparsifier.finalize`). Default False: the caller finalizes
            (after checking the masks across ranks, say).

    Its checkpoint entry is ``sparsifier``: masks, schedule position, the method's RNG states.
    Order 0: it holds the plain model before a comm hook wraps it.
    """

    order = 0

    def __init__(self, sparsifier: Sparsifier | Method | Callable[[int], Method], *, finalize: bool = False) -> None:
        self.sparsifier: Sparsifier | None = sparsifier if isinstance(sparsifier, Sparsifier) else None
        self._method = None if self.sparsifier is not None else sparsifier
        self.finalize = finalize

    def on_fit_start(self, state: FitState) -> None:
        if self.sparsifier is None:
            remaining = None if state.total_steps is None else state.total_steps - state.step
            method = self._method
            if callable(method) and not isinstance(method, Method):
                method = method(remaining)
            self.sparsifier = Sparsifier(state.model, method, total_steps=remaining, optimizer=state.optimizer)

    def on_step_end(self, state: FitState) -> None:
        self.sparsifier.step()

    def on_fit_end(self, state: FitState) -> None:
        if self.finalize:
            self.sparsifier.finalize()

    def sparsity(self) -> float:
        """The masked fraction of the targeted weights now (0 before the run has built the Sparsifier)."""
        return self.sparsifier.sparsity() if self.sparsifier is not None else 0.0

    def state_dict(self, state: FitState) -> dict[str, Any]:
        return {"sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, payload: Mapping[str, Any], state: FitState) -> None:
        if payload.get("sparsifier") is not None:
            self.sparsifier.load_state_dict(payload["sparsifier"])


class CommHookCallback(Callback):
    """Wraps the model in DDP at the start of the run and installs a gradient communication hook.

    Args:
        register: ``register(ddp_model) -> CommState``: installs the hook and returns its
            byte-counting state, e.g. :func:`~sparseforge.distributed.dgc.register_allreduce_counter`,
            ``lambda ddp: register_dgc(ddp, DGCConfig(...))``, ``lambda ddp: register_powersgd(ddp, 2)``
            (see :mod:`sparseforge.distributed.dgc`).
        steady_from: the step from which the hook sends at its final rate (after DGC's
            warm-up, after PowerSGD's all-reduce steps; 0 for all-reduce):
            :meth:`after_warmup` reports the bytes of the steps from there on.
        device_ids: DDP's ``device_ids`` (one CUDA device per rank; None on CPU).

    Needs an initialised process group (one process is enough: the hook then still
    shapes the training). The hook's state (DGC's momentum and unsent residuals,
    warm-up position) travels in the checkpoints as ``hook_states``, one per rank;
    resumed on the same number of ranks a run continues exactly, on another only the
    warm-up position carries over. ``comm`` keeps the byte counts of earlier segments.
    """

    order = 10

    def __init__(self, register: Callable[[nn.Module], Any], *, steady_from: int = 0,
                 device_ids: Sequence[int] | None = None) -> None:
        self.register = register
        self.steady_from = int(steady_from)
        self.device_ids = device_ids
        self.comm: Any = None
        self.earlier: list[dict[str, Any]] = []  # byte counts of the earlier segments of a resumed run
        self._pending: tuple[Mapping[str, Any], FitState] | None = None
        self._at_steady: dict[str, float] | None = None

    def on_fit_start(self, state: FitState) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if not state.world.distributed:
            raise SparseforgeError("a DDP communication hook needs torch.distributed initialised "
                                   "(init_process_group; one process is enough)")
        state.net = DistributedDataParallel(state.model, device_ids=list(self.device_ids) if self.device_ids else None)
        self.comm = self.register(state.net)
        if hasattr(self.comm, "check_optimizer"):
            self.comm.check_optimizer(state.optimizer)  # DGC carries the momentum: the optimizer must not
        if self._pending is not None:
            self.load_state_dict(*self._pending)

    def on_step_start(self, state: FitState) -> None:
        # The counters before the first steady step (zero when this segment starts past the warm-up).
        if self._at_steady is None and state.step >= self.steady_from:
            self._at_steady = dict(self.comm.stats())

    def stats(self) -> dict[str, float]:
        """This rank's byte counters of this segment of the run (see ``CommState.stats``)."""
        return self.comm.stats()

    def after_warmup(self) -> dict[str, Any] | None:
        """Bytes per step of this segment's steps from ``steady_from`` on (None before any).

        ``{"from_step", "steps", "bytes_per_step", "dense_bytes_per_step"}``: what the hook sends
        at its final rate, which is how compression papers report their ratios.
        """
        if self._at_steady is None:
            return None
        now = self.comm.stats()
        n = now["steps"] - self._at_steady["steps"]
        if n <= 0:
            return None
        return {"from_step": self.steady_from, "steps": int(n),
                "bytes_per_step": (now["bytes_sent"] - self._at_steady["bytes_sent"]) / n,
                "dense_bytes_per_step": (now["dense_bytes"] - self._at_steady["dense_bytes"]) / n}

    def state_dict(self, state: FitState) -> dict[str, Any]:
        stats = state.world.gather(self.comm.stats())
        hooks = (state.world.gather(self.comm.state_dict(list(state.model.parameters())))
                 if hasattr(self.comm, "state_dict") else None)
        return {"comm": self.earlier + [s for s in stats if s is not None][:1], "hook_states": hooks}

    def load_state_dict(self, payload: Mapping[str, Any], state: FitState) -> None:
        if self.comm is None:  # the hook is installed at the start of the run: keep it until then
            self._pending = (payload, state)
            return
        self._pending = None
        self.earlier = list(payload.get("comm", []))
        hook_states = payload.get("hook_states")
        if hook_states is not None and hasattr(self.comm, "load_state_dict"):
            # Each rank's own unsent residual and momentum on the same world size; on another
            # one only the warm-up position carries over (no rank's residual belongs to the new ranks).
            world = state.world
            same = int(payload["world_size"]) == world.size and len(hook_states) == world.size
            self.comm.load_state_dict(hook_states[world.rank if same else 0], list(state.model.parameters()),
                                      residuals=same)


class History(Callback):
    """One row per epoch: training loss (and accuracy), an evaluation, extra values and times.

    Training sums are taken over each step's batch and summed over the ranks at the
    end of the epoch. A row: ``epoch`` (1-based), ``step``, ``train_loss``,
    ``train_accuracy`` (with ``accuracy``: ``argmax(outputs, 1) == targets``), then
    ``extra(state)``'s entries, then ``evaluate(model)``'s (on rank 0 only, every
    ``evaluate_every`` epochs and at the last), then ``epoch_seconds`` (this process's
    part of the epoch) and ``total_seconds`` (the run's, earlier segments included).

    Args:
        evaluate: ``evaluate(model) -> dict`` of row entries (e.g. ``test_accuracy``).
        accuracy: count classification accuracy (outputs are logits, targets class ids).
        extra: ``extra(state) -> dict`` of row entries (e.g. the sparsity).
        evaluate_every: evaluate every this many epochs (and at the last).
        on_row: ``on_row(row, state)`` after each row (print it, say).
        path: write ``{"history": rows}`` there (atomically) after every epoch.

    Its checkpoint entries: ``history`` and ``epoch_sums`` (the current epoch's sums so far).
    """

    order = 20

    def __init__(self, evaluate: Callable[[nn.Module], Mapping[str, Any]] | None = None, *, accuracy: bool = True,
                 extra: Callable[[FitState], Mapping[str, Any]] | None = None, evaluate_every: int = 1,
                 on_row: Callable[[dict[str, Any], FitState], None] | None = None,
                 path: str | os.PathLike[str] | None = None) -> None:
        self.evaluate = evaluate
        self.accuracy = accuracy
        self.extra = extra
        self.evaluate_every = max(1, int(evaluate_every))
        self.on_row = on_row
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, Any]] = []
        self.sums = [0.0, 0.0, 0.0]  # loss * examples, correct, examples: this epoch, this rank
        self.last_sums = [0.0, 0.0, 0.0]  # the last finished epoch's, summed over the ranks

    def on_step_end(self, state: FitState) -> None:
        n = int(state.targets.shape[0])
        with torch.no_grad():
            self.sums[0] += float(state.loss.detach()) * n
            if self.accuracy:
                self.sums[1] += float((state.outputs.argmax(1) == state.targets).sum())
            self.sums[2] += n

    def _global_sums(self, state: FitState) -> list[float]:
        return state.world.all_sum(self.sums, state.device) if state.world.size > 1 else list(self.sums)

    def on_epoch_end(self, state: FitState) -> None:
        self.last_sums = self._global_sums(state)
        loss_sum, correct, count = self.last_sums
        self.sums = [0.0, 0.0, 0.0]
        if count == 0:
            raise SparseforgeError("cannot train: the data yielded no examples")
        row: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, "train_loss": loss_sum / count}
        if self.accuracy:
            row["train_accuracy"] = 100.0 * correct / count
        if self.extra is not None:
            row |= dict(self.extra(state))
        last = (state.total_steps is not None and state.step >= state.total_steps) or (
            state.epochs is not None and state.epoch + 1 >= state.epochs)
        if self.evaluate is not None and state.world.lead and ((state.epoch + 1) % self.evaluate_every == 0 or last):
            row |= dict(self.evaluate(state.model))
        now = time.perf_counter()
        row |= {"epoch_seconds": now - state.epoch_started, "total_seconds": state.seconds_before + now - state.started}
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row, state)
        if self.path is not None and state.world.lead:
            write_json_atomic(self.path, {"history": self.rows})

    def state_dict(self, state: FitState) -> dict[str, Any]:
        return {"history": self.rows, "epoch_sums": self._global_sums(state)}

    def load_state_dict(self, payload: Mapping[str, Any], state: FitState) -> None:
        self.rows = list(payload.get("history", []))
        if state.world.lead and "epoch_sums" in payload:
            self.sums = list(payload["epoch_sums"])  # the epoch's global sums so far, counted once (on rank 0)


class CheckpointCallback(Callback):
    """Writes training checkpoints into ``run_dir/checkpoints`` and resumes from the newest.

    Rank 0 writes ``step-NNNNNNNN.pt`` atomically (format version 2 with its content
    digest) every ``every_steps`` steps (default: at the end of every epoch) and at the
    end, while the other ranks wait at a barrier, and keeps the newest ``keep``. A
    checkpoint holds the model, optimizer and scheduler states, the step and the epoch
    and position in it, every rank's RNG state, the world size, the seconds so far,
    every callback's :meth:`~Callback.state_dict` entries and ``extra``.

    At the start, with ``resume``, rank 0 picks the newest readable checkpoint (every
    rank loads the same one), ``check(payload)`` may refuse it (raise), and the run
    continues from it: on the same world size each rank's RNG stream continues; on
    another one each rank's stream is derived from ``(seed, step, rank)``. Without
    ``resume``, the folder's checkpoints and the files ``also_remove`` are deleted first
    (a new run killed early must not leave the old run's outputs looking current).

    Args:
        run_dir: the run folder.
        every_steps: write every this many steps (None: at each epoch's end).
        keep: how many checkpoints to keep.
        resume: continue from the newest checkpoint if there is one.
        extra: top-level entries every checkpoint carries (callbacks' entries win).
        check: ``check(payload)`` raises when a found checkpoint must not be resumed.
        seed: the run's seed (for the RNG streams of a resume on another world size).
        also_remove: files of the run folder that a fresh start deletes.
        progress: shows the loading of a checkpoint as a phase.
    """

    order = 50

    def __init__(self, run_dir: str | os.PathLike[str], *, every_steps: int | None = None, keep: int = 2,
                 resume: bool = True, extra: Mapping[str, Any] | None = None,
                 check: Callable[[Mapping[str, Any]], None] | None = None, seed: int = 0,
                 also_remove: Iterable[str] = (), progress: Progress | None = None) -> None:
        if every_steps is not None and every_steps < 1:
            raise SparseforgeError(f"every_steps must be >= 1 (or None: every epoch), got {every_steps}")
        if keep < 1:
            raise SparseforgeError(f"keep must be >= 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.every_steps, self.keep, self.resume = every_steps, keep, resume
        self.extra = dict(extra or {})
        self.check = check
        self.seed = seed
        self.also_remove = list(also_remove)
        self.progress = progress or Progress(False)
        self.resumed_world_size: int | None = None

    def on_fit_start(self, state: FitState) -> None:
        world = state.world
        if not self.resume:
            if world.lead:
                for p in [p for _, p in list_checkpoints(self.run_dir)] + [self.run_dir / n for n in self.also_remove]:
                    p.unlink(missing_ok=True)
            world.barrier()
        latest = latest_checkpoint(self.run_dir) if self.resume and world.lead else None
        chosen = world.broadcast(str(latest) if latest is not None else None)
        if chosen is None:
            return
        with self.progress.phase(f"loading {chosen}"):
            payload = load_training_checkpoint(Path(chosen), state.device)
        if self.check is not None:
            self.check(payload)
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        if state.scheduler is not None and payload.get("scheduler") is not None:
            state.scheduler.load_state_dict(payload["scheduler"])
        for cb in state.callbacks:
            if cb is not self:
                cb.load_state_dict(payload, state)
        state.step = int(payload["step"])
        state.seconds_before = float(payload["seconds"])
        saved_world = int(payload["world_size"])
        if saved_world == world.size:
            set_rng_state(payload["rng"][world.rank], state.device)
        else:
            # Another world size: no saved stream fits this rank; derive one from (seed, step, rank).
            torch.manual_seed(int(np.random.SeedSequence([self.seed, state.step, world.rank]).generate_state(1)[0]))
        state.resumed_from = Path(chosen)
        self.resumed_world_size = saved_world

    def save(self, state: FitState, epoch: int, batch: int) -> None:
        """Write a checkpoint of ``state`` at (``epoch``, ``batch``): every rank joins, rank 0 writes."""
        world = state.world
        rngs = world.gather(rng_state(state.device))
        entries: dict[str, Any] = {}
        for cb in state.callbacks:
            if cb is not self:
                entries |= cb.state_dict(state)
        if world.lead:
            payload = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
                "step": state.step, "epoch": epoch, "batch_in_epoch": batch, "rng": rngs, "world_size": world.size,
                **self.extra, **entries, "seconds": state.elapsed(),
            }
            write_training_checkpoint(payload, checkpoint_path(self.run_dir, state.step))
            for _, old in list_checkpoints(self.run_dir)[:-self.keep]:
                old.unlink(missing_ok=True)
        world.barrier()

    def on_step_end(self, state: FitState) -> None:
        every, spe = self.every_steps, state.steps_per_epoch
        if (every is not None and state.step % every == 0 and state.total_steps is not None
                and state.step < state.total_steps and spe and state.step % spe):
            self.save(state, state.epoch, state.batch)

    def on_epoch_end(self, state: FitState) -> None:
        every = self.every_steps
        if every is None or state.step % every == 0 or state.step == state.total_steps:
            self.save(state, state.epoch + 1, 0)


class ProgressCallback(Callback):
    """Shows the run on a :class:`~sparseforge.progress.Progress`: one counted task of steps, or one per epoch.

    Args:
        progress: where to show it.
        description: the task's text, or ``description(state)`` (per epoch: called at each epoch's start).
        per_epoch: one task per epoch, counting its batches (else one for the run's steps).
        info: ``info(state) -> str`` shown after the count at every step (e.g. the loss).
    """

    order = 60

    def __init__(self, progress: Progress, description: str | Callable[[FitState], str] = "train: steps", *,
                 per_epoch: bool = False, info: Callable[[FitState], str] | None = None) -> None:
        self.progress = progress
        self.description = description
        self.per_epoch = per_epoch
        self.info = info
        self.task: Task | None = None

    def _text(self, state: FitState) -> str:
        return self.description(state) if callable(self.description) else self.description

    def on_fit_start(self, state: FitState) -> None:
        if not self.per_epoch:
            self.task = self.progress.start(self._text(state), state.total_steps, completed=state.step)

    def on_epoch_start(self, state: FitState) -> None:
        if self.per_epoch:
            self.task = self.progress.start(self._text(state), state.steps_per_epoch, completed=state.batch)

    def on_step_end(self, state: FitState) -> None:
        self.task.advance(info=self.info(state) if self.info is not None else None)
        if self.per_epoch and self.task.completed == self.task.total:
            self.task.finish()  # the epoch's batches are done; its evaluation is not part of them

    def on_epoch_end(self, state: FitState) -> None:
        if self.per_epoch:
            self.task.finish()

    def on_fit_end(self, state: FitState) -> None:
        if self.task is not None:
            self.task.finish()

    def on_fit_error(self, state: FitState, error: BaseException) -> None:
        if self.task is not None:
            self.task.finish(ok=False)  # the display stops, and the error says the rest
