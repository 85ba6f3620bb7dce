"""Essential sparsity: how much of a pretrained model one-shot magnitude pruning removes for free.

"The Emergence of Essential Sparsity in Large Pre-trained Models: The
Weights that Matter" (Jaiswal, Liu, Chen & Wang, NeurIPS 2023). Rule: prune
copies of the model one-shot by weight magnitude at increasing sparsity,
measure each, and call *essential sparsity* the highest sparsity up to which
quality stays within a tolerance of the dense model (the paper: a 1% drop),
the knee after which it falls quickly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.oneshot.prune import prune
from sparseforge.targets import Target

__all__ = ["EssentialSparsity", "essential_sparsity"]

DEFAULT_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(1, 19))  # 5%, 10%, ..., 90%


@dataclass
class EssentialSparsity:
    """The curve (sparsity -> quality) and the essential sparsity read from it."""

    dense: float
    sparsities: list[float]
    values: list[float]
    tolerance: float
    higher_is_better: bool
    essential: float
    steepest_drop: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"dense": self.dense, "curve": dict(zip(map(str, self.sparsities), self.values)),
                "tolerance": self.tolerance, "higher_is_better": self.higher_is_better,
                "essential": self.essential, "steepest_drop": self.steepest_drop}


def essential_sparsity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    tolerance: float = 0.01,
    higher_is_better: bool = True,
    pattern: str = "unstructured",
    target: Target | Sequence[str] | str | None = None,
) -> EssentialSparsity:
    """Prune copies of ``model`` by magnitude at each of ``sparsities`` and find the essential sparsity.

    Args:
        model: the pretrained model (left unchanged: each level prunes a deep copy).
        evaluate: quality of a model, e.g. accuracy (higher is better) or perplexity (then pass
            ``higher_is_better=False``).
        sparsities: the levels, ascending. Default 5%, 10%, ..., 90%.
        tolerance: largest relative loss of quality still counted as free: quality within
            ``tolerance * |dense|`` of the dense model's. Default 0.01 (the paper's 1%).
        higher_is_better: whether larger ``evaluate`` values are better. Default True.
        pattern: ``"unstructured"`` (default) or N:M is not swept here (it fixes the sparsity).
        target: the layers to prune; default as :func:`sparseforge.prune` with calibration data
            (the Linear layers of a transformer's blocks, else every Linear/Conv).

    Returns an :class:`EssentialSparsity`: the curve, the highest level such that
    it and every lower level stay within tolerance (0.0 when the first level
    already does not), and the steepest drop between two neighbouring levels.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.Linear(64, 64)
        >>> x = torch.randn(256, 64)
        >>> ref = layer(x).detach()
        >>> fidelity = lambda m: float(torch.cosine_similarity(m(x).detach().flatten(), ref.flatten(), dim=0))
        >>> curve = essential_sparsity(layer, fidelity, [0.1, 0.3, 0.5, 0.7, 0.9], tolerance=0.05)
        >>> curve.essential, [round(v, 2) for v in curve.values]
        (0.3, [1.0, 0.99, 0.94, 0.82, 0.53])
    """
    levels = [float(s) for s in sparsities]
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])):
        raise SparseforgeError(f"sparsities must be a non-empty ascending list, got {list(sparsities)}")
    if pattern != "unstructured":
        raise SparseforgeError("essential sparsity sweeps unstructured sparsity; an N:M pattern fixes it")
    if tolerance < 0:
        raise SparseforgeError(f"tolerance must be >= 0, got {tolerance}")
    dense = float(evaluate(model))
    values = []
    for s in levels:
        pruned = copy.deepcopy(model)
        # layer by layer over the calibration layers (no data is read: magnitude needs none)
        prune(pruned, "magnitude", s, target=target, calibration=[])
        values.append(float(evaluate(pruned)))
    sign = 1.0 if higher_is_better else -1.0
    floor = abs(dense) * tolerance
    essential = 0.0
    for s, v in zip(levels, values):
        if sign * (dense - v) > floor:
            break
        essential = s
    drops = [(sign * (a - b), s0, s1) for (s0, a), (s1, b) in zip(zip([0.0] + levels, [dense] + values),
                                                                 zip(levels, values))]
    drop, s0, s1 = max(drops)
    return EssentialSparsity(dense, levels, values, tolerance, higher_is_better, essential,
                             {"from": s0, "to": s1, "loss": drop})
