"""Channel pruning over dependency groups: every slice tied to a channel is scored and zeroed together.

``sf.prune(model, score, pattern="channel")`` prunes each layer's rows on its
own: a filter goes, but its bias, the BatchNorm after it and the residual
partners it is added to stay, so :func:`sparseforge.compact` can remove only
part of what was pruned. ``sf.prune(model, score, pattern="channel-groups")``
(:class:`~sparseforge.patterns.ChannelGroups`) works on the dependency groups
of :mod:`sparseforge.compact.dependency` instead, through
:func:`prune_channel_groups` here: the channel's score adds up over all its
slices (Torch-Pruning's group importance), and the lowest-scoring channels of
each group lose every slice at once (filters or rows and their biases,
BatchNorm scale and shift, the next layers' input columns), so that
compaction removes all of them.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.compact.dependency import ChannelGroup, DependencyGraph, analyze, attention_out_name, is_attention
from sparseforge.patterns import ChannelGroups, keep_lowest_pruned
from sparseforge.report import PruneReport
from sparseforge.scores import Score, mean_gradients
from sparseforge.targets import Target

# A slice: (parameter name, a view of the parameter with the channel axis at ``axis``, axis).
_Slice = tuple[str, Callable[[torch.Tensor], torch.Tensor], int]


def _views(model: nn.Module, dep: DependencyGraph, g: ChannelGroup) -> tuple[list[_Slice], list[tuple[str, int, Callable]]]:
    """Scored slices (weights, BatchNorm scales) and zeroed slices (also biases and shifts) of a group.

    Zeroed entries are ``(parameter name, axis, channel -> element indices along axis)``.
    """
    scored: list[_Slice] = []
    zeroed: list[tuple[str, int, Callable[[int], list[int]]]] = []
    one = lambda c: [c]  # noqa: E731
    for p in g.producers:
        m = model.get_submodule(p)
        scored.append((f"{p}.weight", lambda w: w, 0))
        zeroed.append((f"{p}.weight", 0, one))
        if m.bias is not None:
            zeroed.append((f"{p}.bias", 0, one))
    for n in g.norms:
        m = model.get_submodule(n)
        if m.weight is not None:
            scored.append((f"{n}.weight", lambda w: w, 0))
            zeroed += [(f"{n}.weight", 0, one), (f"{n}.bias", 0, one)]
    for con in g.consumers:
        m = model.get_submodule(con.module)
        names = [f"{con.module}.{p}" for p in ("q_proj", "k_proj", "v_proj")] if is_attention(m) else [con.module]
        r = con.repeat
        for name in names:
            scored.append((f"{name}.weight", lambda w, r=r, size=g.size: w.reshape(w.shape[0], size, r, -1), 1))
            zeroed.append((f"{name}.weight", 1, lambda c, r=r: list(range(c * r, (c + 1) * r))))
    return scored, zeroed


def _head_views(model: nn.Module, name: str) -> tuple[list[_Slice], list[tuple[str, int, Callable]]]:
    m = model.get_submodule(name)
    h, d = m.num_heads, m.head_dim
    scored: list[_Slice] = []
    zeroed: list[tuple[str, int, Callable[[int], list[int]]]] = []
    rows = lambda i: list(range(i * d, (i + 1) * d))  # noqa: E731
    for p in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(m, p)
        scored.append((f"{name}.{p}.weight", lambda w: w.reshape(h, d, -1), 0))
        zeroed.append((f"{name}.{p}.weight", 0, rows))
        if layer.bias is not None:
            zeroed.append((f"{name}.{p}.bias", 0, rows))
    out = attention_out_name(m)
    scored.append((f"{name}.{out}.weight", lambda w: w.reshape(w.shape[0], h, d), 1))
    zeroed.append((f"{name}.{out}.weight", 1, rows))
    return scored, zeroed


def _matches(names: Sequence[str], target: Target) -> bool:
    include = [target.include] if isinstance(target.include, str) else list(target.include)
    exclude = [target.exclude] if isinstance(target.exclude, str) else list(target.exclude)
    return all(
        any(fnmatch.fnmatchcase(n, g) for g in include) and not any(fnmatch.fnmatchcase(n, g) for g in exclude)
        for n in names
    )


@torch.no_grad()
def prune_channel_groups(
    model: nn.Module,
    score: Score,
    sparsity: float,
    pattern: ChannelGroups,
    target: Target,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    example_input: torch.Tensor | None = None,
) -> PruneReport:
    """Prune ``sparsity`` of the channels of every dependency group of ``model``, in place.

    What :func:`sparseforge.prune` runs for the ``channel-groups`` pattern (arguments already parsed).
    Rule: for every group that can be compacted (see
    :mod:`sparseforge.compact.dependency`; groups reaching the output or a
    non-channel-wise op are skipped) whose producer modules all match the
    target's ``include`` globs and none of its ``exclude``, each channel's
    score is the sum over its slices (producer filters/rows, BatchNorm scales,
    consumer input columns) of ``score.channel_scores``: ``l1`` sums |w| (the
    group's L1 norm), ``l2`` sums w^2, ``taylor`` sums (sum of w*g over a
    slice)^2 (Molchanov et al. 2019; needs ``calibration``). Biases are zeroed
    with their channel but not scored. The ``round(sparsity * channels)``
    lowest channels of each group are zeroed in every slice, keeping at least
    one; attention heads likewise when ``pattern.heads``. Residual groups are
    pruned jointly, so the channel goes from every member. Then
    :func:`sparseforge.compact` removes them all.

    Returns a :class:`~sparseforge.report.PruneReport` with ``groups`` (members, channels,
    pruned indices, or why skipped) and ``apply(model)``, which re-zeroes the slices.
    """
    start = time.perf_counter()
    dep = analyze(model, example_input)
    params = dict(model.named_parameters())
    units: list[tuple[dict[str, Any], list[_Slice], list, int]] = []
    for g in dep.groups:
        entry = {"members": g.producers + g.norms, "channels": g.size, "pruned": [], "skipped": ""}
        if g.blocked:
            entry["skipped"] = g.blocked[0]
        elif not _matches(g.producers, target):
            entry["skipped"] = "not targeted"
        units.append((entry, *_views(model, dep, g), g.size))
    if pattern.heads:
        for hg in dep.heads:
            entry = {"members": [hg.module], "channels": hg.num_heads, "pruned": [], "skipped": "", "heads": True}
            if not _matches([hg.module], target):
                entry["skipped"] = "not targeted"
            units.append((entry, *_head_views(model, hg.module), hg.num_heads))
    active = [u for u in units if not u[0]["skipped"]]
    grads: dict[str, torch.Tensor] = {}
    if score.needs_grad and active:
        if calibration is None:
            score._grad(None)  # raises the error that explains what to pass
        names = sorted({s[0] for u in active for s in u[1]})
        with torch.enable_grad():
            gs = mean_gradients(model, [params[n] for n in names], calibration, loss_fn, max_batches)
        grads = dict(zip(names, gs))
    result = PruneReport(method=str(score), pattern=str(pattern), allocation="uniform", requested=sparsity)
    for entry, scored, zeroed, size in units:
        result.groups.append(entry)
        if entry["skipped"]:
            continue
        total = torch.zeros(size, dtype=torch.float64)
        for name, view, axis in scored:
            w = view(params[name].detach())
            gview = view(grads[name]) if name in grads else None
            total += score.channel_scores(w, gview, axis).double().cpu()
        n_prune = int(round(sparsity * size))
        keep = keep_lowest_pruned(total, torch.ones(size, dtype=torch.long), n_prune)
        pruned = [int(c) for c in torch.nonzero(~keep).flatten()]
        entry["pruned"] = pruned
        if not pruned:
            continue
        for name, axis, indices in zeroed:
            idx = torch.tensor([i for c in pruned for i in indices(c)], dtype=torch.long)
            result._zero.append((name, axis, idx))
    if not any(not u[0]["skipped"] for u in units):
        raise SparseforgeError(
            "channel-group pruning found no channel group to prune (every group reaches the output, a "
            "non-channel-wise op, or is excluded); see sparseforge.compact.dependency"
        )
    result.apply(model)
    for name in dict.fromkeys(n for n, _, _ in result._zero if n.endswith(".weight")):
        result.record(name.removesuffix(".weight"), params[name], sparsity)
    result.seconds = time.perf_counter() - start
    return result.with_model(model, example_input)
