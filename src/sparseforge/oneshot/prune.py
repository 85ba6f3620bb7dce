"""One-shot pruning in one call: score, allocate, mask, done."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparseforge.allocation import Allocation, as_allocation
from sparseforge.methods.base import default_sparsity
from sparseforge.patterns import Pattern, as_pattern, check_sparsity
from sparseforge.report import SparsityReport, report
from sparseforge.scores import Score, as_score, mean_gradients
from sparseforge.targets import Target, as_target
from sparseforge.updates import check_compatible, select_masks


@torch.no_grad()
def _apply(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    for w, m in zip(weights, masks):
        w.mul_(m.to(w.dtype))


def prune(
    model: nn.Module,
    score: Score | str = "magnitude",
    sparsity: float | None = None,
    pattern: Pattern | str = "unstructured",
    allocation: Allocation | str | Mapping[str, float] = "uniform",
    target: Target | Sequence[str] | str | None = None,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    example_input: torch.Tensor | None = None,
) -> SparsityReport:
    """Prune ``model`` once, in place, and return its :class:`SparsityReport`.

    Rule: compute ``score`` for every targeted weight (gradient scores average
    the loss gradient over the ``calibration`` batches), split ``sparsity``
    over the layers with ``allocation``, and zero the lowest-scoring groups of
    ``pattern`` in each layer. The model is left plain: exact zeros, no masks
    or hooks (use a :class:`Sparsifier` to keep a mask during further training).

    Args:
        model: the model, modified in place.
        score: ``magnitude`` (default), ``random``, ``gradient``, ``snip``, ``taylor`` or a Score.
        sparsity: fraction of the targeted weights to prune, in [0, 1). May be
            omitted for an N:M pattern, which fixes it.
        pattern: ``unstructured`` (default), ``N:M``, ``block:B``, ``channel`` or a Pattern.
        allocation: ``uniform`` (default), ``global``, ``erk``, ``er``, ``lamp``,
            a ``{name glob: sparsity}`` dict, or an Allocation.
        target: module name globs or a Target. Default: every Linear/Conv weight.
        calibration: batches ``(inputs, targets)`` for gradient scores.
        loss_fn: ``loss_fn(model, batch) -> loss``; default cross-entropy.
        max_batches: use at most this many calibration batches.
        example_input: an input used to count FLOPs in the report.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> r = sf.prune(model, "magnitude", pattern="2:4")
        >>> r.sparsity, int((model[0].weight != 0).sum(dim=1).max())
        (0.5, 4)
    """
    pattern = as_pattern(pattern)
    sparsity = check_sparsity(default_sparsity(sparsity, pattern))
    score = as_score(score)
    allocation = as_allocation(allocation)
    layers = as_target(target).select(model)
    check_compatible(layers, pattern, allocation)
    weights = [layer.weight for layer in layers]
    grads: list[torch.Tensor | None] = [None] * len(layers)
    if score.needs_grad:
        if calibration is None:
            score._grad(None)  # raises the error that explains what to pass
        with torch.enable_grad():
            grads = mean_gradients(model, weights, calibration, loss_fn, max_batches)  # type: ignore[assignment]
    scores = [score(w.detach(), g) for w, g in zip(weights, grads)]
    masks = select_masks(layers, scores, pattern, allocation, sparsity)
    _apply(weights, masks)
    return report(model, example_input)
