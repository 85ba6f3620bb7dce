"""Sparse model soups: average sparse models that share one mask, without losing sparsity.

From "Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging"
(Zimmer, Spiegel and Pokutta, ICLR 2024). Models retrained from the same
pruned network under the same fixed mask stay in one basin (they share the
start and the connectivity), so their average is a good model, and since
every one of them is zero wherever the mask is, so is the average: a soup of
sparse models is exactly as sparse as its ingredients. Sparse Model Soups
(SMS) puts this inside iterative magnitude pruning: every prune-retrain cycle
starts from the previous cycle's soup, prunes it, retrains ``m`` copies with
different seeds (data order and any other randomness) and averages them into
the next soup.

The parts are the project's: :func:`sparseforge.merge.core.weighted_average`
for the average, :func:`~sparseforge.methods.GlobalMagnitude` for the
pruning (global magnitude, as IMP prunes) and
:func:`~sparseforge.methods.FixedMask` for retraining under the mask.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sparseforge.errors import SparseforgeError
from sparseforge.merge.core import check_compatible, weighted_average
from sparseforge.method import Method
from sparseforge.methods.fixed import FixedMask
from sparseforge.methods.global_magnitude import GlobalMagnitude
from sparseforge.sparsifier import Sparsifier
from sparseforge.targets import Target, as_target

__all__ = ["SoupCycle", "check_shared_mask", "sparse_model_soup", "sparse_soup"]

State = Mapping[str, Tensor]

SoupTrainFn = Callable[[nn.Module, Method, int], Mapping[str, Any]]
"""``train_fn(model, method, seed) -> metrics``, what :func:`sparse_model_soup` retrains with.

It trains ``model`` in place under ``Sparsifier(model, method, ...)`` (a
:func:`~sparseforge.methods.FixedMask`; finalize it at the end), with
``seed`` seeding everything random in the run (data order, dropout), and
returns a mapping of metrics (e.g. test accuracy) that is stored as it is.
"""


def _mask_names(states: Sequence[State], names: Sequence[str] | None) -> list[str]:
    first = states[0]
    if names is None:
        # What the default Target prunes: Linear/Conv weights, the floating tensors with >= 2 dims.
        return [k for k, v in first.items() if v.is_floating_point() and v.dim() >= 2]
    missing = [n for n in names if n not in first]
    if missing:
        raise SparseforgeError(f"no tensor(s) {missing[:5]} in the state dicts; names are state_dict keys "
                               "such as 'fc1.weight'")
    return list(names)


def check_shared_mask(states: Sequence[State], names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The one keep-mask (``tensor != 0``) all ``states`` share, or an error naming where they differ.

    Rule: for each checked tensor, the zero pattern of every state must equal
    the first state's, element for element; that pattern is the shared mask.

    Args:
        states: compatible state dicts (same keys, shapes, dtypes).
        names: the state-dict keys whose masks are compared. Default: every
            floating tensor with at least two dimensions (the Linear and Conv
            weights, which is what the default Target prunes).

    Returns ``{name: bool keep-mask}``.

    Raises:
        SparseforgeError: incompatible states, an unknown name, or zero patterns
            that differ (the message names the first tensors and models).

    >>> a = {"w": torch.tensor([[1.0, 0.0], [2.0, 3.0]])}
    >>> b = {"w": torch.tensor([[5.0, 0.0], [0.0, 1.0]])}
    >>> check_shared_mask([a, b])
    Traceback (most recent call last):
    ...
    sparseforge.errors.SparseforgeError: the zero patterns differ: 'w' of model 1 differs from model 0 at 1 position(s); a sparse soup averages models that share one mask (retrain copies of one pruned model under FixedMask)
    """
    check_compatible(states)
    keys = _mask_names(states, names)
    masks = {k: states[0][k] != 0 for k in keys}
    problems = []
    for k in keys:
        for i, s in enumerate(states[1:], start=1):
            diff = int(((s[k] != 0) != masks[k]).sum())
            if diff:
                problems.append(f"{k!r} of model {i} differs from model 0 at {diff} position(s)")
                break
        if len(problems) == 3:
            break
    if problems:
        raise SparseforgeError("the zero patterns differ: " + "; ".join(problems) + "; a sparse soup averages "
                               "models that share one mask (retrain copies of one pruned model under FixedMask)")
    return masks


def sparse_soup(
    states: Sequence[State],
    weights: Sequence[float] | None = None,
    *,
    masks: Mapping[str, Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Weighted average of sparse models that share one mask; the result has exactly that mask.

    Rule ("Sparse Model Soups", Zimmer et al., ICLR 2024): average the
    ingredients (:func:`sparseforge.merge.core.weighted_average`, uniform by
    default), then re-apply the shared mask: pruned entries are exactly zero
    (``+0.0``), whatever rounding gave. A kept entry whose average is exactly
    zero because the ingredients cancel (``+w`` and ``-w``) is set to the
    smallest positive normal number of its dtype (``torch.finfo(dtype).tiny``,
    1.2e-38 in float32), so that the soup's nonzero pattern *is* the mask: a
    later ``!= 0`` (sparsity reports, FixedMask, the compressed format, the
    next pruning round) reads the same mask. The change to the function is far
    below float rounding.

    Args:
        states: ingredient state dicts.
        weights: one non-negative weight per ingredient. Default uniform.
        masks: ``{state key: keep-mask}`` the ingredients were trained under.
            When given, every ingredient must be zero wherever its mask is
            (a kept weight that happens to be exactly zero is allowed), and the
            soup keeps these masks. Default: the ingredients' common zero
            pattern (:func:`check_shared_mask`, which then must agree exactly).
        names: with ``masks=None``, the keys whose zero patterns form the mask
            (default every floating tensor with >= 2 dims).

    Raises:
        SparseforgeError: incompatible states, zero patterns that differ, or an
            ingredient with a nonzero where ``masks`` prunes.

    >>> a = {"w": torch.tensor([1.0, 0.0, 2.0, -1.0])}
    >>> b = {"w": torch.tensor([3.0, 0.0, 4.0, 1.0])}
    >>> soup = sparse_soup([a, b], names=["w"])
    >>> soup["w"][:3], bool(soup["w"][3] != 0)
    (tensor([2., 0., 3.]), True)
    """
    if masks is None:
        keep = check_shared_mask(states, names)
    else:
        check_compatible(states)
        keep = {}
        for k, m in masks.items():
            if k not in states[0]:
                raise SparseforgeError(f"masks names {k!r}, which is not in the state dicts")
            m = torch.as_tensor(m).to(device=states[0][k].device) != 0
            if m.shape != states[0][k].shape:
                raise SparseforgeError(f"the mask of {k!r} has shape {tuple(m.shape)}, the tensor "
                                       f"{tuple(states[0][k].shape)}")
            for i, s in enumerate(states):
                outside = int(((s[k] != 0) & ~m).sum())
                if outside:
                    raise SparseforgeError(f"model {i} has {outside} nonzero(s) in {k!r} where the mask prunes; "
                                           "train every ingredient under the mask (FixedMask)")
            keep[k] = m
    soup = weighted_average(states, weights)
    for k, m in keep.items():
        t = soup[k].masked_fill(~m, 0.0)
        cancelled = m & (t == 0)
        if bool(cancelled.any()):
            t = t.masked_fill(cancelled, torch.finfo(t.dtype).tiny)
        soup[k] = t
    return soup


@dataclass
class SoupCycle:
    """One prune-retrain-average cycle of :func:`sparse_model_soup`.

    ``masks`` are by layer name (as the Sparsifier names them), ``soup`` is a
    full state dict, ``metrics`` what ``evaluate`` said of the soup and
    ``ingredients`` what ``train_fn`` returned for each ingredient.
    """

    cycle: int
    sparsity: float
    masks: dict[str, Tensor]
    soup: dict[str, Tensor]
    seeds: list[int]
    metrics: dict[str, Any] = field(default_factory=dict)
    ingredients: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mask_sparsity(self) -> float:
        """Fraction of the targeted weights the masks prune."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def to_dict(self) -> dict[str, Any]:
        """The numbers, without tensors (for JSON)."""
        return {"cycle": self.cycle, "sparsity": self.sparsity, "mask_sparsity": self.mask_sparsity,
                "seeds": self.seeds, "metrics": self.metrics, "ingredients": self.ingredients}


def _ingredient_seed(seed: int, cycle: int, i: int) -> int:
    # Distinct per (run, cycle, ingredient); ingredient 0 of every cycle gets the same seeds
    # whatever m is, so an m = 1 run (IMP from one model) retrains like the soup's first ingredient.
    return (int(seed) * 1_000_003 + cycle * 1_009 + i) % (2**63)


def _param_key(layer_name: str, param: str) -> str:
    return f"{layer_name}.{param}" if layer_name else param


def sparse_model_soup(
    model: nn.Module,
    train_fn: SoupTrainFn,
    sparsities: Sequence[float],
    *,
    ingredients: int = 3,
    weights: Sequence[float] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    seed: int = 0,
    min_keep: int = 1,
    target: Target | Sequence[str] | str | None = None,
) -> list[SoupCycle]:
    """Sparse Model Soups (SMS): iterative magnitude pruning whose every cycle retrains ``m`` copies and averages them.

    Rule (Algorithm 1 of "Sparse Model Soups: A Recipe for Improved Pruning
    via Model Averaging", Zimmer, Spiegel and Pokutta, ICLR 2024): starting
    from the (trained) ``model``, for each sparsity ``s_c`` in ``sparsities``:
    prune the current soup one-shot by global magnitude to ``s_c``
    (:func:`~sparseforge.methods.GlobalMagnitude`; the zeros of the previous
    cycle have the smallest magnitude, so the masks are nested), retrain
    ``ingredients`` copies of the pruned model under that fixed mask
    (:func:`~sparseforge.methods.FixedMask`), each with its own seed, and
    average them with :func:`sparse_soup` into the next cycle's start. With
    ``ingredients=1`` this is IMP continuing from one model (no rewinding):
    the paper's baseline.

    Args:
        model: the trained dense (or already pruned) model; it ends holding
            the last soup.
        train_fn: see :data:`SoupTrainFn`.
        sparsities: model-level sparsity of each cycle, strictly increasing in (0, 1).
        ingredients: m, models retrained per cycle. Default 3.
        weights: soup weights of the ingredients. Default uniform.
        evaluate: ``evaluate(model) -> metrics`` for each soup (loaded into
            ``model``). Default None (no metrics).
        seed: the ingredients' seeds derive from it, the cycle and the index.
        min_keep: weights kept per layer at least (GlobalMagnitude's MT). Default 1.
        target: which tensors are pruned. Default every Linear/Conv weight.

    Returns one :class:`SoupCycle` per sparsity.
    """
    if isinstance(ingredients, bool) or not isinstance(ingredients, int) or ingredients < 1:
        raise SparseforgeError(f"ingredients must be a positive integer, got {ingredients!r}")
    levels = [float(s) for s in sparsities]
    if not levels or any(not 0.0 < s < 1.0 for s in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
        raise SparseforgeError(f"sparsities must be strictly increasing values in (0, 1), got {list(sparsities)}")
    target = as_target(target)
    cycles = []
    for c, s in enumerate(levels, start=1):
        # Prune the current soup (the trained model in cycle 1) one-shot.
        sp = Sparsifier(model, GlobalMagnitude(s, min_keep=min_keep, target=target))
        masks = {name: m.clone() for name, m in sp.masks.items()}
        keys = {_param_key(layer.name, layer.param_name): layer.name for layer in sp.layers}
        sp.finalize()
        method = FixedMask(masks, target=target, name=f"sms-cycle{c}")
        seeds = [_ingredient_seed(seed, c, i) for i in range(ingredients)]
        states, metrics = [], []
        for i in seeds:
            member = copy.deepcopy(model)
            metrics.append(dict(train_fn(member, method, i)))
            states.append({k: v.detach().clone() for k, v in member.state_dict().items()})
        soup = sparse_soup(states, weights, masks={k: masks[name] for k, name in keys.items()})
        model.load_state_dict(soup)
        cycle = SoupCycle(cycle=c, sparsity=s, masks=masks, soup=soup, seeds=seeds, ingredients=metrics)
        if evaluate is not None:
            cycle.metrics = dict(evaluate(model))
        cycles.append(cycle)
    return cycles
