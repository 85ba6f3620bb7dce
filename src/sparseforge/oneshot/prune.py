"""One-shot pruning in one call, with or without data: :func:`prune`, the one entry point.

Every one-shot method is the same parts as a training-time method (DESIGN.md):
a Score, a Pattern, an Allocation, an Update and a Target. What a method reads
beyond the weights it says with capability flags, and :func:`prune` gives it
just that:

- nothing (magnitude, random, L1/L2): all targeted layers are scored and
  masked at once, without running the model;
- gradients (``needs_grad``: gradient, SNIP, Taylor): averaged over the
  ``calibration`` batches first, then the same;
- the layers' inputs on calibration data (``needs_activations``: Wanda's
  feature norms; ``needs_hessian``: SparseGPT's ``X^T X``, read by its
  :class:`~sparseforge.oneshot.sparsegpt.OBSReconstruction` update): a
  :class:`~sparseforge.oneshot.calibration.Calibrator` runs the model block by
  block, each block seeing the already pruned blocks before it, and each
  layer is scored, masked and updated on its ``[out, fan_in]`` matrix as its
  statistics arrive. Data-free scores given calibration batches run layer by
  layer the same way (without forward passes), as the papers' magnitude
  baseline does.

In every case :func:`~sparseforge.updates.select_masks` chooses the masks
(Wanda's "compared within rows" is the pattern's per-row form), and the
result is one :class:`~sparseforge.report.PruneReport`. Whole channels with
everything tied to them (dependency groups) are the ``channel-groups``
pattern (:mod:`sparseforge.oneshot.channels`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseforge.allocation import OWL, Allocation, Uniform, as_allocation
from sparseforge.errors import SparseforgeError
from sparseforge.method import Method, default_sparsity
from sparseforge.oneshot.calibration import Calibrator, LayerStats, select_layers, set_weight_matrix, weight_matrix
from sparseforge.oneshot.channels import prune_channel_groups
from sparseforge.oneshot.sparsegpt import SparseGPT
from sparseforge.patterns import NM, ChannelGroups, Pattern, Unstructured, as_pattern, check_sparsity
from sparseforge.progress import Progress
from sparseforge.report import PruneReport
from sparseforge.scores import Score, Wanda, as_score, mean_gradients
from sparseforge.targets import Layer, Target, TargetSpec, as_target
from sparseforge.updates import HardPrune, Update, UpdateContext, check_compatible

__all__ = ["ONESHOT_METHODS", "prune", "prune_channels"]

ONESHOT_METHODS: dict[str, Callable[[], Method]] = {"sparsegpt": SparseGPT}
"""One-shot methods by name that are more than a score with hard pruning (every score name is one too)."""

@dataclass
class _Parts:
    """The parsed parts of one prune call."""

    name: str
    score: Score
    update: Update
    pattern: Pattern
    allocation: Allocation
    target: TargetSpec
    sparsity: float | None


def _parts(method: Method | Score | str, sparsity: float | None, pattern: Pattern | str | None,
           allocation: Allocation | str | Mapping[str, float] | None, target: TargetSpec) -> _Parts:
    """A method (object or name) or a score, with the call's arguments overriding the method's parts."""
    if isinstance(method, str) and method.strip().lower() in ONESHOT_METHODS:
        preset = ONESHOT_METHODS[method.strip().lower()]()
        given = False
    elif isinstance(method, Method):
        preset, given = method, True
    else:
        score = as_score(method)
        return _Parts(str(score), score, HardPrune(), as_pattern(pattern), as_allocation(allocation), target, sparsity)
    default_target = preset.target == Target()  # "every Linear/Conv": let the pruning mode choose its default
    return _Parts(
        preset.name, preset.score, preset.update,
        as_pattern(pattern) if pattern is not None else preset.pattern,
        as_allocation(allocation) if allocation is not None else preset.allocation,
        target if target is not None or default_target else preset.target,
        sparsity if sparsity is not None or not given else preset.sparsity,
    )


def prune(
    model: nn.Module,
    method: Method | Score | str = "magnitude",
    sparsity: float | None = None,
    pattern: Pattern | str | None = None,
    allocation: Allocation | str | Mapping[str, float] | None = None,
    target: TargetSpec = None,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    example_input: torch.Tensor | None = None,
    *,
    progress: bool | Progress = False,
) -> PruneReport:
    """Prune ``model`` once, in place, and return a :class:`~sparseforge.report.PruneReport`.

    Rule: score every targeted weight, split ``sparsity`` over the layers with
    ``allocation``, and zero the lowest-scoring groups of ``pattern`` in each
    layer (the method's update decides what else changes: SparseGPT updates
    the kept weights). See the module docstring for what runs when. The model
    is left plain: exact zeros, no masks or hooks (use a
    :class:`~sparseforge.Sparsifier` to keep a mask during further training).

    Args:
        model: the model (any ``nn.Module``, a ``transformers`` model included), modified in place.
        method: a score name (``magnitude`` (default), ``random``, ``gradient``, ``snip``,
            ``taylor``, ``l1``, ``l2``, ``wanda``), a one-shot method name (``sparsegpt``),
            a :class:`~sparseforge.scores.Score`, or a :class:`~sparseforge.methods.Method`
            (its parts; this call's arguments override them).
        sparsity: fraction of the targeted weights to prune, in [0, 1). May be
            omitted for an N:M pattern, which fixes it.
        pattern: ``unstructured`` (default), ``N:M``, ``block:B``, ``channel`` (each layer's
            rows), ``channel-groups`` (dependency groups: every slice tied to a channel,
            and attention heads) or a Pattern. With calibration statistics: unstructured or N:M.
        allocation: ``uniform`` (default), ``global``, ``erk``, ``er``, ``lamp``, ``owl``,
            a ``{name glob: sparsity}`` dict, or an Allocation. Pruned layer by layer,
            allocations that compare layers by score (OWL, global, LAMP) read Wanda's
            scores on the dense model, from one calibration pass (as OWL's reference code does).
        target: module name globs or a Target. Default: every Linear/Conv weight; pruned
            layer by layer, the Linear layers inside the model's repeated blocks (embeddings,
            a pooler and the LM head stay dense; all Linear/Conv2d layers of a model without
            such blocks), see :func:`~sparseforge.oneshot.calibration.select_layers`.
        calibration: batches the model is called on: ``(inputs, targets)`` pairs (gradient
            scores: their loss), tensors, or keyword dicts (a tokenizer's output). Given to a
            method that reads no gradient, the layers are pruned layer by layer (block by
            block when the method reads their inputs).
        loss_fn: ``loss_fn(model, batch) -> loss`` for gradient scores; default cross-entropy.
        max_batches: use at most this many calibration batches for gradients.
        example_input: an input used to count FLOPs in the report (and to trace the model
            for ``channel-groups``).
        progress: show progress per block (see :mod:`sparseforge.progress`): True, or a
            :class:`~sparseforge.progress.Progress` to report to. Default False.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> r = sf.prune(model, "magnitude", pattern="2:4")
        >>> r.sparsity, int((model[0].weight != 0).sum(dim=1).max())
        (0.5, 4)
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> r = sf.prune(model, "wanda", 0.5, calibration=[torch.randn(32, 16)])
        >>> r.achieved, int((model[0].weight == 0).sum(dim=1).min())
        (0.5, 8)
    """
    parts = _parts(method, sparsity, pattern, allocation, target)
    score, update = parts.score, parts.update
    reads_inputs = score.needs_stats or update.needs_activations or update.needs_hessian
    reads_grads = score.needs_grad or update.needs_grad
    if reads_inputs and calibration is None:
        raise SparseforgeError(f"{parts.name} reads the layers' inputs on calibration data: pass calibration "
                               "batches (sparseforge.prune(model, ..., calibration=batches))")
    if reads_inputs and reads_grads:
        raise SparseforgeError(f"{parts.name} reads both gradients and the layers' inputs: one-shot pruning "
                               "gives one or the other")
    if parts.pattern.model_level:
        return _prune_channel_groups(model, parts, calibration, loss_fn, max_batches, example_input)
    if calibration is not None and not reads_grads:
        return _prune_layer_by_layer(model, parts, calibration, progress, example_input)
    return _prune_at_once(model, parts, calibration, loss_fn, max_batches, example_input)


@torch.no_grad()
def _prune_at_once(model: nn.Module, parts: _Parts, calibration: Iterable[Any] | None,
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, max_batches: int | None,
                   example_input: torch.Tensor | None) -> PruneReport:
    """Score, allocate and mask every targeted layer at once (data-free and gradient scores)."""
    start = time.perf_counter()
    pattern, allocation, score = parts.pattern, parts.allocation, parts.score
    sparsity = check_sparsity(default_sparsity(parts.sparsity, pattern))
    layers = as_target(parts.target).select(model)
    check_compatible(layers, pattern, allocation)
    weights = [layer.weight for layer in layers]
    grads: list[torch.Tensor | None] = [None] * len(layers)
    if score.needs_grad or parts.update.needs_grad:
        if calibration is None:
            score._grad(None)  # raises the error that explains what to pass
        with torch.enable_grad():
            grads = mean_gradients(model, weights, calibration, loss_fn, max_batches)  # type: ignore[assignment]
    ctx = UpdateContext(layers=layers, masks=[torch.ones_like(w, dtype=torch.bool) for w in weights], grads=grads,
                        score=score, pattern=pattern.within_rows() if score.compare == "row" else pattern,
                        allocation=allocation, sparsity=sparsity, step=0)
    masks = parts.update(ctx)
    rep = PruneReport(method=parts.name, pattern=str(pattern), allocation=_name(allocation), requested=sparsity)
    for layer, w, m in zip(layers, weights, masks):
        w.mul_(m.to(w.dtype))
        rep.record(layer.name, w, 1.0 - float(m.sum()) / m.numel())
    rep.seconds = time.perf_counter() - start
    return rep.with_model(model, example_input)


@torch.no_grad()
def _prune_layer_by_layer(model: nn.Module, parts: _Parts, calibration: Iterable[Any],
                          progress: bool | Progress, example_input: torch.Tensor | None) -> PruneReport:
    """Allocate once on the dense model, then score, mask and update each layer's ``[out, fan_in]`` matrix
    in calibration order, with the statistics the score and update read (Wanda, SparseGPT, magnitude)."""
    pattern, allocation, score, update = parts.pattern, parts.allocation, parts.score, parts.update
    if not isinstance(pattern, (Unstructured, NM)):
        raise SparseforgeError(f"one-shot methods with calibration data support unstructured and N:M patterns, "
                               f"not {pattern}")
    layers = select_layers(model, parts.target)
    names = list(layers)
    shapes = [weight_matrix(m).shape for m in layers.values()]
    if isinstance(pattern, NM):
        if not isinstance(allocation, Uniform):
            raise SparseforgeError(f"an N:M pattern fixes every layer's sparsity: allocation "
                                   f"{_name(allocation)!r} cannot apply")
        for n, s in zip(names, shapes):
            if s[1] % pattern.m:
                raise SparseforgeError(f"{n} has {s[1]} inputs, not divisible by M={pattern.m} of pattern {pattern}: "
                                       "exclude it from the target or use another pattern")
        total = pattern.sparsity
        per_layer = dict.fromkeys(names, total)
    else:
        total = check_sparsity(default_sparsity(parts.sparsity, pattern))
        if isinstance(allocation, OWL):
            allocation.check_blocks(names)  # before the calibration pass, not after it
    calibrator = Calibrator(model, calibration, progress=progress)
    start = time.perf_counter()
    if not isinstance(pattern, NM):
        scores = None
        if allocation.needs_scores:  # Wanda's scores of the dense model, whichever method prunes
            stats = calibrator.statistics(layers, description="OWL/allocation scores")
            wanda = Wanda()
            scores = [wanda(weight_matrix(layers[n]), None, stats[n]) for n in names]
            del stats
        per_layer = dict(zip(names, allocation.allocate(names, shapes, total, scores, pattern)))
        del scores
    rep = PruneReport(method=parts.name, pattern=str(pattern), allocation=_name(allocation), requested=total)
    compared = pattern.within_rows() if score.compare == "row" else pattern

    def process(name: str, module: nn.Module, stats: LayerStats) -> None:
        matrix = weight_matrix(module)
        s = per_layer[name]
        ctx = UpdateContext(layers=[Layer(name, module)], masks=[torch.ones_like(matrix, dtype=torch.bool)],
                            grads=[None], score=score, pattern=compared, allocation=allocation, sparsity=s, step=0,
                            weights=[matrix], stats=[stats], sparsities=[s])
        (keep,) = update(ctx)
        new = matrix * keep
        set_weight_matrix(module, new)
        rep.record(name, new, s)
        rep.calibration_rows = max(rep.calibration_rows, stats.rows)

    calibrator.run(layers, process, activations=score.needs_activations or update.needs_activations,
                   hessian=score.needs_hessian or update.needs_hessian, description=f"{parts.name} {pattern}")
    rep.seconds = time.perf_counter() - start
    return rep.with_model(model, example_input)


def _prune_channel_groups(model: nn.Module, parts: _Parts, calibration: Iterable[Any] | None,
                          loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, max_batches: int | None,
                          example_input: torch.Tensor | None) -> PruneReport:
    if not isinstance(parts.allocation, Uniform):
        raise SparseforgeError(f"pattern {parts.pattern} prunes the same share of every dependency group: "
                               f"allocation {_name(parts.allocation)!r} cannot apply")
    if not isinstance(parts.update, HardPrune):
        raise SparseforgeError(f"pattern {parts.pattern} zeroes whole channels; update {parts.update} cannot apply")
    sparsity = check_sparsity(default_sparsity(parts.sparsity, parts.pattern))
    return prune_channel_groups(model, parts.score, sparsity, parts.pattern, as_target(parts.target),  # type: ignore[arg-type]
                                calibration, loss_fn, max_batches, example_input)


def _name(allocation: Allocation) -> str:
    return type(allocation).__name__.lower()


def prune_channels(
    model: nn.Module,
    score: Score | str = "l1",
    sparsity: float = 0.5,
    target: TargetSpec = None,
    heads: bool = True,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    example_input: torch.Tensor | None = None,
) -> PruneReport:
    """Prune ``sparsity`` of the channels of every dependency group (and attention heads when ``heads``):
    ``sf.prune(model, score, sparsity, pattern=ChannelGroups(heads), target=target, ...)``.

    ``target``: globs or a :class:`~sparseforge.targets.Target` on the groups' producer modules
    (a group is pruned when all its producers are targeted); default every group. See
    :func:`~sparseforge.oneshot.channels.prune_channel_groups` for the rule. Returns the
    :class:`~sparseforge.report.PruneReport` (``groups``, ``pruned_channels``; ``apply(model)``
    re-zeroes the slices).

    Example:
        >>> import sparseforge as sf
        >>> from sparseforge.zoo import build_model
        >>> sf.prune_channels(build_model("lenet300"), "l1", sparsity=0.5).pruned_channels
        200
    """
    return prune(model, score, sparsity, ChannelGroups(heads=heads), target=target, calibration=calibration,
                 loss_fn=loss_fn, max_batches=max_batches, example_input=example_input)
