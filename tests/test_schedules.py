"""Tests for the Schedule part: values at known steps, update steps, fractions, bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseforge import Constant, Cubic, Linear, OneShot, SparseforgeError
from sparseforge.schedules import Schedule, as_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = settings(max_examples=40, deadline=None)


def zhu_gupta(t: int, s_i: float, s_f: float, t0: int, n_dt: int) -> float:
    """s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 on [t0, t0 + n dt]; 0 before, s_f after."""
    if t < t0:
        return 0.0
    if t >= t0 + n_dt:
        return s_f
    return s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** 3


def updates(schedule: Schedule, steps: int) -> list[int]:
    return [t for t in range(steps + 1) if schedule.should_update(t)]


# --------------------------------------------------------------------------- values


def test_constant() -> None:
    s = Constant(final=0.7, start=5, frequency=10).resolve(100)
    assert [s.sparsity(t) for t in (0, 4, 5, 6, 50, 100, 500)] == [0.0, 0.0, 0.7, 0.7, 0.7, 0.7, 0.7]
    assert updates(s, 120) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95, 100]


def test_oneshot() -> None:
    s = OneShot(final=0.8, start=10).resolve(100)
    assert [s.sparsity(t) for t in (0, 9, 10, 11, 100)] == [0.0, 0.0, 0.8, 0.8, 0.8]
    assert updates(s, 100) == [10]
    # Even with a frequency and an explicit end, one shot means one update.
    s = OneShot(final=0.5, start=3, end=50, frequency=2).resolve(100)
    assert updates(s, 100) == [3]
    # A fraction of the run.
    s = OneShot(final=0.5, start=0.5).resolve(40)
    assert s.start == 20 and updates(s, 40) == [20] and s.sparsity(19) == 0.0 and s.sparsity(20) == 0.5


def test_linear() -> None:
    s = Linear(final=0.8, initial=0.2, start=10, end=50, frequency=5).resolve(100)
    assert s.sparsity(9) == 0.0
    assert s.sparsity(10) == pytest.approx(0.2)
    assert s.sparsity(20) == pytest.approx(0.2 + 0.6 * 0.25)
    assert s.sparsity(30) == pytest.approx(0.5)
    assert s.sparsity(50) == pytest.approx(0.8) and s.sparsity(99) == pytest.approx(0.8)
    assert updates(s, 100) == [10, 15, 20, 25, 30, 35, 40, 45, 50]


def test_cubic_known_values() -> None:
    s = Cubic(final=0.9, start=0, end=100, frequency=10).resolve(200)
    assert s.sparsity(0) == 0.0
    assert s.sparsity(25) == pytest.approx(0.9 - 0.9 * 0.75**3)  # 0.5203125
    assert s.sparsity(50) == pytest.approx(0.7875)
    assert s.sparsity(90) == pytest.approx(0.9 - 0.9 * 0.1**3)
    assert s.sparsity(100) == 0.9 and s.sparsity(150) == 0.9
    # With an initial sparsity and a late start.
    s = Cubic(final=0.95, initial=0.5, start=20, end=60, frequency=4).resolve(100)
    assert s.sparsity(19) == 0.0
    assert s.sparsity(20) == pytest.approx(0.5)
    assert s.sparsity(40) == pytest.approx(0.95 - 0.45 * 0.125)


@FAST
@given(
    s_f=st.floats(0.0, 0.99),
    s_i_frac=st.floats(0.0, 1.0),
    t0=st.integers(0, 50),
    n=st.integers(1, 20),
    dt=st.integers(1, 10),
)
def test_cubic_is_zhu_gupta(s_f: float, s_i_frac: float, t0: int, n: int, dt: int) -> None:
    s_i = s_i_frac * s_f
    s = Cubic(final=s_f, initial=s_i, start=t0, end=t0 + n * dt, frequency=dt).resolve(None)
    values = [s.sparsity(t) for t in range(t0 + n * dt + 5)]
    for t, v in enumerate(values):
        assert v == pytest.approx(zhu_gupta(t, s_i, s_f, t0, n * dt), abs=1e-12)
    # Non-decreasing from the start on; masks updated exactly every dt steps t0 .. t0 + n dt.
    assert all(a <= b + 1e-12 for a, b in zip(values[t0:], values[t0 + 1 :]))
    assert updates(s, t0 + n * dt + 5) == [t0 + j * dt for j in range(n + 1)]


# --------------------------------------------------------------------------- update steps


def test_should_update_start_frequency_end() -> None:
    s = Cubic(final=0.9, start=10, end=55, frequency=10).resolve(100)
    assert updates(s, 100) == [10, 20, 30, 40, 50, 55]
    assert not s.should_update(9) and not s.should_update(56) and not s.should_update(60)
    # Start == end: a single update.
    s = Cubic(final=0.5, start=7, end=7).resolve(20)
    assert updates(s, 20) == [7] and s.sparsity(6) == 0.0 and s.sparsity(7) == 0.5


def test_fractions_resolved_against_total_steps() -> None:
    s = Cubic(final=0.9, start=0.1, end=0.75, frequency=5).resolve(200)
    assert (s.start, s.end) == (20, 150)
    assert s.sparsity(150) == 0.9 and s.sparsity(85) == pytest.approx(0.9 - 0.9 * 0.5**3)
    # end defaults to the last step of the run.
    s = Linear(final=0.6).resolve(30)
    assert (s.start, s.end) == (0, 30) and s.sparsity(15) == pytest.approx(0.3)
    # 1.0 is a fraction (the whole run); 1 is a step.
    assert Cubic(final=0.5, end=1.0).resolve(40).end == 40
    assert Cubic(final=0.5, end=1).resolve(40).end == 1
    # Without total_steps, end defaults to start.
    assert Cubic(final=0.5, start=3).resolve(None).end == 3


def test_fraction_needs_total_steps() -> None:
    with pytest.raises(SparseforgeError, match="total_steps"):
        Cubic(final=0.5, end=0.75).resolve(None)


@pytest.mark.parametrize("bad", [1.5, -0.25])
def test_fraction_outside_unit_interval(bad: float) -> None:
    with pytest.raises(SparseforgeError, match=r"\[0, 1\]"):
        Cubic(final=0.5, end=bad).resolve(100)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [Constant, OneShot, Linear, Cubic])
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval(cls, bad: float) -> None:
    with pytest.raises(SparseforgeError, match="final sparsity"):
        cls(final=bad)
    with pytest.raises(SparseforgeError, match="initial sparsity"):
        cls(final=0.5, initial=bad)


@pytest.mark.parametrize("frequency", [0, -1])
def test_frequency_must_be_positive(frequency: int) -> None:
    with pytest.raises(SparseforgeError, match="frequency"):
        Cubic(final=0.5, frequency=frequency)


def test_end_before_start() -> None:
    with pytest.raises(SparseforgeError, match=r"end \(5\) is before its start \(10\)"):
        Cubic(final=0.5, start=10, end=5).resolve(100)
    with pytest.raises(SparseforgeError, match="before its start"):
        Linear(final=0.5, start=0.8, end=0.2).resolve(100)


def test_negative_step() -> None:
    with pytest.raises(SparseforgeError, match=">= 0"):
        Cubic(final=0.5, start=-3, end=10).resolve(100)


def test_as_schedule() -> None:
    assert as_schedule("Cubic", final=0.5) == Cubic(final=0.5)
    assert as_schedule("one-shot", final=0.3, start=2) == OneShot(final=0.3, start=2)
    s = Linear(final=0.1)
    assert as_schedule(s) is s
    with pytest.raises(SparseforgeError, match="unknown schedule 'exponential'"):
        as_schedule("exponential", final=0.5)
