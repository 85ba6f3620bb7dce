"""SparseGPT as parts: the OBS reconstruction is an :class:`~sparseforge.updates.Update`.

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(Frantar & Alistarh, ICML 2023). Rule, per layer with weight ``W`` ``[out,
in]`` and the inputs ``X`` it sees on calibration data (collected block by
block on the already pruned blocks before it): column-wise OBS with the damped
Hessian ``2 X^T X / n``; masks chosen per block of ``block_size`` columns by
``w^2 / [H^-1]_jj^2`` (unstructured: the lowest ``sparsity`` share of the
block's weights; N:M: the ``M - N`` lowest of every group of M inputs of a
row), and the pruning error of each column propagated to the columns not yet
fixed, so the kept weights change. The solver is
:func:`sparseforge.oneshot.obs.obs_compress`, shared with GPTQ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sparseforge.allocation import Allocation
from sparseforge.errors import SparseforgeError
from sparseforge.method import Method
from sparseforge.oneshot.obs import obs_compress
from sparseforge.patterns import NM, Pattern, Unstructured, as_pattern
from sparseforge.schedules import OneShot
from sparseforge.targets import Target
from sparseforge.updates import Update, UpdateContext

__all__ = ["OBSReconstruction", "SparseGPT"]


@dataclass
class OBSReconstruction(Update):
    """Prune each layer by Optimal Brain Surgeon updates and reconstruct its output: SparseGPT's step.

    Reads each layer's Hessian (``needs_hessian``), its allocated sparsity and
    its ``[out, fan_in]`` matrix from the :class:`~sparseforge.updates.UpdateContext`
    that one-shot pruning with calibration data builds; rewrites the matrix in
    place (pruned weights 0, kept weights updated) and returns the keep-masks.
    Unstructured or N:M patterns only. A Sparsifier has no calibration
    statistics to give it.

    Args:
        block_size: columns per lazy-update block (and per mask choice, unstructured). Default 128.
        damp: Hessian damping relative to its mean diagonal. Default 0.01.
    """

    block_size: int = 128
    damp: float = 0.01
    needs_hessian = True

    def __call__(self, ctx: UpdateContext) -> list[torch.Tensor]:
        if ctx.weights is None or ctx.stats is None or ctx.sparsities is None:
            raise SparseforgeError(
                f"{self} reconstructs layers from their inputs on calibration data: use it one-shot, "
                "sparseforge.prune(model, 'sparsegpt', calibration=batches)"
            )
        pattern = ctx.pattern
        if not isinstance(pattern, (NM, Unstructured)):
            raise SparseforgeError(f"{self} prunes unstructured or N:M, not {pattern}")
        n_m = (pattern.n, pattern.m) if isinstance(pattern, NM) else None
        keeps = []
        for i, weight in enumerate(ctx.weights):
            result = obs_compress(weight, ctx.stats[i].hessian, sparsity=None if n_m else ctx.sparsities[i],
                                  n_m=n_m, block_size=self.block_size, damp=self.damp)
            weight.copy_(result.weight)
            keeps.append(result.keep)
        return keeps

    def __str__(self) -> str:
        return f"obs-reconstruction(block_size={self.block_size}, damp={self.damp:g})"


def SparseGPT(
    sparsity: float = 0.5,
    *,
    pattern: Pattern | str = "unstructured",
    allocation: Allocation | str | Mapping[str, float] = "uniform",
    target: Target | Sequence[str] | str | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> Method:
    """SparseGPT: one-shot OBS pruning with reconstruction of the kept weights (see the module docstring).

    A one-shot method: pass it (or its name, ``"sparsegpt"``) to
    :func:`sparseforge.prune` with calibration batches. The masks come from the
    OBS saliency inside the solver; the score (magnitude) is not used to choose
    them, and allocations that compare layers by score (OWL, global, LAMP) read
    Wanda's scores on the dense model, as for every method pruned layer by layer.

    Args:
        sparsity: share of each layer's weights to prune (before allocation);
            ignored for N:M, which fixes it. Default 0.5.
        pattern, allocation, target: as in :class:`~sparseforge.methods.Method`.
        block_size, damp: see :class:`OBSReconstruction`.
    """
    pat = as_pattern(pattern)
    final = pat.sparsity if isinstance(pat, NM) else sparsity
    return Method(schedule=OneShot(final=final), score="magnitude", pattern=pat, allocation=allocation,
                  update=OBSReconstruction(block_size=block_size, damp=damp), target=target, name="sparsegpt")
