"""How important each weight is: the ``Score`` part.

A score maps a weight (and, for some scores, its loss gradient) to a tensor of
the same shape where higher means "keep". Scores that need a gradient say so
with ``needs_grad``; the caller (``Sparsifier`` or :func:`sparseforge.prune`)
provides the gradient averaged over the batches it has seen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

SCORES: Registry[Callable[[], Score]] = Registry("score")
"""Score names -> factories (classes) building the score with its defaults; ``as_score`` looks them up."""


class Score(ABC):
    """Base class: ``score(weight, grad) -> importance`` of the same shape."""

    needs_grad: bool = False

    @abstractmethod
    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor: ...

    def _grad(self, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            raise SparseforgeError(
                f"score {self} needs gradients: pass calibration data (and a loss) to prune(), "
                "or call Sparsifier.step() after backward()"
            )
        return grad

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def channel_scores(self, weight: torch.Tensor, grad: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
        """One importance per index of ``dim`` (a channel's slice of this tensor).

        Default: the sum of the element scores over the slice, so that scores of
        all the slices tied to one channel (a dependency group: filters, BatchNorm
        scales, the next layer's input columns) add up to the channel's score.
        """
        s = self(weight, grad)
        return s.movedim(dim, 0).reshape(s.shape[dim], -1).sum(dim=1)


@SCORES.register("magnitude")
@dataclass
class Magnitude(Score):
    """|w|: the magnitude criterion ("Learning both Weights and Connections", Han et al. 2015)."""

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return weight.detach().abs()

    def __str__(self) -> str:
        return "magnitude"


@SCORES.register("random")
@dataclass
class Random(Score):
    """Uniform random scores from a seeded generator: random pruning, the usual control.

    ("The Unreasonable Effectiveness of Random Pruning", Liu et al. 2022.)

    Args:
        seed: seed of the score's own generator, so that random masks do not
            depend on (or disturb) the global RNG. Default 0.
    """

    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self.generator).to(weight.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def __str__(self) -> str:
        return "random"


@SCORES.register("gradient")
@dataclass
class GradientMagnitude(Score):
    """|g|: the magnitude of the loss gradient, as RigL uses to choose connections to grow."""

    needs_grad = True

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return self._grad(grad).detach().abs()

    def __str__(self) -> str:
        return "gradient"


@SCORES.register("snip")
@dataclass
class SNIP(Score):
    """|w * g|: connection sensitivity ("SNIP: Single-shot Network Pruning based on
    Connection Sensitivity", Lee et al. 2019)."""

    needs_grad = True

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return (weight.detach() * self._grad(grad).detach()).abs()

    def __str__(self) -> str:
        return "snip"


@SCORES.register("taylor")
@dataclass
class Taylor(Score):
    """(w * g)^2: first-order Taylor importance ("Importance Estimation for Neural
    Network Pruning", Molchanov et al. 2019), the squared loss change estimated
    when the weight is removed."""

    needs_grad = True

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return (weight.detach() * self._grad(grad).detach()).pow(2)

    def channel_scores(self, weight: torch.Tensor, grad: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
        """Per channel slice: ``(sum of w * g over the slice)^2``, Molchanov et al.'s filter criterion."""
        wg = weight.detach() * self._grad(grad).detach()
        return wg.movedim(dim, 0).reshape(wg.shape[dim], -1).sum(dim=1).pow(2)

    def __str__(self) -> str:
        return "taylor"


@SCORES.register("l1")
@dataclass
class L1Norm(Score):
    """|w|, named for channel pruning: a channel's summed score is the L1 norm of its
    slices ("Pruning Filters for Efficient ConvNets", Li et al. 2017)."""

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return weight.detach().abs()

    def __str__(self) -> str:
        return "l1"


@SCORES.register("l2")
@dataclass
class L2Norm(Score):
    """w^2: a channel's summed score is the squared L2 norm of its slices (same order as the L2 norm)."""

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        return weight.detach().pow(2)

    def __str__(self) -> str:
        return "l2"


def as_score(spec: Score | str | None) -> Score:
    """A Score, or one built with its defaults from a name registered in :data:`SCORES` (None: magnitude).

    >>> as_score("snip"), as_score(None)
    (SNIP(), Magnitude())
    """
    if spec is None:
        return Magnitude()
    if isinstance(spec, Score):
        return spec
    return SCORES.get(str(spec))()


def mean_gradients(
    model: nn.Module,
    weights: list[torch.Tensor],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
) -> list[torch.Tensor]:
    """Mean loss gradient of each tensor in ``weights`` over calibration batches.

    Args:
        model: the model; its parameters' ``.grad`` are restored afterwards.
        weights: the tensors whose gradients are wanted (parameters of ``model``).
        batches: an iterable of ``(inputs, targets)`` pairs, or of anything
            ``loss_fn`` understands.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``. Default: cross-entropy
            of ``model(inputs)`` against ``targets``.
        max_batches: stop after this many batches. Default: all of them.
    """
    if loss_fn is None:

        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
            inputs, targets = batch
            return nn.functional.cross_entropy(m(inputs), targets)

    saved = {p: p.grad for p in model.parameters()}
    sums = [torch.zeros_like(w) for w in weights]
    count = 0
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s.add_(g)
            count += 1
    finally:
        for p, g in saved.items():
            p.grad = g
    if count == 0:
        raise SparseforgeError("the calibration data yielded no batch; gradient scores need at least one")
    return [s / count for s in sums]
