"""Global magnitude pruning with a per-layer minimum: magnitude + global allocation + hard prune."""

from __future__ import annotations

from collections.abc import Sequence

from sparseforge.allocation import Global
from sparseforge.errors import SparseforgeError
from sparseforge.method import METHODS, Method
from sparseforge.schedules import Cubic, OneShot, Schedule
from sparseforge.targets import Target
from sparseforge.updates import HardPrune


@METHODS.register("global-magnitude")
def GlobalMagnitude(
    sparsity: float = 0.9,
    *,
    min_keep: int = 1,
    schedule: str | Schedule = "oneshot",
    start: int | float = 0,
    end: int | float = 0.75,
    frequency: int = 100,
    target: Target | Sequence[str] | str | None = None,
) -> Method:
    """Global magnitude pruning with a minimum threshold ("Is Complexity Required for
    Neural Network Pruning? A Case Study on Global Magnitude Pruning", Gupta et al. 2022).

    Rule: rank the magnitudes of all targeted weights of the model together
    and prune the smallest, so that ``sparsity`` of them are zero (Global MP);
    every layer keeps at least ``min_keep`` weights (the paper's Minimum
    Threshold, MT, which prevents layer collapse): a layer with at most
    ``min_keep`` weights is not pruned, a layer that would keep fewer keeps
    exactly ``min_keep`` (its largest), and the budget this frees is pruned
    from the other layers by the same global ranking. See
    :class:`~sparseforge.allocation.Global` for how this redistribution differs
    from the authors' code.

    The paper's code gives MT as a percentage of the model's weights (0.05% by
    default); here it is a number of weights: for MT = 0.05% of ``n`` targeted
    weights pass ``min_keep=round(0.0005 * n)``.

    One-shot (the default): the model is pruned when the Sparsifier is created
    (``sf.Sparsifier(model, GlobalMagnitude(0.9)).finalize()`` prunes a
    trained model), or at step ``start``. Gradual (the paper's "gradual
    fashion"): ``schedule="cubic"`` raises the sparsity along Zhu and Gupta's
    cubic schedule from ``start`` to ``end`` every ``frequency`` steps, pruning
    only weights still kept.

    Args:
        sparsity: model-level fraction of targeted weights pruned. Default 0.9.
        min_keep: MT, weights kept in every layer at least. Default 1.
        schedule: ``"oneshot"`` (default), ``"cubic"`` or a Schedule (whose own
            final sparsity is then used).
        start: the pruning step (one-shot) or the ramp's first step; a step or
            a fraction of the run. Default 0.
        end: the cubic ramp's last step or fraction of the run. Default 0.75.
        frequency: steps between cubic pruning events. Default 100.
        target: which tensors. Default every Linear/Conv weight.

    Example:
        >>> import torch, sparseforge as sf
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        >>> with torch.no_grad():  # a small-magnitude output layer: plain Global MP would empty it
        ...     _ = model[2].weight.mul_(1e-3)
        >>> _ = sf.Sparsifier(model, GlobalMagnitude(0.95, min_keep=16)).finalize()
        >>> int((model[2].weight != 0).sum()), int((model[0].weight != 0).sum())
        (16, 195)
    """
    if isinstance(schedule, Schedule):
        sched = schedule
    elif str(schedule).strip().lower() in ("oneshot", "one-shot", "one_shot"):
        sched = OneShot(final=sparsity, start=start)
    elif str(schedule).strip().lower() == "cubic":
        sched = Cubic(final=sparsity, start=start, end=end, frequency=frequency)
    else:
        raise SparseforgeError(f"GlobalMagnitude schedule must be 'oneshot', 'cubic' or a Schedule, got {schedule!r}")
    return Method(
        schedule=sched,
        score="magnitude",
        allocation=Global(min_keep=min_keep),
        update=HardPrune(monotone=True),
        target=target,
        name="global-magnitude",
    )
