"""Weight matching (Git Re-Basin): align one network's hidden units to another's before merging.

From "Git Re-Basin: Merging Models modulo Permutation Symmetries" (Ainsworth,
Hayase and Srinivasa, ICLR 2023). Permuting the hidden units of a network
(the output rows of a layer, together with the matching input columns of the
next) does not change the function it computes, so two independently trained
networks can be far apart in weight space only because their units are
ordered differently. Weight matching picks, for every permutable channel
space, the permutation of model B's units that makes B's weights as similar
as possible to A's (largest sum of inner products), after which averaging or
interpolating the two is much less harmful.

The permutable channel spaces and every tensor slice tied to them come from
the project's dependency analysis,
:func:`sparseforge.compact.dependency.analyze`: each unblocked
:class:`~sparseforge.compact.dependency.ChannelGroup` is one permutation, and
it moves its producers' output rows (and biases), its norms' channels
(weight, bias, running mean and variance) and its consumers' input columns
(``repeat`` consecutive columns per channel after a flatten). Residual
streams are one group (a ResNet stage shares one permutation), and blocked
groups (the logits, anything reaching an op that mixes channels) are never
permuted.

Permutation convention: ``perms[g][i] = j`` means channel ``i`` of the
permuted B is channel ``j`` of the original B (``W_B[perms[g]]`` along the
producer's output dimension), as in the paper's code.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.compact.dependency import DependencyGraph, analyze
from sparseforge.extras import require
from sparseforge.merge.core import weighted_average
from sparseforge.quality import evaluate

__all__ = [
    "apply_permutation",
    "interpolate",
    "interpolation_path",
    "loss_barrier",
    "random_permutation",
    "reset_bn_stats",
    "weight_matching",
]

Perms = dict[int, torch.Tensor]
"""Permutation of each matched channel group, by group id (``ChannelGroup.id``)."""

_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class _Axis:
    """One dimension of one state-dict tensor that a group permutes: ``repeat`` entries per channel."""

    key: str
    dim: int
    repeat: int
    group: int


def _group_axes(graph: DependencyGraph, keys: Iterable[str]) -> dict[int, list[_Axis]]:
    """The tensor dimensions each permutable group moves, built from the dependency analysis.

    A group is permutable when it is not blocked and every consumer is a module
    whose ``weight`` holds the input columns (Linear, Conv): an attention block
    consumes through its q/k/v projections, which this module does not permute.
    """
    keys = set(keys)
    modules = dict(graph.graph_module.named_modules())
    out: dict[int, list[_Axis]] = {}
    seen: dict[tuple[str, int], int] = {}
    for g in graph.groups:
        if g.blocked:
            continue
        if any(not isinstance(modules.get(c.module), nn.Linear | nn.Conv1d | nn.Conv2d) for c in g.consumers):
            continue
        axes = []
        for p in g.producers:
            axes += [_Axis(f"{p}.{s}", 0, 1, g.id) for s in ("weight", "bias") if f"{p}.{s}" in keys]
        for n in g.norms:
            axes += [_Axis(f"{n}.{s}", 0, 1, g.id) for s in _NORM_KEYS if f"{n}.{s}" in keys]
        axes += [_Axis(f"{c.module}.weight", 1, c.repeat, g.id) for c in g.consumers]
        for a in axes:
            if a.key not in keys:
                raise SparseforgeError(f"the state dict has no {a.key}, which the dependency analysis names: "
                                       "pass a state dict of the analysed architecture")
            other = seen.setdefault((a.key, a.dim), g.id)
            if other != g.id:  # the analysis merges tied spaces, so this would be a bug there
                raise SparseforgeError(f"dimension {a.dim} of {a.key} belongs to groups {other} and {g.id}")
        out[g.id] = axes
    return out


def _index(perm: torch.Tensor, repeat: int) -> torch.Tensor:
    """Indices along a dimension holding ``repeat`` consecutive entries per channel."""
    if repeat == 1:
        return perm
    return (perm[:, None] * repeat + torch.arange(repeat, device=perm.device)).reshape(-1)


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return dict(model_or_state.state_dict())
    if isinstance(model_or_state, Mapping):
        return dict(model_or_state)
    raise SparseforgeError(f"expected an nn.Module or a state dict, got {type(model_or_state).__name__}")


def _check_perms(graph: DependencyGraph, axes: Mapping[int, list[_Axis]], perms: Mapping[Any, torch.Tensor]) -> None:
    sizes = {g.id: g for g in graph.groups}
    for gid, perm in perms.items():
        group = sizes.get(gid)
        if group is None:
            raise SparseforgeError(f"no channel group {gid!r}; groups are {sorted(sizes)}")
        if gid not in axes:
            why = "; ".join(group.blocked) or "an attention block consumes it"
            raise SparseforgeError(f"group {gid} {group.describe()} cannot be permuted: {why}")
        p = torch.as_tensor(perm)
        if p.dim() != 1 or p.numel() != group.size or p.is_floating_point() or not torch.equal(
            p.sort().values.cpu(), torch.arange(group.size)
        ):
            raise SparseforgeError(f"perms[{gid}] must be a permutation of 0..{group.size - 1} (integers, each once)")


def apply_permutation(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], graph: DependencyGraph, perms: Mapping[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Permute the hidden units of a model so that it computes exactly the same function.

    Rule: for every group ``g`` in ``perms`` (a channel group of ``graph``, see
    :func:`sparseforge.compact.dependency.analyze`), select ``perms[g]`` along
    the output dimension of its producers' weights and biases, along its
    norms' weight, bias, running mean and variance, and along the input
    dimension of its consumers' weights (``repeat`` consecutive columns per
    channel after a flatten). Groups not in ``perms`` are left as they are.

    Args:
        model_or_state: the model (B) or its state dict.
        graph: the dependency analysis of the architecture.
        perms: ``{group id: LongTensor permutation}``, e.g. from :func:`weight_matching`.

    Returns a new state dict; tensors no group touches are the same objects as
    in the input, permuted ones are new.

    Raises:
        SparseforgeError: an unknown or blocked group, or a perm that is not a
            permutation of the group's channels.

    >>> from sparseforge.zoo.models import LeNet300100
    >>> model = LeNet300100()
    >>> graph = analyze(model)
    >>> state = apply_permutation(model, graph, random_permutation(graph, seed=1))
    >>> x = torch.randn(3, 1, 28, 28)
    >>> other = LeNet300100(); _ = other.load_state_dict(state)
    >>> torch.allclose(model(x), other(x), atol=1e-5), torch.equal(state["fc1.weight"], model.fc1.weight)
    (True, False)
    """
    state = _state(model_or_state)
    axes = _group_axes(graph, state)
    _check_perms(graph, axes, perms)
    out = dict(state)
    for gid, perm in perms.items():
        p = torch.as_tensor(perm).long()
        for a in axes[gid]:
            t = out[a.key]
            out[a.key] = t.index_select(a.dim, _index(p.to(t.device), a.repeat))
    return out


def random_permutation(graph: DependencyGraph, seed: int = 0) -> Perms:
    """A uniformly random permutation of every permutable group of ``graph`` (seeded).

    Permuting a model with these (:func:`apply_permutation`) gives the same
    function in a different unit order: the test case of weight matching.
    """
    gen = torch.Generator().manual_seed(int(seed))
    # The traced module holds the analysed model's submodules under the same names.
    axes = _group_axes(graph, graph.graph_module.state_dict())
    sizes = {g.id: g.size for g in graph.groups}
    return {gid: torch.randperm(sizes[gid], generator=gen) for gid in axes}


def _flat(t: torch.Tensor, dim: int, channels: int) -> torch.Tensor:
    """``t`` as a ``[channels, -1]`` matrix whose row i holds every entry tied to channel i along ``dim``."""
    return t.movedim(dim, 0).reshape(channels, -1)


@torch.no_grad()
def weight_matching(
    model_a: nn.Module,
    model_b: nn.Module | Mapping[str, torch.Tensor],
    *,
    example_input: torch.Tensor | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> Perms:
    """Permutations of B's hidden units that best align its weights with A's (weight matching).

    Rule (Algorithm 2 of "Git Re-Basin: Merging Models modulo Permutation
    Symmetries", Ainsworth et al., ICLR 2023): maximise
    ``sum over tensors <W_A, P(W_B)>`` over the permutations of all permutable
    channel groups by coordinate descent. Starting from the identity, visit
    the groups in a random order; for group ``g`` build the ``n x n`` matrix
    ``C[i, j] = sum over every tensor slice tied to g of
    <slice i of W_A, slice j of W_B>``, where W_B is already permuted by the
    other groups' current permutations along its other dimension (producer
    rows with their biases, norm parameters and running statistics, consumer
    columns), and solve the linear assignment ``max sum_i C[i, perm[i]]`` with
    :func:`scipy.optimize.linear_sum_assignment`. A group's permutation is
    replaced only when it strictly improves its term; the descent stops after
    a sweep in which no group improved, or after ``max_iter`` sweeps.

    The groups come from :func:`sparseforge.compact.dependency.analyze` of
    ``model_a``: blocked groups (the logits) and groups consumed by attention
    blocks are not permuted and are absent from the result.

    Args:
        model_a: the reference model (A); its units keep their order.
        model_b: the model to align (B), or its state dict; same architecture.
        example_input: one input batch for the dependency analysis. Default:
            ``model_a.input_shape`` (zoo models).
        max_iter: most sweeps over all groups. Default 100.
        seed: seed of the random visiting order. Default 0.

    Returns:
        ``{group id: LongTensor perm}``: :func:`apply_permutation` of B with
        these moves B's units onto A's.

    Raises:
        SparseforgeError: B's tensors are missing or shaped differently from A's.

    >>> from sparseforge.zoo.models import LeNet300100
    >>> a = LeNet300100()
    >>> graph = analyze(a)
    >>> b = apply_permutation(a, graph, random_permutation(graph, seed=3))
    >>> perms = weight_matching(a, b)
    >>> all(torch.equal(t, a.state_dict()[k]) for k, t in apply_permutation(b, graph, perms).items())
    True
    """
    # Here, not at the top: scipy is optional (the rebasin extra) and scipy.optimize costs 0.4 s to import.
    linear_sum_assignment = require("scipy.optimize", "weight matching (Git Re-Basin)").linear_sum_assignment

    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise SparseforgeError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(model_a, nn.Module):
        raise SparseforgeError(f"model_a must be an nn.Module (it is traced), got {type(model_a).__name__}")
    state_a = _state(model_a)
    state_b = _state(model_b)
    graph = analyze(model_a, example_input)
    axes = _group_axes(graph, state_a)
    for gid, group_axes in axes.items():
        for a in group_axes:
            if a.key not in state_b:
                raise SparseforgeError(f"model B has no {a.key}; weight matching needs the same architecture")
            if tuple(state_b[a.key].shape) != tuple(state_a[a.key].shape):
                raise SparseforgeError(f"{a.key} has shape {tuple(state_a[a.key].shape)} in A and "
                                       f"{tuple(state_b[a.key].shape)} in B; weight matching needs the same architecture")
    sizes = {g.id: g.size for g in graph.groups}
    by_key: dict[str, list[_Axis]] = {}
    for group_axes in axes.values():
        for a in group_axes:
            by_key.setdefault(a.key, []).append(a)
    # Inner products in float64: the assignment compares sums of many products, and
    # a permuted copy must be recovered exactly.
    wa = {k: state_a[k].detach().to("cpu", torch.float64) for k in by_key}
    wb = {k: state_b[k].detach().to("cpu", torch.float64) for k in by_key}
    perms: Perms = {gid: torch.arange(sizes[gid]) for gid in axes}
    order_gen = torch.Generator().manual_seed(int(seed))
    gids = list(axes)
    for _ in range(max_iter):
        improved = False
        for idx in torch.randperm(len(gids), generator=order_gen).tolist():
            gid = gids[idx]
            n = sizes[gid]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for a in axes[gid]:
                b = wb[a.key]
                for other in by_key[a.key]:
                    if other.dim != a.dim:
                        b = b.index_select(other.dim, _index(perms[other.group], other.repeat))
                cost += _flat(wa[a.key], a.dim, n) @ _flat(b, a.dim, n).T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
            old_value = cost[torch.arange(n), perms[gid]].sum().item()
            new_value = cost[torch.arange(n), new].sum().item()
            # Strict improvement with a relative tolerance: equal-valued ties must not
            # flip back and forth and keep the loop running.
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[gid] = new
                improved = True
        if not improved:
            break
    return perms


def interpolate(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The point ``(1 - alpha) * A + alpha * B`` on the linear path between two models.

    Rule: a weighted average with weights ``(1 - alpha, alpha)``
    (:func:`sparseforge.merge.core.weighted_average`): floating-point tensors
    are interpolated, others (BatchNorm's ``num_batches_tracked``) are taken
    from A. ``alpha = 0`` gives A and ``alpha = 1`` gives B.

    BatchNorm running statistics interpolated this way do not match the
    interpolated network's activations (the variance collapses between the
    two ends): recompute them with :func:`reset_bn_stats` before evaluating,
    as Git Re-Basin does for its ResNets.

    Args:
        state_a, state_b: state dicts of the same architecture.
        alpha: position on the path, in [0, 1].
    """
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise SparseforgeError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise SparseforgeError(f"alpha must be in [0, 1], got {alpha}")
    return weighted_average([state_a, state_b], [1.0 - alpha, alpha])


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance from ``batches``; returns ``model``.

    Rule: reset the running statistics, set ``momentum=None`` (a cumulative
    average over all batches rather than an exponential one), run the model
    in train mode on every batch without gradients, then restore each norm's
    momentum and the model's train/eval mode. This is the BatchNorm reset that
    "Git Re-Basin" (Ainsworth et al., ICLR 2023) applies to interpolated
    ResNets, whose averaged running statistics do not describe the averaged
    network. A model without BatchNorm is returned unchanged.

    Args:
        model: the model, modified in place.
        batches: an iterable of input tensors or ``(inputs, targets)`` pairs
            (e.g. a few training batches).

    Raises:
        SparseforgeError: ``batches`` is empty while the model has BatchNorm layers.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            model(x.to(device))
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise SparseforgeError("reset_bn_stats needs at least one batch to recompute the BatchNorm statistics")
    return model


@torch.no_grad()
def interpolation_path(
    model: nn.Module,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    alphas: Sequence[float],
    *,
    bn_batches: Iterable[Any] | None = None,
) -> list[dict[str, float]]:
    """Test loss and accuracy of :func:`interpolate` ``(A, B, alpha)`` at each alpha.

    Each point is evaluated on a copy of ``model`` (which is left as it is)
    with :func:`sparseforge.quality.evaluate`; when ``bn_batches`` is
    given, the BatchNorm statistics are recomputed on them first
    (:func:`reset_bn_stats`).

    Returns one ``{"alpha", "loss", "accuracy"}`` dict per alpha.
    """
    if not alphas:
        raise SparseforgeError("interpolation_path needs at least one alpha")
    work = copy.deepcopy(model)
    bn = list(bn_batches) if bn_batches is not None else None
    out = []
    for alpha in alphas:
        work.load_state_dict(interpolate(state_a, state_b, alpha))
        if bn is not None:
            reset_bn_stats(work, bn)
        ev = evaluate(work, loader)
        out.append({"alpha": float(alpha), "loss": ev["loss"], "accuracy": ev["accuracy"]})
    return out


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """The loss barrier of a linear path: ``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]``.

    Rule: the definition of "Git Re-Basin" (Ainsworth et al., ICLR 2023,
    after Frankle et al. 2020): the largest rise of the loss along the path
    above the straight line between its ends. ``alphas`` must start at 0 and
    end at 1. Zero (or below) means the two ends are linearly mode connected.

    >>> loss_barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0])
    1.5
    """
    if len(alphas) != len(losses) or len(alphas) < 2:
        raise SparseforgeError("loss_barrier needs as many losses as alphas, at least two")
    if float(alphas[0]) != 0.0 or float(alphas[-1]) != 1.0:
        raise SparseforgeError(f"the alphas must run from 0 to 1, got {alphas[0]} .. {alphas[-1]}")
    l0, l1 = float(losses[0]), float(losses[-1])
    return max(float(loss) - ((1.0 - float(a)) * l0 + float(a) * l1) for a, loss in zip(alphas, losses))
