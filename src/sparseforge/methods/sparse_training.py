"""Sparse training from scratch: static random masks, SET, RigL, GraNet.

Each is a preset of the shared parts; the differences are the schedule and
the update (see :class:`~sparseforge.updates.PruneRegrow`).
"""

from __future__ import annotations

from collections.abc import Mapping

from sparseforge.allocation import Allocation
from sparseforge.method import METHODS, Method
from sparseforge.schedules import Constant, Cubic
from sparseforge.scores import Random
from sparseforge.targets import TargetSpec
from sparseforge.updates import Chain, HardPrune, PruneRegrow

AllocationSpec = Allocation | str | Mapping[str, float]


@METHODS.register("static", aliases=("static-random",))
def StaticRandom(sparsity: float = 0.9, *, allocation: AllocationSpec = "erk", seed: int = 0,
                 target: TargetSpec = None) -> Method:
    """A random mask drawn once at initialisation and kept for the whole run.

    ("The Unreasonable Effectiveness of Random Pruning: Return of the Most
    Naive Baseline for Sparse Training", Liu et al. 2022.) Rule: at step 0,
    each layer keeps a uniformly random subset of its weights, of the size the
    allocation gives it (``uniform``, ``er`` or ``erk``); the mask never changes.

    Args:
        sparsity: model-level sparsity. Default 0.9.
        allocation: ``erk`` (default), ``er``, ``uniform`` or an Allocation.
        seed: seed of the random mask. Default 0.
    """
    return Method(
        schedule=Constant(final=sparsity, start=0, end=0),
        score=Random(seed=seed),
        allocation=allocation,
        update=HardPrune(monotone=False),
        target=target,
        name=f"static-random-{allocation if isinstance(allocation, str) else type(allocation).__name__.lower()}",
    )


@METHODS.register("set")
def SET(sparsity: float = 0.9, *, drop_fraction: float = 0.3, frequency: int = 100, end: int | float = 1.0,
        allocation: AllocationSpec = "erk", seed: int = 0, target: TargetSpec = None) -> Method:
    """Sparse Evolutionary Training ("Scalable training of artificial neural networks
    with adaptive sparse connectivity inspired by network science", Mocanu et al. 2018).

    Rule: start from a random sparse mask (``allocation``, ER in the paper,
    ERK here by default as in RigL's comparison); every ``frequency`` steps
    drop the fraction ``drop_fraction`` (zeta = 0.3) of each layer's active
    weights with the smallest magnitude and grow as many at random positions,
    initialised to zero. The sparsity stays constant.

    Args:
        sparsity: 0.9; drop_fraction: 0.3 (constant); frequency: 100 steps;
        end: last update (step or fraction of the run), 1.0; allocation: erk; seed: 0.
    """
    return Method(
        schedule=Constant(final=sparsity, start=0, end=end, frequency=frequency),
        score="magnitude",
        allocation=allocation,
        update=PruneRegrow(grow="random", drop_fraction=drop_fraction, anneal="constant", seed=seed),
        target=target,
        name="set",
    )


@METHODS.register("rigl")
def RigL(sparsity: float = 0.9, *, drop_fraction: float = 0.3, frequency: int = 100, end: int | float = 0.75,
         allocation: AllocationSpec = "erk", seed: int = 0, target: TargetSpec = None) -> Method:
    """Rigged Lottery ("Rigging the Lottery: Making All Tickets Winners", Evci et al. 2020).

    Rule: start from a random sparse mask with ERK allocation; every
    ``frequency`` (Delta T) steps until ``end`` (T_end, 75% of training), in
    each layer drop the ``f_t * n_active`` active weights of smallest
    magnitude and grow as many inactive weights with the largest dense
    gradient magnitude, initialised to zero; ``f_t = alpha / 2 (1 + cos(pi t /
    T_end))`` with alpha = ``drop_fraction``.

    Args:
        sparsity: 0.9; drop_fraction: alpha = 0.3; frequency: Delta T = 100 steps;
        end: T_end = 0.75 of the run; allocation: erk; seed: 0 (initial mask).
    """
    return Method(
        schedule=Constant(final=sparsity, start=0, end=end, frequency=frequency),
        score="magnitude",
        allocation=allocation,
        update=PruneRegrow(grow="gradient", drop_fraction=drop_fraction, anneal="cosine", seed=seed),
        target=target,
        name="rigl",
    )


@METHODS.register("granet")
def GraNet(sparsity: float = 0.9, *, initial_sparsity: float = 0.0, drop_fraction: float = 0.5,
           frequency: int = 100, start: int | float = 0, end: int | float = 0.75,
           allocation: AllocationSpec = "global", seed: int = 0, target: TargetSpec = None) -> Method:
    """Gradual pruning with zero-cost neuroregeneration ("Sparse Training via Boosting
    Pruning Plasticity with Neuroregeneration", Liu et al. 2021).

    Rule: at every update from ``start`` to ``end``, first prune by magnitude
    to the cubic (Zhu and Gupta) schedule's sparsity, then drop the fraction
    ``f_t`` of active weights with smallest magnitude and regrow as many with
    the largest dense gradient, zero-initialised; ``f_t`` is cosine-annealed
    from ``drop_fraction`` (0.5 in the paper) to 0. Dense-to-sparse:
    ``initial_sparsity=0``. Sparse-to-sparse: ``initial_sparsity > 0`` (0.5 in
    the paper) with a random initial mask.

    Args:
        sparsity: final 0.9; initial_sparsity: 0 (dense-to-sparse); drop_fraction: 0.5;
        frequency: 100 steps; start: 0; end: 0.75 of the run; allocation: global
        (the paper prunes globally); seed: 0.
    """
    init = Random(seed=seed) if initial_sparsity > 0 else None
    return Method(
        schedule=Cubic(final=sparsity, initial=initial_sparsity, start=start, end=end, frequency=frequency),
        score="magnitude",
        allocation=allocation,
        update=Chain([HardPrune(monotone=True, init=init),
                      PruneRegrow(grow="gradient", drop_fraction=drop_fraction, anneal="cosine", init=None,
                                  seed=seed)]),
        target=target,
        name="granet" if initial_sparsity == 0 else "granet-s2s",
    )
