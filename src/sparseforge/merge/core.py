"""Shared parts of every merge: compatibility checks, weights, per-tensor iteration, averaging and soups.

A state is a mapping ``name -> Tensor`` (a ``state_dict``). Every merge in
:mod:`sparseforge.merge` treats tensors the same way (see :func:`map_tensors`):

- floating tensors (weights, biases, BatchNorm running statistics) are merged
  by the method's rule, computed in float64 (:data:`ACC_DTYPE`) and cast back
  to their own dtype once;
- non-floating tensors (``num_batches_tracked``, integer buffers, boolean
  masks) are counters and flags that have no meaningful average, so they are
  copied from the first model (the base model, for task-vector methods).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparseforge.errors import SparseforgeError
from sparseforge.registry import Registry

__all__ = [
    "ACC_DTYPE", "FILE_OPTIONS", "MERGE_METHODS", "MergeMethod", "Rule", "average_tensors", "check_compatible",
    "greedy_soup", "is_mergeable", "map_tensors", "normalize_weights", "uniform_soup", "weighted_average",
]

State = Mapping[str, Tensor]

Rule = Callable[[str, "Tensor | None", list[Tensor]], Tensor]
"""A per-tensor merge rule: ``rule(key, base tensor or None, [each model's tensor]) -> merged tensor``."""

FILE_OPTIONS = ("density", "lam", "seed")
"""The hyperparameters a merge of files passes on (beside ``weights``) to the methods that take them."""


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method: how a merge of files (:func:`~sparseforge.merge.merge_files`, merge
    recipes, ``sparseforge merge``) builds its per-tensor rule.

    Attributes:
        build: ``build(count, weights=None, **options) -> rule``: checks the
            options for ``count`` models (raising :class:`SparseforgeError`)
            and returns the :data:`Rule` applied to every floating tensor.
            ``options`` are those of :data:`FILE_OPTIONS` listed in ``options``.
            None for a method that files cannot hold what it needs.
        needs_base: whether it merges task vectors against a base model (a
            base is then required; methods without are refused one).
        options: which of :data:`FILE_OPTIONS` it takes; ``density`` and a
            ``lam`` other than 1 are refused by the others, ``seed`` ignored.
        python_only: for a method that needs more than weights (data, masks):
            why, and it is run from Python only; empty for a file merge method.
        summary: one line for help and the docs tables.

    Register one with ``MERGE_METHODS.register("name", MergeMethod(build, ...))``
    (see ``docs/extending.md``).
    """

    build: Callable[..., Rule] | None = None
    needs_base: bool = False
    options: tuple[str, ...] = ()
    python_only: str = ""
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = [o for o in self.options if o not in FILE_OPTIONS]
        if unknown:
            raise SparseforgeError(f"merge method options {unknown} are not among {', '.join(FILE_OPTIONS)}")
        if self.build is None and not self.python_only:
            raise SparseforgeError("a merge method needs a build function, or python_only saying why it has none")


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")
"""Merge methods by name: ``average``, the task-vector presets (``task_arithmetic``, ``ties``, ``dare``,
``dare_ties``), and Python-only ones (``fisher``, ``regmean``, ``tall``). Merge recipes and
``sparseforge merge --method`` take the file merge methods among them."""

# Merges compute in float64: base + (finetuned - base) gives back the fine-tuned
# float32/bf16 value exactly (the difference of two float32 numbers of similar
# size is exact in float64), so identities such as "one task at lam=1 is the
# fine-tuned model" hold bit for bit, and sums over many models lose nothing.
ACC_DTYPE = torch.float64

_SHOW = 5  # how many offending keys an error message lists


def _preview(items: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in list(items)[:_SHOW])
    more = len(items) - _SHOW
    return shown + (f" and {more} more" if more > 0 else "")


def is_mergeable(tensor: Tensor) -> bool:
    """True for floating tensors, which merges combine; others are copied from the first model.

    >>> is_mergeable(torch.zeros(2)), is_mergeable(torch.tensor(3))
    (True, False)
    """
    return tensor.is_floating_point()


def check_compatible(states: Sequence[State], names: Sequence[str] | None = None, base: State | None = None) -> None:
    """Raise :class:`SparseforgeError` unless all states (and ``base``) have the same keys, shapes and dtypes.

    Args:
        states: one or more state dicts to merge.
        names: a label per state for error messages (default ``"model 0"``, ``"model 1"``, ...).
        base: optional base (pre-trained) state the others must also match.

    The reference is ``base`` when given, else the first state; a message
    names the model, and the first few missing or extra keys, or the first few
    keys whose shape or dtype differ.

    >>> check_compatible([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: model 1 does not match model 0: shape differs for 'w' ([3] vs [2]); ...
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence):
        raise SparseforgeError(
            f"expected a sequence of state dicts, got {type(states).__name__}; pass a list such as [sd_a, sd_b]"
        )
    if len(states) < 1:
        raise SparseforgeError("need at least one model to merge, got an empty list")
    if names is None:
        names = [f"model {i}" for i in range(len(states))]
    elif len(names) != len(states):
        raise SparseforgeError(f"got {len(names)} names for {len(states)} models; give one name per model")
    labelled = list(zip(names, states))
    if base is not None:
        labelled.insert(0, ("the base model", base))
    for label, state in labelled:
        if not isinstance(state, Mapping):
            raise SparseforgeError(f"{label} is a {type(state).__name__}, not a state dict (name -> Tensor)")
        bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
        if bad:
            raise SparseforgeError(f"{label} has values that are not tensors: {_preview(bad)}")
    ref_label, ref = labelled[0]
    for label, state in labelled[1:]:
        missing = [k for k in ref if k not in state]
        extra = [k for k in state if k not in ref]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} key(s) {_preview(missing)}")
            if extra:
                parts.append(f"has {len(extra)} extra key(s) {_preview(extra)}")
            raise SparseforgeError(
                f"{label} does not match {ref_label}: it {' and '.join(parts)}; "
                "merge only models of the same architecture (same state_dict keys)"
            )
        problems = []
        for k, r in ref.items():
            t = state[k]
            if t.shape != r.shape:
                problems.append(f"shape differs for {k!r} ({list(t.shape)} vs {list(r.shape)})")
            elif t.dtype != r.dtype:
                problems.append(f"dtype differs for {k!r} ({t.dtype} vs {r.dtype})")
        if problems:
            more = len(problems) - _SHOW
            raise SparseforgeError(
                f"{label} does not match {ref_label}: " + "; ".join(problems[:_SHOW])
                + (f"; and {more} more" if more > 0 else "")
                + "; merge only models of the same architecture, converted to the same dtype"
            )


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Validate per-model weights and scale them to sum to 1 (uniform when ``None``).

    Weights must be ``count`` finite, non-negative numbers, not all zero:
    anything else is weights that do not sum sensibly to a convex combination.

    >>> normalize_weights([1, 3], 2)
    [0.25, 0.75]
    """
    if weights is None:
        return [1.0 / count] * count
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise SparseforgeError(f"weights must be numbers, got {weights!r}") from None
    if len(values) != count:
        raise SparseforgeError(f"got {len(values)} weights for {count} models; give one weight per model")
    if not all(math.isfinite(w) and w >= 0 for w in values) or sum(values) <= 0:
        raise SparseforgeError(
            f"weights that do not sum sensibly: {values}; weights must be finite, non-negative and not all zero "
            "(they are normalized to sum to 1)"
        )
    total = sum(values)
    return [w / total for w in values]


def map_tensors(states: Sequence[State], rule: Callable[[str, list[Tensor]], Tensor]) -> dict[str, Tensor]:
    """Merge states key by key: ``rule(name, tensors)`` for floating tensors, a copy of the first for the rest.

    The one place that decides how buffers are treated: non-floating tensors
    (``num_batches_tracked`` counters, integer or boolean buffers) have no
    meaningful average and are copied from ``states[0]``. Keys keep the first
    state's order. States are assumed compatible (see :func:`check_compatible`).
    """
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if is_mergeable(first):
            out[name] = rule(name, [s[name] for s in states])
        else:
            out[name] = first.clone()
    return out


def average_tensors(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted mean of one tensor across models, ``weights`` already summing to 1; float64 inside, first dtype out.

    The per-tensor rule of :func:`weighted_average` (streaming merges call it tensor by tensor).

    >>> average_tensors([torch.tensor([1.0]), torch.tensor([3.0])], [0.5, 0.5])
    tensor([2.])
    """
    # x_0 + sum_i w_i (x_i - x_0) rather than sum_i w_i x_i: with weights summing
    # to 1 both are the weighted mean, but this form returns x_0 bit for bit
    # when all models are equal (every difference is exactly 0), whereas
    # sum_i x / 3 three times need not round back to x.
    first = tensors[0].to(ACC_DTYPE)
    acc = first.clone()
    for w, t in zip(weights[1:], tensors[1:]):
        acc.add_(t.to(ACC_DTYPE) - first, alpha=w)
    return acc.to(tensors[0].dtype)


def weighted_average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Weighted mean of the models' parameters: ``sum_i w_i theta_i`` with ``w`` normalized to sum 1.

    Args:
        states: compatible state dicts.
        weights: one non-negative weight per model (default uniform); they
            are normalized to sum to 1, so ``[1, 1]`` and ``[0.5, 0.5]`` agree.
            Negative, non-finite or all-zero weights raise :class:`SparseforgeError`.

    Floating tensors are averaged in float64 and cast back to their dtype;
    non-floating ones are copied from the first model (see :func:`map_tensors`).
    Averaging identical models returns exactly the same tensors.

    >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}
    >>> weighted_average([a, b], [1, 3])["w"]
    tensor([1.5000, 3.5000])
    """
    check_compatible(states)
    w = normalize_weights(weights, len(states))
    return map_tensors(states, lambda name, tensors: average_tensors(tensors, w))


def _average_rule(count: int, weights: Sequence[float] | None = None) -> Rule:
    """The streaming form of :func:`weighted_average`: one key at a time, the same code and buffer rule."""
    if count == 1:
        raise SparseforgeError("the average of one model is that model: list two or more model files to "
                               "merge (to scale one fine-tuned model's change, use task_arithmetic with --base "
                               "and --lambda)")
    normalize_weights(weights, count)  # the weights' rules live there; raises on bad ones

    def average(key: str, base_tensor: Tensor | None, tensors: list[Tensor]) -> Tensor:
        return weighted_average([{key: t} for t in tensors], weights)[key]

    return average


MERGE_METHODS.register("average", MergeMethod(
    _average_rule, summary="weighted average of the models (a uniform model soup by default)"))


def uniform_soup(states: Sequence[State]) -> dict[str, Tensor]:
    """Uniform soup: the plain average of fine-tuned models' weights.

    From "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time" (Wortsman et al., ICML 2022).
    Same as :func:`weighted_average` with uniform weights.
    """
    return weighted_average(states)


def _score(evaluate: Callable[[dict[str, Tensor]], float], state: dict[str, Tensor], what: str) -> float:
    value = evaluate(state)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise SparseforgeError(f"evaluate must return a number (higher is better), got {value!r} for {what}") from None
    if math.isnan(score):
        raise SparseforgeError(f"evaluate returned NaN for {what}; it must return a held-out score, higher is better")
    return score


def greedy_soup(
    states: Sequence[State],
    evaluate: Callable[[dict[str, Tensor]], float],
    *,
    order: Sequence[int] | None = None,
) -> tuple[dict[str, Tensor], list[int]]:
    """Greedy soup: add ingredients best-first, keeping each only if the soup's held-out score does not drop.

    From "Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time" (Wortsman et al., ICML 2022),
    Recipe 1: rank the ingredients by their own held-out score (``evaluate``,
    higher is better) in descending order, start from the best, and add each
    next ingredient if the uniform average of the soup with it scores at least
    as well as the soup without it.

    Args:
        states: compatible fine-tuned state dicts (the ingredients).
        evaluate: held-out score of a state dict (e.g. validation accuracy);
            higher is better. Called once per ingredient and once per candidate soup.
        order: distinct ingredient indices to try, in this order, instead of
            ranking all ingredients by their own score (the first one starts
            the soup; ingredients not listed are left out).

    Returns:
        ``(soup, chosen)``: the soup's state dict and the indices of its
        ingredients in the order they were added.
    """
    check_compatible(states)
    if order is None:
        scores = [_score(evaluate, dict(s), f"model {i}") for i, s in enumerate(states)]
        # sorted() is stable: equal scores keep index order, so the result is deterministic.
        ranking = sorted(range(len(states)), key=lambda i: -scores[i])
        best_score = scores[ranking[0]]
    else:
        ranking = [int(i) for i in order]
        if not ranking or len(set(ranking)) != len(ranking) or not all(0 <= i < len(states) for i in ranking):
            raise SparseforgeError(
                f"order must list distinct model indices in [0, {len(states) - 1}], got {list(order)!r}"
            )
        best_score = _score(evaluate, dict(states[ranking[0]]), f"model {ranking[0]}")
    chosen = [ranking[0]]
    soup = {k: v.clone() for k, v in states[ranking[0]].items()}
    for i in ranking[1:]:
        candidate = weighted_average([states[j] for j in chosen + [i]])
        score = _score(evaluate, candidate, f"the soup of models {chosen + [i]}")
        if score >= best_score:
            chosen.append(i)
            soup, best_score = candidate, score
    return soup, chosen
