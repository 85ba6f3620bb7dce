"""The lifecycle object: masks a model during training according to a method.

Masks live as (non-persistent) buffers ``<param>_mask`` on the targeted
modules, in the weight's dtype so that applying one is a single fused
multiply. They are applied in place after every optimizer step; gradients of
pruned weights are zeroed before the optimizer sees them (through an
optimizer step pre-hook when the optimizer is given, else a post-accumulate
gradient hook per weight), and at a mask update the optimizer's per-weight
state (momentum, Adam moments) is zeroed where weights were pruned, so
nothing can revive a pruned weight. For optimizers in
:data:`ZERO_PRESERVING_OPTIMIZERS` that already keeps pruned weights exactly
zero; for any other optimizer, and without an optimizer, the weights are also
multiplied by their masks after every step. Weights changed by hand (say, a
dense ``load_state_dict``) are re-masked by :meth:`Sparsifier.apply_masks`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from sparseforge import collectives
from sparseforge.errors import SparseforgeError
from sparseforge.method import Method
from sparseforge.targets import Layer
from sparseforge.updates import UpdateContext, check_compatible

STATE_VERSION = 1

#: Optimizers whose update of a weight is exactly zero when its gradient and
#: its state (momentum, moments) are zero and the weight itself is zero, weight
#: decay included: SGD (momentum, dampening, Nesterov), Adam and AdamW
#: (amsgrad too). With masked gradients and masked state, their pruned weights
#: stay exactly zero without a second multiply after each step, which halves
#: the masking cost (see ``python -m sparseforge.bench overhead``). Subclasses
#: are not trusted: their step may differ.
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
)


class Sparsifier:
    """Apply a sparsity :class:`~sparseforge.methods.Method` to ``model`` during training.

    Call :meth:`step` after every ``optimizer.step()``; it advances the
    schedule, updates the masks when the schedule says so, and re-applies them.
    :meth:`finalize` leaves a plain model with exact zeros and no hooks or
    buffers. :meth:`state_dict` holds the masks, the step and the RNG state of
    the method's random parts, so that a resumed run equals an uninterrupted one,
    whichever is built first: the Sparsifier (then load the model, optimizer and
    Sparsifier states) or the model and optimizer states (then build the
    Sparsifier on them and load its state, which undoes what the method's
    step-0 update did to them at construction).

    Args:
        model: the model to sparsify (modified in place).
        method: the composition of parts, e.g. ``sparseforge.methods.GMP(0.9)``.
        total_steps: the run's number of optimizer steps; needed when the
            schedule gives steps as fractions of the run (most presets do).
        optimizer: the optimizer; when given, gradients are masked in one fused
            call before each of its steps and its state is masked at updates.
        sync_masks: broadcast rank 0's masks to every rank after every mask
            update. Default ``None``: on whenever ``torch.distributed`` is
            initialised with more than one rank (checked at each update);
            ``True`` also requires it (checked here); ``False`` never syncs
            (e.g. when ranks hold different layers, which is not data
            parallelism).

    Under ``torch.distributed`` DDP every rank must build its Sparsifier on the
    module *before* wrapping it (a DistributedDataParallel wrapper is refused:
    its layer names gain a ``module.`` prefix) and call :meth:`step` at every
    step: with ``sync_masks`` on, updates are collectives. Each rank computes
    every update from the same inputs (DDP has averaged the gradients the
    optimizer pre-hook captures; without an optimizer, the per-weight hooks see
    each rank's own gradient, so the Sparsifier averages those first), then
    rank 0's masks are broadcast, so that the masks are identical on every
    rank by construction rather than by luck. Built after
    ``init_process_group`` (as it should be), the Sparsifier also excludes its
    mask buffers from DDP's per-forward buffer broadcast, which would resend
    them at every step. See :mod:`sparseforge.distributed` and
    ``docs/distributed.md``.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sp = sf.Sparsifier(model, sf.methods.GMP(sparsity=0.5, frequency=1, end=2), total_steps=4, optimizer=opt)
        >>> for _ in range(4):
        ...     model(torch.randn(2, 8)).sum().backward()
        ...     opt.step(); opt.zero_grad()
        ...     sp.step()
        >>> int((model.weight == 0).sum())
        16
        >>> plain = sp.finalize()
        >>> hasattr(model, "weight_mask")
        False
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        total_steps: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        sync_masks: bool | None = None,
    ) -> None:
        collectives.reject_wrapper(model)
        if sync_masks is not None and not isinstance(sync_masks, bool):
            raise SparseforgeError(f"sync_masks must be None (auto), True or False, got {sync_masks!r}")
        syncing = collectives.sync_enabled(sync_masks)
        if not isinstance(method, Method):
            raise SparseforgeError(
                f"Sparsifier needs a sparseforge Method (e.g. sparseforge.methods.GMP(0.9)), got {type(method).__name__}"
            )
        if total_steps is not None and int(total_steps) < 1:
            raise SparseforgeError(f"total_steps must be a positive number of steps, got {total_steps}")
        self.model = model
        self.method = method
        self.total_steps = total_steps
        self.optimizer = optimizer
        self.sync_masks = sync_masks
        self.schedule = method.schedule.resolve(total_steps)
        self.layers: list[Layer] = method.target.select(model)
        check_compatible(self.layers, method.pattern, method.allocation)
        self._step = 0
        self._finalized = False
        self._dense_grads: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        # Checked before anything is attached to the model, so that a failed
        # construction leaves it as it was and a corrected Sparsifier can attach
        # (instead of failing on leftover masks).
        for layer in self.layers:
            if hasattr(layer.module, layer.mask_name):
                raise SparseforgeError(
                    f"{layer.name} already has a {layer.mask_name}: is another Sparsifier attached? "
                    "finalize() it first"
                )
        if method.update.straight_through and optimizer is None:
            raise SparseforgeError(
                f"{method.update} trains dense weights through masked ones and needs the optimizer: "
                "Sparsifier(model, method, total_steps, optimizer=optimizer)"
            )
        if optimizer is not None:
            managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [layer.name for layer in self.layers if id(layer.weight) not in managed]
            if missing:
                raise SparseforgeError(f"the optimizer does not hold the weights of {', '.join(missing[:5])}")
        for layer in self.layers:
            layer.module.register_buffer(
                layer.mask_name, torch.ones_like(layer.weight, memory_format=torch.contiguous_format), persistent=False
            )
        if syncing:
            # A DDP wrapper would otherwise broadcast every mask before every forward;
            # masks change only at updates, which sync them. (Built before
            # init_process_group, the masks keep DDP's broadcast, which at least
            # syncs them with the weights when DDP is constructed.)
            collectives.exclude_from_ddp_sync(model, self._mask_fqns())
        self._weights = [layer.weight for layer in self.layers]
        self.straight_through = bool(method.update.straight_through)
        self._dense: list[torch.Tensor] | None = None
        if self.straight_through:
            self._dense = [w.detach().clone() for w in self._weights]
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            if self.straight_through or type(optimizer) not in ZERO_PRESERVING_OPTIMIZERS:
                # Masking the weights right after the optimizer wrote them, while
                # they are still in cache, is cheaper than later.
                self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        else:
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.weight.register_post_accumulate_grad_hook(self._grad_hook(i)))
        # What the mask update at step 0 is about to change, kept until the first step so
        # that load_state_dict can undo it (see _ConstructionUndo).
        self._undo: _ConstructionUndo | None = None
        try:
            if self.schedule.should_update(0):
                self._undo = _ConstructionUndo.before(self._weights, optimizer)
                self._update(0)
            self.apply_masks()
        except Exception:
            # E.g. a gradient score with no gradient yet at step 0: leave the model clean.
            self._undo = None
            self._detach()
            raise
        if self._undo is not None:
            self._undo.seal()

    # -- masks ---------------------------------------------------------------

    def _mask(self, i: int) -> torch.Tensor:
        layer = self.layers[i]
        return getattr(layer.module, layer.mask_name)

    @property
    def _masks(self) -> list[torch.Tensor]:
        return [self._mask(i) for i in range(len(self.layers))]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-mask of each targeted layer, by qualified module name."""
        return {layer.name: self._mask(i).bool() for i, layer in enumerate(self.layers)}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights in place (one fused multiply over all layers).

        Under a straight-through update the module weight becomes
        ``dense * forward_mask`` instead, the dense shadow staying as it is.
        """
        self._check_live()
        if self._dense is not None:
            self._write_forward_weights(self._step)
        else:
            torch._foreach_mul_(self._weights, self._masks)

    @torch.no_grad()
    def _write_forward_weights(self, step: int) -> None:
        """Straight-through: module weight = dense shadow * the update's forward mask at ``step``."""
        progress = self.schedule.progress(step)
        for w, d, m in zip(self._weights, self._dense, self._masks):
            torch.mul(d, self.method.update.forward_mask(m, progress), out=w)

    def sparsity(self) -> float:
        """Achieved fraction of zeros in the targeted weights' masks."""
        kept = sum(int(m.count_nonzero()) for m in self._masks)
        total = sum(layer.numel for layer in self.layers)
        return 1.0 - kept / total

    # -- gradient masking ----------------------------------------------------

    def _wants_dense_grads(self, step: int) -> bool:
        return self.schedule.should_update(step) and (self.method.score.needs_grad or self.method.update.needs_grad)

    def _grad_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if self._wants_dense_grads(self._step + 1):
                self._dense_grads[i] = param.grad.detach().clone()
            param.grad.mul_(self._mask(i))

        return hook

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        if self._finalized:
            return None
        # args are step()'s positional arguments, the optimizer itself first.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._mask_grads()
            return None
        if self._dense is not None:
            raise SparseforgeError(
                f"{self.method.update} trains dense weights through masked ones and cannot follow an "
                "optimizer.step(closure): compute the loss and backward before optimizer.step()"
            )

        # The closure computes the gradients inside step(), after this hook: mask them as it
        # returns (every call: LBFGS evaluates it several times), or a zero-preserving
        # optimizer would write the pruned weights.
        def masked_closure() -> Any:
            loss = closure()
            self._mask_grads()
            return loss

        return tuple(args[:1]), dict(kwargs, closure=masked_closure)

    @torch.no_grad()
    def _mask_grads(self) -> None:
        if self._dense is not None:
            # Straight-through: the gradient of the masked weight updates the dense one.
            progress = self.schedule.progress(self._step)
            for i, (w, d) in enumerate(zip(self._weights, self._dense)):
                if w.grad is not None:
                    self.method.update.adjust_grad(d, self._mask(i), w.grad, progress)
                w.copy_(d)
            return
        pairs = [(i, w.grad) for i, w in enumerate(self._weights) if w.grad is not None]
        if not pairs:
            return
        if self._wants_dense_grads(self._step + 1):
            for i, g in pairs:
                self._dense_grads[i] = g.detach().clone()
        torch._foreach_mul_([g for _, g in pairs], [self._mask(i) for i, _ in pairs])

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._finalized:
            return
        if self._dense is not None:
            torch._foreach_copy_(self._dense, [w.detach() for w in self._weights])
            # The next forward belongs to the step that step() is about to count: a
            # forward mask that changes with progress (MDGF) must use that step's.
            self._write_forward_weights(self._step + 1)
        else:
            torch._foreach_mul_(self._weights, self._masks)

    # -- the lifecycle ---------------------------------------------------------

    @property
    def current_step(self) -> int:
        """Number of optimizer steps taken so far."""
        return self._step

    def step(self) -> None:
        """Advance one optimizer step: update the masks if the schedule says so, then apply them.

        With an optimizer attached, pruned weights were already kept at zero
        during its step; the masks are applied here only when they changed.
        """
        self._check_live()
        self._undo = None  # from now on the weights are this run's own
        self._step += 1
        if self.schedule.should_update(self._step):
            self._update(self._step)
            self.apply_masks()
        elif self.optimizer is None:
            self.apply_masks()
        if self._dense_grads:
            self._dense_grads.clear()

    @torch.no_grad()
    def _update(self, step: int) -> None:
        sync = collectives.sync_enabled(self.sync_masks)
        if sync and self.optimizer is None and self._dense_grads:
            # The per-weight hooks ran inside backward, before DDP wrote the averaged
            # gradients: average them, so that regrowth reads the whole batch's gradient.
            collectives.average_([self._dense_grads[i] for i in sorted(self._dense_grads)])
        grads: list[torch.Tensor | None] = []
        for i, w in enumerate(self._weights):
            g = self._dense_grads.get(i)
            if g is None and w.grad is not None:
                g = w.grad.detach()
            grads.append(g)
        old = [m.bool() for m in self._masks]
        ctx = UpdateContext(
            layers=self.layers,
            masks=old,
            grads=grads,
            score=self.method.score,
            pattern=self.method.pattern,
            allocation=self.method.allocation,
            sparsity=self.schedule.sparsity(step),
            step=step,
            schedule=self.schedule,
            weights=self._dense,
            total_steps=self.total_steps,
        )
        new = self.method.update(ctx)
        for i, keep in enumerate(new):
            self._mask(i).copy_(keep)
        if sync:
            # Every rank computed these masks from the same inputs; rank 0's win, so
            # that seeds, tie-breaking or reductions differing across ranks cannot
            # make the ranks train different networks.
            collectives.broadcast_masks_(self._masks, [layer.name for layer in self.layers], self.current_step)
        self._mask_optimizer_state()

    @torch.no_grad()
    def _mask_optimizer_state(self) -> None:
        if self.optimizer is None or self._dense is not None:
            return
        for i, w in enumerate(self._weights):
            for value in self.optimizer.state.get(w, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == w.shape:
                    value.mul_(self._mask(i))

    def finalize(self) -> nn.Module:
        """Apply the masks a last time and remove every hook and mask buffer.

        Returns the model: a plain module whose pruned weights are exact zeros
        and whose ``state_dict`` loads into a fresh copy of the architecture.
        Finalizing before the schedule's end, while the model's sparsity is
        still short of the target, warns (the masks are not the method's final
        ones: ISS-P, for one, is dense until its end).
        """
        self._check_live()
        end = int(self.schedule.end if self.schedule.end is not None else self.schedule.start)
        if self._step < end and abs(self.sparsity() - float(self.schedule.final)) > 0.005:
            # Not an error (stopping early is legitimate), but the masks are not the
            # method's final ones; ISS-P, for one, is still dense before its end.
            warnings.warn(
                f"finalize() at step {self._step}, before the schedule's end at step {end}: the model's "
                f"sparsity is {self.sparsity():.4g}, not the target {self.schedule.final:g}. Train to step "
                f"{end} first, or build the method with an earlier end",
                stacklevel=2,
            )
        if self._dense is not None:
            # The hard mask, whatever a straight-through update let through during training.
            with torch.no_grad():
                for w, d, m in zip(self._weights, self._dense, self._masks):
                    torch.mul(d, m, out=w)
        else:
            self.apply_masks()
        self._detach()
        self._finalized = True
        self._dense = None
        self._undo = None
        return self.model

    def _detach(self) -> None:
        """Remove every hook and mask buffer this Sparsifier attached."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers:
            if hasattr(layer.module, layer.mask_name):
                delattr(layer.module, layer.mask_name)
        collectives.restore_ddp_sync(self.model, self._mask_fqns())

    def _mask_fqns(self) -> list[str]:
        """Qualified names of the mask buffers, relative to the model."""
        return [f"{layer.name}.{layer.mask_name}" if layer.name else layer.mask_name for layer in self.layers]

    def _check_live(self) -> None:
        if self._finalized:
            raise SparseforgeError("this Sparsifier was finalized; create a new one to keep sparsifying")

    # -- checkpointing -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks (boolean, by layer name), step, and the method's RNG/state."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "masks": {layer.name: self._mask(i).bool().clone() for i, layer in enumerate(self.layers)},
            "score": self.method.score.state_dict(),
            "update": self.method.update.state_dict(),
            "method": self.method.describe(),
            "dense": None if self._dense is None else {
                layer.name: d.clone() for layer, d in zip(self.layers, self._dense)
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the layer names and shapes must match."""
        self._check_live()
        if state.get("version") != STATE_VERSION:
            raise SparseforgeError(
                f"Sparsifier state version {state.get('version')!r} is not {STATE_VERSION}; "
                "it was written by another sparseforge version"
            )
        for layer, w in zip(self.layers, self._weights):
            if getattr(layer.module, layer.param_name) is not w:
                raise SparseforgeError(
                    f"{layer.name}.{layer.param_name} is no longer the tensor this Sparsifier masks (was it "
                    "replaced, e.g. by load_state_dict(..., assign=True)?): build the Sparsifier after "
                    "loading the model, or load without assign=True"
                )
        masks = state["masks"]
        names = [layer.name for layer in self.layers]
        if sorted(masks) != sorted(names):
            missing = sorted(set(names) - set(masks))
            extra = sorted(set(masks) - set(names))
            raise SparseforgeError(f"Sparsifier state does not match the model: missing {missing}, unexpected {extra}")
        for i, layer in enumerate(self.layers):
            mask = masks[layer.name]
            if mask.shape != layer.shape:
                raise SparseforgeError(
                    f"mask of {layer.name} has shape {tuple(mask.shape)}, the weight {tuple(layer.shape)}"
                )
        dense = state.get("dense")
        if self._dense is not None and dense is None:
            raise SparseforgeError("this Sparsifier trains dense shadow weights but the state has none")
        if self._undo is not None:
            # Built on the checkpoint's weights (and optimizer state) and resumed before any
            # step: undo what the fresh mask update at construction did to them, so that
            # both orders of resuming give the same, uninterrupted run.
            self._undo.restore()
            self._undo = None
        for i, layer in enumerate(self.layers):
            self._mask(i).copy_(masks[layer.name])
        if self._dense is not None:
            for layer, d in zip(self.layers, self._dense):
                d.copy_(dense[layer.name])
        self._step = int(state["step"])
        self.method.score.load_state_dict(state.get("score", {}))
        self.method.update.load_state_dict(state.get("update", {}))
        self.apply_masks()


class _ConstructionUndo:
    """What a Sparsifier's mask update at construction changed, to undo it when a state is loaded.

    Building a Sparsifier runs the method's update at step 0 (RigL and SET draw
    their initial masks, ISS-P shrinks, GMP at step 0 prunes), which zeroes or
    rescales weights and masks the optimizer's state in place. When the
    Sparsifier is built on a checkpoint's weights and its own state is loaded
    next, that update destroyed weights the checkpoint's masks keep. Kept:
    copies of the targeted weights and of their same-shape optimizer state
    from just before the update, and each tensor's version counter just after
    construction. :meth:`restore` copies back only the tensors nothing has
    written since (a ``model.load_state_dict`` after construction bumps the
    weights' versions; ``optimizer.load_state_dict`` replaces its state
    tensors), so the documented order (build, then load everything) is
    unchanged. Held until the first :meth:`Sparsifier.step`: at most one copy
    of the targeted weights plus their optimizer state, freed then.
    """

    def __init__(self, weights: list[torch.Tensor], saved: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer | None,
                 state: list[tuple[torch.Tensor, str, torch.Tensor, torch.Tensor]]) -> None:
        self.weights = weights
        self.saved = saved
        self.optimizer = optimizer
        self.state = state  # (weight, state key, the state tensor now, its copy)
        self.versions: list[int] = []
        self.state_versions: list[int] = []

    @classmethod
    @torch.no_grad()
    def before(cls, weights: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> _ConstructionUndo:
        state = []
        if optimizer is not None:
            for w in weights:
                for key, value in optimizer.state.get(w, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == w.shape:
                        state.append((w, key, value, value.clone()))
        return cls(list(weights), [w.detach().clone() for w in weights], optimizer, state)

    def seal(self) -> None:
        """Record the versions the tensors have once construction is done."""
        self.versions = [w._version for w in self.weights]
        self.state_versions = [t._version for _, _, t, _ in self.state]

    @torch.no_grad()
    def restore(self) -> None:
        for w, saved, version in zip(self.weights, self.saved, self.versions):
            if w._version == version:
                w.copy_(saved)
        for (w, key, tensor, saved), version in zip(self.state, self.state_versions):
            # optimizer.load_state_dict replaces the state dict and its tensors: then it is not ours to undo
            if self.optimizer.state.get(w, {}).get(key) is tensor and tensor._version == version:
                tensor.copy_(saved)
