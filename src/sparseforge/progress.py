"""Progress of long-running work: a live bar on a terminal, plain lines in a log.

One helper for every command and library function that shows progress
(model loading, calibration, pruning block by block, quality evaluation,
training, merging, writing). Progress always goes to **stderr**, so that
stdout holds only a command's result (``--json`` output stays pure JSON).

On a terminal (stderr is a tty) it is a ``rich`` display, erased when the
work ends: a bar with a count and the time left for counted work
(:meth:`Progress.task`), a pulsing bar with the time so far for a phase that
cannot be counted (:meth:`Progress.phase`: loading a model, evaluating).

Otherwise (a log file, CI, a notebook) it is plain lines, each prefixed
with the seconds since the reporter started, at a modest rate:

- a phase or task prints a line when it starts and one when it ends, with
  the seconds it took;
- while work goes on and nothing was printed for ``interval_s`` (default
  10 s), a status line: a counted task's ``k/N`` and time left, or a
  phase's time so far, so a log shows that something is happening even
  during one long step, without a line per step;
- nothing is shown during a reporter's first ``hold_s`` (default 10 s, the
  interval: a log is never silent longer while work goes on): a command
  that ends or fails sooner shows only its result or its one-line error,
  and one that runs longer gets the held lines then (with the times at
  which they happened) and the rest as they happen.

Library functions take ``progress: bool | Progress = False`` and pass it to
:func:`using`; the command line turns it on (one :class:`Progress` per
command, shared by its phases).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["HOLD_S", "INTERVAL_S", "Progress", "Task", "using"]

#: seconds of silence at the start of a plain-line reporter (see the module docstring)
HOLD_S = 10.0
#: seconds between plain progress lines while work goes on
INTERVAL_S = 10.0
#: how often the plain-line reporter's thread looks at the clock
_TICK_S = 0.25


def _seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: a duration for a log line."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


@dataclass
class Task:
    """One phase or counted task of a :class:`Progress` (what :meth:`Progress.task` yields)."""

    description: str
    total: int | None
    completed: int = 0
    info: str = ""
    started: float = field(default_factory=time.perf_counter)
    _owner: Progress | None = field(default=None, repr=False)
    _rich_id: Any = field(default=None, repr=False)

    def advance(self, n: int = 1, *, info: str | None = None, description: str | None = None) -> None:
        """``n`` more units done; ``info`` (e.g. ``"loss 0.412"``) replaces the text shown after the count."""
        self.update(self.completed + n, info=info, description=description)

    def update(self, completed: int | None = None, *, info: str | None = None,
               description: str | None = None) -> None:
        """Set the units done, the text after the count, or the description."""
        if completed is not None:
            self.completed = int(completed)
        if info is not None:
            self.info = info
        if description is not None:
            self.description = description
        if self._owner is not None:
            self._owner._changed(self)

    def finish(self, ok: bool = True) -> None:
        """End it (what leaving its ``with`` block does): the end line with its time, unless ``ok`` is False."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._finish(self, ok)

    def status(self, now: float) -> str:
        """The plain line for this task at ``now``: its count, percent and time left, or its time so far."""
        elapsed = now - self.started
        info = f"  {self.info}" if self.info else ""
        if self.total is None:
            return f"{self.description} ... {_seconds(elapsed)} so far{info}"
        text = f"{self.description}: {self.completed}/{self.total}"
        if self.total > 0:
            text += f" ({100.0 * self.completed / self.total:.0f}%)"
        text += f", {_seconds(elapsed)}"
        if 0 < self.completed < self.total:
            text += f", about {_seconds(elapsed / self.completed * (self.total - self.completed))} left"
        return text + info


class Progress:
    """Progress of one command or call: phases and counted tasks, on stderr.

    Args:
        enabled: False: every method does nothing (``--quiet``).
        stream: where progress goes (default ``sys.stderr`` at construction).
        terminal: a live ``rich`` display (True) or plain lines (False);
            default: whether ``stream`` is a terminal.
        interval_s: plain lines: seconds between lines while work goes on
            (default :data:`INTERVAL_S`).
        hold_s: plain lines: seconds of silence at the start (default
            :data:`HOLD_S`); see the module docstring.
        header: plain lines: a first line (e.g. the command and its thread
            count), held like the others.

    Use it as a context manager (or call :meth:`close`): closing stops the
    display and the plain-line thread, so that nothing is printed after it
    (an error message comes after the last progress line, never inside one).
    """

    def __init__(self, enabled: bool = True, *, stream: TextIO | None = None, terminal: bool | None = None,
                 interval_s: float | None = None, hold_s: float | None = None, header: str | None = None) -> None:
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        if terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                terminal = bool(isatty()) if isatty is not None else False
            except (ValueError, OSError):  # a closed or odd stream
                terminal = False
        self.terminal = terminal
        self.interval_s = INTERVAL_S if interval_s is None else float(interval_s)
        self.hold_s = HOLD_S if hold_s is None else float(hold_s)
        self.started = time.perf_counter()
        self._active: list[Task] = []
        self._lock = threading.RLock()
        self._held: list[str] | None = []  # None once released: lines are then written as they come
        self._last_line = self.started
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._rich: Any = None
        self._closed = False
        if self.enabled and header and not self.terminal:
            self._line(header)

    # -- public -------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, description: str) -> Iterator[Task]:
        """A stretch of work that cannot be counted (loading a model, evaluating): start and end lines."""
        with self._activity(description, None) as t:
            yield t

    @contextlib.contextmanager
    def task(self, description: str, total: int, *, completed: int = 0, info: str = "") -> Iterator[Task]:
        """Counted work of ``total`` units (blocks, steps, tensors); advance the yielded :class:`Task`."""
        with self._activity(description, int(total), completed, info) as t:
            yield t

    def start(self, description: str, total: int | None = None, *, completed: int = 0, info: str = "") -> Task:
        """:meth:`task` (or :meth:`phase` without ``total``) for code that cannot use a ``with`` block.

        End it with :meth:`Task.finish`; :meth:`close` ends what is left (without end lines).
        """
        t = Task(description, None if total is None else int(total), int(completed), info)
        if not self.enabled or self._closed:
            return t
        with self._lock:
            t._owner = self
            self._active.append(t)
            if self.terminal:
                self._rich_add(t)
            else:
                self._line(f"{description} ..." if total is None else t.status(t.started))
                self._start_thread()
        return t

    def close(self) -> None:
        """Stop the display and the line thread; held lines of a short run are dropped (see the module docstring)."""
        with self._lock:
            for t in list(self._active):
                t.finish(ok=False)
            self._closed = True
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._stop_rich()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- activities -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _activity(self, description: str, total: int | None, completed: int = 0, info: str = "") -> Iterator[Task]:
        t = self.start(description, total, completed=completed, info=info)
        try:
            yield t
        except BaseException:
            t.finish(ok=False)  # on an error the error message says the rest
            raise
        t.finish()

    def _finish(self, t: Task, ok: bool) -> None:
        with self._lock:
            if t not in self._active:
                return
            self._active.remove(t)
            if self.terminal:
                self._rich_remove(t)
            elif ok:
                took = _seconds(time.perf_counter() - t.started)
                info = f"  {t.info}" if t.info else ""
                done = "" if t.total is None else f" {t.completed}/{t.total}"
                self._line(f"{t.description}:{done} done in {took}{info}")

    def _changed(self, t: Task) -> None:
        if self.terminal:
            with self._lock:
                if self._rich is not None and t._rich_id is not None:
                    self._rich.update(t._rich_id, completed=t.completed, description=t.description,
                                      info=t.info, count=self._count(t))

    # -- plain lines ----------------------------------------------------------------------

    def _line(self, text: str) -> None:
        with self._lock:
            now = time.perf_counter()
            line = f"[{now - self.started:6.1f}s] {text}\n"
            self._last_line = now
            if self._held is not None and now - self.started < self.hold_s:
                self._held.append(line)
                return
            self._release()
            self._write(line)

    def _release(self) -> None:
        if self._held:
            self._write("".join(self._held))
        self._held = None

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not end the work it reports on
            pass

    def _start_thread(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._tick, name="sparseforge-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(_TICK_S):
            with self._lock:
                if self._closed:
                    return
                now = time.perf_counter()
                if self._held is not None and now - self.started >= self.hold_s:
                    self._release()
                if self._active and now - self._last_line >= self.interval_s:
                    self._line(self._active[-1].status(now))

    # -- rich ---------------------------------------------------------------------------

    @staticmethod
    def _count(t: Task) -> str:
        return "" if t.total is None else f"{t.completed}/{t.total}"

    def _rich_add(self, t: Task) -> None:
        if self._rich is None:
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stream, force_terminal=True, highlight=False)
            stdout_tty = False
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stdout_tty = sys.stdout.isatty()
            # Printing to stdout while the display runs goes above it when both are this terminal;
            # when stdout is a file it must stay there (rich would send it to the display's stream).
            self._rich = RichProgress(
                *_rich_columns(), console=console, transient=True, redirect_stdout=stdout_tty, redirect_stderr=True,
            )
            self._rich.start()
        t._rich_id = self._rich.add_task(t.description, total=t.total, completed=t.completed, info=t.info,
                                         count=self._count(t))

    def _rich_remove(self, t: Task) -> None:
        if self._rich is not None and t._rich_id is not None:
            self._rich.remove_task(t._rich_id)
            t._rich_id = None
            if not self._active:
                self._stop_rich()

    def _stop_rich(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def _rich_columns() -> list[Any]:
    """The terminal display's columns: description, bar, ``k/N``, time so far, time left, info."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Remaining(ProgressColumn):
        """Time left of a counted task; nothing for a phase."""

        def render(self, task: Any) -> Text:
            left = task.time_remaining
            if task.total is None or left is None or not math.isfinite(left):
                return Text("")
            return Text(f"{_seconds(left)} left")

    return [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
            Remaining(), TextColumn("{task.fields[info]}")]


_DISABLED = Progress(enabled=False, stream=sys.__stderr__ or sys.stderr, terminal=False)


def using(progress: bool | Progress | None) -> contextlib.AbstractContextManager[Progress]:
    """The :class:`Progress` a library function reports to, as a context manager.

    A :class:`Progress` given by the caller is used as it is (the caller
    closes it); True makes a new one, closed when the block ends; False or
    None a disabled one.
    """
    if isinstance(progress, Progress):
        return contextlib.nullcontext(progress)
    if progress:
        return Progress()
    return contextlib.nullcontext(_DISABLED)
