"""What happens at a mask update: the ``Update`` part, and the mask selection every
update and one-shot pruning share.

:func:`select_masks` is the one place where scores, an allocation and a
pattern become masks. An :class:`Update` decides which scores to hand it and
what else changes at an update step (hard pruning here; prune-and-regrow and
soft shrinkage are further updates built on the same call).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparseforge.allocation import Allocation, Uniform
from sparseforge.errors import SparseforgeError
from sparseforge.patterns import Pattern
from sparseforge.scores import Score
from sparseforge.targets import Layer


def check_compatible(layers: Sequence[Layer], pattern: Pattern, allocation: Allocation) -> None:
    """Raise a clear error when the pattern cannot apply to a layer or to the allocation."""
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
) -> list[torch.Tensor]:
    """Boolean keep-masks: split ``sparsity`` over the layers, then keep each layer's top scores.

    Args:
        layers: the targeted layers.
        scores: one score tensor per layer, shaped like its weight (higher = keep).
        pattern: the shape of the zeros.
        allocation: how the model-level sparsity is split over layers.
        sparsity: fraction of all targeted weights to prune, in [0, 1).
    """
    names = [layer.name for layer in layers]
    shapes = [layer.shape for layer in layers]
    per_layer = allocation.allocate(names, shapes, sparsity, scores if allocation.needs_scores else None, pattern)
    return [pattern.mask(score, s) for score, s in zip(scores, per_layer)]


@dataclass
class UpdateContext:
    """What an update sees at a mask update step.

    ``masks`` are the current boolean keep-masks; ``grads`` the dense loss
    gradients of the weights at this step (None when no score or update asked
    for them); ``sparsity`` the model-level sparsity the schedule asks for now.
    """

    layers: Sequence[Layer]
    masks: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor | None]
    score: Score
    pattern: Pattern
    allocation: Allocation
    sparsity: float
    step: int

    def scores(self) -> list[torch.Tensor]:
        return [self.score(layer.weight.detach(), g) for layer, g in zip(self.layers, self.grads)]


class Update(ABC):
    """Base class: turns an :class:`UpdateContext` into new boolean keep-masks."""

    #: whether the update itself needs the dense gradients (e.g. gradient regrowth).
    needs_grad: bool = False

    @abstractmethod
    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class HardPrune(Update):
    """Prune to the scheduled sparsity by score; the pruned weights become exact zeros.

    Rule: new mask = the top scores under the allocation and pattern. With
    ``monotone=True`` (default) a weight once pruned stays pruned: its score is
    set to -inf before selection, as in gradual magnitude pruning, where
    sparsity only grows.
    """

    monotone: bool = True

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        scores = ctx.scores()
        if self.monotone:
            scores = [s.masked_fill(~m, -math.inf) for s, m in zip(scores, ctx.masks)]
        return select_masks(ctx.layers, scores, ctx.pattern, ctx.allocation, ctx.sparsity)

    def __str__(self) -> str:
        return "hard-prune"
