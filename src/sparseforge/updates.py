"""What happens at a mask update: the ``Update`` part, and the mask selection every
update and one-shot pruning share.

:func:`select_masks` is the one place where scores, an allocation and a
pattern become masks: for the Sparsifier's updates and for one-shot pruning
alike, data-free scores, gradient scores and activation-aware ones (Wanda),
unstructured, N:M, blocks and channels. An :class:`Update` decides which
scores to hand it and what else changes at an update step (hard pruning here;
prune-and-regrow and soft shrinkage are further updates built on the same
call; SparseGPT's reconstruction of the kept weights,
:class:`sparseforge.oneshot.obs.OBSReconstruction`, is one too).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from sparseforge.allocation import Allocation, Uniform
from sparseforge.errors import SparseforgeError
from sparseforge.patterns import NM, Pattern
from sparseforge.registry import Registry
from sparseforge.schedules import Schedule
from sparseforge.scores import Random, Score, as_score
from sparseforge.targets import Layer

UPDATES: Registry[type[Update]] = Registry("update")
"""Update names -> classes; ``as_update(name)`` builds one with its defaults."""


def check_compatible(layers: Sequence[Layer], pattern: Pattern, allocation: Allocation) -> None:
    """Raise a clear error when the pattern cannot apply to a layer or to the allocation."""
    if pattern.model_level:
        raise SparseforgeError(
            f"pattern {pattern} prunes a model's dependency groups at once: use sparseforge.prune(model, score, "
            f"sparsity, pattern={str(pattern)!r}); to keep such channels pruned while training, call the returned "
            "report's apply(model) after each optimizer step"
        )
    for layer in layers:
        pattern.check(layer.shape, layer.name)
    if not pattern.free_sparsity and not isinstance(allocation, Uniform):
        raise SparseforgeError(
            f"pattern {pattern} fixes every layer's sparsity, so the allocation must be 'uniform', "
            f"not {type(allocation).__name__}"
        )


def select_masks(
    layers: Sequence[Layer],
    scores: Sequence[torch.Tensor],
    pattern: Pattern,
    allocation: Allocation,
    sparsity: float,
    sparsities: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Boolean keep-masks: split ``sparsity`` over the layers, then keep each layer's top scores.

    Args:
        layers: the targeted layers.
        scores: one score tensor per layer, shaped like its weight (higher = keep).
        pattern: the shape of the zeros (for a score compared within rows, the
            pattern's :meth:`~sparseforge.patterns.Pattern.within_rows` form).
        allocation: how the model-level sparsity is split over layers.
        sparsity: fraction of all targeted weights to prune, in [0, 1).
        sparsities: each layer's sparsity, when the allocation was made already
            (one-shot pruning layer by layer allocates once, on the dense model,
            before the first layer is pruned); ``allocation`` is then not asked again.
    """
    if sparsities is None:
        names = [layer.name for layer in layers]
        shapes = [layer.shape for layer in layers]
        sparsities = allocation.allocate(names, shapes, sparsity, scores if allocation.needs_scores else None, pattern)
    return [pattern.mask(score, s) for score, s in zip(scores, sparsities)]


@dataclass
class UpdateContext:
    """What an update sees at a mask update step.

    ``masks`` are the current boolean keep-masks; ``grads`` the dense loss
    gradients of the weights at this step (None when no score or update asked
    for them); ``sparsity`` the model-level sparsity the schedule asks for now.
    One-shot pruning with calibration data also gives ``stats``, each layer's
    input statistics (:class:`~sparseforge.oneshot.calibration.LayerStats`,
    what the score's and update's ``needs_activations``/``needs_hessian``
    asked for), ``sparsities``, each layer's share already allocated, and in
    ``weights`` each layer's ``[out, fan_in]`` matrix (a copy that an update
    may rewrite in place, as SparseGPT's reconstruction does; the caller
    writes it back, masked).
    """

    layers: Sequence[Layer]
    masks: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor | None]
    score: Score
    pattern: Pattern
    allocation: Allocation
    sparsity: float
    step: int
    schedule: Schedule | None = None
    weights: Sequence[torch.Tensor] | None = None
    total_steps: int | None = None
    stats: Sequence[Any] | None = None
    sparsities: Sequence[float] | None = None

    @property
    def is_first(self) -> bool:
        """Whether this is the schedule's first update (the initial mask)."""
        return self.schedule is None or self.step <= int(self.schedule.start)

    @property
    def is_last(self) -> bool:
        """Whether this is the schedule's last update (at its ``end``): the masks the run keeps."""
        if self.schedule is None:
            return True
        end = self.schedule.end if self.schedule.end is not None else self.schedule.start
        return self.step >= int(end)

    @property
    def trains_after(self) -> bool:
        """Whether any optimizer step follows this update (False at the run's last step)."""
        return self.total_steps is None or self.step < int(self.total_steps)

    @property
    def progress(self) -> float:
        """Position of this update between the schedule's start (0) and end (1)."""
        return 1.0 if self.schedule is None else self.schedule.progress(self.step)

    def weight(self, i: int) -> torch.Tensor:
        """The weight of layer ``i`` that scores read: the dense shadow under straight-through updates."""
        return (self.weights[i] if self.weights is not None else self.layers[i].weight).detach()

    def stat(self, i: int) -> Any:
        """Layer ``i``'s calibration statistics, or None outside calibrated one-shot pruning."""
        return self.stats[i] if self.stats is not None else None

    def scores(self) -> list[torch.Tensor]:
        return [self.score.evaluate(self.weight(i), g, self.stat(i)) for i, g in enumerate(self.grads)]


class Update(ABC):
    """Base class: turns an :class:`UpdateContext` into new boolean keep-masks.

    A *straight-through* update (``straight_through = True``) trains dense
    weights that the forward pass sees masked: the Sparsifier keeps a dense
    shadow of each weight, writes ``dense * forward_mask(mask)`` into the
    module for the forward and backward passes, lets the optimizer update the
    dense shadow with the gradient of the masked weight (after
    :meth:`adjust_grad`), and scores read the dense shadow.
    """

    #: whether the update itself needs the dense gradients (e.g. gradient regrowth).
    needs_grad: bool = False
    #: whether the update reads the layers' input feature norms on calibration data (one-shot only).
    needs_activations: bool = False
    #: whether the update reads the layers' input Gram matrices on calibration data (one-shot only: SparseGPT).
    needs_hessian: bool = False
    #: whether the optimizer updates dense weights that the forward sees masked (SR-STE).
    straight_through: bool = False

    def forward_mask(self, mask: torch.Tensor, progress: float) -> torch.Tensor:
        """The multiplier the forward pass applies to the dense weight (straight-through only)."""
        return mask

    def adjust_grad(self, dense: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, progress: float) -> None:
        """Modify, in place, the gradient the optimizer applies to the dense weight (straight-through only)."""

    @abstractmethod
    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@UPDATES.register("hard-prune")
@dataclass
class HardPrune(Update):
    """Prune to the scheduled sparsity by score; the pruned weights become exact zeros.

    Rule: new mask = the top scores under the allocation and pattern. With
    ``monotone=True`` (default) a weight once pruned stays pruned: its score is
    set to -inf before selection, as in gradual magnitude pruning, where
    sparsity only grows. ``init``, when given, replaces the method's score at
    the schedule's first update (e.g. a random initial mask for sparse
    training from scratch).
    """

    monotone: bool = True
    init: Score | str | None = None

    def __post_init__(self) -> None:
        self.init = None if self.init is None else as_score(self.init)

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        if ctx.is_first and self.init is not None:
            scores = [self.init(ctx.weight(i), g) for i, g in enumerate(ctx.grads)]
        else:
            scores = ctx.scores()
        if self.monotone:
            scores = [s.masked_fill(~m, -math.inf) for s, m in zip(scores, ctx.masks)]
        return select_masks(ctx.layers, scores, ctx.pattern, ctx.allocation, ctx.sparsity, ctx.sparsities)

    def state_dict(self) -> dict[str, Any]:
        return {"init": self.init.state_dict()} if self.init is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.init is not None and "init" in state:
            self.init.load_state_dict(state["init"])

    def __str__(self) -> str:
        return "hard-prune" if self.init is None else f"hard-prune(init={self.init})"


def as_update(spec: Update | str | None) -> Update:
    """An Update, or one built with its defaults from a name of :data:`UPDATES` (None: hard pruning).

    >>> as_update("soft-shrink")
    SoftShrink(shrink=0.95)
    """
    if spec is None:
        return HardPrune()
    if isinstance(spec, Update):
        return spec
    return UPDATES.get(str(spec))()


def cosine_drop_fraction(initial: float, progress: float) -> float:
    """RigL's annealing: ``initial / 2 * (1 + cos(pi * progress))``, from ``initial`` to 0."""
    return initial / 2.0 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@UPDATES.register("prune-regrow")
@dataclass
class PruneRegrow(Update):
    """Drop the weakest active weights and grow as many inactive ones, keeping each layer's sparsity.

    Rule, at every update after the first: in each layer with ``n`` active
    weights (groups, for block and channel patterns), drop the
    ``k = floor(f * n)`` active ones with the lowest method score (magnitude),
    then activate the ``k`` highest-``grow``-scored among those inactive after
    the drop. Newly grown weights start at exactly zero (they were pruned, so
    they are zero); a weight dropped and regrown in the same update keeps its
    value (RigL's default). No weight is dropped or grown at an update on the
    run's last step (``total_steps``): what grew there would end untrained, at zero. ``f`` is ``drop_fraction``, annealed with a cosine
    to 0 at the schedule's end when ``anneal="cosine"``. At the first update
    the initial mask is drawn from ``init`` (random, the usual sparse
    initialisation) under the method's allocation; ``init=None`` leaves the
    masks as they are (when a preceding update already set them).

    Presets: SET ("Scalable training of artificial neural networks with
    adaptive sparse connectivity", Mocanu et al. 2018): ``grow="random"``,
    ``anneal="constant"``, ``drop_fraction=0.3``. RigL ("Rigging the Lottery",
    Evci et al. 2020): ``grow="gradient"`` (dense gradient magnitude),
    ``anneal="cosine"``, ``drop_fraction=0.3``.

    Args:
        grow: score of inactive weights to grow: ``random`` or ``gradient``. Default random.
        drop_fraction: f at the start of the schedule. Default 0.3.
        anneal: ``cosine`` or ``constant``. Default cosine.
        init: score of the initial mask; None keeps the incoming masks. Default random.
        seed: seed of the random initial mask (the same mask as ``StaticRandom``
            with this seed and allocation, so runs pair up), and, through an
            independent derived stream, of random growth. Default 0.
    """

    grow: Score | str = "random"
    drop_fraction: float = 0.3
    anneal: str = "cosine"
    init: Score | str | None = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.drop_fraction) <= 1.0:
            raise SparseforgeError(f"drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if self.anneal not in ("cosine", "constant"):
            raise SparseforgeError(f"anneal must be 'cosine' or 'constant', got {self.anneal!r}")
        # The grow stream is derived from the seed rather than seed + 1, so that
        # run seed s's growth never replays run seed s + 1's initial mask.
        grow_seed = int(np.random.SeedSequence([int(self.seed), 1]).generate_state(1)[0])
        self.grow = Random(seed=grow_seed) if self.grow == "random" else as_score(self.grow)
        if self.init == "random":
            self.init = Random(seed=self.seed)
        elif self.init is not None:
            self.init = as_score(self.init)
        self.needs_grad = self.grow.needs_grad

    def fraction(self, ctx: UpdateContext) -> float:
        """The drop fraction at this update."""
        if self.anneal == "constant":
            return float(self.drop_fraction)
        return cosine_drop_fraction(float(self.drop_fraction), ctx.progress)

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        if not ctx.pattern.free_sparsity:
            raise SparseforgeError(f"prune-and-regrow works on unstructured, block and channel patterns, not {ctx.pattern}")
        if ctx.is_first:
            if self.init is None:
                return [m.clone() for m in ctx.masks]
            scores = [self.init(ctx.weight(i), g) for i, g in enumerate(ctx.grads)]
            return select_masks(ctx.layers, scores, ctx.pattern, ctx.allocation, ctx.sparsity)
        if not ctx.trains_after:
            # Weights grown now would never train: they would stay zero, and the
            # model would end below its density (SET's reference code skips the
            # last epoch's evolution for the same reason).
            return [m.clone() for m in ctx.masks]
        f = self.fraction(ctx)
        drop_scores = ctx.scores()
        new_masks = []
        for i, (layer, mask, drop_score, g) in enumerate(zip(ctx.layers, ctx.masks, drop_scores, ctx.grads)):
            grow_score = self.grow(ctx.weight(i), g)
            pattern = ctx.pattern
            active = pattern.group_scores(mask.to(drop_score.dtype)) > 0.5
            n_active = int(active.sum())
            k = int(f * n_active)
            if k == 0:
                new_masks.append(mask.clone())
                continue
            g_drop = pattern.group_scores(drop_score).masked_fill(~active, math.inf)
            dropped = torch.topk(g_drop, k, largest=False).indices
            after_drop = active.clone()
            after_drop[dropped] = False
            g_grow = pattern.group_scores(grow_score).masked_fill(after_drop, -math.inf)
            grown = torch.topk(g_grow, k, largest=True).indices
            keep = after_drop.clone()
            keep[grown] = True
            new_masks.append(pattern.expand(keep, layer.shape))
        return new_masks

    def state_dict(self) -> dict[str, Any]:
        state = {"grow": self.grow.state_dict()}
        if self.init is not None:
            state["init"] = self.init.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grow.load_state_dict(state.get("grow", {}))
        if self.init is not None:
            self.init.load_state_dict(state.get("init", {}))

    def __str__(self) -> str:
        return f"prune-regrow(grow={self.grow}, drop_fraction={self.drop_fraction}, anneal={self.anneal})"


@UPDATES.register("chain")
@dataclass
class Chain(Update):
    """Apply several updates in order, each seeing the masks the previous one chose.

    GraNet, for instance, is ``Chain([HardPrune(), PruneRegrow(grow="gradient", init=None)])``:
    prune to the scheduled sparsity, then drop and regrow at that sparsity.
    """

    updates: Sequence[Update] = ()

    def __post_init__(self) -> None:
        self.needs_grad = any(u.needs_grad for u in self.updates)

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        masks = list(ctx.masks)
        for update in self.updates:
            masks = update(replace(ctx, masks=masks))
        return masks

    def state_dict(self) -> dict[str, Any]:
        return {str(i): u.state_dict() for i, u in enumerate(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, u in enumerate(self.updates):
            u.load_state_dict(state.get(str(i), {}))

    def __str__(self) -> str:
        return " then ".join(str(u) for u in self.updates)


@UPDATES.register("soft-shrink")
@dataclass
class SoftShrink(Update):
    """Shrink the lowest-scored weights by a factor instead of zeroing them; hard mask only at the end.

    This is ISS-P, Iterative Soft Shrinkage-Percentage ("Iterative Soft
    Shrinkage Learning for Efficient Image Super-Resolution", Wang, Wang,
    Zhang, Fu and Tao, ICCV 2023), for training a sparse network from a random
    initialisation.

    Rule, at every update before the schedule's last one (every optimizer
    step in the paper): select the weights hard pruning would remove now, the
    fraction ``s`` = the scheduled sparsity (ISS-P: the target sparsity,
    constant from the start) with the lowest method score (magnitude, |w|)
    under the method's allocation (``uniform`` = the same fraction in every
    layer, the paper's "local" mode) and pattern, and multiply them in place
    by ``shrink`` (alpha): ``w <- alpha * w``. Nothing is masked: the returned
    masks are all ones, so every weight keeps its gradient, and a shrunk
    weight that the gradient grows back above the layer's threshold leaves the
    shrunk set at the next update (the sparse structure keeps changing). At
    the schedule's last update (at ``end``, the paper's K_p) the same
    selection becomes the hard mask: those weights become exact zeros and stay
    pruned for the rest of the run (the paper's fine-tuning stage, K_FT steps
    with the frozen mask). Every update shrinks, including one at step 0
    (before the first optimizer step), which only rescales part of the
    random initialisation.

    The reference code (``basicsr/pruner/ist_pruner.py`` of the authors'
    repository) does this after each optimizer step, per layer, with
    ``--ist_ratio 0.95``, for 100k iterations out of 300k (then 200k of
    fine-tuning with the mask frozen). It shrinks ``ceil(s * n)`` weights of
    a layer of ``n`` (at most 99.5%); here the count is the pattern's usual
    ``round(s * n)``.

    Args:
        shrink: alpha, the factor applied to the selected weights at each
            update, in [0, 1). Default 0.95 (the released training commands).
            ``shrink=0`` is iterative hard thresholding (IHT), the paper's
            hard counterpart: the selected weights are set to zero at each
            update but not masked, so they may grow back.

    Example:
        >>> import torch
        >>> from sparseforge.methods import ISSP
        >>> from sparseforge.sparsifier import Sparsifier
        >>> layer = torch.nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.1, -2.0, 0.3, 4.0]]))
        >>> sp = Sparsifier(layer, ISSP(sparsity=0.5, shrink=0.5, end=2), total_steps=2)
        >>> layer.weight.tolist()  # step 0: the two smallest halved, none zeroed
        [[0.05000000074505806, -2.0, 0.15000000596046448, 4.0]]
        >>> sp.step(); sp.step()  # step 2 is the schedule's end: hard mask
        >>> layer.weight.tolist()
        [[0.0, -2.0, 0.0, 4.0]]
    """

    shrink: float = 0.95

    def __post_init__(self) -> None:
        try:
            value = float(self.shrink)
        except (TypeError, ValueError):
            raise SparseforgeError(f"shrink must be a number in [0, 1), got {self.shrink!r}") from None
        if not 0.0 <= value < 1.0:
            raise SparseforgeError(
                f"shrink must be in [0, 1) (the factor applied to the lowest-magnitude weights; "
                f"0.95 in ISS-P, 0 for iterative hard thresholding), got {self.shrink!r}"
            )
        self.shrink = value

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        keep = select_masks(ctx.layers, ctx.scores(), ctx.pattern, ctx.allocation, ctx.sparsity)
        if ctx.is_last:
            return keep
        with torch.no_grad():
            for layer, k in zip(ctx.layers, keep):
                w = layer.weight
                # A factor tensor (1 where kept, alpha where shrunk) multiplies in one
                # pass; multiplying by exactly 1.0 leaves the kept weights bit-identical.
                one = torch.ones((), dtype=w.dtype, device=w.device)
                w.mul_(torch.where(k, one, one * self.shrink))
        return [torch.ones_like(k) for k in keep]

    def __str__(self) -> str:
        return f"soft-shrink(shrink={self.shrink:g})"


# -- straight-through updates for N:M sparse training: SR-STE, progressive gradient flow --


def _check_nonnegative(value: float, what: str, hint: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SparseforgeError(f"{what} must be a number >= 0 ({hint}), got {value!r}") from None
    if not math.isfinite(out) or out < 0.0:
        raise SparseforgeError(f"{what} must be a finite number >= 0 ({hint}), got {value!r}")
    return out


class StraightThrough(Update):
    """Base of the straight-through updates: masks recomputed from the dense weights.

    Rule: at every update the keep-mask is chosen from the *dense* shadow
    weights by the method's score, allocation and pattern (nothing is
    monotone: a pruned weight that outgrows a kept one comes back); the
    gradient of the masked weight trains the dense one, plus
    ``decay * (1 - E) * W`` when a subclass sets ``decay`` (SR-STE's
    sparse-refined term). Subclasses choose the forward mask.
    """

    straight_through = True
    decay: float = 0.0

    def __post_init__(self) -> None:
        self.decay = _check_nonnegative(self.decay, "decay", "lambda_W, 2e-4 in SR-STE, 0 for plain STE")

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        return select_masks(ctx.layers, ctx.scores(), ctx.pattern, ctx.allocation, ctx.sparsity)

    def adjust_grad(self, dense: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, progress: float) -> None:
        if self.decay:
            grad.addcmul_(dense, 1.0 - mask, value=self.decay)


@UPDATES.register("sr-ste")
@dataclass
class SparseRefinedSTE(StraightThrough):
    """SR-STE: dense weights trained through a mask recomputed from their magnitudes.

    From "Learning N:M Fine-grained Structured Sparse Neural Networks From
    Scratch" (Zhou et al., ICLR 2021). Rule: at every update (every
    ``frequency`` steps of the method's schedule; every step in the paper) the
    mask E is recomputed from the *dense* weights W with the method's score
    (|W|) and pattern (N:M: the N largest of every M consecutive inputs). The
    forward and backward passes see ``W~ = W * E``; the optimizer updates the
    dense weights with the straight-through gradient plus the sparse-refined
    term, which decays only the pruned weights::

        W <- W - lr * (g(W~) + decay * (1 - E) * W)

    where ``g(W~)`` is the loss gradient of the masked weight, applied to the
    dense one as if the mask were the identity. The term is added to the
    gradient the optimizer receives (as the reference code returns it from the
    backward pass), so momentum, weight decay and adaptive optimizers treat it
    like the rest of the gradient. ``decay=0`` is plain STE, the paper's
    baseline. At :meth:`Sparsifier.finalize` the dense weights are multiplied
    by the last mask: exact N:M zeros.

    Args:
        decay: lambda_W, the strength of the sparse-refined term. Default 2e-4 (the paper's).
    """

    decay: float = 2e-4

    def __str__(self) -> str:
        return f"sr-ste(decay={self.decay:g})" if self.decay else "ste"


#: Default decay rates of :class:`MaskDecay`, per unit of schedule progress (see its docstring).
MASK_DECAY_RATES: dict[str, float] = {"linear": 4.0, "exponential": 20.0}


@UPDATES.register("mask-decay")
@dataclass
class MaskDecay(StraightThrough):
    """MDGF, mask-decay gradient flow: pruned weights fade out of the forward pass.

    From "Progressive Gradient Flow for Robust N:M Sparsity Training in
    Transformers" (Bambhaniya et al., 2024). Rule: as in
    :class:`SparseRefinedSTE`, the mask E is recomputed from the dense weights
    at every update, but the forward pass sees ``W~ = W * (E + beta (1 - E))``:
    pruned weights still contribute, scaled by ``beta``, which decays from 1 to
    0 with the schedule's progress p (0 at its ``start``, 1 at its ``end``)::

        linear:       beta(p) = max(0, 1 - rate * p)
        exponential:  beta(p) = exp(-rate * p)

    and ``beta = 0`` (a binary mask, the paper's fine-tuning phase) once
    ``p >= 1 - fine_tune``. Before the schedule's start the masks are all ones
    (the paper's dense phase). The reference code
    (``timm/sparse_pruning/sparse_functions.py`` in the authors' repository)
    applies the same formulas to the step count t since the end of the dense
    phase with a per-step coefficient ``alpha`` (2e-4 by default); here the
    rate is per unit of progress, so a run of T sparse steps matches
    ``alpha`` with ``rate = alpha * T``. The reference backward pass hands
    the gradient of ``W~`` to the dense weights unchanged (straight-through,
    ``scale_grad=False``, the default); with ``scale_grad=True`` it is
    multiplied by the forward mask, ``g(W~) * (E + beta (1 - E))``, the exact
    gradient of the product, so the pruned weights' gradient fades with their
    forward contribution. ``decay`` adds SR-STE's term (0 in the paper's MDGF).

    Args:
        curve: ``"exponential"`` (MDGF-Exponential, the paper's best) or ``"linear"``.
        rate: decay per unit of progress; default 20 for exponential (beta is 1%
            at 23% of the sparse phase) and 4 for linear (beta reaches 0 at 25%).
        scale_grad: multiply the dense weights' gradient by the forward mask. Default False.
        fine_tune: last fraction of the schedule trained with beta = 0. Default 0.
        decay: SR-STE's lambda_W added to the pruned weights' gradient. Default 0.

    Example:
        >>> u = MaskDecay("linear", rate=2.0)
        >>> [u.beta(p) for p in (0.0, 0.25, 0.5, 1.0)]
        [1.0, 0.5, 0.0, 0.0]
        >>> u.forward_mask(torch.tensor([1.0, 0.0]), 0.25).tolist()
        [1.0, 0.5]
    """

    curve: str = "exponential"
    rate: float | None = None
    scale_grad: bool = False
    fine_tune: float = 0.0
    decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.curve = str(self.curve).strip().lower()
        if self.curve not in MASK_DECAY_RATES:
            raise SparseforgeError(f"mask decay curve must be one of {sorted(MASK_DECAY_RATES)}, got {self.curve!r}")
        if self.rate is None:
            self.rate = MASK_DECAY_RATES[self.curve]
        self.rate = _check_nonnegative(self.rate, "rate", "the decay of beta per unit of schedule progress")
        self.fine_tune = _check_fraction(self.fine_tune, "fine_tune")

    def beta(self, progress: float) -> float:
        """The factor applied to the pruned weights in the forward pass at ``progress``."""
        p = min(max(float(progress), 0.0), 1.0)
        if self.fine_tune > 0.0 and p >= 1.0 - self.fine_tune:
            return 0.0
        if self.curve == "linear":
            return max(0.0, 1.0 - self.rate * p)
        return math.exp(-self.rate * p)

    def forward_mask(self, mask: torch.Tensor, progress: float) -> torch.Tensor:
        b = self.beta(progress)
        if b == 0.0:
            return mask
        # mask + b (1 - mask): exactly 1 where kept (no rounding of 1 - b + b).
        return torch.add(mask, 1.0 - mask, alpha=b)

    def adjust_grad(self, dense: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, progress: float) -> None:
        if self.scale_grad:
            grad.mul_(self.forward_mask(mask, progress))
        super().adjust_grad(dense, mask, grad, progress)

    def __str__(self) -> str:
        extra = (", scaled-grad" if self.scale_grad else "") + (f", decay={self.decay:g}" if self.decay else "")
        return f"mask-decay({self.curve}, rate={self.rate:g}{extra})"


def _check_fraction(value: float, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SparseforgeError(f"{what} must be a fraction in [0, 1), got {value!r}") from None
    if not 0.0 <= out < 1.0:
        raise SparseforgeError(f"{what} must be a fraction in [0, 1) of the schedule, got {value!r}")
    return out


@UPDATES.register("structure-decay")
@dataclass
class StructureDecay(StraightThrough):
    """SDGF, structure-decay gradient flow: the N:M pattern tightens in steps.

    From "Progressive Gradient Flow for Robust N:M Sparsity Training in
    Transformers" (Bambhaniya et al., 2024). Rule: the schedule's sparse phase
    (progress 0 to ``1 - fine_tune``) is cut into ``len(frames)`` equal parts;
    during part k the mask, recomputed from the dense weights at every update
    as in :class:`SparseRefinedSTE` (binary, straight-through gradient), keeps
    ``frames[k] = (N_k, M_k)``: the N_k largest |W| of every M_k consecutive
    inputs. The last frame holds from its start to the end of the run (it
    should be the method's pattern). The paper's schedules, for a target N:M
    (see :func:`~sparseforge.methods.ProgressiveNM`): SDGF-Stepwise
    ``(M-1):M, M/2:M, M/4:M, ..., N:M`` (1:8: 7:8, 4:8, 2:8, 1:8) and
    SDGF-Geometric ``8N:8M, 4N:4M, 2N:2M, N:M`` (1:8: 8:64, 4:32, 2:16, 1:8).
    Every frame's M must divide every targeted layer's input dimension; this is
    checked at each update, naming the layer.

    Args:
        frames: the (N, M) of each part, loosest first.
        fine_tune: last fraction of the schedule at the final frame only. Default 0.
        decay: SR-STE's lambda_W added to the pruned weights' gradient. Default 0 (as in the paper).
    """

    frames: Sequence[tuple[int, int]] = ()
    fine_tune: float = 0.0
    decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fine_tune = _check_fraction(self.fine_tune, "fine_tune")
        try:
            frames = tuple((int(n), int(m)) for n, m in self.frames)
        except (TypeError, ValueError):
            raise SparseforgeError(f"frames must be a list of (N, M) pairs, got {self.frames!r}") from None
        if not frames:
            raise SparseforgeError("structure decay needs at least one (N, M) frame, e.g. [(4, 8), (2, 8), (1, 8)]")
        self.frames = frames
        self.patterns = [NM(n, m) for n, m in frames]

    def frame(self, progress: float) -> int:
        """Index of the frame in force at ``progress``."""
        k = len(self.frames)
        span = 1.0 - self.fine_tune
        p = min(max(float(progress), 0.0), 1.0)
        return min(int(p / span * k), k - 1)

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        for layer in ctx.layers:
            for pattern in self.patterns:
                pattern.check(layer.shape, layer.name)
        pattern = self.patterns[self.frame(ctx.progress)]
        return [pattern.mask(score) for score in ctx.scores()]

    def __str__(self) -> str:
        frames = "->".join(f"{n}:{m}" for n, m in self.frames)
        return f"structure-decay({frames}" + (f", decay={self.decay:g})" if self.decay else ")")
