"""How important each weight is: the ``Score`` part.

A score maps a weight (and, for some scores, its loss gradient or statistics
of the layer's inputs) to a tensor of the same shape where higher means
"keep". What a score reads beyond the weight it declares with capability
flags, and the caller provides it:

- ``needs_grad``: the loss gradient of the weight, averaged over the batches
  seen (the ``Sparsifier`` after ``backward()``; :func:`sparseforge.prune`
  from its ``calibration`` batches);
- ``needs_activations``: the norm of each input feature of the layer on
  calibration data, ``||X_j||_2`` (Wanda), and ``needs_hessian``: the
  layer's input Gram matrix ``X^T X``; :func:`sparseforge.prune` collects
  them block by block with a :class:`~sparseforge.oneshot.calibration.Calibrator`
  and passes them as ``stats`` (a
  :class:`~sparseforge.oneshot.calibration.LayerStats`). The weight such a
  score sees is the layer's ``[out, fan_in]`` matrix, in the column order of
  those statistics.

``compare`` says which weights a score's values may be compared between:
``"layer"`` (any two weights of a layer, the default) or ``"row"`` (only
weights of the same output row, as Wanda's paper prescribes); the pruning
code turns the pattern into its per-row form (:meth:`Pattern.within_rows`)
for a row-compared score, so that :func:`sparseforge.updates.select_masks`
chooses every mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

SCORES: Registry[Callable[[], Score]] = Registry("score")
"""Score names -> factories (classes) building the score with its defaults; ``as_score`` looks them up."""

if TYPE_CHECKING:  # only for annotations: the statistics are computed in sparseforge.oneshot
    from sparseforge.oneshot.calibration import LayerStats


class Score(ABC):
    """Base class: ``score(weight, grad) -> importance`` of the same shape.

    A score that reads calibration statistics (``needs_activations`` or
    ``needs_hessian``) takes them as a third argument:
    ``score(weight, grad, stats)``; call :meth:`evaluate` to pass whatever the
    score reads.
    """

    #: whether the score reads the loss gradient of the weight.
    needs_grad: bool = False
    #: whether the score reads the layer's input feature norms on calibration data (``stats.feature_norms``).
    needs_activations: bool = False
    #: whether the score reads the layer's input Gram matrix on calibration data (``stats.hessian``).
    needs_hessian: bool = False
    #: which weights the score's values may be compared between: ``"layer"`` or ``"row"`` (see the module docstring).
    compare: str = "layer"

    @abstractmethod
    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor: ...

    @property
    def needs_stats(self) -> bool:
        """Whether the score reads statistics of the layer's inputs on calibration data."""
        return self.needs_activations or self.needs_hessian

    def evaluate(self, weight: torch.Tensor, grad: torch.Tensor | None = None,
                 stats: LayerStats | None = None) -> torch.Tensor:
        """The score of ``weight``, given what it reads: the gradient, and the statistics when it needs them."""
        if self.needs_stats:
            return self(weight, grad, stats)  # type: ignore[call-arg]
        return self(weight, grad)

    def _grad(self, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            raise SparseforgeError(
                f"score {self} needs gradients: pass calibration data (and a loss) to prune(), "
                "or call Sparsifier.step() after backward()"
            )
        return grad

    def _stats(self, stats: LayerStats | None) -> LayerStats:
        if stats is None:
            raise SparseforgeError(
                f"score {self} reads the layers' inputs on calibration data: pass calibration batches to "
                "sparseforge.prune(model, ..., calibration=batches); a Sparsifier does not collect them"
            )
        return stats

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


@SCORES.register("wanda")
@dataclass
class Wanda(Score):
    """|W_ij| * ||X_j||_2, compared within each output row: "A Simple and Effective Pruning
    Approach for Large Language Models" (Sun, Liu, Bair & Kolter, ICLR 2024).

    Rule: the magnitude of a weight times the L2 norm of its input feature over
    the calibration data (``stats.feature_norms``, collected layer by layer on
    the already pruned earlier blocks). Scores are compared only within an
    output row (``compare = "row"``): unstructured, every row loses its
    ``int(in * sparsity)`` lowest scores; N:M, every group of M inputs of a
    row keeps its N highest. No weight is updated.

    Example:
        >>> from types import SimpleNamespace
        >>> w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        >>> Wanda()(w, None, SimpleNamespace(feature_norms=torch.tensor([2.0, 0.5]))).tolist()
        [[2.0, 1.0], [6.0, 0.25]]
    """

    needs_activations = True
    compare = "row"

    def __call__(self, weight: torch.Tensor, grad: torch.Tensor | None = None,
                 stats: LayerStats | None = None) -> torch.Tensor:
        norms = self._stats(stats).feature_norms
        return weight.detach().abs() * norms.to(weight.dtype).reshape(1, -1)

    def __str__(self) -> str:
        return "wanda"


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
