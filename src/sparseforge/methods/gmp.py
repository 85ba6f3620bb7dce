"""Gradual magnitude pruning (GMP): cubic schedule + magnitude + hard prune."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sparseforge.allocation import Allocation
from sparseforge.method import METHODS, Method
from sparseforge.patterns import Pattern
from sparseforge.schedules import Cubic
from sparseforge.targets import Target
from sparseforge.updates import HardPrune


@METHODS.register("gmp")
def GMP(
    sparsity: float = 0.9,
    *,
    initial_sparsity: float = 0.0,
    start: int | float = 0,
    end: int | float = 0.75,
    frequency: int = 100,
    pattern: Pattern | str = "unstructured",
    allocation: Allocation | str | Mapping[str, float] = "uniform",
    target: Target | Sequence[str] | str | None = None,
) -> Method:
    """Gradual magnitude pruning ("To prune, or not to prune: exploring the efficacy
    of pruning for model compression", Zhu and Gupta 2017).

    Rule: every ``frequency`` steps between ``start`` and ``end``, raise the
    sparsity along the cubic schedule
    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3`` and prune the
    lowest-magnitude weights that are still kept; pruned weights never come
    back. Training continues after ``end`` at the final sparsity, which lets
    the network recover.

    Args:
        sparsity: final sparsity s_f. Default 0.9.
        initial_sparsity: s_i. Default 0.
        start: t0, a step or a fraction of the run. Default 0.
        end: t0 + n*dt, a step or a fraction of the run. Default 0.75 (the last
            quarter of training fine-tunes at the final sparsity).
        frequency: dt, steps between pruning events. Default 100.
        pattern, allocation, target: as in :class:`Method`. Defaults:
            unstructured, uniform, every Linear/Conv weight.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> sparsifier = sf.Sparsifier(model, sf.methods.GMP(sparsity=0.75, frequency=2), total_steps=8)
        >>> for _ in range(8):
        ...     sparsifier.step()
        >>> round(sparsifier.sparsity(), 2)
        0.75
    """
    schedule = Cubic(final=sparsity, initial=initial_sparsity, start=start, end=end, frequency=frequency)
    return Method(
        schedule=schedule,
        score="magnitude",
        pattern=pattern,
        allocation=allocation,
        update=HardPrune(monotone=True),
        target=target,
        name="gmp",
    )
