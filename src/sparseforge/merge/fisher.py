"""Fisher-weighted averaging: each parameter averaged with weights given by each model's diagonal Fisher information.

From "Merging Models with Fisher-Weighted Averaging" (Matena & Raffel,
NeurIPS 2022). Plain averaging treats every parameter of every model as
equally reliable; Fisher merging weights model ``i``'s value of an entry by
how sharply its own log-likelihood depends on that entry (the diagonal of the
Fisher information, a Laplace approximation of its posterior precision).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparseforge.errors import SparseforgeError
from sparseforge.merge.core import (
    ACC_DTYPE, MERGE_METHODS, MergeMethod, average_tensors, check_compatible, is_mergeable, map_tensors,
    normalize_weights,
)

__all__ = ["fisher_diagonal", "fisher_merge"]

State = Mapping[str, Tensor]

LOSSES = ("empirical", "sampled")

# Per-example gradients of this many floats at once (vmap materializes them all): ~128 MiB in float32.
_CHUNK_FLOATS = 1 << 25


def _unpack(batch: object, index: int) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise SparseforgeError(
            f"batch {index} is a {type(batch).__name__}; fisher_diagonal needs batches of (inputs, labels)"
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise SparseforgeError(f"batch {index}: inputs and labels must be tensors")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise SparseforgeError(
            f"batch {index}: labels must be a 1-D integer tensor with one class index per example, "
            f"got shape {list(y.shape)} {y.dtype} for {x.shape[0]} inputs"
        )
    return x, y


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable,
    *,
    loss: str = "empirical",
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of a classifier: the mean over examples of ``(d log p(y|x) / d theta)^2``.

    From "Merging Models with Fisher-Weighted Averaging" (Matena & Raffel,
    NeurIPS 2022). Per-example gradients are computed with ``torch.func``
    (``vmap`` over ``grad`` of a ``functional_call``), in chunks so memory
    stays bounded. The model runs in eval mode (restored afterwards): dropout
    off, BatchNorm on its running statistics, so one example's gradient does
    not depend on the rest of the batch.

    Args:
        model: a classifier returning logits ``[B, C]``.
        batches: iterable of ``(inputs, labels)`` batches (labels: class indices).
        loss: ``"empirical"`` (default): ``y`` is the true label, the
            "empirical Fisher" of the model on its own data;
            ``"sampled"``: ``y`` is drawn from the model's softmax, the
            Fisher as the paper defines it (an expectation over the model's
            predictive distribution, here with one sample per example).
        max_batches: use at most this many batches (default all).
        seed: seed of the label sampling for ``"sampled"``. Default 0.

    Returns:
        ``parameter name -> Fisher`` (float32, the parameter's shape); the
        names are the model's ``named_parameters()``, as in its ``state_dict``.
    """
    if loss not in LOSSES:
        raise SparseforgeError(f"unknown Fisher loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise SparseforgeError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters()}
    if not params:
        raise SparseforgeError("the model has no parameters; there is no Fisher to compute")
    buffers = {k: b.detach() for k, b in model.named_buffers()}
    device = next(iter(params.values())).device
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, min(512, _CHUNK_FLOATS // n_params))
    totals = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def log_likelihood(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits, dim=-1)[0].gather(0, y.unsqueeze(0))[0]

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            x, y = _unpack(batch, index)
            x, y = x.to(device), y.to(device)
            if loss == "sampled":
                with torch.no_grad():
                    logits = model(x)
                if logits.dim() != 2:
                    raise SparseforgeError(f"the model must return logits [B, C], got shape {list(logits.shape)}")
                probs = torch.softmax(logits.double(), dim=-1).cpu()
                y = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
            for xs, ys in zip(x.split(chunk), y.split(chunk)):
                grads = per_example(params, xs, ys)
                for k, g in grads.items():
                    totals[k].add_(g.float().square().sum(0))
                count += xs.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise SparseforgeError("no examples to compute the Fisher on: batches was empty")
    return {k: v / count for k, v in totals.items()}


def fisher_merge(
    states: Sequence[State],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """Fisher-weighted average: ``theta* = sum_i w_i F_i theta_i / sum_i w_i F_i`` per entry.

    From "Merging Models with Fisher-Weighted Averaging" (Matena & Raffel,
    NeurIPS 2022), with the paper's per-model coefficients ``w`` (``weights``,
    default uniform, normalized to sum 1) and a floor ``eps`` added to every
    Fisher (default 1e-8) so that entries where all Fishers are 0 fall back
    to the plain weighted average instead of 0/0.

    Tensors without a Fisher (buffers such as BatchNorm running statistics,
    which have no gradient) are averaged with the same weights ``w``, as if
    their Fishers were equal; non-floating tensors are copied from the first
    model. Every Fisher dict must cover the same parameters.

    Args:
        states: compatible state dicts.
        fishers: one ``name -> Fisher`` dict per state (from :func:`fisher_diagonal`).
        weights: per-model coefficients (default uniform).
        eps: non-negative floor added to each Fisher. Default 1e-8.
    """
    check_compatible(states)
    if len(fishers) != len(states):
        raise SparseforgeError(f"got {len(fishers)} Fisher dicts for {len(states)} models; give one per model")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise SparseforgeError(f"eps must be a finite non-negative number, got {eps!r}")
    w = normalize_weights(weights, len(states))
    keys = set(fishers[0])
    for i, fisher in enumerate(fishers):
        if set(fisher) != keys:
            diff = sorted(set(fisher) ^ keys)
            raise SparseforgeError(
                f"Fisher {i} covers different parameters than Fisher 0 (e.g. {diff[:5]}); "
                "compute every Fisher on the same architecture"
            )
        for k, f in fisher.items():
            ref = states[0].get(k)
            if ref is None or not is_mergeable(ref):
                raise SparseforgeError(f"Fisher {i} has {k!r}, which is not a floating tensor of the models")
            if f.shape != ref.shape:
                raise SparseforgeError(f"Fisher {i} for {k!r} has shape {list(f.shape)}, the parameter {list(ref.shape)}")
            if not torch.isfinite(f).all() or (f < 0).any():
                raise SparseforgeError(f"Fisher {i} for {k!r} has negative or non-finite entries; a Fisher is >= 0")

    def rule(name: str, tensors: list[Tensor]) -> Tensor:
        if name not in keys:
            return average_tensors(tensors, w)
        # theta_0 + sum_i c_i (theta_i - theta_0) / sum_i c_i: the same weighted mean,
        # and exactly theta_0 when all models are equal.
        first = tensors[0].to(ACC_DTYPE)
        num = torch.zeros_like(first)
        den = torch.zeros_like(first)
        for wi, t, fisher in zip(w, tensors, fishers):
            c = (fisher[name].to(device=first.device, dtype=ACC_DTYPE) + eps) * wi
            num.add_(c * (t.to(ACC_DTYPE) - first))
            den.add_(c)
        merged = (first + num / torch.where(den > 0, den, 1.0)).to(tensors[0].dtype)
        if not (den > 0).all():  # only with eps=0: entries no model has information on get the plain average
            merged = torch.where(den > 0, merged, average_tensors(tensors, w))
        return merged

    return map_tensors(states, rule)


MERGE_METHODS.register("fisher", MergeMethod(
    python_only="Fisher merging needs each model's Fisher information (computed on data)",
    summary="Fisher-weighted averaging (Python: fisher_diagonal, fisher_merge)"))
