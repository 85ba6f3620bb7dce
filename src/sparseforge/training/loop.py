"""The training loop: :func:`fit` and the :class:`Callback` hooks everything else attaches to.

One optimizer step of :func:`fit` (and of :meth:`TrainingRun.step`) is:

1. ``on_step_start``;
2. ``optimizer.zero_grad(set_to_none=True)``, ``outputs = forward(net, inputs)``
   (default ``net(inputs)``), ``value = loss(outputs, targets)``, ``value.backward()``;
3. ``after_backward`` (gradients are there: clip them, read them);
4. ``optimizer.step()`` (with a closure for optimizers that need one, such as
   L-BFGS: then steps 2 and 3 run inside it), then ``scheduler.step()``;
5. ``on_step_end`` (the step counter has advanced; a Sparsifier steps here,
   after the optimizer, as it must).

An epoch calls ``on_epoch_start``, runs its steps and calls ``on_epoch_end``;
the run calls ``on_fit_start`` first and ``on_fit_end`` last, or
``on_fit_error`` when an exception ends it. Callbacks run in the order of
their ``order`` attribute (then in the order given): the Sparsifier (0)
before a DDP comm hook (10, it wraps the model once the Sparsifier holds it),
metrics (20), the checkpoint (50, it saves the history the metrics just
extended and restores the position the progress display starts from) and
progress (60). A callback that keeps state returns it from ``state_dict`` as
top-level entries of the checkpoint and takes it back in ``load_state_dict``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.training.data import as_batches

__all__ = ["Callback", "FitState", "LambdaCallback", "TrainingRun", "World", "fit"]

LossFn = Callable[[Any, Any], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass
class World:
    """This process's place among the ranks, and the collectives the callbacks use.

    ``distributed``: a process group exists (possibly of one process, for a comm hook).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @classmethod
    def current(cls) -> World:
        """The initialised process group, or a single process when there is none."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dist.get_rank(), True)
        return cls()

    @property
    def lead(self) -> bool:
        """Rank 0: the one that evaluates, prints and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing alone)."""
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a list of one alone)."""
        if not self.distributed or self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.distributed or self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        if self.distributed and self.size > 1:
            dist.all_reduce(t)
        return t.tolist()


@dataclass
class FitState:
    """Where a run stands; every callback hook gets it.

    ``step`` counts optimizer steps since the run began (a resumed run continues
    the count), ``epoch`` is the current epoch (0-based) and ``batch`` the
    batches of it done. ``outputs``, ``targets`` and ``loss`` are the current
    step's (after ``on_step_end`` the outputs are released and the loss is
    detached, so that no graph outlives its step). ``net`` is what the forward pass calls: the model, or a wrapper
    (DDP) a callback put around it. ``seconds_before``: time spent in earlier
    segments of a resumed run; :meth:`elapsed` adds this one's.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: Any
    world: World
    device: torch.device
    total_steps: int | None
    steps_per_epoch: int | None
    epochs: int | None
    callbacks: list[Callback] = field(default_factory=list)
    net: nn.Module | None = None
    step: int = 0
    epoch: int = 0
    batch: int = 0
    outputs: Any = None
    targets: Any = None
    loss: torch.Tensor | None = None
    seconds_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    epoch_started: float = field(default_factory=time.perf_counter)
    stop: bool = False
    resumed_from: Any = None

    def elapsed(self) -> float:
        """Seconds of the whole run so far, earlier segments of a resumed run included."""
        return self.seconds_before + time.perf_counter() - self.started

    def callback(self, kind: type[Callback]) -> Callback | None:
        """The first callback of type ``kind``, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)


class Callback:
    """A part of a training run that acts at fixed points of :func:`fit` (see the module docstring).

    Every hook gets the :class:`FitState` and does nothing by default.
    ``order`` places the callback among the others (lower first).
    """

    order: int = 30

    def on_fit_start(self, state: FitState) -> None:
        """Before the first step (after a resume: before the first step left to do)."""

    def on_epoch_start(self, state: FitState) -> None:
        """Before the first step of an epoch (``state.epoch``; ``state.batch`` is where it starts)."""

    def on_step_start(self, state: FitState) -> None:
        """Before the forward pass."""

    def after_backward(self, state: FitState) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``: the gradients are there."""

    def on_step_end(self, state: FitState) -> None:
        """After ``optimizer.step()`` and ``scheduler.step()``; ``state.step`` counts this step."""

    def on_epoch_end(self, state: FitState) -> None:
        """After an epoch's last step (``state.epoch`` is the epoch that ended)."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last step of a run that ended normally."""

    def on_fit_error(self, state: FitState, error: BaseException) -> None:
        """When an exception (a KeyboardInterrupt too) ends the run; it is raised again afterwards."""

    def state_dict(self, state: FitState) -> dict[str, Any]:
        """Top-level checkpoint entries that restore this callback; called on every rank at every checkpoint."""
        return {}

    def load_state_dict(self, payload: Mapping[str, Any], state: FitState) -> None:
        """Take this callback's entries back from a checkpoint's payload (the whole payload)."""


class LambdaCallback(Callback):
    """A callback made of functions: ``LambdaCallback(on_step_end=lambda state: ...)``.

    >>> seen = []
    >>> cb = LambdaCallback(on_step_end=lambda s: seen.append(s.step))
    >>> model = nn.Linear(2, 1)
    >>> _ = fit(model, [(torch.ones(1, 2), torch.zeros(1, 1))] * 3, torch.optim.SGD(model.parameters(), lr=0.1),
    ...         torch.nn.functional.mse_loss, epochs=1, callbacks=[cb])
    >>> seen
    [1, 2, 3]
    """

    _HOOKS = ("on_fit_start", "on_epoch_start", "on_step_start", "after_backward", "on_step_end", "on_epoch_end",
              "on_fit_end")

    def __init__(self, order: int = 30, **hooks: Callable[[FitState], None]) -> None:
        unknown = sorted(set(hooks) - set(self._HOOKS))
        if unknown:
            raise SparseforgeError(f"LambdaCallback: unknown hook(s) {unknown}; hooks: {', '.join(self._HOOKS)}")
        self.order = order
        for name, fn in hooks.items():
            setattr(self, name, fn)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Tensors (alone, or in dicts, lists and tuples) moved to ``device``; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    # L-BFGS evaluates the loss several times per step; the others take a closure but do not need one.
    return isinstance(optimizer, torch.optim.LBFGS)


class TrainingRun:
    """One training run of :func:`fit`, also steppable one batch at a time.

    ``TrainingRun(...).run()`` is ``fit(...)``. Benchmarks that time single
    steps call :meth:`start` once and then :meth:`step` with their own batch:
    the same step, with the same callbacks, as the run's.
    Arguments: see :func:`fit`.
    """

    def __init__(self, model: nn.Module, data: Any, optimizer: torch.optim.Optimizer, loss: LossFn, *,
                 epochs: int | None = None, steps: int | None = None, scheduler: Any = None,
                 callbacks: Iterable[Callback] = (), forward: ForwardFn | None = None,
                 device: torch.device | str | None = None, world: World | None = None,
                 start_step: int = 0, started: float | None = None) -> None:
        self.data = as_batches(data) if data is not None else None
        per_epoch = None
        if self.data is not None:
            try:
                per_epoch = len(self.data)
            except TypeError:
                per_epoch = None
        if data is not None and epochs is None and steps is None:
            raise SparseforgeError("fit needs epochs or steps: how long to train")
        for name, value in (("epochs", epochs), ("steps", steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SparseforgeError(f"fit: {name} must be a positive integer, got {value!r}")
        if per_epoch == 0:
            raise SparseforgeError("cannot train: the data has no batches")
        total = steps if steps is not None else (epochs * per_epoch if per_epoch is not None else None)
        if epochs is None and per_epoch is not None:
            epochs = math.ceil(total / per_epoch)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0 or (
                total is not None and start_step >= total):
            raise SparseforgeError(f"fit: start_step must be in [0, {total}), got {start_step!r}")
        if start_step and per_epoch is None:
            raise SparseforgeError("fit: start_step needs data with a length (batches per epoch)")
        world = world if world is not None else World.current()
        ordered = sorted(callbacks, key=lambda c: c.order)  # stable: equal orders keep the given order
        self.state = FitState(
            model=model, optimizer=optimizer, scheduler=scheduler, data=self.data, world=world,
            device=torch.device(device) if device is not None else _model_device(model),
            total_steps=total, steps_per_epoch=per_epoch, epochs=epochs, callbacks=ordered, net=model,
            step=start_step, started=time.perf_counter() if started is None else started,
        )
        self.loss_fn = loss
        self.forward = forward
        self.closure = _needs_closure(optimizer)

    def _call(self, hook: str) -> None:
        state = self.state
        for cb in state.callbacks:
            getattr(cb, hook)(state)

    def start(self) -> FitState:
        """Run ``on_fit_start`` (a checkpoint callback may move ``state.step`` to where a run resumes)."""
        self._call("on_fit_start")
        return self.state

    def step(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One optimizer step on ``(inputs, targets)`` with every callback's step hooks; returns the loss."""
        s = self.state
        inputs, targets = _to_device(inputs, s.device), _to_device(targets, s.device)
        s.targets = targets
        self._call("on_step_start")

        def evaluate() -> torch.Tensor:
            s.optimizer.zero_grad(set_to_none=True)
            s.outputs = self.forward(s.net, inputs) if self.forward is not None else s.net(inputs)
            value = self.loss_fn(s.outputs, targets)
            value.backward()
            s.loss = value
            self._call("after_backward")
            return value

        if self.closure:
            s.optimizer.step(evaluate)
        else:
            evaluate()
            s.optimizer.step()
        if s.scheduler is not None:
            s.scheduler.step()
        s.step += 1
        s.batch += 1
        self._call("on_step_end")
        # Drop the step's graph and outputs now: kept, they would be alive during the next forward.
        s.outputs = None
        s.loss = s.loss.detach()
        return s.loss

    def _done(self) -> bool:
        s = self.state
        return s.stop or (s.total_steps is not None and s.step >= s.total_steps)

    def run(self) -> FitState:
        """Train to the end (``on_fit_start``, the epochs, ``on_fit_end``); returns the final state."""
        s = self.state
        if self.data is None:
            raise SparseforgeError("TrainingRun.run needs data (without it, call start() and step(inputs, targets))")
        try:
            self.start()
            while not self._done():
                if s.steps_per_epoch is not None:
                    s.epoch, s.batch = divmod(s.step, s.steps_per_epoch)
                    if s.epochs is not None and s.epoch >= s.epochs:
                        break
                elif s.epochs is not None and s.epoch >= s.epochs:
                    break
                else:
                    s.batch = 0
                s.epoch_started = time.perf_counter()  # for a run resumed mid-epoch: this process's part of it
                self._call("on_epoch_start")
                s.net.train()
                for inputs, targets in s.data.batches(s.epoch, s.batch):
                    self.step(inputs, targets)
                    if self._done():
                        break
                self._call("on_epoch_end")
                if s.steps_per_epoch is None:
                    s.epoch += 1  # an unsized pass: the next epoch is the next pass
            self._call("on_fit_end")
        except BaseException as error:
            for cb in s.callbacks:
                cb.on_fit_error(s, error)
            raise
        return s


def fit(model: nn.Module, data: Any, optimizer: torch.optim.Optimizer, loss: LossFn, *,
        epochs: int | None = None, steps: int | None = None, scheduler: Any = None,
        callbacks: Iterable[Callback] = (), forward: ForwardFn | None = None,
        device: torch.device | str | None = None, world: World | None = None, start_step: int = 0,
        started: float | None = None) -> FitState:
    """Train ``model`` on ``data``: the one training loop of sparseforge.

    Args:
        model: the module to train (the plain model; a comm-hook callback wraps it in DDP).
        data: an iterable of ``(inputs, targets)`` batches (one ``iter()`` per epoch), or an
            object with ``batches(epoch, start)`` (:class:`~sparseforge.training.data.Batches`,
            e.g. :class:`~sparseforge.training.data.ShardedPermutation`) for exact resume.
            Tensors in a batch (also inside dicts, lists and tuples) are moved to ``device``.
        optimizer: steps once per batch (L-BFGS gets a closure).
        loss: ``loss(outputs, targets) -> scalar tensor``.
        epochs: passes over ``data``; or
        steps: optimizer steps of the run (wins over ``epochs`` when both are given; with data
            of no length, e.g. an endless sampler, the run is ``steps`` batches of one pass).
        scheduler: its ``step()`` runs after every optimizer step (LR schedulers).
        callbacks: the :class:`Callback` objects of the run (Sparsifier, comm hook,
            checkpoints, metrics, progress, ...), run in their ``order``.
        forward: ``forward(net, inputs) -> outputs`` instead of ``net(inputs)`` (e.g. keyword inputs).
        device: where batches go (default: the model's parameters' device).
        world: the ranks (default: the initialised process group, else one process).
        start_step: begin at this step of the run: data position and epoch follow from it
            (the learning rate schedule is the caller's to advance).
        started: the run's clock start (``time.perf_counter()``; default: now), e.g. taken
            before loading the data, for ``state.elapsed()`` and the metrics' times.

    Returns:
        the final :class:`FitState` (``step``, ``epoch``, ``callbacks``, the last loss).

    >>> torch.manual_seed(0) and None
    >>> model = nn.Linear(3, 1)
    >>> x = torch.randn(32, 3); y = x.sum(1, keepdim=True)
    >>> batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    >>> state = fit(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.mse_loss, epochs=20)
    >>> state.step, round(float(state.loss), 3) < 0.01
    (80, True)
    """
    return TrainingRun(model, data, optimizer, loss, epochs=epochs, steps=steps, scheduler=scheduler,
                       callbacks=callbacks, forward=forward, device=device, world=world,
                       start_step=start_step, started=started).run()
