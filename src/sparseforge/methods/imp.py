"""Iterative magnitude pruning with rewinding: lottery tickets.

IMP is a driver over whole training runs, not a per-step update, so it is a
small object built on the shared parts rather than a :class:`Method`: the
pruning is :func:`~sparseforge.updates.select_masks` on magnitude scores with
an allocation (global by default), and each retraining is a
:class:`~sparseforge.Sparsifier` under the :func:`FixedMask` method.

What it finds is a :class:`Ticket`: a mask plus the weights to start from
(the rewind point). The mask, the rewind point and the retraining are
separate on purpose: one ticket can be retrained several times with
different seeds or data orders, and since every retraining keeps the same
mask, the results average without losing sparsity (sparse model soups).

Typical use, with your own training loop::

    imp = IMP(rate=0.2, rewind_step=500)
    model = make_model()
    imp.start(model)                      # saves the rewind point now if rewind_step == 0
    train(model, on_step=imp.observe)     # call imp.observe(step, model) after each optimizer step
    for _ in range(8):
        imp.prune_round(model)            # prune 20% of the remaining weights, globally by magnitude
        ticket = imp.ticket()             # (masks, rewind state)
        ticket.apply(model)               # rewind: kept weights back to step k, pruned ones zero
        train(model, method=ticket.method(), start_step=imp.rewind_step)

or :meth:`IMP.run` with a ``train_fn`` that does the same, controls included.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparseforge.allocation import Allocation, Explicit, as_allocation
from sparseforge.errors import SparseforgeError
from sparseforge.method import Method
from sparseforge.methods.fixed import FixedMask
from sparseforge.patterns import Unstructured
from sparseforge.scores import Magnitude, Random
from sparseforge.targets import Layer, Target, as_target
from sparseforge.updates import select_masks

if TYPE_CHECKING:
    from sparseforge.sparsifier import Sparsifier

StepCallback = Callable[[int, nn.Module], None]
"""``on_step(step, model)``: called after every optimizer step with the number of steps taken so far."""

TrainFn = Callable[[nn.Module, Method | None, int, StepCallback | None], Mapping[str, Any]]
"""``train_fn(model, method, start_step, on_step) -> metrics``, what :meth:`IMP.run` trains with.

It trains ``model`` in place: under a ``Sparsifier(model, method, ...)`` when
``method`` is given (a :func:`FixedMask` ticket; finalize it at the end) and
dense when it is None; it starts at step ``start_step`` of the run (the
learning-rate schedule and data order continue from there, as when a ticket
rewound to step k is retrained for the remaining steps); it calls
``on_step(step, model)`` after every optimizer step when ``on_step`` is not
None; and it returns a mapping of metrics (e.g. test accuracy) that IMP
stores as they are.
"""

CONTROLS: tuple[str, ...] = ("reinit", "random")
"""The two controls of the lottery ticket paper: same mask with a fresh
initialisation, and a random mask of the same per-layer sizes."""


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _control_seed(seed: int, round_: int, kind: str) -> int:
    # Distinct, reproducible seeds per (run seed, round, control): the controls of
    # different rounds must not share an initialisation or a random mask by accident.
    return (int(seed) * 1_000_003 + round_ * 1_009 + CONTROLS.index(kind) * 7 + 12_345) % (2**63)


def _check_layers(layers: Sequence[Layer], masks: Mapping[str, torch.Tensor], what: str) -> None:
    names = [layer.name for layer in layers]
    if sorted(names) != sorted(masks):
        missing = sorted(set(masks) - set(names))
        extra = sorted(set(names) - set(masks))
        raise SparseforgeError(
            f"{what}: the model's targeted layers do not match the ticket's masks "
            f"(masks for layers the model lacks: {missing}; targeted layers without a mask: {extra})"
        )
    for layer in layers:
        if tuple(layer.shape) != tuple(masks[layer.name].shape):
            raise SparseforgeError(
                f"{what}: {layer.name} has shape {tuple(layer.shape)}, its mask {tuple(masks[layer.name].shape)}"
            )


@dataclass
class Ticket:
    """A sparse subnetwork to train: keep-masks plus the weights to start from.

    Args:
        masks: boolean keep-mask of each targeted layer, by qualified name.
        state: a full ``state_dict`` of the model to start from (the rewind
            point; biases and buffers included). It holds the dense values:
            :meth:`apply` zeroes the pruned weights, and the random-mask
            control reads the values where its mask differs.
        target: the Target the masks were chosen over. Default every Linear/Conv weight.
        rewind_step: the training step ``state`` was taken at (k). Default 0.
        round: the IMP round that produced the mask (0 = dense). Default 0.
        kind: ``"imp"`` (a winning-ticket candidate), ``"reinit"`` or ``"random"`` (controls).

    Tickets are values: they share tensors with the IMP that made them and
    must not be modified in place.
    """

    masks: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]
    target: Target = field(default_factory=Target)
    rewind_step: int = 0
    round: int = 0
    kind: str = "imp"

    def __post_init__(self) -> None:
        if not self.masks:
            raise SparseforgeError("a Ticket needs at least one mask")
        self.masks = {name: m.detach() != 0 for name, m in self.masks.items()}
        self.target = as_target(self.target)

    @property
    def counts(self) -> dict[str, int]:
        """Number of kept weights in each layer."""
        return {name: int(m.sum()) for name, m in self.masks.items()}

    @property
    def density(self) -> float:
        """Fraction of the targeted weights kept."""
        return sum(self.counts.values()) / sum(m.numel() for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the targeted weights pruned."""
        return 1.0 - self.density

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Load the rewind state into ``model`` and zero its pruned weights; returns ``model``.

        The model stays a plain module (no masks attached): train it under
        :meth:`method` (or :meth:`sparsifier`) to keep the pruned weights zero.
        """
        layers = self.target.select(model)
        _check_layers(layers, self.masks, "Ticket.apply")
        try:
            model.load_state_dict(self.state)
        except RuntimeError as e:
            raise SparseforgeError(f"the ticket's rewind state does not fit this model: {e}") from None
        for layer in layers:
            layer.weight.mul_(self.masks[layer.name].to(device=layer.weight.device, dtype=layer.weight.dtype))
        return model

    def method(self) -> Method:
        """The fixed-mask method that keeps this ticket's mask during training."""
        return FixedMask(self.masks, target=self.target, name=f"{self.kind}-round{self.round}")

    def sparsifier(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, total_steps: int | None = None
    ) -> Sparsifier:
        """:meth:`apply` the ticket to ``model`` and attach a Sparsifier that keeps its mask.

        This starts a round: the model is rewound. To resume a round from a checkpoint, attach
        ``Sparsifier(model, ticket.method(), ...)`` and load the model, optimizer and Sparsifier
        states (in either order) instead.
        """
        from sparseforge.sparsifier import Sparsifier  # late: the sparsifier imports the methods package

        self.apply(model)
        return Sparsifier(model, self.method(), total_steps=total_steps, optimizer=optimizer)

    def reinit(self, model: nn.Module) -> Ticket:
        """Control (a) of the lottery ticket paper: the same mask, a fresh initialisation.

        Rule: keep the masks, replace the rewind state by ``model``'s current
        state, which must be a freshly initialised copy of the architecture
        (a new draw from the initialisation distribution, whatever k is).
        """
        layers = self.target.select(model)
        _check_layers(layers, self.masks, "Ticket.reinit")
        return replace(self, state=_clone_state(model), kind="reinit")

    def random_mask(self, seed: int = 0, model: nn.Module | None = None) -> Ticket:
        """Control (b): a uniformly random mask with the same number of kept weights in every layer.

        Rule: in each layer keep ``counts[layer]`` weights chosen uniformly at
        random (a seeded :class:`~sparseforge.scores.Random` score, top-k per
        layer). The starting weights are this ticket's rewind state (the same
        initialisation, so only the choice of connections differs) unless a
        freshly initialised ``model`` is given, whose state is used instead.

        Args:
            seed: seed of the random mask. Default 0.
            model: a fresh model to take the initialisation from. Default None: the rewind state.
        """
        score = Random(seed=seed)
        pattern = Unstructured()
        masks = {}
        for name, keep in self.masks.items():
            kept = int(keep.sum())
            # sparsity (n - kept) / n prunes exactly round(n - kept) weights: the same count.
            masks[name] = pattern.mask(score(keep.float()), 1.0 - kept / keep.numel())
        state = self.state
        if model is not None:
            _check_layers(self.target.select(model), self.masks, "Ticket.random_mask")
            state = _clone_state(model)
        return replace(self, masks=masks, state=state, kind="random")

    def state_dict(self) -> dict[str, Any]:
        """Masks, rewind state and labels as plain tensors and numbers (for ``torch.save``).

        The target is not included: pass the same one to :meth:`from_state_dict`.
        """
        return {"masks": dict(self.masks), "state": dict(self.state), "rewind_step": self.rewind_step,
                "round": self.round, "kind": self.kind}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], target: Target | Sequence[str] | str | None = None) -> Ticket:
        """Rebuild a ticket from :meth:`state_dict`."""
        try:
            return cls(masks=dict(state["masks"]), state=dict(state["state"]), target=as_target(target),
                       rewind_step=int(state.get("rewind_step", 0)), round=int(state.get("round", 0)),
                       kind=str(state.get("kind", "imp")))
        except (KeyError, TypeError) as e:
            raise SparseforgeError(f"not a Ticket state dict (needs 'masks' and 'state'): {e}") from None


@dataclass
class IMPRound:
    """One round of :meth:`IMP.run`: the ticket, what training it gave, and the controls."""

    round: int
    density: float
    ticket: Ticket
    metrics: dict[str, Any]
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)
    control_tickets: dict[str, Ticket] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The numbers, without tensors (for JSON)."""
        return {"round": self.round, "density": self.density, "counts": self.ticket.counts,
                "metrics": self.metrics, "controls": self.controls}


@dataclass
class IMPResult:
    """What :meth:`IMP.run` returns: the dense run's metrics and one :class:`IMPRound` per round."""

    dense: dict[str, Any]
    rounds: list[IMPRound]

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense, "rounds": [r.to_dict() for r in self.rounds]}


class IMP:
    """Iterative magnitude pruning with rewinding: find lottery tickets.

    Rule ("The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
    Networks", Frankle and Carbin 2019; rewinding to step k from "Stabilizing
    the Lottery Ticket Hypothesis" / "Linear Mode Connectivity and the
    Lottery Ticket Hypothesis", Frankle et al. 2019/2020): train the dense
    network, saving its state at step k; then repeat: prune ``rate`` of the
    weights that remain, by magnitude, across layers as ``allocation`` says;
    rewind the kept weights (and biases, buffers) to their step-k values and
    the pruned ones to zero; retrain from step k under that fixed mask.

    After round r the kept fraction of the targeted weights is ``(1 - rate)^r``
    (exactly ``total - round((1 - (1 - rate)^r) * total)`` weights with the
    global allocation; per layer, to the element, with ``layer_rates``), and
    the masks are nested: a weight pruned once stays pruned (pruned weights
    score -inf, and each new mask is intersected with the old one).

    Args:
        rate: p, the fraction of the remaining weights pruned per round. Default 0.2.
        rounds: rounds of :meth:`run`. Default 8 ((1 - 0.2)^8 = 16.8% of the weights left).
        rewind_step: k, the step of the dense run whose weights tickets start
            from; 0 is the original initialisation (the original LTH). Default 0.
        allocation: how each round's model-level sparsity ``1 - (1 - rate)^r`` is
            split over layers: ``"global"`` (default; one magnitude threshold over
            all layers, at least ``min_keep`` kept per layer: pass
            ``Global(min_keep=...)``), ``"uniform"`` (every layer pruned at ``rate``:
            the LTH paper's layer-wise pruning), ``"lamp"``, ``"erk"`` or an Allocation.
        layer_rates: ``{name glob: rate}``: layers matching a glob are pruned at
            their own rate per round (of their own remaining weights) and left out
            of the allocation; e.g. ``{"fc3": 0.1}`` prunes the output layer at
            half the rate, as the LTH paper does. Default None.
        target: which tensors. Default every Linear/Conv weight.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))
        >>> imp = IMP(rate=0.2)
        >>> imp.start(model)
        >>> # ... train the model here ...
        >>> masks = imp.prune_round(model)
        >>> imp.ticket().density, round(imp.sparsity(1), 3)
        (0.8, 0.2)
        >>> imp.ticket().apply(model) is model
        True
    """

    def __init__(
        self,
        rate: float = 0.2,
        rounds: int = 8,
        rewind_step: int = 0,
        allocation: Allocation | str = "global",
        layer_rates: Mapping[str, float] | None = None,
        target: Target | Sequence[str] | str | None = None,
    ) -> None:
        self.rate = self._check_rate(rate, "rate")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise SparseforgeError(f"rounds must be a positive integer, got {rounds!r}")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise SparseforgeError(f"rewind_step must be an integer >= 0 (a training step), got {rewind_step!r}")
        self.rounds = rounds
        self.rewind_step = rewind_step
        self.allocation = as_allocation(allocation)
        if isinstance(allocation, Mapping) or isinstance(self.allocation, Explicit):
            raise SparseforgeError("IMP prunes a fraction of what remains each round; for per-layer rates "
                                   "use layer_rates={glob: rate}, not an explicit allocation")
        self.layer_rates = {str(g): self._check_rate(r, f"layer_rates[{g!r}]") for g, r in (layer_rates or {}).items()}
        self.target = as_target(target)
        self.round = 0
        self._names: list[str] | None = None
        self._masks: dict[str, torch.Tensor] | None = None
        self._rewind_state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _check_rate(rate: float, what: str) -> float:
        try:
            value = float(rate)
        except (TypeError, ValueError):
            raise SparseforgeError(f"{what} must be a number in (0, 1), got {rate!r}") from None
        if not 0.0 < value < 1.0:
            raise SparseforgeError(f"{what} must be in (0, 1) (the fraction of remaining weights pruned "
                                   f"per round), got {rate!r}")
        return value

    def sparsity(self, round_: int, rate: float | None = None) -> float:
        """Model-level sparsity after ``round_`` rounds: ``1 - (1 - rate)^round``."""
        return 1.0 - (1.0 - (self.rate if rate is None else rate)) ** round_

    # -- the state ---------------------------------------------------------------

    def start(self, model: nn.Module) -> None:
        """Begin on a freshly initialised ``model``: all weights kept, round 0.

        Saves the rewind point now when ``rewind_step`` is 0; otherwise
        :meth:`observe` saves it during the dense run.
        """
        layers = self.target.select(model)
        for glob in self.layer_rates:
            if not any(fnmatch.fnmatchcase(layer.name, glob) for layer in layers):
                raise SparseforgeError(f"layer_rates key {glob!r} matches no targeted layer; layers: "
                                       f"{', '.join(layer.name for layer in layers)}")
        self._names = [layer.name for layer in layers]
        self._masks = {layer.name: torch.ones(layer.shape, dtype=torch.bool, device=layer.weight.device)
                       for layer in layers}
        self.round = 0
        self._rewind_state = _clone_state(model) if self.rewind_step == 0 else None

    def observe(self, step: int, model: nn.Module) -> None:
        """Step callback for the dense run: saves the rewind point when ``step == rewind_step``.

        ``step`` is the number of optimizer steps taken so far.
        """
        if self._rewind_state is None and step == self.rewind_step:
            self.save_rewind_point(model)

    def save_rewind_point(self, model: nn.Module) -> None:
        """Record ``model``'s current state as the rewind point (for loops that do not use :meth:`observe`)."""
        self._require_started()
        self._rewind_state = _clone_state(model)

    @property
    def has_rewind_point(self) -> bool:
        """Whether the step-k state has been saved."""
        return self._rewind_state is not None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current boolean keep-masks, by layer name (copies)."""
        self._require_started()
        return {name: m.clone() for name, m in self._masks.items()}  # type: ignore[union-attr]

    @property
    def density(self) -> float:
        """Fraction of the targeted weights kept by the current masks."""
        self._require_started()
        masks = self._masks.values()  # type: ignore[union-attr]
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    def _require_started(self) -> None:
        if self._masks is None:
            raise SparseforgeError("call IMP.start(model) on the freshly initialised model first")

    # -- one round -----------------------------------------------------------------

    @torch.no_grad()
    def prune_round(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Prune ``rate`` of the remaining weights of the trained ``model``; returns the new masks.

        Scores are the weights' magnitudes, already-pruned weights score -inf
        so they are pruned first, and the new masks are intersected with the
        old ones (nothing pruned comes back). The model itself is not changed:
        :meth:`rewind` or ``ticket().apply(model)`` does that.
        """
        self._require_started()
        layers = self.target.select(model)
        _check_layers(layers, self._masks, "IMP.prune_round")  # type: ignore[arg-type]
        old = [self._masks[layer.name].to(layer.weight.device) for layer in layers]  # type: ignore[index]
        scores = [Magnitude()(layer.weight).float().masked_fill(~m, -math.inf) for layer, m in zip(layers, old)]
        r = self.round + 1
        new = self._select(layers, scores, r)
        self._masks = {layer.name: (n & o) for layer, n, o in zip(layers, new, old)}
        self.round = r
        return self.masks

    def _select(self, layers: list[Layer], scores: list[torch.Tensor], r: int) -> list[torch.Tensor]:
        pattern = Unstructured()
        own = [i for i, layer in enumerate(layers)
               if any(fnmatch.fnmatchcase(layer.name, g) for g in self.layer_rates)]
        rest = [i for i in range(len(layers)) if i not in set(own)]
        out: list[torch.Tensor | None] = [None] * len(layers)
        if rest:
            picked = select_masks([layers[i] for i in rest], [scores[i] for i in rest], pattern,
                                  self.allocation, self.sparsity(r))
            for i, m in zip(rest, picked):
                out[i] = m
        if own:
            # The first matching glob sets a layer's rate (Explicit's rule), compounded over r rounds.
            per_layer = Explicit({g: self.sparsity(r, rate) for g, rate in self.layer_rates.items()
                                  if any(fnmatch.fnmatchcase(layers[i].name, g) for i in own)},
                                 min_keep=self.allocation.min_keep)
            picked = select_masks([layers[i] for i in own], [scores[i] for i in own], pattern, per_layer, 0.0)
            for i, m in zip(own, picked):
                out[i] = m
        return out  # type: ignore[return-value]

    def ticket(self) -> Ticket:
        """The current (masks, rewind state) as a :class:`Ticket`."""
        self._require_started()
        if self._rewind_state is None:
            raise SparseforgeError(
                f"the rewind point (step {self.rewind_step}) has not been saved: pass imp.observe as the "
                "step callback of the dense run (or call save_rewind_point), and train at least that many steps"
            )
        return Ticket(masks=self.masks, state=self._rewind_state, target=self.target,
                      rewind_step=self.rewind_step, round=self.round, kind="imp")

    def rewind(self, model: nn.Module) -> nn.Module:
        """Reset ``model`` to the rewind point under the current masks (``ticket().apply(model)``)."""
        return self.ticket().apply(model)

    # -- the driver ------------------------------------------------------------------

    def run_round(
        self,
        model: nn.Module,
        train_fn: TrainFn,
        *,
        model_factory: Callable[[], nn.Module] | None = None,
        controls: Sequence[str] = (),
        seed: int = 0,
    ) -> IMPRound:
        """One round: prune the trained ``model``, rewind it, retrain it with ``train_fn``, train the controls.

        ``model`` is left trained under the new mask, ready for the next round.
        Controls (``"reinit"``, ``"random"``) train fresh models from
        ``model_factory()`` with the same ``train_fn`` and start step: the
        reinitialised one is drawn under a seed derived from ``seed`` and the
        round; the random mask is drawn with that seed and starts from the
        ticket's rewind state (same initialisation, different connections).
        """
        unknown = [c for c in controls if c not in CONTROLS]
        if unknown:
            raise SparseforgeError(f"unknown IMP control(s) {unknown}; use {list(CONTROLS)}")
        if controls and model_factory is None:
            raise SparseforgeError("the controls train fresh models: pass model_factory")
        self.prune_round(model)
        ticket = self.ticket()
        ticket.apply(model)
        metrics = dict(train_fn(model, ticket.method(), self.rewind_step, None))
        result = IMPRound(round=self.round, density=ticket.density, ticket=ticket, metrics=metrics)
        for kind in controls:
            cseed = _control_seed(seed, self.round, kind)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cseed)
                fresh = model_factory()  # type: ignore[misc]
            control = ticket.reinit(fresh) if kind == "reinit" else ticket.random_mask(seed=cseed)
            control.apply(fresh)
            result.controls[kind] = dict(train_fn(fresh, control.method(), self.rewind_step, None))
            result.control_tickets[kind] = control
        return result

    def run(
        self,
        model_factory: Callable[[], nn.Module],
        train_fn: TrainFn,
        *,
        seed: int = 0,
        controls: Sequence[str] = (),
        rounds: int | None = None,
    ) -> IMPResult:
        """Find tickets end to end: seed, build, train dense, then :meth:`run_round` ``rounds`` times.

        Args:
            model_factory: builds a freshly initialised model (from torch's global RNG).
            train_fn: see :data:`TrainFn`.
            seed: seeds torch's global RNG before the model is built; the controls' seeds derive from it.
            controls: any of ``"reinit"``, ``"random"``: trained at every round. Default none.
            rounds: number of rounds. Default ``self.rounds``.
        """
        torch.manual_seed(seed)
        model = model_factory()
        self.start(model)
        dense = dict(train_fn(model, None, 0, self.observe))
        if self._rewind_state is None:
            raise SparseforgeError(f"the dense run ended before the rewind step {self.rewind_step} "
                                   "(or train_fn did not call on_step): no rewind point")
        n = self.rounds if rounds is None else rounds
        results = [self.run_round(model, train_fn, model_factory=model_factory, controls=controls, seed=seed)
                   for _ in range(n)]
        return IMPResult(dense=dense, rounds=results)

    def __repr__(self) -> str:
        return (f"IMP(rate={self.rate}, rounds={self.rounds}, rewind_step={self.rewind_step}, "
                f"allocation={self.allocation!r}, layer_rates={self.layer_rates or None}, target={self.target!r})")
