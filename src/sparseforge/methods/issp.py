"""ISS-P: iterative soft shrinkage of the lowest-magnitude percentage, then a hard mask."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sparseforge.allocation import Allocation
from sparseforge.method import METHODS, Method
from sparseforge.patterns import Pattern
from sparseforge.schedules import Constant
from sparseforge.targets import Target
from sparseforge.updates import SoftShrink


@METHODS.register("issp")
def ISSP(
    sparsity: float = 0.9,
    *,
    shrink: float = 0.95,
    frequency: int = 1,
    start: int | float = 0,
    end: int | float = 1 / 3,
    pattern: Pattern | str = "unstructured",
    allocation: Allocation | str | Mapping[str, float] = "uniform",
    target: Target | Sequence[str] | str | None = None,
) -> Method:
    """Iterative Soft Shrinkage-Percentage ("Iterative Soft Shrinkage Learning for
    Efficient Image Super-Resolution", Wang et al., ICCV 2023), from a random initialisation.

    Rule: every ``frequency`` optimizer steps from ``start`` until ``end``
    (the pruning stage, K_p), find in each layer the fraction ``sparsity`` of
    weights with the smallest magnitude and multiply them by ``shrink``
    (alpha); nothing is zeroed, so a weight that grows back leaves the shrunk
    set. The percentage is the target sparsity from the first step (no ramp,
    as in the released code). At ``end`` the lowest-magnitude ``sparsity`` of
    each layer is pruned for good (exact zeros) and training continues with
    that mask frozen (the fine-tuning stage, K_FT). See
    :class:`~sparseforge.updates.SoftShrink`.

    Args:
        sparsity: the percentage P shrunk at each step and pruned at the end. Default 0.9.
        shrink: alpha in [0, 1). Default 0.95 (``--ist_ratio`` of the released
            commands); 0 gives iterative hard thresholding (IHT).
        frequency: steps between shrinks. Default 1 (every iteration, as in the paper).
        start: first shrink, a step or a fraction of the run. Default 0.
        end: K_p, the step (or fraction of the run) of the hard mask. Default 1/3:
            the released code shrinks for 100k iterations, then fine-tunes for 200k.
        pattern, allocation, target: as in :class:`Method`. Defaults:
            unstructured, uniform (per-layer percentage, the paper's "local"
            mode), every Linear/Conv weight.

    Example:
        >>> import torch, sparseforge as sf
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        >>> sp = sf.Sparsifier(model, ISSP(sparsity=0.75, end=4), total_steps=8)
        >>> for _ in range(3):
        ...     sp.step()
        >>> sp.sparsity(), int((model[0].weight == 0).sum())   # shrinking, nothing zeroed
        (0.0, 0)
        >>> for _ in range(5):
        ...     sp.step()
        >>> sp.sparsity()
        0.75
    """
    schedule = Constant(final=sparsity, start=start, end=end, frequency=frequency)
    return Method(
        schedule=schedule,
        score="magnitude",
        pattern=pattern,
        allocation=allocation,
        update=SoftShrink(shrink=shrink),
        target=target,
        name="iss-p" if float(shrink) > 0 else "iht",
    )
