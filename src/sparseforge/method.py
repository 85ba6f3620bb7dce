"""A sparsity method: one choice for each part (docs/architecture.md), nothing else.

Named methods (GMP, RigL, ...) are functions in :mod:`sparseforge.methods` that return a
:class:`Method` preset; users may also build one directly from parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sparseforge.allocation import Allocation, as_allocation
from sparseforge.errors import SparseforgeError
from sparseforge.patterns import NM, Pattern, as_pattern
from sparseforge.registry import Registry
from sparseforge.schedules import Cubic, Linear, Schedule
from sparseforge.scores import Score, as_score
from sparseforge.targets import Target, as_target
from sparseforge.updates import HardPrune, Update, as_update

METHODS: Registry[Callable[..., Method]] = Registry("method")
"""Method presets by name (``gmp``, ``rigl``, ...): functions of their hyperparameters returning a
:class:`Method`. Training recipes name them (``method: {name: rigl}``); ``@METHODS.register("name")``
above a preset adds one."""


@dataclass
class Method:
    """A sparsity method as a composition of the six parts.

    Args:
        schedule: how much sparsity at step t, and when masks are updated.
        score: how important each weight is. Default magnitude.
        pattern: what shape the zeros take. Default unstructured.
        allocation: how the budget is split over layers. Default uniform.
        update: what happens at a mask update (an Update or a name of
            :data:`~sparseforge.updates.UPDATES`). Default hard pruning.
        target: which tensors are sparsified. Default every Linear/Conv weight.
        name: a label for reports.

    Example:
        >>> import sparseforge as sf
        >>> m = Method(schedule=sf.schedules.OneShot(final=0.5), allocation="global")
        >>> str(m.pattern), type(m.allocation).__name__
        ('unstructured', 'Global')
    """

    schedule: Schedule
    score: Score | str = "magnitude"
    pattern: Pattern | str = "unstructured"
    allocation: Allocation | str | Mapping[str, float] = "uniform"
    update: Update | str = field(default_factory=HardPrune)
    target: Target | Sequence[str] | str | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        self.score = as_score(self.score)
        self.update = as_update(self.update)
        self.pattern = as_pattern(self.pattern)
        self.allocation = as_allocation(self.allocation)
        self.target = as_target(self.target)
        if not self.pattern.free_sparsity:
            self._check_fixed_sparsity_schedule()

    def _check_fixed_sparsity_schedule(self) -> None:
        # A pattern like N:M allows exactly one sparsity (and 0 before the schedule
        # starts): reject a schedule that would ask for another one now, rather
        # than failing at the first intermediate update, hours into a run.
        fixed = self.pattern.sparsity
        s = self.schedule
        gradual = isinstance(s, (Linear, Cubic)) and s.initial != s.final
        if gradual or abs(float(s.final) - fixed) > 1e-6:
            raise SparseforgeError(
                f"pattern {self.pattern} fixes the sparsity at {fixed:g}, but the schedule {s!r} asks for "
                f"{'a gradual ramp' if gradual else f'sparsity {s.final:g}'}. Use a constant or one-shot "
                f"schedule with final={fixed:g}; to make N:M sparsity gradual, change N:M over time "
                "(ProgressiveNM) rather than the sparsity"
            )

    @property
    def sparsity(self) -> float:
        """The final model-level sparsity."""
        return self.schedule.final

    def describe(self) -> dict[str, str]:
        """The parts as strings, for reports and metrics files."""
        return {
            "name": self.name,
            "schedule": repr(self.schedule),
            "score": str(self.score),
            "pattern": str(self.pattern),
            "allocation": repr(self.allocation),
            "update": str(self.update),
            "target": repr(self.target),
        }


def default_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The sparsity to use when a caller gave none: N:M's own, else an error."""
    if sparsity is None:
        if isinstance(pattern, NM):
            return pattern.sparsity

        raise SparseforgeError("give a sparsity in [0, 1) (or an N:M pattern, which fixes it)")
    return sparsity
