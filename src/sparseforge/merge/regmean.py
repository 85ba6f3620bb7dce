"""RegMean: merge each Linear layer by solving for the weights that best reproduce every model's outputs on its inputs.

From "Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin
et al., ICLR 2023). For a Linear layer with weights ``W_i`` (out x in) in
model ``i`` and that model's inputs ``X_i`` to the layer, the merged ``W``
minimizing ``sum_i ||X_i W^T - X_i W_i^T||^2`` is

    W* = (sum_i W_i G_i) (sum_i G_i)^-1,   G_i = X_i^T X_i,

so only the Gram matrices ``G_i`` (in x in) of each model's inputs are needed,
not the data. The paper shrinks the off-diagonal entries of every ``G_i`` by
``alpha`` (default 0.9) to regularize towards the plain average.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparseforge.errors import SparseforgeError
from sparseforge.merge.core import (
    ACC_DTYPE, MERGE_METHODS, MergeMethod, average_tensors, check_compatible, map_tensors, normalize_weights,
)
from sparseforge.oneshot.calibration import capture_inputs

__all__ = ["GramMatrices", "gram_matrices", "regmean"]

State = Mapping[str, Tensor]


class GramMatrices(dict):
    """``Linear module name -> G = X^T X`` (float64, in x in), with ``counts[name]``: the input rows summed."""

    def __init__(self, grams: Mapping[str, Tensor] = (), counts: Mapping[str, int] | None = None) -> None:
        super().__init__(grams)
        self.counts: dict[str, int] = dict(counts or {})


def gram_matrices(
    model: nn.Module,
    batches: Iterable,
    *,
    names: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> GramMatrices:
    """Gram matrices ``G = X^T X`` of the inputs of every ``nn.Linear`` (or of the named ones), for RegMean.

    From "Dataless Knowledge Fusion by Merging Weights of Language Models"
    (Jin et al., ICLR 2023). Inputs are captured in one pass by the shared
    calibration capture (:func:`sparseforge.oneshot.calibration.capture_inputs`,
    hooks removed afterwards), leading dimensions flattened (``[B, T, in]`` -> ``[B*T, in]``)
    and accumulated in float64: ``G`` is the sum over all rows, not the mean,
    so a model seen on more data weighs more in the merge, as in the
    least-squares objective.

    Args:
        model: the fine-tuned model, run in eval mode under ``no_grad`` (its mode is restored).
        batches: iterable of batches; a tuple/list batch passes its first item to the model,
            a dict its keyword arguments, anything else is passed as is.
        names: module names of the Linear layers to capture (default: every ``nn.Linear``).
        max_batches: use at most this many batches (default all).

    Returns:
        :class:`GramMatrices`: module name -> ``G``; ``.counts`` holds the number of rows.
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise SparseforgeError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    modules = dict(model.named_modules())
    if names is None:
        selected = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
        if not selected:
            raise SparseforgeError("the model has no nn.Linear layers; RegMean merges Linear weights")
    else:
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise SparseforgeError(f"no module named {unknown[:5]} in the model; pass names of nn.Linear modules")
        not_linear = [n for n in names if not isinstance(modules[n], nn.Linear)]
        if not_linear:
            raise SparseforgeError(f"modules {not_linear[:5]} are not nn.Linear; RegMean merges Linear weights")
        selected = {n: modules[n] for n in names}
    stats = capture_inputs(model, batches, selected, gram_dtype=ACC_DTYPE, max_batches=max_batches)
    unused = [n for n, st in stats.items() if st.rows == 0]
    if unused:
        raise SparseforgeError(f"no inputs reached {unused[:5]}; was batches empty, or are these layers unused?")
    grams = {n: st.gram for n, st in stats.items()}
    counts = {n: st.rows for n, st in stats.items()}
    return GramMatrices(grams, counts)


def _solve(gram_sum: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``gram_sum @ X = rhs`` for symmetric PSD ``gram_sum``; least-norm solution if singular."""
    try:
        return torch.linalg.solve(gram_sum, rhs)
    except torch.linalg.LinAlgError:
        # Only reachable with alpha=1 and fewer independent input rows than features.
        return torch.linalg.lstsq(gram_sum, rhs, driver="gelsd" if gram_sum.device.type == "cpu" else None).solution


def regmean(
    states: Sequence[State],
    grams: Sequence[Mapping[str, Tensor]],
    *,
    alpha: float = 0.9,
) -> dict[str, Tensor]:
    """RegMean: ``W* = (sum_i W_i G_i) (sum_i G_i)^-1`` for every Linear weight with Gram matrices; average the rest.

    From "Dataless Knowledge Fusion by Merging Weights of Language Models"
    (Jin et al., ICLR 2023). ``W*`` minimizes ``sum_i ||X_i W^T - X_i W_i^T||^2``,
    the distance between the merged layer's outputs and each model's own
    outputs on that model's inputs.

    Args:
        states: compatible state dicts.
        grams: one ``module name -> G`` dict per state (from :func:`gram_matrices`),
            all with the same module names; the weight of module ``m`` is ``f"{m}.weight"``.
        alpha: the off-diagonal entries of every ``G_i`` are multiplied by
            ``alpha`` in [0, 1] (the paper's "reduce non-diagonal"; default 0.9):
            ``alpha=1`` is the exact least-squares merge, ``alpha=0`` is a
            per-input-feature weighted average.

    Everything else (biases, other parameters, buffers) is averaged uniformly;
    non-floating tensors are copied from the first model. The linear system
    is solved in float64; input features no model ever saw (zero rows of
    ``sum_i G_i``) get the plain average of their weight columns.
    """
    check_compatible(states)
    if len(grams) != len(states):
        raise SparseforgeError(f"got {len(grams)} Gram dicts for {len(states)} models; give one per model")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and 0 <= alpha <= 1):
        raise SparseforgeError(f"alpha must be a number in [0, 1], got {alpha!r}")
    modules = set(grams[0])
    for i, g in enumerate(grams):
        if set(g) != modules:
            diff = sorted(set(g) ^ modules)
            raise SparseforgeError(f"Gram dict {i} covers different modules than Gram dict 0 (e.g. {diff[:5]})")
    weight_of = {}
    for m in modules:
        key = f"{m}.weight"
        w = states[0].get(key)
        if w is None or w.dim() != 2 or not w.is_floating_point():
            raise SparseforgeError(f"Gram matrices given for {m!r} but the models have no 2-D floating {key!r}")
        for i, g in enumerate(grams):
            if tuple(g[m].shape) != (w.shape[1], w.shape[1]):
                raise SparseforgeError(
                    f"Gram dict {i}: {m!r} is {list(g[m].shape)}, expected [{w.shape[1]}, {w.shape[1]}] "
                    f"(in_features of {key!r} {list(w.shape)})"
                )
        weight_of[key] = m
    uniform = normalize_weights(None, len(states))

    def rule(name: str, tensors: list[Tensor]) -> Tensor:
        module = weight_of.get(name)
        if module is None:
            return average_tensors(tensors, uniform)
        device = tensors[0].device
        gram_sum = None
        rhs = None  # sum_i G_i W_i^T  (in x out)
        for t, g in zip(tensors, grams):
            gi = g[module].to(device=device, dtype=ACC_DTYPE)
            gi = alpha * gi + (1 - alpha) * torch.diag(torch.diagonal(gi)) if alpha != 1 else gi
            term = gi @ t.to(ACC_DTYPE).T
            gram_sum = gi.clone() if gram_sum is None else gram_sum.add_(gi)
            rhs = term if rhs is None else rhs.add_(term)
        # W* G = sum_i W_i G_i with G symmetric  <=>  G W*^T = sum_i G_i W_i^T.
        unseen = torch.diagonal(gram_sum) <= 0
        if unseen.any():
            # An input that is zero for every model has a zero row and column in every G_i (PSD):
            # its weight column is unconstrained. Set G[j, j] = 1 for it in the system: that
            # decouples it and yields the plain average of the columns there.
            idx = unseen.nonzero()[:, 0]
            gram_sum[idx, idx] = float(len(tensors))
            rhs[idx] = sum(t.to(ACC_DTYPE).T[idx] for t in tensors)
        merged_t = _solve(gram_sum, rhs)
        return merged_t.T.contiguous().to(tensors[0].dtype)

    return map_tensors(states, rule)


MERGE_METHODS.register("regmean", MergeMethod(
    python_only="RegMean needs the Gram matrices of each model's Linear inputs (computed on data)",
    summary="RegMean: Linear layers merged by their input Gram matrices (Python: regmean)"))
