"""How much sparsity at step t: the ``Schedule`` part.

A schedule answers two questions for an optimizer step t (0 = before the
first step): which model-level sparsity holds at t, and whether the masks are
updated at t. ``start`` and ``end`` are steps; a float in (0, 1] means a
fraction of the run's ``total_steps``, which the :class:`Sparsifier` fills in
through :meth:`Schedule.resolve`. Masks are updated every ``frequency`` steps
from ``start`` to ``end`` inclusive, and at ``end`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sparseforge.errors import SparseforgeError
from sparseforge.patterns import check_sparsity
from sparseforge.registry import Registry

SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
"""Schedule names -> classes; ``as_schedule(name, **arguments)`` builds one."""


@dataclass(frozen=True)
class Schedule:
    """Base schedule: constant sparsity ``final`` from ``start`` on.

    Args:
        final: the sparsity reached at ``end``.
        initial: the sparsity at ``start`` (gradual schedules). Default 0.
        start: first update step (int) or fraction of the run (float). Default 0.
        end: last step of the ramp; None means the last step of the run.
        frequency: steps between mask updates (Zhu and Gupta's delta t). Default 1.
    """

    final: float = 0.0
    initial: float = 0.0
    start: int | float = 0
    end: int | float | None = None
    frequency: int = 1

    def __post_init__(self) -> None:
        check_sparsity(self.final, "final sparsity")
        check_sparsity(self.initial, "initial sparsity")
        if int(self.frequency) < 1:
            raise SparseforgeError(f"schedule frequency must be >= 1 step, got {self.frequency}")

    def resolve(self, total_steps: int | None) -> Schedule:
        """Return a copy with ``start``/``end`` as absolute integer steps."""

        def absolute(v: int | float | None, default: int | None) -> int | None:
            if v is None:
                return default
            if isinstance(v, float):
                if not 0.0 <= v <= 1.0:
                    raise SparseforgeError(
                        f"schedule step {v} is a float, read as a fraction of the run: it must be in [0, 1]"
                    )
                if total_steps is None:
                    raise SparseforgeError(
                        f"schedule step {v} is a fraction of the run; pass total_steps to the Sparsifier"
                    )
                return int(round(v * total_steps))
            if int(v) < 0:
                raise SparseforgeError(f"schedule step must be >= 0, got {v}")
            return int(v)

        start = absolute(self.start, 0)
        end = absolute(self.end, total_steps)
        if end is None:
            end = start
        if end < start:
            raise SparseforgeError(f"schedule end ({end}) is before its start ({start})")
        return replace(self, start=start, end=end)

    def ramp(self, progress: float) -> float:
        """Sparsity at ``progress`` in [0, 1] of the ramp from ``start`` to ``end``."""
        return self.final

    def sparsity(self, step: int) -> float:
        """Model-level sparsity at ``step`` (0 before ``start``, ``final`` after ``end``)."""
        start, end = int(self.start), int(self.end if self.end is not None else self.start)
        if step < start:
            return 0.0
        if step >= end:
            return self.final
        return self.ramp((step - start) / (end - start))

    def progress(self, step: int) -> float:
        """Position of ``step`` between ``start`` (0) and ``end`` (1), clamped."""
        start, end = int(self.start), int(self.end if self.end is not None else self.start)
        if end <= start:
            return 0.0 if step < start else 1.0
        return min(1.0, max(0.0, (step - start) / (end - start)))

    def should_update(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``."""
        start, end = int(self.start), int(self.end if self.end is not None else self.start)
        if step < start:
            return False
        if step > end:
            return False
        return (step - start) % int(self.frequency) == 0 or step == end


@SCHEDULES.register("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    """The same sparsity ``final`` at every step from ``start``; masks updated every
    ``frequency`` steps until ``end`` (used by sparse training from scratch: SET, RigL)."""

    def sparsity(self, step: int) -> float:
        return self.final if step >= int(self.start) else 0.0


@SCHEDULES.register("oneshot")
@dataclass(frozen=True)
class OneShot(Schedule):
    """Dense until step ``start`` (alias ``at``), then ``final`` at once, one mask update.

    Example:
        >>> s = OneShot(final=0.8, start=10).resolve(100)
        >>> s.sparsity(9), s.sparsity(10), s.should_update(10), s.should_update(11)
        (0.0, 0.8, True, False)
    """

    def resolve(self, total_steps: int | None) -> Schedule:
        return Schedule.resolve(replace(self, end=self.start), total_steps)

    def sparsity(self, step: int) -> float:
        return self.final if step >= int(self.start) else 0.0


@SCHEDULES.register("linear")
@dataclass(frozen=True)
class Linear(Schedule):
    """Sparsity rises linearly from ``initial`` at ``start`` to ``final`` at ``end``."""

    def ramp(self, progress: float) -> float:
        return self.initial + (self.final - self.initial) * progress


@SCHEDULES.register("cubic")
@dataclass(frozen=True)
class Cubic(Schedule):
    """The gradual pruning schedule of "To prune, or not to prune" (Zhu and Gupta, 2017).

    Rule: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` for
    ``t0 <= t <= t0 + n*dt``, with ``t0 = start``, ``n*dt = end - start`` and
    ``dt = frequency``: pruning is fast early, when redundant weights are
    plentiful, and slow near the end.

    Example:
        >>> s = Cubic(final=0.9, start=0, end=100, frequency=10).resolve(200)
        >>> round(s.sparsity(0), 4), round(s.sparsity(50), 4), s.sparsity(100), s.sparsity(150)
        (0.0, 0.7875, 0.9, 0.9)
    """

    def ramp(self, progress: float) -> float:
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3


def as_schedule(spec: Schedule | str, **kwargs) -> Schedule:
    """A Schedule, or one built from a name of :data:`SCHEDULES` (``constant``, ``oneshot``, ``linear``,
    ``cubic``) with its arguments.

    >>> as_schedule("one-shot", final=0.5, start=10)
    OneShot(final=0.5, initial=0.0, start=10, end=None, frequency=1)
    """
    if isinstance(spec, Schedule):
        return spec
    return SCHEDULES.get(str(spec))(**kwargs)
